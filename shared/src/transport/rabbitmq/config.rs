//! Adapter settings and the broker limits checked before any call.

use std::time::Duration;

use crate::{
    error::{Error, Result},
    message::OutgoingMessage,
    text::truncate,
    topology::MAX_NAME_BYTES,
};

/// RabbitMQ's default `max_message_size`, 128 MiB
/// (<https://www.rabbitmq.com/docs/configure#config-items>); checked before publishing.
pub const MAX_BODY_BYTES: usize = 128 * 1024 * 1024;
/// Headers travel in one content-header frame, which must fit in the negotiated `frame_max`
/// (131072 bytes by default, <https://www.rabbitmq.com/docs/configure#config-items>); producer
/// headers are held to half of it so that the envelope always fits beside them.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// `dlq_get` and `redrive` look at no more than this many dead letters.
pub const DLQ_SCAN_LIMIT: usize = 10_000;

/// AMQP delivery mode 2: the broker writes the message to disk.
pub(super) const PERSISTENT: u8 = 2;
/// One connection attempt gives up after this long.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnect backoff: the first wait, doubling up to the cap, for up to the budget.
pub(super) const RECONNECT_FIRST: Duration = Duration::from_millis(100);
pub(super) const RECONNECT_CAP: Duration = Duration::from_secs(5);
pub(super) const RECONNECT_BUDGET: Duration = Duration::from_secs(15);

/// Adapter settings beyond [`crate::transport::TransportOptions`] (whose `url` is the
/// `amqp(s)://` URL). A function binary gets them from the settings (`transport.prefetch`,
/// `transport.consumer_timeout`) through [`crate::transport::AnyTransport::open`].
#[derive(Debug, Clone)]
pub struct RabbitConfig {
    /// Messages the broker may push ahead of `receive` (unacked, per handle). Keep it above
    /// the worker's concurrency plus one ack batch, or delivery stalls while acks are pending.
    pub prefetch: u16,
    /// Longest a delivery may be held, counted from the broker's delivery; keep it below the
    /// broker's `consumer_timeout` (30 min by default), which would close the channel (see
    /// [`RabbitConfig::hold_within`]).
    pub max_hold: Duration,
    /// Declare every queue with `x-expires` (and the exchange auto-delete), so that the broker
    /// removes an unused topology by itself. For tests; `None` in production.
    pub queue_expires: Option<Duration>,
    /// `amqps://`: CA certificates (PEM text, from `transport.tls_ca_file`) trusted besides
    /// the system's roots.
    pub tls_ca_pem: Option<String>,
}

impl Default for RabbitConfig {
    fn default() -> Self {
        Self {
            prefetch: 20,
            max_hold: Self::hold_within(Duration::from_secs(30 * 60)),
            queue_expires: None,
            tls_ca_pem: None,
        }
    }
}

impl RabbitConfig {
    /// The [`RabbitConfig::max_hold`] for a broker whose `consumer_timeout` is `timeout`: a
    /// tenth of it earlier, but never more than a minute earlier (29 min for the default
    /// 30 min), so that the requeue is sent, and reaches the broker, before the broker's own
    /// periodic check can close the channel.
    pub fn hold_within(timeout: Duration) -> Duration {
        timeout.saturating_sub((timeout / 10).min(Duration::from_secs(60)))
    }
}

/// Limits checked before any network call.
pub(super) fn check_outgoing(m: &OutgoingMessage) -> Result<()> {
    if m.body.len() > MAX_BODY_BYTES {
        return Err(Error::Limit(format!(
            "body is {} bytes, RabbitMQ accepts at most {MAX_BODY_BYTES} (max_message_size)",
            m.body.len()
        )));
    }
    let mut total = 0;
    for (k, v) in &m.headers {
        if k.len() > MAX_NAME_BYTES {
            return Err(Error::Limit(format!(
                "header name {:?} is {} bytes, AMQP allows {MAX_NAME_BYTES}",
                truncate(k, 32),
                k.len()
            )));
        }
        total += k.len() + v.len();
    }
    if total > MAX_HEADER_BYTES {
        return Err(Error::Limit(format!(
            "headers are {total} bytes, this adapter allows {MAX_HEADER_BYTES} (they must fit in one AMQP frame with the envelope)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_end_before_the_brokers_consumer_timeout() {
        let min = Duration::from_secs(60);
        assert_eq!(RabbitConfig::hold_within(30 * min), 29 * min);
        assert_eq!(RabbitConfig::default().max_hold, 29 * min);
        assert_eq!(
            RabbitConfig::hold_within(Duration::from_secs(10)),
            Duration::from_secs(9)
        );
    }
}
