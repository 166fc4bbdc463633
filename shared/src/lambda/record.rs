//! One record of an SQS event as a delivery: decoded exactly as the SQS transport decodes a
//! received message (the envelope in `sluice-meta`, encoded bodies, other `sluice-*` attributes
//! passed on to be rejected as forged), with the invocation's deadline as its lease end.

use std::{collections::HashMap, time::SystemTime};

use aws_lambda_events::event::sqs::SqsMessage;
use aws_sdk_sqs::types::{Message, MessageAttributeValue, MessageSystemAttributeName};

use crate::{
    error::{Error, Result},
    message::Delivery,
    transport::sqs::{decode_message, SqsTransport},
};

/// The delivery of one record; a record without an id or a receipt handle, or from another
/// source than SQS, is refused.
pub(super) fn delivery(
    queue: &SqsTransport,
    record: &SqsMessage,
    deadline_ms: u64,
) -> Result<Delivery> {
    let decoded = decode_message(&to_message(record)?, SystemTime::now());
    Ok(queue.lambda_delivery(decoded, i64::try_from(deadline_ms).unwrap_or(i64::MAX)))
}

/// The record as the SQS message it stands for.
pub(crate) fn to_message(record: &SqsMessage) -> Result<Message> {
    // An event source mapping only hands over its queue's messages: a record of another
    // source (an S3 or SNS record pasted into the event) is not one of them.
    if let Some(source) = record.event_source.as_deref().filter(|s| *s != "aws:sqs") {
        return Err(Error::Invalid(format!(
            "a record from {source:?}, not from SQS (eventSource aws:sqs)"
        )));
    }
    let missing = |what: &str| Error::Invalid(format!("SQS record without {what}"));
    let id = record
        .message_id
        .clone()
        .ok_or_else(|| missing("messageId"))?;
    let handle = record
        .receipt_handle
        .clone()
        .ok_or_else(|| missing("receiptHandle"))?;
    // Lambda names the system attributes as SQS does (ApproximateReceiveCount, ...).
    let system: HashMap<MessageSystemAttributeName, String> = record
        .attributes
        .iter()
        .map(|(k, v)| (MessageSystemAttributeName::from(k.as_str()), v.clone()))
        .collect();
    let mut attributes = HashMap::new();
    for (name, a) in &record.message_attributes {
        let mut value = MessageAttributeValue::builder()
            .data_type(a.data_type.clone().unwrap_or_else(|| "String".into()));
        if let Some(s) = &a.string_value {
            value = value.string_value(s);
        }
        if let Some(b) = &a.binary_value {
            value = value.binary_value(aws_sdk_sqs::primitives::Blob::new(b.to_vec()));
        }
        let value = value
            .build()
            .map_err(|e| Error::Invalid(format!("message attribute {name:?}: {e}")))?;
        attributes.insert(name.clone(), value);
    }
    Ok(Message::builder()
        .message_id(id)
        .receipt_handle(handle)
        .body(record.body.clone().unwrap_or_default())
        .set_attributes(Some(system))
        .set_message_attributes(Some(attributes))
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(json: &str) -> SqsMessage {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_record_of_another_source_or_without_its_ids_is_refused_in_words() {
        let ok =
            record(r#"{"messageId":"m","receiptHandle":"h","eventSource":"aws:sqs","body":"{}"}"#);
        assert_eq!(to_message(&ok).unwrap().body(), Some("{}"));
        let s3 = record(r#"{"messageId":"m","receiptHandle":"h","eventSource":"aws:s3"}"#);
        let err = to_message(&s3).unwrap_err().to_string();
        assert!(
            err.contains("a record from \"aws:s3\", not from SQS"),
            "{err}"
        );
        let no_id = record(r#"{"receiptHandle":"h","eventSource":"aws:sqs"}"#);
        assert!(to_message(&no_id)
            .unwrap_err()
            .to_string()
            .contains("messageId"));
    }
}
