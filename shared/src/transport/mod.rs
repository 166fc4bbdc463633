//! The transport contract and the run-time choice between adapters.
//!
//! Payloads are bytes plus headers, with the [`crate::envelope::Envelope`] beside them; every
//! adapter passes `conformance::transport`. An adapter that cannot do an operation returns
//! [`Error::Invalid`] saying so: never a no-op. Each adapter is a folder with one file per
//! concern; what they share is written once elsewhere: the envelope and its checks
//! (`envelope.rs`), dead letters and their classification (`dead_letter.rs`), the dead-letter
//! operations (`dlq.rs`), the local lease clock (`lease.rs`) and request batching (`batch.rs`).

// A build without any transport (`--no-default-features`) has nothing to delegate to.
#![cfg_attr(
    not(any(feature = "embedded", feature = "rabbitmq", feature = "sqs")),
    allow(unused_variables, unused_imports)
)]

#[cfg(feature = "embedded")]
pub mod embedded;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;
#[cfg(feature = "sqs")]
pub mod sqs;

use std::{future::Future, time::Duration};

use crate::{
    config::{Settings, TransportKind},
    dead_letter::DeadLetter,
    envelope::Failure,
    error::{Error, Result},
    message::{Delivery, OutgoingMessage, QueueStats, RedriveFilter},
};

/// What every adapter is built from.
#[derive(Debug, Clone)]
pub struct TransportOptions {
    /// The work queue.
    pub queue: String,
    /// The function (recorded in dead-letter history).
    pub function: String,
    /// Where: a file path, an `amqp://` URL, a queue URL.
    pub url: String,
    /// Lease (visibility timeout) of a received message.
    pub lease: Duration,
    /// Crash-loop guard: a message delivered this many times without being settled is
    /// dead-lettered by the transport itself.
    pub max_deliveries: u32,
    /// Embedded: idle poll interval.
    pub poll_interval: Duration,
    /// Create the queues that are missing on first use (`run` with `transport.declare` on).
    /// Off, they are only checked, and an operation that needs a missing queue fails naming
    /// `provision`; [`Transport::provision`] creates them either way.
    pub declare: bool,
}

/// What a handle is opened for: whether it may create missing queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// `run`: creates missing queues when `transport.declare` is on.
    Work,
    /// Every other command: creates nothing (`provision` does, by calling it).
    Admin,
    /// Lambda mode: creates nothing and looks nothing up before the first event (SQS finds its
    /// queues on the first copy it sends: a retry or a dead letter), so a cold start makes no
    /// network call.
    Lambda,
}

impl TransportOptions {
    /// Options from the function settings.
    pub fn from_settings(function: &str, s: &Settings, purpose: Purpose) -> Self {
        Self {
            queue: s.queue.clone(),
            function: function.to_owned(),
            url: s.transport.url.clone(),
            lease: s.transport.lease,
            max_deliveries: s.retry.max_deliveries,
            poll_interval: s.transport.poll_interval,
            declare: purpose == Purpose::Work && s.transport.declare,
        }
    }
}

