//! What the SDK's errors mean here: a receipt handle SQS no longer knows is a lost lease; the
//! rest is a broker failure, with the SDK's whole text as its cause.

use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

use crate::{error::Error, message::Delivery};

/// An SDK error of a settling call, kept until we know whether it means "lease lost".
pub(super) struct SdkErr {
    pub(super) op: &'static str,
    pub(super) queue: String,
    pub(super) code: Option<String>,
    pub(super) message: Option<String>,
    pub(super) text: String,
}

impl SdkErr {
    pub(super) fn new<E>(op: &'static str, queue: &str, e: SdkError<E>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        Self {
            op,
            queue: queue.to_owned(),
            code: code(&e).map(str::to_owned),
            message: e
                .as_service_error()
                .and_then(|s| s.message())
                .map(str::to_owned),
            text: DisplayErrorContext(&e).to_string(),
        }
    }

    /// The receipt handle is gone: deleted, moved, expired, or never ours.
    fn receipt_gone(&self) -> bool {
        let message = self
            .message
            .as_deref()
            .unwrap_or_default()
            .to_ascii_lowercase();
        match self.code.as_deref() {
            Some(
                "ReceiptHandleIsInvalid"
                | "AWS.SimpleQueueService.ReceiptHandleIsInvalid"
                | "MessageNotInflight"
                | "AWS.SimpleQueueService.MessageNotInflight"
                | "InvalidIdFormat",
            ) => true,
            Some("InvalidParameterValue") => {
                message.contains("receipt handle") || message.contains("receipthandle")
            }
            _ => false,
        }
    }

    fn visibility_cap(&self) -> bool {
        self.code.as_deref() == Some("InvalidParameterValue")
            && self
                .message
                .as_deref()
                .unwrap_or_default()
                .contains("VisibilityTimeout")
    }
}

impl std::fmt::Display for SdkErr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sqs: {} {}: {}", self.op, self.queue, self.text)
    }
}

pub(super) fn lost_or(e: SdkErr, d: &Delivery) -> Error {
    if e.receipt_gone() {
        Error::LeaseLost(d.id.clone())
    } else if e.visibility_cap() {
        Error::Limit(e.to_string())
    } else {
        Error::transport_msg(e.to_string())
    }
}

pub(super) fn code<E: ProvideErrorMetadata>(e: &SdkError<E>) -> Option<&str> {
    e.as_service_error().and_then(|s| s.code())
}

pub(super) fn is_queue_missing<E: ProvideErrorMetadata>(e: &SdkError<E>) -> bool {
    matches!(
        code(e),
        Some("QueueDoesNotExist" | "AWS.SimpleQueueService.NonExistentQueue")
    )
}

pub(super) fn sdk_err<E>(op: &str, queue: &str, e: SdkError<E>) -> Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    // DisplayErrorContext walks the SDK's own chain (dispatch failure, service error, ...),
    // which its Display alone does not print.
    let text = DisplayErrorContext(&e).to_string();
    Error::transport(format!("sqs: {op} {queue}"), SdkText(text))
}

/// The SDK error's whole text, as the cause of our error.
#[derive(Debug)]
struct SdkText(String);

impl std::fmt::Display for SdkText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SdkText {}
