//! The queues' names and settings, and SQS's limits, checked before any call. Message quotas:
//! <https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/quotas-messages.html>;
//! queue quotas (names):
//! <https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/quotas-queues.html>.

use std::time::Duration;

use aws_sdk_sqs::config::{timeout::TimeoutConfig, BehaviorVersion};

use crate::{
    error::{Error, Result},
    transport::TransportOptions,
};

/// Largest message: the body plus every attribute's name, type and value (SQS counts them all).
/// The queues are provisioned with the same `MaximumMessageSize` (moto defaults to 1 MiB).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Entries in one `SendMessageBatch`, `DeleteMessageBatch` or `ChangeMessageVisibilityBatch`
/// (moto accepts 11 in the last two; we never send more than 10).
pub const MAX_BATCH_ENTRIES: usize = 10;
/// Sum of the message sizes in one `SendMessageBatch` request.
pub const MAX_BATCH_BYTES: usize = 256 * 1024;
/// Message attributes on one message.
pub const MAX_MESSAGE_ATTRIBUTES: usize = 10;
/// Headers a producer may set: one attribute is kept for `sluice-meta`.
pub const MAX_PRODUCER_HEADERS: usize = MAX_MESSAGE_ATTRIBUTES - 1;
/// Longest visibility timeout, and longest time in flight after a receive.
pub const MAX_VISIBILITY: Duration = Duration::from_secs(43_200);
/// Longest per-message delay (`DelaySeconds`).
pub const MAX_DELAY: Duration = Duration::from_secs(900);
/// Longest long poll (`WaitTimeSeconds`).
pub const MAX_WAIT: Duration = Duration::from_secs(20);
/// Messages one `ReceiveMessage` returns at most.
pub const MAX_RECEIVE: usize = 10;
/// `maxReceiveCount` of a `RedrivePolicy` is 1 to 1000.
pub const MAX_RECEIVE_COUNT: u32 = 1000;
/// Queue names: 1 to 80 characters, `.fifo` suffix included.
pub const MAX_QUEUE_NAME: usize = 80;
/// Message attribute names: up to 256 characters.
pub const MAX_ATTRIBUTE_NAME: usize = 256;
/// FIFO `MessageGroupId` and `MessageDeduplicationId`: up to 128 characters.
pub const MAX_FIFO_ID: usize = 128;
/// Longest retention (14 days), given to the DLQ.
pub(super) const MAX_RETENTION_SECONDS: u64 = 1_209_600;

// ---------------------------------------------------------------------------------------------
// The adapter's own names and timings.

/// Messages `dlq_get` and `redrive` read at most in one call.
pub const DLQ_SCAN_LIMIT: usize = 1000;
/// How long a peek (`dlq_list`, `dlq_get`, `redrive`) hides the DLQ messages it reads if the
/// process dies before it puts them back.
pub const PEEK_LEASE: Duration = Duration::from_secs(30);
/// Spacing of the short polls that fill the sub-second part of a receive wait (requests cost
/// money on AWS: `transport.poll_interval` is used, but never below this).
pub const MIN_SHORT_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// FIFO first-failure times remembered by one process (FIFO retries keep the message in place).
pub const FIFO_MEMO_CAPACITY: usize = 10_000;
/// One request attempt: longer than a 20 s long poll.
pub(super) const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(25);
/// One operation with the SDK's own retries.
pub(super) const OPERATION_TIMEOUT: Duration = Duration::from_secs(60);
/// Rounds for batch entries that failed on the server side (not the sender's fault).
pub(super) const BATCH_ROUNDS: u32 = 3;

/// Where the queues are and how they behave, derived from [`TransportOptions`].
#[derive(Debug, Clone)]
pub struct SqsConfig {
    /// The work queue's name.
    pub queue_name: String,
    /// The URL given as `transport.url`, when a URL was given.
    pub queue_url: Option<String>,
    /// `<name>-dlq` (FIFO: `<name>-dlq.fifo`).
    pub dlq_name: String,
    /// A FIFO queue (the name ends in `.fifo`).
    pub fifo: bool,
    /// Visibility timeout of a receive: the lease rounded up to whole seconds, at least 1 s.
    pub visibility: Duration,
    /// `maxReceiveCount` given to the queue's `RedrivePolicy` by `provision`.
    pub max_receive_count: u32,
}