/// The broker operations the pipeline and the CLI need.
pub trait Transport: Send + Sync + 'static {
    /// Declares queues/tables (idempotent).
    fn provision(&self) -> impl Future<Output = Result<()>> + Send;
    /// Publishes messages; returns their ids once they are durably stored.
    fn publish(
        &self,
        msgs: Vec<OutgoingMessage>,
    ) -> impl Future<Output = Result<Vec<String>>> + Send;
    /// Leases up to `max` messages, waiting up to `wait` for the first.
    fn receive(
        &self,
        max: usize,
        wait: Duration,
    ) -> impl Future<Output = Result<Vec<Delivery>>> + Send;
    /// Done: remove the message. Fails with `LeaseLost` if the lease is no longer ours.
    fn ack(&self, d: &Delivery) -> impl Future<Output = Result<()>> + Send;
    /// Deliver again after `delay`, recording the failure.
    fn retry_after(
        &self,
        d: &Delivery,
        delay: Duration,
        failure: &Failure,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Move to the dead-letter queue with the failure history, body intact.
    fn dead_letter(
        &self,
        d: &Delivery,
        failure: &Failure,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Keep the lease for `lease` more from now.
    fn extend(&self, d: &Delivery, lease: Duration) -> impl Future<Output = Result<()>> + Send;
    /// Return the message to the queue now (shutdown); the delivery still counts.
    fn release(&self, d: &Delivery) -> impl Future<Output = Result<()>> + Send;
    /// Queue depths.
    fn stats(&self) -> impl Future<Output = Result<QueueStats>> + Send;
    /// Peek at dead letters, oldest first, without consuming them.
    fn dlq_list(&self, limit: usize) -> impl Future<Output = Result<Vec<DeadLetter>>> + Send;
    /// One dead letter by message id.
    fn dlq_get(&self, id: &str) -> impl Future<Output = Result<Option<DeadLetter>>> + Send;
    /// Move dead letters back to the work queue, attempts reset; returns what moved (or
    /// would move, on a dry run).
    fn redrive(
        &self,
        filter: &RedriveFilter,
    ) -> impl Future<Output = Result<Vec<DeadLetter>>> + Send;
}

/// The adapter chosen at run time from `transport.kind`.
pub enum AnyTransport {
    /// The embedded SQLite queue.
    #[cfg(feature = "embedded")]
    Embedded(embedded::EmbeddedTransport),
    /// RabbitMQ (quorum queues, a TTL delay ladder, a DLQ with history).
    #[cfg(feature = "rabbitmq")]
    Rabbitmq(rabbitmq::RabbitTransport),
    /// Amazon SQS in container mode (long polling, a DLQ with history, `RedrivePolicy`).
    #[cfg(feature = "sqs")]
    Sqs(sqs::SqsTransport),
    /// Never constructed: keeps the enum inhabited-in-type when no transport is built.
    #[doc(hidden)]
    Unbuilt(std::convert::Infallible),
}

impl AnyTransport {
    /// Opens the adapter named by the settings.
    pub async fn open(function: &str, settings: &Settings, purpose: Purpose) -> Result<Self> {
        let opts = TransportOptions::from_settings(function, settings, purpose);
        match settings.transport.kind {
            #[cfg(feature = "embedded")]
            TransportKind::Embedded => Ok(AnyTransport::Embedded(
                embedded::EmbeddedTransport::open(opts).await?,
            )),
            #[cfg(feature = "rabbitmq")]
            TransportKind::Rabbitmq => {
                let config = rabbitmq::RabbitConfig {
                    prefetch: settings.prefetch(),
                    max_hold: rabbitmq::RabbitConfig::hold_within(
                        settings.transport.consumer_timeout,
                    ),
                    tls_ca_pem: crate::config::read_ca_file(
                        "transport.tls_ca_file",
                        settings.transport.tls_ca_file.as_deref(),
                    )?,
                    ..rabbitmq::RabbitConfig::default()
                };
                Ok(AnyTransport::Rabbitmq(
                    rabbitmq::RabbitTransport::open_with(opts, config).await?,
                ))
            }
            #[cfg(feature = "sqs")]
            TransportKind::Sqs if purpose == Purpose::Lambda => {
                Ok(AnyTransport::Sqs(sqs::SqsTransport::open_lazy(opts).await?))
            }
            #[cfg(feature = "sqs")]
            TransportKind::Sqs => Ok(AnyTransport::Sqs(sqs::SqsTransport::open(opts).await?)),
            #[allow(unreachable_patterns)]
            other => Err(Error::Config(format!(
                "key `transport.kind`: {} is not built into this binary (enable the cargo feature `{}` of sluice)",
                other.name(),
                other.name()
            ))),
        }
    }
}

macro_rules! delegate {
    ($self:ident, $t:ident => $e:expr) => {
        match $self {
            #[cfg(feature = "embedded")]
            AnyTransport::Embedded($t) => $e,
            #[cfg(feature = "rabbitmq")]
            AnyTransport::Rabbitmq($t) => $e,
            #[cfg(feature = "sqs")]
            AnyTransport::Sqs($t) => $e,
            AnyTransport::Unbuilt(never) => match *never {},
        }
    };
}

impl Transport for AnyTransport {
    async fn provision(&self) -> Result<()> {
        delegate!(self, t => t.provision().await)
    }
    /// Publishes; a message without a trace context gets the current span's when spans are
    /// exported (a handler's process span, `send`'s producer span): its creation context.
    async fn publish(&self, mut msgs: Vec<OutgoingMessage>) -> Result<Vec<String>> {
        if crate::telemetry::trace::exporting() {
            let current = crate::telemetry::trace::context_of(&tracing::Span::current());
            for m in msgs.iter_mut().filter(|m| m.envelope.trace.is_none()) {
                m.envelope.trace = current.clone();
            }
        }
        delegate!(self, t => t.publish(msgs).await)
    }
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        delegate!(self, t => t.receive(max, wait).await)
    }
    async fn ack(&self, d: &Delivery) -> Result<()> {
        delegate!(self, t => t.ack(d).await)
    }
    async fn retry_after(&self, d: &Delivery, delay: Duration, failure: &Failure) -> Result<()> {
        delegate!(self, t => t.retry_after(d, delay, failure).await)
    }
    async fn dead_letter(&self, d: &Delivery, failure: &Failure) -> Result<()> {
        delegate!(self, t => t.dead_letter(d, failure).await)
    }
    async fn extend(&self, d: &Delivery, lease: Duration) -> Result<()> {
        delegate!(self, t => t.extend(d, lease).await)
    }
    async fn release(&self, d: &Delivery) -> Result<()> {
        delegate!(self, t => t.release(d).await)
    }
    async fn stats(&self) -> Result<QueueStats> {
        delegate!(self, t => t.stats().await)
    }
    async fn dlq_list(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        delegate!(self, t => t.dlq_list(limit).await)
    }
    async fn dlq_get(&self, id: &str) -> Result<Option<DeadLetter>> {
        delegate!(self, t => t.dlq_get(id).await)
    }
    async fn redrive(&self, filter: &RedriveFilter) -> Result<Vec<DeadLetter>> {
        delegate!(self, t => t.redrive(filter).await)
    }
}
