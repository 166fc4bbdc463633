//! The RabbitMQ transport (feature `rabbitmq`, client `lapin` 4): a quorum work queue, a delay
//! ladder built from TTL queues (no plugin), a dead-letter queue that carries the failure
//! history, and leases kept by this process. docs/rabbitmq.md is the user's view; the
//! invariants the code keeps are here.
//!
//! - **Topology** (`crate::topology`, plain data shared with `sluice-infra`): the `<q>` exchange
//!   and quorum queue, `<q>.dlq`, and one TTL queue per [`DELAY_LADDER_MS`] step. A handle
//!   declares it when opened for work with `transport.declare` on (and on every reconnect), or
//!   only checks it; `provision` declares it.
//! - **Nothing is acked before its copy is confirmed** (`settle.rs`): a retry or dead-letter copy
//!   is published with confirms and `mandatory` on the lease's own connection, then the
//!   original is acked. A failed publish keeps the lease; a failed ack after a confirmed copy
//!   duplicates (at-least-once), never loses.
//! - **Attempts** = the envelope's carried retries + the quorum queue's `x-delivery-count` + 1.
//!   The queue's `x-delivery-limit` (`max_deliveries - 1`) is the crash-loop guard.
//! - **Our copies are told apart by how they arrived** (`codec.rs`): through the default exchange
//!   (every copy reaches `<q>` that way, producers publish to the `<q>` exchange) and carrying
//!   `sluice-retries`. Only then are top-level `sluice-*` headers read as the envelope, and
//!   checked; on any other delivery every header is the producer's, so forged `sluice-*` names
//!   are rejected as bad input by the pipeline and never change the attempt number. A
//!   producer's own `sluice-*` headers travel on copies nested in `sluice-producer-headers`.
//! - **Leases are ours** ([`crate::lease`]): RabbitMQ holds an unacked delivery with its channel
//!   forever, so the lease keeper requeues a delivery whose lease ran out, and settling it after
//!   that is `LeaseLost`. No lease outlasts [`RabbitConfig::max_hold`] (below the broker's
//!   `consumer_timeout`). A receipt names its handle, connection generation, channel and tag:
//!   a tag of a dead channel or an older connection is never acked on a new one.
//! - **Acks are coalesced** (`acks.rs`) only where a `multiple` ack covers finished deliveries
//!   alone.
//! - **Delays** ride the ladder: the largest step not above the delay; a copy that comes back
//!   at least one smallest step early is published to the next step (`intake.rs`), so a delivery
//!   comes at most 250 ms early, and a delay under 250 ms waits 250 ms.
//! - **Connection loss**: the next operation reconnects with backoff (`session.rs`); deliveries
//!   of the old connection are the broker's to redeliver.

mod acks;
mod codec;
mod config;
mod dlq;
mod error;
mod intake;
mod session;
mod settle;

use std::{
    collections::VecDeque,
    sync::{atomic::AtomicU64, Arc},
    time::Duration,
};

/// The client this adapter is built on, re-exported so that tools beside it (the benchmark's
/// raw baseline) and users speak to the broker with the same lapin version.
#[cfg(feature = "fuzzing")]
pub(crate) use self::codec::fuzz_headers;
pub use lapin;

pub use self::{
    acks::ACK_LINGER,
    config::{RabbitConfig, DLQ_SCAN_LIMIT, MAX_BODY_BYTES, MAX_HEADER_BYTES},
};
use self::{intake::Intake, session::Session, settle::Lease};
use super::{Transport, TransportOptions};
pub use crate::topology::{topology, ArgValue, DELAY_LADDER_MS, MAX_NAME_BYTES};
use crate::{
    config::redact_url,
    dead_letter::DeadLetter,
    envelope::Failure,
    error::{Error, Result},
    lease::LeaseClock,
    message::{Delivery, OutgoingMessage, QueueStats, RabbitKey, RedriveFilter},
    sync::Mutex,
    topology::Names,
};

/// The RabbitMQ transport. Clones share one connection.
#[derive(Clone)]
pub struct RabbitTransport {
    inner: Arc<Inner>,
}

struct Inner {
    opts: TransportOptions,
    config: RabbitConfig,
    names: Names,
    /// Tells this handle's receipts from another handle's.
    handle: u32,
    generations: AtomicU64,
    session: tokio::sync::Mutex<Option<Arc<Session>>>,
    intake: tokio::sync::Mutex<Option<Intake>>,
    /// Taken off the consumer, not handed out yet.
    pending: Mutex<VecDeque<intake::Pending>>,
    /// Handed out and not settled.
    leases: LeaseClock<RabbitKey, Lease>,
}

