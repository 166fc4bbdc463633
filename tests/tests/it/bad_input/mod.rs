//! The bad-input suite: one corpus ([`corpus::common`]) plus what only each wire can say,
//! published with each broker's own client (the embedded file written with SQLite, lapin,
//! aws-sdk-sqs), never through `send`, then drained by one charge-payment worker per
//! transport. Each bad message ends on the dead-letter queue at once (one attempt, class
//! `permanent`) with a reason in words and its bytes intact; each valid one is charged once;
//! the worker drains everything and exits 0; the run summary counts every dead letter under
//! its label.

mod corpus;

use std::collections::BTreeMap;

use corpus::{Case, Expect, LIMITS};

use crate::support::{pending, wait_exit, FunctionRun};

/// Longest the worker may take to drain the corpus (it needs a few seconds).
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// A message as published: where to find it on the dead-letter queue (its id, when the test
/// knows it; else by its body) and the bytes it must keep.
struct Sent {
    name: String,
    id: Option<String>,
    body: Vec<u8>,
    expect: Expect,
}

impl Sent {
    fn of(case: &Case, id: Option<String>) -> Self {
        Self {
            name: case.name.clone(),
            id,
            body: case.body.clone(),
            expect: case.expect,
        }
    }
}

/// Texts that would mean a reason is a debug dump rather than words.
const DUMPS: [&str; 8] = [
    "FieldArray",
    "LongString",
    "LongInt",
    "ShortString",
    "Blob",
    "MessageAttributeValue",
    "Some(",
    "{\"",
];

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn body_of(entry: &serde_json::Value) -> Vec<u8> {
    match entry["body"].as_str() {
        Some(text) => text.as_bytes().to_vec(),
        None => unhex(entry["body_hex"].as_str().expect("body or body_hex")),
    }
}

fn charges_of(run: &FunctionRun, payment_id: &str) -> i64 {
    let conn = rusqlite::Connection::open(run.sandbox.ledger_db()).expect("the ledger");
    conn.query_row(
        "SELECT COUNT(*) FROM charges WHERE payment_id = ?1",
        [payment_id],
        |r| r.get(0),
    )
    .expect("count charges")
}

/// Drains the queue with one worker and checks every message's fate (see the module doc).
async fn drain_and_check(run: &FunctionRun, sent: &[Sent]) {
    let summary_path = run.path("summary.json");
    let summary_arg = summary_path.display().to_string();
    let mut args = vec!["--drain", "--summary", summary_arg.as_str()];
    for l in LIMITS {
        args.extend(["--set", l]);
    }
    let mut worker = run.worker(&args, "worker.log");
    let status = wait_exit(&mut worker, DRAIN_TIMEOUT, Some(&run.path("worker.log"))).await;
    assert!(
        status.success(),
        "the worker stays up and drains the corpus: {status:?}; see {}",
        run.path("worker.log").display()
    );
    let log = run.log("worker.log");
    assert!(!log.contains("panicked at"), "no panic: {log}");

    let stats = run.stats();
    assert_eq!(pending(&stats), 0, "nothing left: {stats}");
    let dlq = run.json(&["dlq", "list", "--json", "--limit", "1000"]);
    let dlq = dlq.as_array().expect("a list").clone();
    let mut expected_labels: BTreeMap<String, u64> = BTreeMap::new();
    let (mut dead, mut duplicates) = (0, 0);
    // Every message is checked and every miss listed, so one run shows them all.
    let mut misses = Vec::new();
    for s in sent {
        match s.expect {
            Expect::Dead { label, words } => {
                dead += 1;
                *expected_labels.entry(label.to_owned()).or_default() += 1;
                let Some(entry) = dlq.iter().find(|e| match &s.id {
                    Some(id) => e["id"] == id.as_str(),
                    None => body_of(e) == s.body,
                }) else {
                    misses.push(format!("{}: not on the dead-letter queue", s.name));
                    continue;
                };
                let reason = entry["last_error"].as_str().unwrap_or_default();
                if body_of(entry) != s.body {
                    misses.push(format!("{}: bytes changed", s.name));
                }
                if entry["error_class"] != "permanent" || entry["attempts"] != 1 {
                    misses.push(format!("{}: not permanent at once: {entry}", s.name));
                }
                if !reason.contains(words) {
                    misses.push(format!("{}: {reason:?} does not say {words:?}", s.name));
                }
                if let Some(dump) = DUMPS.iter().find(|d| reason.contains(**d)) {
                    misses.push(format!("{}: {dump:?} dumped in {reason:?}", s.name));
                }
            }
            Expect::Bare { label } => {
                dead += 1;
                *expected_labels.entry(label.to_owned()).or_default() += 1;
                if !dlq.iter().any(|e| body_of(e) == s.body) {
                    misses.push(format!("{}: not on the dead-letter queue", s.name));
                }
            }
            Expect::Handled { payment_id } => {
                let n = charges_of(run, payment_id);
                if n != 1 {
                    misses.push(format!("{}: charged {n} times, not once", s.name));
                }
            }
            Expect::Duplicate => duplicates += 1,
        }
    }
    assert!(
        misses.is_empty(),
        "{} misses:\n{}",
        misses.len(),
        misses.join("\n")
    );
    assert_eq!(dlq.len(), dead, "only the bad input is dead-lettered");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary_path).expect("the summary"))
            .expect("summary JSON");
    assert_eq!(summary["received"], sent.len() as u64, "{summary}");
    assert_eq!(summary["dead_lettered"], dead as u64, "{summary}");
    assert_eq!(summary["duplicates_skipped"], duplicates, "{summary}");
    let labels: BTreeMap<String, u64> =
        serde_json::from_value(summary["dead_letter_reasons"].clone()).expect("reasons");
    assert_eq!(
        labels, expected_labels,
        "every dead letter counted by label"
    );
    assert_eq!(run.ledger().replays, 0, "no duplicate reached the gateway");
    eprintln!(
        "bad input: {} messages, {dead} dead-lettered, {} handled",
        sent.len(),
        sent.len() - dead
    );
}