impl SqsConfig {
    /// Checks the options against the SQS limits; makes no call.
    pub fn from_options(opts: &TransportOptions) -> Result<Self> {
        let url = opts.url.trim();
        let (queue_name, queue_url) = if url.starts_with("https://") || url.starts_with("http://") {
            let name = url.trim_end_matches('/').rsplit('/').next().unwrap_or("");
            (name.to_owned(), Some(url.to_owned()))
        } else if url.is_empty() {
            (opts.queue.clone(), None)
        } else {
            (url.to_owned(), None)
        };
        check_queue_name(&queue_name)?;
        let fifo = queue_name.ends_with(".fifo");
        let dlq_name = dlq_name_for(&queue_name);
        check_queue_name(&dlq_name).map_err(|_| {
            Error::Config(format!(
                "key `transport.url`: queue name {queue_name:?} is too long for its DLQ {dlq_name:?} ({MAX_QUEUE_NAME} characters at most)"
            ))
        })?;
        let visibility = Duration::from_secs(ceil_secs(opts.lease).max(1));
        if visibility > MAX_VISIBILITY {
            return Err(Error::Config(format!(
                "key `transport.lease`: {:?} is over the SQS visibility limit of {MAX_VISIBILITY:?}",
                opts.lease
            )));
        }
        if !(1..=MAX_RECEIVE_COUNT).contains(&opts.max_deliveries) {
            return Err(Error::Config(format!(
                "key `retry.max_deliveries`: {} is outside SQS's maxReceiveCount range 1..={MAX_RECEIVE_COUNT}",
                opts.max_deliveries
            )));
        }
        Ok(Self {
            queue_name,
            queue_url,
            dlq_name,
            fifo,
            visibility,
            max_receive_count: opts.max_deliveries,
        })
    }
}

pub(super) fn dlq_name_for(queue: &str) -> String {
    match queue.strip_suffix(".fifo") {
        Some(base) => format!("{base}-dlq.fifo"),
        None => format!("{queue}-dlq"),
    }
}

fn check_queue_name(name: &str) -> Result<()> {
    let base = name.strip_suffix(".fifo").unwrap_or(name);
    let ok = !base.is_empty()
        && name.len() <= MAX_QUEUE_NAME
        && base
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "key `transport.url`: {name:?} is not an SQS queue URL or name (1 to {MAX_QUEUE_NAME} characters: letters, digits, - and _, optionally ending in .fifo)"
        )))
    }
}

/// The client configuration of the standard AWS environment, with this adapter's timeouts.
/// [`super::SqsTransport::open_with`] takes the result (tests add interceptors to it).
pub async fn sdk_config_from_env() -> Result<aws_sdk_sqs::config::Builder> {
    let shared = aws_config::load_defaults(BehaviorVersion::latest()).await;
    if shared.region().is_none() {
        return Err(Error::Config(
            "key `transport.url`: the SQS transport needs an AWS region (set AWS_REGION)".into(),
        ));
    }
    Ok(aws_sdk_sqs::config::Builder::from(&shared).timeout_config(
        TimeoutConfig::builder()
            .operation_attempt_timeout(ATTEMPT_TIMEOUT)
            .operation_timeout(OPERATION_TIMEOUT)
            .build(),
    ))
}

/// Whole seconds, rounded up.
pub(super) fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_whole_seconds() {
        assert_eq!(dlq_name_for("jobs"), "jobs-dlq");
        assert_eq!(dlq_name_for("jobs.fifo"), "jobs-dlq.fifo");
        assert_eq!(ceil_secs(Duration::ZERO), 0);
        assert_eq!(ceil_secs(Duration::from_millis(400)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1500)), 2);
        assert_eq!(ceil_secs(Duration::from_secs(3)), 3);
    }

    #[test]
    fn options_are_checked_against_sqs_limits() {
        let opts = |url: &str, lease: Duration, max: u32| TransportOptions {
            queue: "jobs".into(),
            function: "f".into(),
            url: url.into(),
            lease,
            max_deliveries: max,
            poll_interval: Duration::from_millis(20),
            declare: false,
        };
        let c = SqsConfig::from_options(&opts("jobs", Duration::from_millis(400), 5)).unwrap();
        assert_eq!(
            (c.queue_name.as_str(), c.visibility),
            ("jobs", Duration::from_secs(1))
        );
        let c = SqsConfig::from_options(&opts(
            "https://sqs.eu-west-1.amazonaws.com/123456789012/orders.fifo",
            Duration::from_secs(30),
            10,
        ))
        .unwrap();
        assert!(c.fifo && c.dlq_name == "orders-dlq.fifo" && c.queue_url.is_some());
        for (url, lease, max) in [
            ("bad name", Duration::from_secs(1), 5),
            (&"q".repeat(78), Duration::from_secs(1), 5),
            ("jobs", Duration::from_secs(43_201), 5),
            ("jobs", Duration::from_secs(1), 0),
            ("jobs", Duration::from_secs(1), 1001),
        ] {
            assert!(
                matches!(
                    SqsConfig::from_options(&opts(url, lease, max)),
                    Err(Error::Config(_))
                ),
                "{url:?} {lease:?} {max}"
            );
        }
    }
}
