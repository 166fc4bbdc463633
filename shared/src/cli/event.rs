//! `invoke --file event.json` with a Lambda SQS event: each record's body through the handler,
//! as Lambda mode would run it, and the partial batch response printed, so a Lambda function
//! can be tried locally without the emulators. No queue and no idempotency record are used:
//! a transient failure is reported in `batchItemFailures` (Lambda would deliver the record
//! again), a permanent one is not (Lambda mode dead-letters it), and each record's outcome is
//! one line on stderr.

use serde_json::{json, Value};

use super::Outcome;
use crate::{handler::ErrorKind, worker::Handle};

/// The records of an SQS event, if `body` is one: `(messageId, body)`.
pub(super) fn sqs_records(body: &[u8]) -> Option<Vec<(String, String)>> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let records = v.get("Records")?.as_array()?;
    let from_sqs = !records.is_empty()
        && records
            .iter()
            .all(|r| r.get("eventSource").and_then(Value::as_str) == Some("aws:sqs"));
    if !from_sqs {
        return None;
    }
    Some(
        records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let id = r
                    .get("messageId")
                    .and_then(Value::as_str)
                    .map_or_else(|| format!("record-{i}"), str::to_owned);
                let body = r.get("body").and_then(Value::as_str).unwrap_or_default();
                (id, body.to_owned())
            })
            .collect(),
    )
}

/// Runs each record and prints the batch response; `HandlerFailed` if any record failed.
pub(super) async fn invoke_records(handle: &Handle<'_>, records: Vec<(String, String)>) -> Outcome {
    let mut failures = Vec::new();
    let mut failed = false;
    for (id, body) in records {
        match handle.invoke(body.as_bytes()).await {
            Ok(output) => eprintln!("record {id}: ok {}", String::from_utf8_lossy(&output)),
            Err(e) => {
                failed = true;
                let (class, reported) = match e.kind {
                    ErrorKind::Transient => ("transient", true),
                    ErrorKind::RetryAfter(_) => ("retry_after", true),
                    ErrorKind::Permanent => ("permanent", false),
                };
                let what = if reported {
                    "reported: Lambda delivers it again"
                } else {
                    "not reported: Lambda mode dead-letters it"
                };
                eprintln!("record {id}: {class}: {} ({what})", e.message);
                if reported {
                    failures.push(json!({ "itemIdentifier": id }));
                }
            }
        }
    }
    println!("{}", json!({ "batchItemFailures": failures }));
    if failed {
        Outcome::HandlerFailed
    } else {
        Outcome::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_sqs_event_is_taken_as_records() {
        let event = br#"{"Records":[{"messageId":"m-1","eventSource":"aws:sqs","body":"{\"a\":1}"},
            {"eventSource":"aws:sqs","body":"x"}]}"#;
        assert_eq!(
            sqs_records(event).unwrap(),
            vec![
                ("m-1".to_owned(), "{\"a\":1}".to_owned()),
                ("record-1".to_owned(), "x".to_owned())
            ]
        );
        for not in [
            &br#"{"Records":[{"eventSource":"aws:s3"}]}"#[..],
            br#"{"Records":[]}"#,
            br#"{"payment_id":"p-1"}"#,
            b"not json",
        ] {
            assert_eq!(sqs_records(not), None);
        }
    }
}