fn dead(label: &'static str, words: &'static str) -> Expect {
    Expect::Dead { label, words }
}

fn special(name: &str, body: impl Into<Vec<u8>>, expect: Expect) -> Case {
    Case {
        name: name.to_owned(),
        body: body.into(),
        headers: Vec::new(),
        expect,
    }
}

mod embedded {
    //! The embedded queue: rows written into the file with SQLite, as another tool would.

    use rusqlite::{params, types::Value};

    use super::*;

    fn insert(run: &FunctionRun, id: Value, body: Value, headers: Value, envelope: Value) {
        insert_row(
            run,
            id,
            body,
            headers,
            envelope,
            Value::Integer(0),
            Value::Integer(0),
        );
    }

    fn insert_row(
        run: &FunctionRun,
        id: Value,
        body: Value,
        headers: Value,
        envelope: Value,
        receive_count: Value,
        enqueued_at: Value,
    ) {
        let conn = rusqlite::Connection::open(run.sandbox.queue_db()).expect("the queue file");
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .unwrap();
        conn.execute(
            "INSERT INTO messages (id, queue, body, headers, envelope, enqueued_at, visible_at, receive_count)
             VALUES (?1, 'charge-payment', ?2, ?3, ?4, ?5, 0, ?6)",
            params![id, body, headers, envelope, enqueued_at, receive_count],
        )
        .expect("insert a row");
    }

    fn text(s: &str) -> Value {
        Value::Text(s.to_owned())
    }

