//! The SQS transport in container mode (feature `sqs`, client `aws-sdk-sqs`): long polling, a
//! dead-letter queue that carries the failure history, and the queue's `RedrivePolicy` as the
//! crash-loop guard. Endpoint, region and credentials come from the standard AWS environment
//! (`AWS_ENDPOINT_URL[_SQS]`, `AWS_REGION`, profiles, the task role), so the same binary talks
//! to AWS or to moto. docs/sqs.md is the user's view; the invariants the code keeps are here.
//!
//! - **Queues** (`provision.rs`): `transport.url` is a queue URL or name; the DLQ is `<name>-dlq`
//!   (FIFO: `<name>-dlq.fifo`) or what the `RedrivePolicy` names. Opening creates nothing;
//!   the queues are looked up on first use, and created then only for `run` with
//!   `transport.declare` on. `provision` creates or updates both.
//! - **Whole seconds**: every duration is rounded up (lease, delays, extensions), so a message
//!   is never redelivered earlier than asked. `receive(max, wait)` never waits longer than
//!   asked.
//! - **Attempts** = `ApproximateReceiveCount` + the retries carried in the envelope. The
//!   `RedrivePolicy` counts the receives of one copy; a message it moved has no dead-letter
//!   mark and is listed as `crash_loop` with attempts = carried retries + `maxReceiveCount`.
//! - **Leases** ([`crate::lease`]): SQS does not reliably refuse a stale receipt handle, so each
//!   handle keeps a lease clock; settling after the lease (or twice) is `LeaseLost` without a
//!   call. No message is kept in flight past 12 hours after its receive.
//! - **Retries** (`settle.rs`): on a standard queue a copy with the envelope is sent with
//!   `DelaySeconds`, then the original is deleted (a duplicate, never a loss, if the delete
//!   fails); delays over 15 minutes carry a due time and hop. On a FIFO queue the original's
//!   visibility is set instead (it holds back its group; the history stays in this process).
//! - **The wire** (`codec.rs`): one `sluice-meta` attribute for the envelope, 9 for producers.
//! - **Dead letters** (`dlq.rs`): sent with the envelope, then the original deleted; peeked with
//!   a short visibility and put back.

mod codec;
mod config;
mod dlq;
mod error;
mod provision;
mod receive;
mod settle;

use std::{sync::Arc, time::Duration};

pub use aws_sdk_sqs;
use aws_sdk_sqs::Client;

#[cfg(feature = "fuzzing")]
pub(crate) use self::codec::fuzz_round_trip;
#[cfg(feature = "lambda")]
pub(crate) use self::codec::{decode_message, Received};
pub use self::{
    codec::{DEDUP_ID_HEADER, DEFAULT_GROUP, GROUP_ID_HEADER, META_ATTRIBUTE, TRACE_HEADER},
    config::{
        sdk_config_from_env, SqsConfig, DLQ_SCAN_LIMIT, FIFO_MEMO_CAPACITY, MAX_BATCH_BYTES,
        MAX_BATCH_ENTRIES, MAX_DELAY, MAX_MESSAGE_ATTRIBUTES, MAX_MESSAGE_BYTES,
        MAX_PRODUCER_HEADERS, MAX_VISIBILITY, MAX_WAIT, MIN_SHORT_POLL_INTERVAL, PEEK_LEASE,
    },
};
use self::{
    error::SdkErr,
    provision::{missing, Urls},
    settle::FifoMemo,
};
use super::{Transport, TransportOptions};
use crate::{
    batch::Batcher,
    dead_letter::DeadLetter,
    envelope::Failure,
    error::Result,
    lease::LeaseClock,
    message::{Delivery, OutgoingMessage, QueueStats, RedriveFilter},
    sync::Mutex,
};

/// The SQS transport: a cheap handle (clones share the client and the lease clock).
#[derive(Clone)]
pub struct SqsTransport(Arc<Shared>);

/// What the handles of one `open` share.
struct Shared {
    opts: TransportOptions,
    config: SqsConfig,
    client: Client,
    /// Found on first use (or by `provision`).
    urls: tokio::sync::OnceCell<Urls>,
    /// Acks waiting to be sent together as `DeleteMessageBatch` calls.
    acks: tokio::sync::OnceCell<Batcher<String, Result<(), SdkErr>>>,
    /// Leases by receipt handle.
    leases: LeaseClock<String, ()>,
    fifo_memo: Mutex<FifoMemo>,
}

impl SqsTransport {
    /// Opens the queue named by `opts.url` with the client configuration of the standard AWS
    /// environment. Creates nothing unless `opts.declare` (see the module doc).
    pub async fn open(opts: TransportOptions) -> Result<Self> {
        SqsConfig::from_options(&opts)?;
        let sdk = sdk_config_from_env().await?.build();
        Self::open_with(opts, sdk).await
    }

