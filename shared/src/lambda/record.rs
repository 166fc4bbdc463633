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

/// The delivery of one record; a record without an id or a receipt handle is refused.
pub(super) fn delivery(
    queue: &SqsTransport,
    record: &SqsMessage,
    deadline_ms: u64,
) -> Result<Delivery> {
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
    let message = Message::builder()
        .message_id(id)
        .receipt_handle(handle)
        .body(record.body.clone().unwrap_or_default())
        .set_attributes(Some(system))
        .set_message_attributes(Some(attributes))
        .build();
    let decoded = decode_message(&message, SystemTime::now());
    Ok(queue.lambda_delivery(decoded, i64::try_from(deadline_ms).unwrap_or(i64::MAX)))
}