    #[tokio::test]
    async fn every_bad_row_is_dead_lettered_at_once_with_its_bytes_and_a_reason() {
        let run = FunctionRun::new("charge-payment");
        // Creates the file and its schema.
        run.stats();
        let mut sent = Vec::new();
        for (i, case) in corpus::common(false).iter().enumerate() {
            let id = format!("bi-{i}");
            let headers: serde_json::Map<String, serde_json::Value> = case
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone().into()))
                .collect();
            insert(
                &run,
                text(&id),
                Value::Blob(case.body.clone()),
                text(&serde_json::Value::Object(headers).to_string()),
                text("{}"),
            );
            sent.push(Sent::of(case, Some(id)));
        }
        let ok = corpus::valid;
        let header_cases: [(&str, Value, Expect); 5] = [
            (
                "headers column not JSON",
                text("x-a=1"),
                dead("malformed header", "the headers column is not JSON"),
            ),
            (
                "headers column an array",
                text(r#"["x-a"]"#),
                dead(
                    "malformed header",
                    "expected a JSON object of texts, got an array",
                ),
            ),
            (
                "header value a number",
                text(r#"{"x-n":7}"#),
                dead(
                    "malformed header",
                    "header \"x-n\": expected a text value, got a number",
                ),
            ),
            (
                "header value an object",
                text(r#"{"idempotency-key":{"k":1}}"#),
                dead("malformed header", "expected a text value, got an object"),
            ),
            (
                "headers column a non-UTF-8 blob",
                Value::Blob(vec![0xff, 0x7b]),
                dead("malformed header", "not UTF-8"),
            ),
        ];
        for (i, (name, headers, expect)) in header_cases.into_iter().enumerate() {
            let c = special(name, ok(&format!("bi-eh{i}")), expect);
            let id = format!("bi-eh{i}");
            insert(
                &run,
                text(&id),
                Value::Blob(c.body.clone()),
                headers,
                text("{}"),
            );
            sent.push(Sent::of(&c, Some(id)));
        }
        let envelope_cases = [
            ("envelope not JSON", "garbage", "not a JSON object"),
            (
                "envelope count overflowing u32",
                r#"{"sluice-retries":"4294967296"}"#,
                "is larger than 4294967295",
            ),
            (
                "envelope count negative",
                r#"{"sluice-retries":"-1"}"#,
                "decimal digits",
            ),
            (
                "envelope due a century ahead",
                r#"{"sluice-due-at":"2126-01-01T00:00:00Z"}"#,
                "more than a year ahead",
            ),
            (
                "envelope part of a history",
                r#"{"sluice-first-failure-at":"2026-01-01T00:00:00Z"}"#,
                "incomplete failure history",
            ),
            (
                "envelope unknown field",
                r#"{"sluice-bogus":"1"}"#,
                "is not a Sluice field",
            ),
        ];
        for (i, (name, envelope, words)) in envelope_cases.into_iter().enumerate() {
            let c = special(
                name,
                ok(&format!("bi-ee{i}")),
                dead("malformed envelope", words),
            );
            let id = format!("bi-ee{i}");
            insert(
                &run,
                text(&id),
                Value::Blob(c.body.clone()),
                text("{}"),
                text(envelope),
            );
            sent.push(Sent::of(&c, Some(id)));
        }
        // Columns of another type than ours: read for what they hold.
        let c = special(
            "body stored as TEXT",
            ok("bi-et1"),
            Expect::Handled {
                payment_id: "bi-et1",
            },
        );
        insert(
            &run,
            text("bi-et1"),
            text(&ok("bi-et1")),
            text("{}"),
            text("{}"),
        );
        sent.push(Sent::of(&c, Some("bi-et1".into())));
        let c = special(
            "body stored as TEXT, not JSON",
            "plain text body",
            dead("malformed JSON", "body is not JSON"),
        );
        insert(
            &run,
            text("bi-et2"),
            text("plain text body"),
            text("{}"),
            text("{}"),
        );
        sent.push(Sent::of(&c, Some("bi-et2".into())));
        let c = special(
            "id stored as an integer",
            ok("bi-et3"),
            Expect::Handled {
                payment_id: "bi-et3",
            },
        );
        insert(
            &run,
            Value::Integer(4242),
            Value::Blob(c.body.clone()),
            text("{}"),
            text("{}"),
        );
        sent.push(Sent::of(&c, Some("4242".into())));
        let c = special(
            "counts and times stored as text",
            ok("bi-et4"),
            Expect::Handled {
                payment_id: "bi-et4",
            },
        );
        insert_row(
            &run,
            text("bi-et4"),
            Value::Blob(c.body.clone()),
            text("{}"),
            text("{}"),
            text("lots"),
            text("soon"),
        );
        sent.push(Sent::of(&c, Some("bi-et4".into())));

        assert!(sent.len() >= 40, "{} messages", sent.len());
        drain_and_check(&run, &sent).await;
    }
}

#[cfg(feature = "rabbitmq")]
mod rabbitmq;
#[cfg(feature = "sqs")]
mod sqs;