    /// [`open`](Self::open) with an explicit SDK configuration.
    pub async fn open_with(opts: TransportOptions, sdk: aws_sdk_sqs::Config) -> Result<Self> {
        let shared = Self::shared(opts, sdk)?;
        // Found now when they exist, so a queue without a RedrivePolicy fails at start; a
        // missing queue is not an error yet (`provision` is about to create it).
        if let Some(urls) =
            provision::resolve(&shared.client, &shared.config, shared.opts.declare).await?
        {
            let _ = shared.urls.set(urls);
        }
        Ok(Self(Arc::new(shared)))
    }

    /// Lambda mode: no call to SQS until one is needed. The trigger's records carry all a
    /// successful invocation needs; the queues are looked up (and their RedrivePolicy checked)
    /// on the first retry or dead-letter copy, once per process.
    pub(crate) async fn open_lazy(opts: TransportOptions) -> Result<Self> {
        SqsConfig::from_options(&opts)?;
        let sdk = sdk_config_from_env().await?.build();
        Ok(Self(Arc::new(Self::shared(opts, sdk)?)))
    }

    fn shared(opts: TransportOptions, sdk: aws_sdk_sqs::Config) -> Result<Shared> {
        let config = SqsConfig::from_options(&opts)?;
        let client = Client::from_conf(sdk);
        Ok(Shared {
            opts,
            config,
            client,
            urls: tokio::sync::OnceCell::new(),
            acks: tokio::sync::OnceCell::new(),
            leases: LeaseClock::default(),
            fifo_memo: Mutex::new(FifoMemo::default()),
        })
    }

    /// The queue settings in force.
    pub fn config(&self) -> &SqsConfig {
        &self.0.config
    }

    /// The work queue's URL, looked up if not known yet.
    pub async fn queue_url(&self) -> Result<String> {
        Ok(self.0.urls().await?.queue.clone())
    }

    /// The DLQ's URL, looked up if not known yet.
    pub async fn dlq_url(&self) -> Result<String> {
        Ok(self.0.urls().await?.dlq.clone())
    }

    /// Lambda mode: a decoded record of an SQS event as a delivery of this queue, with the
    /// invocation's deadline as its lease end.
    #[cfg(feature = "lambda")]
    pub(crate) fn lambda_delivery(&self, r: Received, deadline_ms: i64) -> Delivery {
        let now = crate::time::unix_ms(std::time::SystemTime::now());
        self.0.delivery(r, now, deadline_ms)
    }
}

impl Shared {
    /// The queues, found on first use.
    async fn urls(&self) -> Result<&Urls> {
        self.urls
            .get_or_try_init(|| async {
                provision::resolve(&self.client, &self.config, self.opts.declare)
                    .await?
                    .ok_or_else(|| missing(&self.config))
            })
            .await
    }

    async fn provision(&self) -> Result<()> {
        let (queue, dlq) = provision::provision_queues(&self.client, &self.config).await?;
        let _ = self.urls.set(Urls {
            queue,
            dlq,
            max_receive_count: self.config.max_receive_count,
        });
        Ok(())
    }
}

impl Transport for SqsTransport {
    async fn provision(&self) -> Result<()> {
        self.0.provision().await
    }

    async fn publish(&self, msgs: Vec<OutgoingMessage>) -> Result<Vec<String>> {
        self.0.publish_messages(msgs).await
    }

    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        self.0.receive_messages(max, wait).await
    }

    async fn ack(&self, d: &Delivery) -> Result<()> {
        self.0.ack_delivery(d).await
    }

    async fn retry_after(&self, d: &Delivery, delay: Duration, failure: &Failure) -> Result<()> {
        self.0.retry_delivery(d, delay, failure).await
    }

    async fn dead_letter(&self, d: &Delivery, failure: &Failure) -> Result<()> {
        self.0.dead_letter_delivery(d, failure).await
    }

    async fn extend(&self, d: &Delivery, lease: Duration) -> Result<()> {
        self.0.extend_delivery(d, lease).await
    }

    async fn release(&self, d: &Delivery) -> Result<()> {
        self.0.release_delivery(d).await
    }

    async fn stats(&self) -> Result<QueueStats> {
        self.0.queue_stats().await
    }

    async fn dlq_list(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        crate::dlq::list(dlq::SqsDlq::start(&self.0).await?, limit).await
    }

    async fn dlq_get(&self, id: &str) -> Result<Option<DeadLetter>> {
        crate::dlq::get(dlq::SqsDlq::start(&self.0).await?, id, DLQ_SCAN_LIMIT).await
    }

    async fn redrive(&self, filter: &RedriveFilter) -> Result<Vec<DeadLetter>> {
        crate::dlq::redrive(dlq::SqsDlq::start(&self.0).await?, filter, DLQ_SCAN_LIMIT).await
    }
}