impl RabbitTransport {
    /// Connects to `opts.url`, declares (or checks) the topology and starts the lease keeper,
    /// with the default [`RabbitConfig`].
    pub async fn open(opts: TransportOptions) -> Result<Self> {
        Self::open_with(opts, RabbitConfig::default()).await
    }

    /// [`RabbitTransport::open`] with adapter settings.
    pub async fn open_with(opts: TransportOptions, config: RabbitConfig) -> Result<Self> {
        if !(opts.url.starts_with("amqp://") || opts.url.starts_with("amqps://")) {
            return Err(Error::Config(format!(
                "key `transport.url`: {:?} is not an amqp:// or amqps:// URL",
                redact_url(&opts.url)
            )));
        }
        // A URL that cannot parse would fail every reconnect attempt the same way.
        if let Err(e) = opts.url.parse::<lapin::uri::AMQPUri>() {
            return Err(Error::Config(format!(
                "key `transport.url`: {} is not a valid AMQP URL: {e}",
                redact_url(&opts.url)
            )));
        }
        if config.prefetch == 0 {
            return Err(Error::Config(
                "key `transport.prefetch`: the RabbitMQ prefetch must be at least 1 (0 means \
                 unlimited in AMQP)"
                    .into(),
            ));
        }
        let names = Names::new(&opts.queue)?;
        let tick = (opts.lease / 8).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let inner = Arc::new(Inner {
            opts,
            config,
            names,
            handle: rand::random(),
            generations: AtomicU64::new(0),
            session: tokio::sync::Mutex::new(None),
            intake: tokio::sync::Mutex::new(None),
            pending: Mutex::new(VecDeque::new()),
            leases: LeaseClock::default(),
        });
        inner.session().await?;
        tokio::spawn(intake::keep_leases(Arc::downgrade(&inner), tick));
        Ok(Self { inner })
    }

    /// Deletes this work queue's queues (messages included) and exchange: for tests and for
    /// decommissioning a function.
    pub async fn delete_topology(&self) -> Result<()> {
        self.inner.delete_topology().await
    }
}

impl Transport for RabbitTransport {
    async fn provision(&self) -> Result<()> {
        let session = self.inner.session().await?;
        let admin = session.admin().await?;
        self.inner
            .declare(admin.as_ref().expect("admin channel"))
            .await
    }

    async fn publish(&self, msgs: Vec<OutgoingMessage>) -> Result<Vec<String>> {
        self.inner.publish(msgs).await
    }

    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        self.inner.receive(max, wait).await
    }

    async fn ack(&self, d: &Delivery) -> Result<()> {
        self.inner.ack(d).await
    }

    async fn retry_after(&self, d: &Delivery, delay: Duration, failure: &Failure) -> Result<()> {
        self.inner.retry_after(d, delay, failure).await
    }

    async fn dead_letter(&self, d: &Delivery, failure: &Failure) -> Result<()> {
        self.inner.dead_letter(d, failure).await
    }

    async fn extend(&self, d: &Delivery, lease: Duration) -> Result<()> {
        self.inner.extend(d, lease).await
    }

    async fn release(&self, d: &Delivery) -> Result<()> {
        self.inner.release(d).await
    }

    async fn stats(&self) -> Result<QueueStats> {
        self.inner.stats().await
    }

    async fn dlq_list(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        let session = self.inner.session().await?;
        let cursor = dlq::RabbitDlq::start(&self.inner, &session).await?;
        crate::dlq::list(cursor, limit).await
    }

    async fn dlq_get(&self, id: &str) -> Result<Option<DeadLetter>> {
        let session = self.inner.session().await?;
        let cursor = dlq::RabbitDlq::start(&self.inner, &session).await?;
        crate::dlq::get(cursor, id, DLQ_SCAN_LIMIT).await
    }

    async fn redrive(&self, filter: &RedriveFilter) -> Result<Vec<DeadLetter>> {
        let session = self.inner.session().await?;
        let cursor = dlq::RabbitDlq::start(&self.inner, &session).await?;
        crate::dlq::redrive(cursor, filter, DLQ_SCAN_LIMIT).await
    }
}
