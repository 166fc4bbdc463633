//! The RabbitMQ transport (feature `rabbitmq`, client `lapin` 4): a quorum work queue, a delay
//! ladder built from TTL queues (no plugin), a dead-letter queue that carries the failure
//! history, and leases kept by this process.
//!
//! # Topology
//!
//! For a work queue `<q>`, declared idempotently when a handle opens (unless
//! [`RabbitConfig::declare`], the setting `transport.declare`, is off: then the queues are
//! only checked to exist) and by `provision`. [`topology`] describes it as plain data, which
//! both the declaration here and `sluice-infra` (rendering `infra/rabbitmq/definitions.json`
//! for every function, with two policies per function that repeat the quorum queues'
//! dead-letter settings and delivery limit) use:
//!
//! | name | kind | arguments | role |
//! |---|---|---|---|
//! | `<q>` | direct exchange | durable | producers publish here, routing key `<q>` |
//! | `<q>` | quorum queue, bound to the exchange with key `<q>` | `x-delivery-limit`, dead-letter to `<q>.dlq` (at-least-once) | the work |
//! | `<q>.dlq` | classic durable queue | | dead letters with their history |
//! | `<q>.delay.<ms>` | quorum queues, one per ladder step | `x-message-ttl = <ms>`, dead-letter to `<q>` (at-least-once) | delayed retries |
//!
//! Dead-lettering goes through the default exchange (`x-dead-letter-exchange = ""` with the
//! target queue as routing key), so no extra exchange is needed. Both quorum kinds use
//! `x-dead-letter-strategy = at-least-once` (with `x-overflow = reject-publish`, which it
//! requires): RabbitMQ moves a dead letter with publisher confirms and keeps it until the
//! target has it, so neither a crash-loop dead letter nor a delayed retry can be lost in between.
//! The DLQ is a classic queue because peeking (below) needs the queue to apply a requeue before
//! the next command from the same channel, which classic queues do and quorum queues do not
//! promise (their counts and `basic.get` may lag a requeue).
//!
//! Changing `max_deliveries` later makes the declaration fail with PRECONDITION_FAILED (queue
//! arguments are fixed): the error says so; lower the limit with the function's RabbitMQ policy
//! (for `delivery-limit` the broker takes the smaller of policy and argument) or recreate the
//! queue.
//!
//! # Attempts and the crash-loop guard
//!
//! Attempt = `sluice-retries` (the attempt of the delivery a retry copy was made from) +
//! the quorum queue's `x-delivery-count` (returns of this copy: nacks, expired leases, dead
//! consumers) + 1. Quorum queues dead-letter a message once it has been returned more than
//! `x-delivery-limit` times, so the limit is declared as `max_deliveries - 1`: the copy is
//! delivered `max_deliveries` times, and the next return sends it to `<q>.dlq` with RabbitMQ's
//! `x-death` header (reason `delivery_limit`), listed as class `crash_loop` with attempts =
//! `sluice-retries + max_deliveries`. The guard counts the deliveries of one copy; the pipeline
//! counts all attempts (its own `max_deliveries` check dead-letters retried messages).
//! Prefetched messages that this process never handed out are returned when the connection
//! closes, and quorum queues count that return too.
//!
//! # Delays: the ladder and its rounding
//!
//! [`DELAY_LADDER_MS`] is 250 ms, 500 ms, 1 s, 2 s, ... doubling up to 512 s (12 queues).
//! `retry_after(d)` (and `publish` with a delay) writes the due time into `sluice-due-at` and
//! publishes the copy to the largest step <= `d`. When the step expires the copy returns to
//! `<q>`; a consumer that receives a copy whose due time is still at least one smallest step
//! away publishes it to the next step (the largest <= the time left), confirms, acks, and does
//! not hand it out. So any delay is a chain of at most a few steps (a binary decomposition; 512 s
//! steps repeat for longer delays), and a delivery comes **at most 250 ms early** (the smallest
//! step), plus clock skew between workers; each hop can only make it later. A delay under
//! 250 ms (but not zero) waits the 250 ms step, so it comes up to 250 ms **late** rather than at
//! once: a short backoff must not turn into an immediate redelivery that burns a delivery
//! attempt. A zero delay goes straight back to `<q>`. The conformance suite is run with
//! `rounding = 250 ms`.
//! A chained copy waits in `<q>` between steps only while some consumer is receiving.
//!
//! # Receiving and leases
//!
//! A handle starts one consumer on its first `receive`, with a prefetch of
//! [`RabbitConfig::prefetch`] (the setting `transport.prefetch`, by default 2 x
//! `worker.concurrency` as DESIGN says); a handle that only publishes never takes messages.
//! Deliveries wait in a local buffer; `receive(max, wait)` hands out up to `max` of them,
//! waiting up to `wait` for the first. The receipt is
//! `<handle>:<connection generation>:<channel id>:<delivery tag>`, and settling goes through
//! lapin's `Acker` of the channel the message came on: a delivery tag of a dead channel or of an
//! older connection can never be acked on a new one; settling it returns `LeaseLost` (the broker
//! redelivers such messages by itself).
//!
//! RabbitMQ has no lease: an unacked message stays with its channel until it is settled or the
//! channel closes. The lease (`opts.lease`) is kept here: `extend` pushes the deadline, a
//! background task nacks with requeue every handed-out delivery whose deadline passed unsettled
//! (so it is redelivered with `x-delivery-count + 1`, as an SQS visibility timeout would), and
//! settling an expired delivery returns `LeaseLost`. RabbitMQ closes a channel that holds a
//! delivery longer than `consumer_timeout` (30 min by default, the setting
//! `transport.consumer_timeout` tells us the broker's), killing every delivery on it; leases
//! are therefore capped at [`RabbitConfig::max_hold`] (29 min for 30) after the broker
//! delivered the message: `extend` past it returns `LeaseLost` and the message is requeued,
//! with a warning naming the setting. Prefetched deliveries that waited that long in the
//! buffer (every slot busy) are requeued the same way by the lease keeper.
//!
//! # Settling
//!
//! Nothing is acked before its copy is confirmed: `retry_after` publishes the copy (to a delay
//! step, or straight back to `<q>` for a zero delay) and `dead_letter` publishes to
//! `<q>.dlq`, each with publisher confirms and `mandatory`, then acks the original. If the
//! publish fails, the lease is kept (it runs out and the message returns); if the ack fails
//! after a confirmed copy, the message is duplicated (at-least-once), never lost. `release`
//! (and a lease running out) is `basic.nack` with requeue of that delivery alone (it counts).
//!
//! Acks are coalesced per channel (`AckWindow`): one `basic.ack` with `multiple = true` for
//! the highest tag of a run of finished deliveries that starts at the channel's oldest
//! unsettled one. A delivery still prefetched, still being handled, waiting for its copy's
//! confirm, or being nacked ends the run, so a multiple ack never covers it; finished
//! deliveries behind such a gap are acked one by one after [`ACK_LINGER`] (1 ms). `ack` returns
//! once the frame that covers its delivery is sent (as an uncoalesced `basic.ack` would), so
//! a worker that has returned from its last ack leaves nothing unsent when it exits.
//!
//! # Headers: ours, the broker's, and forged ones
//!
//! Copies made by this adapter carry `sluice-*` headers: `sluice-retries`, `sluice-due-at`,
//! the failure history (`sluice-first-failure-at`, `sluice-last-failure-at`,
//! `sluice-last-error`, `sluice-error-class`), redrive marks (`sluice-redriven`,
//! `sluice-redriven-from`, `sluice-redriven-at`) and, on dead letters, `sluice-function`,
//! `sluice-attempts`, `sluice-original-queue`, `sluice-dead-lettered-at`.
//! A producer's own `sluice-*` headers are never mixed with these: on a copy they travel inside
//! the nested table `sluice-producer-headers` and come back out as producer headers.
//!
//! A delivery is taken as our copy only when it arrived through the default exchange (every copy
//! reaches `<q>` that way: from a delay step's dead-lettering, a direct retry or a redrive,
//! while producers publish to the `<q>` exchange) **and** carries `sluice-retries`. Only then are
//! its top-level `sluice-*` headers read and stripped. On any other delivery, such as a first
//! delivery, every header reaches `Delivery::headers`, so the pipeline rejects forged
//! `sluice-*` names as bad input, and forged values never change the attempt number. This holds
//! against producers that cannot publish to the default exchange: give producers' users write
//! permission on the `<q>` exchange only (with the default `guest`-style full permissions, a
//! producer that deliberately publishes to the default exchange with `sluice-retries` is
//! trusted). Broker bookkeeping (`x-death`, `x-delivery-count`, `x-first-death-*`,
//! `x-last-death-*`) is always stripped from `Delivery::headers`.
//!
//! # Dead letters: peeking and redrive
//!
//! AMQP has no peek. `dlq_list`/`dlq_get` take messages with `basic.get` (no auto-ack) and then
//! `basic.nack` them all with requeue, on one channel reserved for DLQ work and queue counts.
//! `basic.get` rather than a consumer because it takes exactly as many as asked and stops,
//! and nothing is pushed to us that we would then have to return; a classic queue puts requeued
//! messages back in their place, so the order is kept. While one process peeks, the messages it
//! holds are invisible to others (a concurrent redrive skips them). `dlq_get` scans at most
//! [`DLQ_SCAN_LIMIT`] messages. `redrive` takes messages the same way, republishes each match
//! to `<q>` (attempts reset: `sluice-retries = 0`, `sluice-redriven` incremented,
//! `sluice-redriven-from` and `-at` set, failure history dropped), confirms, acks the DLQ copy,
//! and requeues what it skipped (filter) or only listed (dry run).
//!
//! # Stats
//!
//! From passive declares: `ready` = messages ready in `<q>` + those this handle prefetched but
//! has not handed out; `delayed` = the sum of the delay steps; `dead_lettered` = `<q>.dlq`.
//! `in_flight` is this handle's leased deliveries only: the AMQP protocol reports no unacked
//! count (the management API does, over HTTP, which this adapter does not use), so other
//! processes' leases and prefetch are not visible.
//!
//! # Connection loss
//!
//! All channels of a handle share one connection. When it is lost, the next operation reconnects
//! with backoff ([`ReconnectSchedule`]: 100 ms doubling to 5 s, equal jitter, for up to 15 s,
//! each attempt logged with its wait; then the error is returned and the caller's own retry
//! takes over), declares the topology again, and starts a fresh consumer: a new generation.
//! Unacked deliveries of the dead connection are redelivered by the broker; settling them here
//! returns `LeaseLost`. A lost channel (e.g. killed by `consumer_timeout`) is replaced the same
//! way. The URL's password is never printed. A login the broker refuses, an unknown virtual
//! host, or a TLS handshake that fails on `amqps://` (lapin's rustls: a plain port, a
//! certificate rustls rejects) is a configuration error at once (no retry).

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, Weak,
    },
    time::{Duration, Instant, SystemTime},
};

use futures_util::{FutureExt, StreamExt};
use lapin::{
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
        BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
        ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError},
    types::{AMQPValue, FieldTable, LongString},
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer, ErrorKind,
    ExchangeKind,
};
use sha2::{Digest, Sha256};

/// The client this adapter is built on, re-exported so that tools beside it (the benchmark's
/// raw baseline) and users speak to the broker with the same lapin version.
pub use lapin;

use super::{Transport, TransportOptions};
use crate::{
    config::redact_url,
    error::{Error, Result},
    message::{
        header, rfc3339, DeadLetter, Delivery, Failure, FailureClass, Headers, OutgoingMessage,
        QueueStats, RedriveFilter,
    },
    retry::ReconnectSchedule,
};

// ---------------------------------------------------------------------------------------------
// Limits and constants

/// Queue, exchange and header names are AMQP short strings: at most 255 bytes
/// (<https://www.rabbitmq.com/amqp-0-9-1-reference#domain.shortstr>).
pub const MAX_NAME_BYTES: usize = 255;
/// RabbitMQ's default `max_message_size`, 128 MiB
/// (<https://www.rabbitmq.com/docs/configure#config-items>); checked before publishing.
pub const MAX_BODY_BYTES: usize = 128 * 1024 * 1024;
/// Headers travel in one content-header frame, which must fit in the negotiated `frame_max`
/// (131072 bytes by default, <https://www.rabbitmq.com/docs/configure#config-items>); producer
/// headers are held to half of it so that the failure history always fits beside them.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// The last error kept in `sluice-last-error` on a copy (longer texts are cut).
pub const MAX_ERROR_BYTES: usize = 4 * 1024;
/// The delay ladder: one TTL queue `<q>.delay.<ms>` per step (see the module doc).
pub const DELAY_LADDER_MS: [u64; 12] = [
    250, 500, 1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 128_000, 256_000, 512_000,
];
/// `dlq_get` looks at no more than this many dead letters.
pub const DLQ_SCAN_LIMIT: usize = 10_000;

/// AMQP delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;
/// One connection attempt gives up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnect backoff: the first wait, doubling up to the cap, for up to the budget.
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
const RECONNECT_CAP: Duration = Duration::from_secs(5);
const RECONNECT_BUDGET: Duration = Duration::from_secs(15);

/// Header names this adapter owns besides the shared failure-history ones in
/// [`crate::message::header`].
pub mod own_header {
    /// On copies: the attempt number of the delivery the copy was made from (0 for a fresh
    /// message that only waited for a delay, or a redriven one).
    pub const RETRIES: &str = "sluice-retries";
    /// On delayed copies: RFC 3339 time the copy is due.
    pub const DUE_AT: &str = "sluice-due-at";
    /// Times the message was redriven from the DLQ.
    pub const REDRIVEN: &str = "sluice-redriven";
    /// The DLQ a redriven message came from.
    pub const REDRIVEN_FROM: &str = "sluice-redriven-from";
    /// RFC 3339 time of the last redrive.
    pub const REDRIVEN_AT: &str = "sluice-redriven-at";
    /// On dead letters: RFC 3339 time it was dead-lettered.
    pub const DEAD_LETTERED_AT: &str = "sluice-dead-lettered-at";
    /// On copies: a nested table holding the producer's own `sluice-*` headers, kept apart.
    pub const PRODUCER_HEADERS: &str = "sluice-producer-headers";
}

/// Headers the broker sets for its own bookkeeping; never shown as producer headers.
const BROKER_HEADERS: [&str; 8] = [
    "x-death",
    "x-delivery-count",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-first-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-last-death-exchange",
];

// ---------------------------------------------------------------------------------------------
// Configuration

/// Adapter settings beyond [`TransportOptions`] (whose `url` is the `amqp(s)://` URL). A
/// function binary gets them from the settings (`transport.prefetch`, `transport.declare`,
/// `transport.consumer_timeout`) through [`super::AnyTransport::open`].
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
    /// Declare the topology when the handle connects (and on every reconnect). Off: it is
    /// only checked to exist (passive declares), for brokers whose topology comes from
    /// `infra/rabbitmq/definitions.json` or whose users may not configure. `provision`
    /// declares either way.
    pub declare: bool,
}

impl Default for RabbitConfig {
    fn default() -> Self {
        Self {
            prefetch: 20,
            max_hold: Self::hold_within(Duration::from_secs(30 * 60)),
            queue_expires: None,
            declare: true,
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

/// The names of one work queue's topology.
#[derive(Debug, Clone)]
struct Names {
    work: String,
    dlq: String,
    /// (step, queue name), shortest first.
    delays: Vec<(Duration, String)>,
}

impl Names {
    fn new(queue: &str) -> Result<Self> {
        if queue.is_empty() {
            return Err(Error::Config("key `queue`: empty queue name".into()));
        }
        let longest = format!(
            "{queue}.delay.{}",
            DELAY_LADDER_MS[DELAY_LADDER_MS.len() - 1]
        );
        if longest.len() > MAX_NAME_BYTES {
            return Err(Error::Config(format!(
                "key `queue`: {queue:?} is too long for RabbitMQ: {longest:?} must fit in {MAX_NAME_BYTES} bytes"
            )));
        }
        Ok(Self {
            work: queue.to_owned(),
            dlq: format!("{queue}.dlq"),
            delays: DELAY_LADDER_MS
                .iter()
                .map(|ms| (Duration::from_millis(*ms), format!("{queue}.delay.{ms}")))
                .collect(),
        })
    }

    fn smallest_step(&self) -> Duration {
        self.delays[0].0
    }

    /// Where a copy due in `delay` goes: the largest step <= `delay`; the smallest step for a
    /// delay under it (so that a short backoff is not an immediate redelivery); the work queue
    /// for no delay.
    fn route(&self, delay: Duration) -> &str {
        if delay.is_zero() {
            return self.work.as_str();
        }
        self.delays
            .iter()
            .rev()
            .find(|(step, _)| *step <= delay)
            .unwrap_or(&self.delays[0])
            .1
            .as_str()
    }

    fn all_queues(&self) -> impl Iterator<Item = &str> {
        [self.work.as_str(), self.dlq.as_str()]
            .into_iter()
            .chain(self.delays.iter().map(|(_, n)| n.as_str()))
    }
}

// ---------------------------------------------------------------------------------------------
// The topology as data

/// The broker objects of one work queue, as plain data: what [`Transport::provision`] (and a
/// connecting handle) declares, and what `sluice-infra` writes to
/// `infra/rabbitmq/definitions.json`, so that the two cannot say different things.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// The direct, durable exchange producers publish to (named like the work queue).
    pub exchange: String,
    /// The work queue, the DLQ and the delay steps, in declaration order.
    pub queues: Vec<QueueSpec>,
    /// (exchange, queue, routing key).
    pub bindings: Vec<(String, String, String)>,
    /// Policies carrying the same dead-letter settings and delivery limit as the queue
    /// arguments (definitions files only: AMQP cannot declare a policy). See [`topology`].
    pub policies: Vec<PolicySpec>,
}

/// One durable queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    /// Its name.
    pub name: String,
    /// `quorum` or `classic` (also its `x-queue-type` argument).
    pub kind: &'static str,
    /// Its `x-*` arguments, sorted by name.
    pub arguments: BTreeMap<&'static str, ArgValue>,
}

/// One policy (`apply-to: queues`, priority 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySpec {
    /// Its name.
    pub name: String,
    /// The regular expression of the queue names it applies to.
    pub pattern: String,
    /// Its definition (keys without the `x-` of queue arguments), sorted by name.
    pub definition: BTreeMap<&'static str, ArgValue>,
}

/// A queue argument or policy value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgValue {
    /// A string.
    Text(String),
    /// A number.
    Int(i64),
}

impl ArgValue {
    fn amqp(&self) -> AMQPValue {
        match self {
            ArgValue::Text(s) => long_string(s),
            ArgValue::Int(n) => AMQPValue::LongLongInt(*n),
        }
    }
}

/// The queue arguments the policies repeat (each is a policy key for quorum queues in RabbitMQ
/// 3.10, without the `x-`). `x-queue-type` cannot come from a policy, and `x-message-ttl`
/// differs from one delay step to the next, so those stay queue arguments only.
const POLICY_KEYS: [&str; 5] = [
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-dead-letter-strategy",
    "x-delivery-limit",
    "x-overflow",
];

/// The topology of the work queue `queue` whose messages are delivered at most
/// `max_deliveries` times per copy (see the module doc's table).
///
/// Two policies repeat the quorum queues' dead-letter settings and delivery limit: `<q>` for
/// the work queue and `<q>.delay` for the delay steps. For quorum queues RabbitMQ 3.10 takes
/// the queue argument over the policy for the dead-letter and overflow keys, and the smaller
/// of the two for `delivery-limit`; so on queues declared by Sluice the policies change
/// nothing, a queue created without arguments still gets them, and an operator can lower
/// the crash-loop limit of existing queues by editing the policy (raising it needs the
/// queues recreated, as their argument is the upper bound).
pub fn topology(queue: &str, max_deliveries: u32) -> Result<Topology> {
    let names = Names::new(queue)?;
    Ok(names.topology(max_deliveries))
}

impl Names {
    fn topology(&self, max_deliveries: u32) -> Topology {
        let text = |s: &str| ArgValue::Text(s.to_owned());
        let quorum = |dead_letter_to: &str| {
            BTreeMap::from([
                ("x-queue-type", text("quorum")),
                ("x-dead-letter-exchange", text("")),
                ("x-dead-letter-routing-key", text(dead_letter_to)),
                // Dead letters move with confirms: none is lost on the way. It requires
                // reject-publish.
                ("x-dead-letter-strategy", text("at-least-once")),
                ("x-overflow", text("reject-publish")),
            ])
        };
        let mut work = quorum(&self.dlq);
        work.insert(
            "x-delivery-limit",
            ArgValue::Int(i64::from(max_deliveries.max(1) - 1)),
        );
        let mut queues = vec![
            QueueSpec {
                name: self.work.clone(),
                kind: "quorum",
                arguments: work,
            },
            QueueSpec {
                name: self.dlq.clone(),
                kind: "classic",
                arguments: BTreeMap::from([("x-queue-type", text("classic"))]),
            },
        ];
        for (step, name) in &self.delays {
            let mut args = quorum(&self.work);
            args.insert("x-message-ttl", ArgValue::Int(step.as_millis() as i64));
            queues.push(QueueSpec {
                name: name.clone(),
                kind: "quorum",
                arguments: args,
            });
        }
        let policy_of = |q: &QueueSpec| -> BTreeMap<&'static str, ArgValue> {
            q.arguments
                .iter()
                .filter(|(k, _)| POLICY_KEYS.contains(k))
                .map(|(k, v)| (k.strip_prefix("x-").unwrap_or(k), v.clone()))
                .collect()
        };
        let escaped = regex_escape(&self.work);
        let policies = vec![
            PolicySpec {
                name: self.work.clone(),
                pattern: format!("^{escaped}$"),
                definition: policy_of(&queues[0]),
            },
            PolicySpec {
                name: format!("{}.delay", self.work),
                pattern: format!("^{escaped}\\.delay\\.[0-9]+$"),
                definition: policy_of(&queues[2]),
            },
        ];
        Topology {
            exchange: self.work.clone(),
            queues,
            bindings: vec![(self.work.clone(), self.work.clone(), self.work.clone())],
            policies,
        }
    }
}

/// `name` as a literal in a policy pattern (RabbitMQ uses Erlang's PCRE `re`).
fn regex_escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The adapter

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
    nonce: String,
    generations: AtomicU64,
    session: tokio::sync::Mutex<Option<Arc<Session>>>,
    intake: tokio::sync::Mutex<Option<Intake>>,
    /// Taken off the consumer, not handed out yet.
    pending: Mutex<VecDeque<Pending>>,
    /// Handed out and not settled, by receipt.
    leases: Mutex<HashMap<String, Lease>>,
}

/// One connection and its channels.
struct Session {
    generation: u64,
    connection: Connection,
    /// Publisher confirms on.
    publisher: tokio::sync::Mutex<Option<Channel>>,
    /// Queue counts and DLQ work; used by one operation at a time.
    admin: tokio::sync::Mutex<Option<Channel>>,
}

/// The consumer of the work queue.
struct Intake {
    generation: u64,
    channel: Channel,
    consumer: Consumer,
    window: Arc<AckWindow>,
}

struct Pending {
    generation: u64,
    window: Arc<AckWindow>,
    arrived: Instant,
    delivery: lapin::message::Delivery,
}

struct Lease {
    id: String,
    generation: u64,
    window: Arc<AckWindow>,
    tag: u64,
    deadline: Instant,
    hold_until: Instant,
    properties: BasicProperties,
    producer: FieldTable,
    envelope: Envelope,
    enqueued_at: SystemTime,
}

/// What our `sluice-*` headers say about a copy.
#[derive(Debug, Clone, Default)]
struct Envelope {
    retries: u32,
    due_at: Option<SystemTime>,
    first_failure_at: Option<SystemTime>,
    last_failure_at: Option<SystemTime>,
    last_error: Option<String>,
    error_class: Option<FailureClass>,
    redriven: u32,
    function: Option<String>,
    attempts: Option<u32>,
    original_queue: Option<String>,
}

impl RabbitTransport {
    /// Connects to `opts.url`, declares the topology and starts the lease keeper, with the
    /// default [`RabbitConfig`].
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
            nonce: uuid::Uuid::new_v4().simple().to_string()[..8].to_owned(),
            generations: AtomicU64::new(0),
            session: tokio::sync::Mutex::new(None),
            intake: tokio::sync::Mutex::new(None),
            pending: Mutex::new(VecDeque::new()),
            leases: Mutex::new(HashMap::new()),
        });
        inner.session().await?;
        tokio::spawn(keep_leases(Arc::downgrade(&inner), tick));
        Ok(Self { inner })
    }

    /// Deletes this work queue's queues (messages included) and exchange: for tests and for
    /// decommissioning a function.
    pub async fn delete_topology(&self) -> Result<()> {
        self.inner.delete_topology().await
    }
}

/// Nacks (with requeue) the deliveries whose lease ran out, and the prefetched ones that waited
/// in the buffer for [`RabbitConfig::max_hold`] (the broker's `consumer_timeout` counts them
/// too), until the handle is dropped.
async fn keep_leases(inner: Weak<Inner>, tick: Duration) {
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(inner) = inner.upgrade() else { break };
        let now = Instant::now();
        let expired: Vec<Lease> = {
            let mut leases = inner.leases.lock().expect("lease map");
            let receipts: Vec<String> = leases
                .iter()
                .filter(|(_, l)| l.deadline <= now)
                .map(|(r, _)| r.clone())
                .collect();
            receipts.iter().filter_map(|r| leases.remove(r)).collect()
        };
        let max_hold = inner.config.max_hold;
        // Deliveries still inside lapin's consumer count for the broker too: take them into
        // the buffer, so that their wait is measured from about now (within one tick). A
        // `receive` holding the intake does the same itself.
        if let Ok(mut intake) = inner.intake.try_lock() {
            if let Some(i) = intake.as_mut() {
                inner.drain_ready(i);
            }
        }
        let stale: Vec<Pending> = {
            let mut pending = inner.pending.lock().expect("pending buffer");
            // Oldest first: the buffer is in arrival order.
            let n = pending
                .iter()
                .take_while(|p| now.duration_since(p.arrived) >= max_hold)
                .count();
            pending.drain(..n).collect()
        };
        drop(inner);
        for lease in expired {
            if lease.deadline >= lease.hold_until {
                tracing::warn!(
                    id = %lease.id,
                    held = ?max_hold,
                    "message held as long as RabbitMQ's consumer_timeout allows \
                     (transport.consumer_timeout): requeued before the broker closes the channel"
                );
            } else {
                tracing::debug!(id = %lease.id, "lease ran out unsettled: requeued");
            }
            lease.window.requeue(lease.tag).await;
        }
        if !stale.is_empty() {
            tracing::warn!(
                count = stale.len(),
                waited = ?max_hold,
                "prefetched messages waited as long as RabbitMQ's consumer_timeout allows \
                 (transport.consumer_timeout) without a free slot: requeued before the broker \
                 closes the channel"
            );
        }
        for p in stale {
            p.window.requeue(p.delivery.delivery_tag).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Coalesced acks

/// The consumer channel's deliveries that no settle frame has been sent for, and the task
/// that acks finished ones with as few frames as it safely can.
///
/// `basic.ack(tag, multiple = true)` settles every unsettled delivery of the channel up to
/// `tag`, so it may only be sent for the highest tag of a run that starts at the channel's
/// oldest unsettled delivery and holds finished ones only. A delivery that is prefetched,
/// handed out, or waiting for its retry or dead-letter copy to be confirmed is not finished,
/// and a delivery being nacked (requeued) blocks the run until its nack frame is sent, so a
/// multiple ack never covers it. Finished deliveries behind an unfinished one (a slow
/// handler) are acked one by one after [`ACK_LINGER`], so they do not wait for it.
///
/// The caller of [`AckWindow::ack`] waits until the frame covering its delivery is sent: once
/// the worker has returned from its last ack, nothing is left to flush when the process exits.
struct AckWindow {
    channel: Channel,
    tags: Mutex<BTreeMap<u64, Tag>>,
    /// Wakes the flusher; shared with it so that it can outlive the window and stop.
    kick: Arc<tokio::sync::Notify>,
    closed: Arc<std::sync::atomic::AtomicBool>,
}

/// Where one delivery of the window stands.
enum Tag {
    /// Prefetched or handed out.
    Held,
    /// Finished: waiting for the ack frame that covers it (the flag says whether it was sent).
    Done {
        since: Instant,
        sent: tokio::sync::oneshot::Sender<bool>,
    },
    /// A nack (requeue) of it alone is under way.
    Settling,
}

/// Finished deliveries taken for an ack frame: their tags, and who waits for the frame.
type Finished = Vec<(u64, tokio::sync::oneshot::Sender<bool>)>;

/// How long a finished delivery behind an unfinished one waits to be covered by a multiple
/// ack before it is acked alone. Short: the worker's slot is held meanwhile.
pub const ACK_LINGER: Duration = Duration::from_millis(1);

impl AckWindow {
    fn new(channel: Channel) -> Arc<Self> {
        let window = Arc::new(Self {
            channel,
            tags: Mutex::new(BTreeMap::new()),
            kick: Arc::new(tokio::sync::Notify::new()),
            closed: Arc::default(),
        });
        tokio::spawn(flush_acks(
            Arc::downgrade(&window),
            window.kick.clone(),
            window.closed.clone(),
        ));
        window
    }

    /// A delivery arrived on the channel (tags arrive in increasing order).
    fn hold(&self, tag: u64) {
        self.tags.lock().expect("ack window").insert(tag, Tag::Held);
    }

    fn usable(&self) -> bool {
        self.channel.status().connected()
    }

    /// Marks the delivery finished and waits until an ack covering it is sent. `Ok(false)`:
    /// it was settled already, or its channel closed first (the broker redelivers it).
    async fn ack(&self, tag: u64) -> lapin::Result<bool> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut tags = self.tags.lock().expect("ack window");
            match tags.get_mut(&tag) {
                Some(t @ Tag::Held) => {
                    *t = Tag::Done {
                        since: Instant::now(),
                        sent: tx,
                    }
                }
                _ => return Ok(false),
            }
        }
        self.kick.notify_one();
        Ok(rx.await.unwrap_or(false))
    }

    /// Nacks the delivery alone (requeue: it returns to the queue and counts as a delivery).
    async fn nack(&self, tag: u64) -> lapin::Result<bool> {
        {
            let mut tags = self.tags.lock().expect("ack window");
            match tags.get_mut(&tag) {
                Some(t @ Tag::Held) => *t = Tag::Settling,
                _ => return Ok(false),
            }
        }
        let requeue = BasicNackOptions {
            multiple: false,
            requeue: true,
        };
        let result = self.channel.basic_nack(tag, requeue).await;
        // Only now may a multiple ack pass over it: its nack frame went out first.
        self.tags.lock().expect("ack window").remove(&tag);
        self.kick.notify_one();
        result.map(|()| true)
    }

    /// [`AckWindow::nack`] for paths that cannot report a failure: a dead channel returns the
    /// delivery by itself.
    async fn requeue(&self, tag: u64) {
        if let Err(e) = self.nack(tag).await {
            tracing::debug!(error = %e, "requeue failed: the channel is gone and the broker redelivers");
        }
    }

    /// One flush: takes what can be acked now. Returns (the run to ack with one frame, the
    /// finished deliveries behind a gap that waited long enough, when to look again).
    fn take_flushable(&self, now: Instant) -> (Finished, Finished, Option<Instant>) {
        let mut tags = self.tags.lock().expect("ack window");
        let mut run = Vec::new();
        while let Some(entry) = tags.first_entry() {
            if !matches!(entry.get(), Tag::Done { .. }) {
                break;
            }
            if let (tag, Tag::Done { sent, .. }) = entry.remove_entry() {
                run.push((tag, sent));
            }
        }
        let mut alone = Vec::new();
        let mut next: Option<Instant> = None;
        let overdue: Vec<u64> = tags
            .iter()
            .filter_map(|(tag, t)| match t {
                Tag::Done { since, .. } if now.duration_since(*since) >= ACK_LINGER => Some(*tag),
                Tag::Done { since, .. } => {
                    let due = *since + ACK_LINGER;
                    next = Some(next.map_or(due, |n| n.min(due)));
                    None
                }
                _ => None,
            })
            .collect();
        for tag in overdue {
            if let Some(Tag::Done { sent, .. }) = tags.remove(&tag) {
                alone.push((tag, sent));
            }
        }
        (run, alone, next)
    }
}

impl Drop for AckWindow {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Relaxed);
        self.kick.notify_one();
    }
}

/// The window's flusher: one ack frame per contiguous run of finished deliveries. It yields
/// once before looking, so that pipelines finishing at the same moment join the frame (about
/// 40 deliveries a frame at full speed in `just bench rabbitmq`, 15 without the yield); acks
/// that arrive while a frame is being sent go in the next one.
async fn flush_acks(
    window: Weak<AckWindow>,
    kick: Arc<tokio::sync::Notify>,
    closed: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut next: Option<Instant> = None;
    loop {
        match next {
            Some(at) => {
                let _ = tokio::time::timeout_at(at.into(), kick.notified()).await;
            }
            None => kick.notified().await,
        }
        if closed.load(Ordering::Relaxed) {
            break;
        }
        // Let the pipelines that are finishing right now (they run on this runtime) join
        // this frame: more deliveries per ack, fewer frames for the broker.
        tokio::task::yield_now().await;
        let Some(window) = window.upgrade() else {
            break;
        };
        let (run, alone, due) = window.take_flushable(Instant::now());
        next = due;
        if let Some((last, _)) = run.last() {
            let multiple = run.len() > 1;
            let ok = window
                .channel
                .basic_ack(*last, BasicAckOptions { multiple })
                .await
                .map_err(|e| tracing::debug!(error = %e, "ack failed: the channel is gone and the broker redelivers"))
                .is_ok();
            for (_, sent) in run {
                let _ = sent.send(ok);
            }
        }
        for (tag, sent) in alone {
            let ok = window
                .channel
                .basic_ack(tag, BasicAckOptions::default())
                .await
                .is_ok();
            let _ = sent.send(ok);
        }
    }
}

impl Inner {
    // --- connection -------------------------------------------------------------------------

    /// The live session, reconnecting (with backoff) if the connection was lost.
    async fn session(&self) -> Result<Arc<Session>> {
        let mut slot = self.session.lock().await;
        if let Some(s) = slot.as_ref() {
            if s.connection.status().connected() {
                return Ok(s.clone());
            }
            tracing::warn!(
                url = %redact_url(&self.opts.url),
                "RabbitMQ connection lost; reconnecting (unsettled deliveries return to the queue)"
            );
        }
        *slot = None;
        let s = Arc::new(self.connect_with_backoff().await?);
        // Deliveries of older connections can no longer be settled: the broker redelivers them.
        self.leases
            .lock()
            .expect("lease map")
            .retain(|_, l| l.generation == s.generation);
        self.pending
            .lock()
            .expect("pending buffer")
            .retain(|p| p.generation == s.generation);
        *slot = Some(s.clone());
        Ok(s)
    }

    async fn connect_with_backoff(&self) -> Result<Session> {
        let mut schedule = ReconnectSchedule::new(RECONNECT_FIRST, RECONNECT_CAP, RECONNECT_BUDGET);
        loop {
            let err = match self.connect_once().await {
                Ok(s) => return Ok(s),
                Err(e @ Error::Config(_)) => return Err(e),
                Err(e) => e,
            };
            let Some(wait) = schedule.next_wait() else {
                return Err(err);
            };
            // The error texts come from `connect_error` and `broker`: the URL in them is
            // redacted, and lapin's own texts carry no credentials.
            tracing::warn!(
                url = %redact_url(&self.opts.url),
                error = %err,
                attempt = schedule.attempts(),
                retry_in = ?wait,
                "could not connect to RabbitMQ; retrying"
            );
            tokio::time::sleep(wait).await;
        }
    }

    async fn connect_once(&self) -> Result<Session> {
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        let name = format!("sluice {} on {}", self.opts.function, self.names.work);
        let props = ConnectionProperties::default().with_connection_name(name.into());
        let connection =
            tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(&self.opts.url, props))
                .await
                .map_err(|_| Error::Timeout(CONNECT_TIMEOUT))?
                .map_err(|e| connect_error(&self.opts.url, e))?;
        let session = Session {
            generation,
            connection,
            publisher: tokio::sync::Mutex::new(None),
            admin: tokio::sync::Mutex::new(None),
        };
        if self.config.declare {
            let admin = session.admin().await?;
            self.declare(admin.as_ref().expect("admin channel")).await?;
        } else if let Err(e) = self.check_topology(&session).await {
            // Not fatal: `provision` must still run, and a worker starts working once the
            // topology is imported (until then its receive fails with this same reason).
            tracing::warn!(error = %e, "RabbitMQ topology is incomplete");
        }
        Ok(session)
    }

    /// With declaring off: every queue of the topology should exist already.
    async fn check_topology(&self, session: &Session) -> Result<()> {
        for name in self.names.all_queues() {
            let mut admin = session.admin().await?;
            let ch = admin.as_ref().expect("admin channel");
            if let Err(e) = ch
                .queue_declare(
                    name.into(),
                    QueueDeclareOptions::default().passive(),
                    FieldTable::default(),
                )
                .await
            {
                // A failed passive declare closes the channel.
                *admin = None;
                return Err(missing_queue(name, e));
            }
        }
        Ok(())
    }

    /// Declares the topology (idempotent): [`topology`] on the broker, plus `x-expires` on
    /// every queue when [`RabbitConfig::queue_expires`] is set.
    async fn declare(&self, ch: &Channel) -> Result<()> {
        let topology = self.names.topology(self.opts.max_deliveries);
        ch.exchange_declare(
            topology.exchange.as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                auto_delete: self.config.queue_expires.is_some(),
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| declare_error(&topology.exchange, e))?;
        for q in &topology.queues {
            let mut args = FieldTable::default();
            for (name, value) in &q.arguments {
                args.insert((*name).into(), value.amqp());
            }
            if let Some(expires) = self.config.queue_expires {
                args.insert(
                    "x-expires".into(),
                    AMQPValue::LongLongInt(expires.as_millis() as i64),
                );
            }
            ch.queue_declare(q.name.as_str().into(), QueueDeclareOptions::durable(), args)
                .await
                .map_err(|e| declare_error(&q.name, e))?;
        }
        for (exchange, queue, key) in &topology.bindings {
            ch.queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| declare_error(queue, e))?;
        }
        Ok(())
    }

    async fn delete_topology(&self) -> Result<()> {
        let session = self.session().await?;
        let admin = session.admin().await?;
        let ch = admin.as_ref().expect("admin channel");
        for q in self.names.all_queues() {
            ch.queue_delete(q.into(), QueueDeleteOptions::default())
                .await
                .map_err(|e| broker("queue.delete", e))?;
        }
        ch.exchange_delete(
            self.names.work.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await
        .map_err(|e| broker("exchange.delete", e))?;
        Ok(())
    }

    // --- publishing ---------------------------------------------------------------------------

    /// Publishes (mandatory, confirmed) and waits for the broker to take the message.
    async fn publish_confirmed(
        &self,
        session: &Session,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<()> {
        let ch = session.publisher().await?;
        let confirm = ch
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                mandatory(),
                body,
                properties,
            )
            .await
            .map_err(|e| broker("basic.publish", e))?;
        check_confirm(
            confirm.await.map_err(|e| broker("publisher confirm", e))?,
            routing_key,
        )
    }

    async fn publish(&self, msgs: Vec<OutgoingMessage>) -> Result<Vec<String>> {
        for m in &msgs {
            check_outgoing(m)?;
        }
        let session = self.session().await?;
        let ch = session.publisher().await?;
        let now = SystemTime::now();
        let mut sent = Vec::with_capacity(msgs.len());
        for m in msgs {
            let id = uuid::Uuid::new_v4().to_string();
            let producer = field_table(&m.headers);
            let base = BasicProperties::default()
                .with_message_id(id.as_str().into())
                .with_timestamp(unix_secs(now))
                .with_delivery_mode(PERSISTENT);
            let (exchange, routing_key, properties) = if !m.delay.is_zero() {
                // A delayed first publish travels the ladder like a retry copy, with no history.
                let envelope = Envelope {
                    due_at: Some(now + m.delay),
                    ..Envelope::default()
                };
                let headers = copy_headers(&producer, &envelope.retry_entries());
                ("", self.names.route(m.delay), base.with_headers(headers))
            } else {
                (
                    self.names.work.as_str(),
                    self.names.work.as_str(),
                    base.with_headers(producer),
                )
            };
            let confirm = ch
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    mandatory(),
                    &m.body,
                    properties,
                )
                .await
                .map_err(|e| broker("basic.publish", e))?;
            sent.push((id, routing_key.to_owned(), confirm));
        }
        // Confirms come back in order; wait for all of them before reporting the ids.
        let mut ids = Vec::with_capacity(sent.len());
        for (id, routing_key, confirm) in sent {
            check_confirm(
                confirm.await.map_err(|e| broker("publisher confirm", e))?,
                &routing_key,
            )?;
            ids.push(id);
        }
        Ok(ids)
    }

    // --- receiving ----------------------------------------------------------------------------

    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let until = Instant::now() + wait;
        let mut intake = self.intake.lock().await;
        loop {
            let session = self.session().await?;
            self.ensure_intake(&session, &mut intake).await?;
            let current = intake.as_mut().expect("intake started");
            self.drain_ready(current);
            let mut out = Vec::new();
            while out.len() < max {
                let Some(p) = self.pending.lock().expect("pending buffer").pop_front() else {
                    break;
                };
                if let Some(d) = self.admit(&session, p).await {
                    out.push(d);
                }
            }
            if !out.is_empty() {
                return Ok(out);
            }
            let now = Instant::now();
            if now >= until {
                return Ok(out);
            }
            match tokio::time::timeout(until - now, current.consumer.next()).await {
                Err(_) => return Ok(out),
                Ok(Some(Ok(d))) => self.take_in(current, d),
                Ok(Some(Err(e))) => {
                    tracing::warn!(error = %e, "RabbitMQ consumer failed; starting a new one");
                    *intake = None;
                }
                Ok(None) => {
                    tracing::warn!("RabbitMQ consumer was cancelled; starting a new one");
                    *intake = None;
                }
            }
        }
    }

    /// Starts the consumer on the current connection if it is not running there.
    async fn ensure_intake(&self, session: &Session, intake: &mut Option<Intake>) -> Result<()> {
        if let Some(i) = intake.as_ref() {
            if i.generation == session.generation && i.channel.status().connected() {
                return Ok(());
            }
        }
        // The old channel (if any) is gone; the broker redelivers what it held.
        *intake = None;
        let channel = session
            .connection
            .create_channel()
            .await
            .map_err(|e| broker("channel.open", e))?;
        channel
            .basic_qos(self.config.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| broker("basic.qos", e))?;
        let consumer = channel
            .basic_consume(
                self.names.work.as_str().into(),
                format!("sluice-{}-{}", self.nonce, session.generation).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| missing_queue(&self.names.work, e))?;
        *intake = Some(Intake {
            generation: session.generation,
            window: AckWindow::new(channel.clone()),
            channel,
            consumer,
        });
        Ok(())
    }

    /// Moves deliveries that already arrived into the pending buffer, without waiting.
    fn drain_ready(&self, intake: &mut Intake) {
        while let Some(Some(Ok(d))) = intake.consumer.next().now_or_never() {
            self.take_in(intake, d);
        }
    }

    /// A delivery off the consumer: held in the channel's ack window, buffered until handed out.
    fn take_in(&self, intake: &Intake, d: lapin::message::Delivery) {
        intake.window.hold(d.delivery_tag);
        self.pending
            .lock()
            .expect("pending buffer")
            .push_back(Pending {
                generation: intake.generation,
                window: intake.window.clone(),
                arrived: Instant::now(),
                delivery: d,
            });
    }

    /// Turns a raw delivery into a leased [`Delivery`], or forwards a copy that is not due yet
    /// to the next delay step (and returns `None`).
    async fn admit(&self, session: &Session, p: Pending) -> Option<Delivery> {
        let raw = p.delivery;
        if p.generation != session.generation || !p.window.usable() {
            // Its channel is gone; the broker redelivers it.
            return None;
        }
        // Borrowed, not cloned: this runs for every delivery.
        let no_headers = FieldTable::default();
        let top = raw.properties.headers().as_ref().unwrap_or(&no_headers);
        let trusted = raw.exchange.as_str().is_empty() && top.contains_key(own_header::RETRIES);
        let (producer, envelope) = split_headers(top, trusted);
        let now = SystemTime::now();
        let id = message_id(&raw.properties, &raw.data);
        if let Some(due) = envelope.due_at {
            let left = due.duration_since(now).unwrap_or_default();
            if left >= self.names.smallest_step() {
                self.forward(session, &p.window, &raw, &id, &producer, &envelope, left)
                    .await;
                return None;
            }
        }
        let returns = if raw.redelivered {
            top.inner()
                .get("x-delivery-count")
                .and_then(as_u64)
                .map_or(1, |n| n as u32)
        } else {
            0
        };
        let enqueued_at = raw
            .properties
            .timestamp()
            .map_or(now, |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        let receipt = format!(
            "{}:{}:{}:{}",
            self.nonce,
            p.generation,
            p.window.channel.id(),
            raw.delivery_tag
        );
        let arrived = Instant::now();
        let hold_until = p.arrived + self.config.max_hold;
        let delivery = Delivery {
            id: id.clone(),
            body: raw.data,
            headers: to_headers(&producer),
            attempt: envelope.retries + returns + 1,
            enqueued_at,
            first_failure_at: envelope.first_failure_at,
            receipt: receipt.clone(),
        };
        let lease = Lease {
            id,
            generation: p.generation,
            window: p.window,
            tag: raw.delivery_tag,
            deadline: (arrived + self.opts.lease).min(hold_until),
            hold_until,
            properties: raw.properties,
            producer,
            envelope,
            enqueued_at,
        };
        self.leases
            .lock()
            .expect("lease map")
            .insert(receipt, lease);
        Some(delivery)
    }

    /// A delayed copy came back early (the ladder rounds down): on to the next step.
    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        session: &Session,
        window: &AckWindow,
        raw: &lapin::message::Delivery,
        id: &str,
        producer: &FieldTable,
        envelope: &Envelope,
        left: Duration,
    ) {
        let headers = copy_headers(producer, &envelope.retry_entries());
        let properties = copy_properties(&raw.properties, id, headers);
        let step = self.names.route(left);
        match self
            .publish_confirmed(session, "", step, &raw.data, properties)
            .await
        {
            Ok(()) => {
                if !matches!(window.ack(raw.delivery_tag).await, Ok(true)) {
                    tracing::warn!(
                        id,
                        "forwarded a delayed copy but could not ack the old one: it is duplicated"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(id, error = %e, "could not forward a delayed copy; it returns to the queue");
                window.requeue(raw.delivery_tag).await;
            }
        }
    }

    // --- settling -----------------------------------------------------------------------------

    /// Takes the lease of `d` out of the map: from here on this call settles it.
    async fn take_lease(&self, d: &Delivery) -> Result<Lease> {
        let lease = {
            let mut leases = self.leases.lock().expect("lease map");
            match leases.remove(&d.receipt) {
                Some(l) if l.id == d.id => l,
                Some(l) => {
                    leases.insert(d.receipt.clone(), l);
                    return Err(Error::LeaseLost(d.id.clone()));
                }
                None => return Err(Error::LeaseLost(d.id.clone())),
            }
        };
        if lease.deadline <= Instant::now() {
            // Ran out before the keeper noticed: it goes back, and the holder lost it.
            lease.window.requeue(lease.tag).await;
            return Err(Error::LeaseLost(d.id.clone()));
        }
        Ok(lease)
    }

    /// The session a copy of `lease` is published on: the lease's own connection. Once that is
    /// gone the broker redelivers the original, so a copy would only duplicate it.
    async fn session_of(&self, lease: &Lease, d: &Delivery) -> Result<Arc<Session>> {
        let session = self.session().await?;
        if session.generation != lease.generation || !lease.window.usable() {
            return Err(Error::LeaseLost(d.id.clone()));
        }
        Ok(session)
    }

    /// Publishes a copy of the leased delivery (same body and properties, `headers`) to
    /// `routing_key` on the lease's own connection, and acks the original only once the broker
    /// confirmed the copy; on failure the lease is put back, so nothing is lost.
    async fn replace_with_copy(
        &self,
        d: &Delivery,
        lease: Lease,
        routing_key: &str,
        headers: FieldTable,
    ) -> Result<()> {
        let properties = copy_properties_at(&lease.properties, &d.id, headers, lease.enqueued_at);
        let result = match self.session_of(&lease, d).await {
            Ok(session) => {
                self.publish_confirmed(&session, "", routing_key, &d.body, properties)
                    .await
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => settled(lease.window.ack(lease.tag).await, &d.id),
            Err(e) => {
                self.restore(d, lease);
                Err(e)
            }
        }
    }

    /// Puts a lease back after a failed settle, so it runs out as usual.
    fn restore(&self, d: &Delivery, lease: Lease) {
        self.leases
            .lock()
            .expect("lease map")
            .insert(d.receipt.clone(), lease);
    }

    async fn ack(&self, d: &Delivery) -> Result<()> {
        let lease = self.take_lease(d).await?;
        settled(lease.window.ack(lease.tag).await, &d.id)
    }

    async fn release(&self, d: &Delivery) -> Result<()> {
        let lease = self.take_lease(d).await?;
        settled(lease.window.nack(lease.tag).await, &d.id)
    }

    async fn extend(&self, d: &Delivery, lease: Duration) -> Result<()> {
        let now = Instant::now();
        let expired = {
            let mut leases = self.leases.lock().expect("lease map");
            match leases.get_mut(&d.receipt) {
                Some(l) if l.id == d.id && l.deadline > now && l.hold_until > now => {
                    l.deadline = (now + lease).min(l.hold_until);
                    return Ok(());
                }
                Some(l) if l.id == d.id => leases.remove(&d.receipt),
                _ => None,
            }
        };
        if let Some(l) = expired {
            if l.hold_until <= now {
                tracing::warn!(
                    id = %l.id,
                    held = ?self.config.max_hold,
                    "message held as long as RabbitMQ's consumer_timeout allows \
                     (transport.consumer_timeout): requeued before the broker closes the channel"
                );
            }
            l.window.requeue(l.tag).await;
        }
        Err(Error::LeaseLost(d.id.clone()))
    }

    async fn retry_after(&self, d: &Delivery, delay: Duration, failure: &Failure) -> Result<()> {
        let lease = self.take_lease(d).await?;
        let envelope = Envelope {
            // The copy's own deliveries count on from here.
            retries: d.attempt,
            due_at: (!delay.is_zero()).then(|| SystemTime::now() + delay),
            first_failure_at: Some(lease.envelope.first_failure_at.unwrap_or(failure.at)),
            last_failure_at: Some(failure.at),
            last_error: Some(cut(&failure.reason, MAX_ERROR_BYTES)),
            error_class: Some(failure.class),
            redriven: lease.envelope.redriven,
            ..Envelope::default()
        };
        let headers = copy_headers(&lease.producer, &envelope.retry_entries());
        self.replace_with_copy(d, lease, self.names.route(delay), headers)
            .await
    }

    async fn dead_letter(&self, d: &Delivery, failure: &Failure) -> Result<()> {
        let lease = self.take_lease(d).await?;
        let first = lease.envelope.first_failure_at.unwrap_or(failure.at);
        let entries = vec![
            (header::FUNCTION, self.opts.function.clone()),
            (header::ERROR_CLASS, failure.class.as_str().to_owned()),
            (header::LAST_ERROR, cut(&failure.reason, MAX_ERROR_BYTES)),
            (header::ATTEMPTS, d.attempt.to_string()),
            (header::FIRST_FAILURE_AT, rfc3339(first)),
            (header::LAST_FAILURE_AT, rfc3339(failure.at)),
            (header::ORIGINAL_QUEUE, self.names.work.clone()),
            (own_header::REDRIVEN, lease.envelope.redriven.to_string()),
            (own_header::DEAD_LETTERED_AT, rfc3339(SystemTime::now())),
        ];
        let headers = copy_headers(&lease.producer, &entries);
        self.replace_with_copy(d, lease, &self.names.dlq, headers)
            .await
    }

    // --- inspection ---------------------------------------------------------------------------

    async fn stats(&self) -> Result<QueueStats> {
        let session = self.session().await?;
        let (ready, delayed, dead_lettered) = {
            let admin = session.admin().await?;
            let ch = admin.as_ref().expect("admin channel");
            let ready = queue_depth(ch, &self.names.work).await?;
            let mut delayed = 0;
            for (_, name) in &self.names.delays {
                delayed += queue_depth(ch, name).await?;
            }
            (ready, delayed, queue_depth(ch, &self.names.dlq).await?)
        };
        // Deliveries that reached this process but were not handed out are still ready work.
        if let Ok(mut intake) = self.intake.try_lock() {
            if let Some(i) = intake.as_mut() {
                self.drain_ready(i);
            }
        }
        let prefetched = self.pending.lock().expect("pending buffer").len() as u64;
        let in_flight = self.leases.lock().expect("lease map").len() as u64;
        Ok(QueueStats {
            ready: ready + prefetched,
            in_flight,
            delayed,
            dead_lettered,
        })
    }

    async fn dlq_list(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        let session = self.session().await?;
        let mut scan = DlqScan::start(&session, &self.names.dlq).await?;
        let mut out = Vec::new();
        let result = async {
            while out.len() < limit {
                let Some(m) = scan.next().await? else { break };
                out.push(self.dead_letter_from(&m));
                scan.keep(&m);
            }
            Ok(())
        }
        .await;
        scan.finish(result).await?;
        Ok(out)
    }

    async fn dlq_get(&self, id: &str) -> Result<Option<DeadLetter>> {
        let session = self.session().await?;
        let mut scan = DlqScan::start(&session, &self.names.dlq).await?;
        let mut found = None;
        let result = async {
            for _ in 0..DLQ_SCAN_LIMIT {
                let Some(m) = scan.next().await? else { break };
                scan.keep(&m);
                if message_id(&m.properties, &m.data) == id {
                    found = Some(self.dead_letter_from(&m));
                    break;
                }
            }
            Ok(())
        }
        .await;
        scan.finish(result).await?;
        Ok(found)
    }

    async fn redrive(&self, filter: &RedriveFilter) -> Result<Vec<DeadLetter>> {
        let limit = filter.limit.unwrap_or(usize::MAX);
        let session = self.session().await?;
        let mut scan = DlqScan::start(&session, &self.names.dlq).await?;
        let mut out = Vec::new();
        let result = async {
            for _ in 0..DLQ_SCAN_LIMIT {
                if out.len() >= limit {
                    break;
                }
                let Some(m) = scan.next().await? else { break };
                let dl = self.dead_letter_from(&m);
                if !filter.error_class.is_none_or(|c| c == dl.error_class) {
                    scan.keep(&m);
                    continue;
                }
                if filter.dry_run {
                    scan.keep(&m);
                    out.push(dl);
                    continue;
                }
                let ((producer, _), _) = self.dead_letter_parts(&m);
                let entries = [
                    (own_header::RETRIES, "0".to_owned()),
                    (own_header::REDRIVEN, (dl.redriven + 1).to_string()),
                    (own_header::REDRIVEN_FROM, self.names.dlq.clone()),
                    (own_header::REDRIVEN_AT, rfc3339(SystemTime::now())),
                ];
                let properties =
                    copy_properties(&m.properties, &dl.id, copy_headers(&producer, &entries));
                // Confirmed on the work queue before the DLQ copy goes.
                self.publish_confirmed(&session, "", &self.names.work, &m.data, properties)
                    .await?;
                scan.remove(&m).await?;
                out.push(dl);
            }
            Ok(())
        }
        .await;
        scan.finish(result).await?;
        Ok(out)
    }

    /// Splits a DLQ message: (producer headers, our envelope), and the broker's `x-death`
    /// entry when the broker dead-lettered it (crash-loop guard) rather than this adapter.
    fn dead_letter_parts(
        &self,
        m: &lapin::message::Delivery,
    ) -> ((FieldTable, Envelope), Option<FieldTable>) {
        let top = m.properties.headers().clone().unwrap_or_default();
        let death = top
            .inner()
            .get("x-death")
            .and_then(|v| match v {
                AMQPValue::FieldArray(a) => a.as_slice().first().cloned(),
                _ => None,
            })
            .and_then(|v| match v {
                AMQPValue::FieldTable(t) => Some(t),
                _ => None,
            });
        // Our own dead letters never carry x-death (it is stripped from copies). A broker dead
        // letter is our copy only if it had come through the default exchange, like any copy.
        let trusted = match &death {
            None => true,
            Some(d) => {
                d.inner().get("exchange").map(as_string).unwrap_or_default() == ""
                    && top.contains_key(own_header::RETRIES)
            }
        };
        (split_headers(&top, trusted), death)
    }

    fn dead_letter_from(&self, m: &lapin::message::Delivery) -> DeadLetter {
        let ((producer, env), death) = self.dead_letter_parts(m);
        let now = SystemTime::now();
        let mut dl = match death {
            Some(death) => {
                let get = |k: &str| death.inner().get(k).map(as_string).unwrap_or_default();
                let at = death
                    .inner()
                    .get("time")
                    .and_then(as_u64)
                    .map_or(now, |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s));
                let reason = get("reason");
                let queue = Some(get("queue"))
                    .filter(|q| !q.is_empty())
                    .unwrap_or_else(|| self.names.work.clone());
                let (class, attempts, last_error) = if reason == "delivery_limit" {
                    let n = env.retries + self.opts.max_deliveries.max(1);
                    (
                        FailureClass::CrashLoop,
                        n,
                        format!(
                            "delivered {n} times without being settled (RabbitMQ x-delivery-limit): the worker crashed or lost its lease each time"
                        ),
                    )
                } else {
                    (
                        FailureClass::Permanent,
                        env.retries + 1,
                        format!("dead-lettered by RabbitMQ from {queue}: {reason}"),
                    )
                };
                DeadLetter {
                    id: message_id(&m.properties, &m.data),
                    attempts,
                    error_class: class,
                    last_error,
                    body: None,
                    body_hex: None,
                    headers: to_headers(&producer),
                    function: self.opts.function.clone(),
                    original_queue: queue,
                    first_failure_at: rfc3339(env.first_failure_at.unwrap_or(at)),
                    last_failure_at: rfc3339(at),
                    redriven: env.redriven,
                    raw_body: Vec::new(),
                }
            }
            None => DeadLetter {
                id: message_id(&m.properties, &m.data),
                attempts: env.attempts.unwrap_or(1),
                error_class: env.error_class.unwrap_or(FailureClass::Permanent),
                last_error: env.last_error.clone().unwrap_or_default(),
                body: None,
                body_hex: None,
                headers: to_headers(&producer),
                function: env
                    .function
                    .clone()
                    .unwrap_or_else(|| self.opts.function.clone()),
                original_queue: env
                    .original_queue
                    .clone()
                    .unwrap_or_else(|| self.names.work.clone()),
                first_failure_at: rfc3339(env.first_failure_at.unwrap_or(now)),
                last_failure_at: rfc3339(env.last_failure_at.unwrap_or(now)),
                redriven: env.redriven,
                raw_body: Vec::new(),
            },
        };
        dl.set_body(m.data.clone());
        dl
    }
}

/// A pass over the DLQ on the admin channel: `basic.get` without auto-ack, then every message
/// kept is returned in place with one `basic.nack` (multiple, requeue). Classic queues apply
/// that before the next command of the same channel, so counts and peeks right after see it.
struct DlqScan<'s> {
    slot: tokio::sync::MutexGuard<'s, Option<Channel>>,
    channel: Channel,
    dlq: &'s str,
    /// Highest delivery tag kept: every unacked message on the channel up to it is one we keep.
    kept: Option<u64>,
}

impl<'s> DlqScan<'s> {
    async fn start(session: &'s Session, dlq: &'s str) -> Result<Self> {
        let slot = session.admin().await?;
        let channel = slot.as_ref().expect("admin channel").clone();
        Ok(Self {
            slot,
            channel,
            dlq,
            kept: None,
        })
    }

    async fn next(&mut self) -> Result<Option<lapin::message::Delivery>> {
        let got = self
            .channel
            .basic_get(self.dlq.into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(|e| broker("basic.get", e))?;
        Ok(got.map(|m| m.delivery))
    }

    fn keep(&mut self, m: &lapin::message::Delivery) {
        self.kept = Some(m.delivery_tag);
    }

    /// Acks a message that was moved elsewhere (and confirmed there).
    async fn remove(&mut self, m: &lapin::message::Delivery) -> Result<()> {
        self.channel
            .basic_ack(m.delivery_tag, BasicAckOptions::default())
            .await
            .map_err(|e| broker("basic.ack", e))
    }

    /// Returns what was kept; on an error, drops the channel instead (closing it returns
    /// every unacked message all the same).
    async fn finish(mut self, result: Result<()>) -> Result<()> {
        if result.is_ok() {
            if let Some(tag) = self.kept {
                let back = BasicNackOptions {
                    multiple: true,
                    requeue: true,
                };
                match self.channel.basic_nack(tag, back).await {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        *self.slot = None;
                        return Err(broker("basic.nack", e));
                    }
                }
            }
            return result;
        }
        *self.slot = None;
        result
    }
}

impl Session {
    /// The publisher channel (confirms on), reopened if it was closed.
    async fn publisher(&self) -> Result<Channel> {
        let mut slot = self.publisher.lock().await;
        if let Some(ch) = slot.as_ref() {
            if ch.status().connected() {
                return Ok(ch.clone());
            }
        }
        let ch = self
            .connection
            .create_channel()
            .await
            .map_err(|e| broker("channel.open", e))?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| broker("confirm.select", e))?;
        *slot = Some(ch.clone());
        Ok(ch)
    }

    /// The admin channel, reopened if it was closed (a failed passive declare closes it);
    /// held by one operation at a time.
    async fn admin(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Channel>>> {
        let mut slot = self.admin.lock().await;
        if !slot.as_ref().is_some_and(|ch| ch.status().connected()) {
            let ch = self
                .connection
                .create_channel()
                .await
                .map_err(|e| broker("channel.open", e))?;
            *slot = Some(ch);
        }
        Ok(slot)
    }
}

impl Envelope {
    /// Reads our `sluice-*` headers (only called on trusted copies).
    fn read(&mut self, name: &str, value: &AMQPValue) {
        let text = as_string(value);
        let time = || humantime::parse_rfc3339(&text).ok();
        match name {
            own_header::RETRIES => self.retries = text.parse().unwrap_or(0),
            own_header::DUE_AT => self.due_at = time(),
            own_header::REDRIVEN => self.redriven = text.parse().unwrap_or(0),
            header::FIRST_FAILURE_AT => self.first_failure_at = time(),
            header::LAST_FAILURE_AT => self.last_failure_at = time(),
            header::LAST_ERROR => self.last_error = Some(text),
            header::ERROR_CLASS => self.error_class = FailureClass::parse(&text),
            header::FUNCTION => self.function = Some(text),
            header::ATTEMPTS => self.attempts = text.parse().ok(),
            header::ORIGINAL_QUEUE => self.original_queue = Some(text),
            _ => {}
        }
    }

    /// The headers of a copy on its way back to the work queue.
    fn retry_entries(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![(own_header::RETRIES, self.retries.to_string())];
        if let Some(t) = self.due_at {
            out.push((own_header::DUE_AT, rfc3339(t)));
        }
        if let Some(t) = self.first_failure_at {
            out.push((header::FIRST_FAILURE_AT, rfc3339(t)));
        }
        if let Some(t) = self.last_failure_at {
            out.push((header::LAST_FAILURE_AT, rfc3339(t)));
        }
        if let Some(e) = &self.last_error {
            out.push((header::LAST_ERROR, e.clone()));
        }
        if let Some(c) = self.error_class {
            out.push((header::ERROR_CLASS, c.as_str().to_owned()));
        }
        out.push((own_header::REDRIVEN, self.redriven.to_string()));
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Headers and properties

/// Splits message headers into the producer's and our envelope. On a trusted copy every
/// top-level `sluice-*` header is ours and the producer's own `sluice-*` ones come out of the
/// nested table; otherwise every header is the producer's. Broker bookkeeping is dropped.
fn split_headers(top: &FieldTable, trusted: bool) -> (FieldTable, Envelope) {
    let mut producer = FieldTable::default();
    let mut envelope = Envelope::default();
    for (name, value) in top {
        let name = name.as_str();
        if BROKER_HEADERS.contains(&name) {
            continue;
        }
        if trusted && name.starts_with(header::RESERVED_PREFIX) {
            if name == own_header::PRODUCER_HEADERS {
                if let AMQPValue::FieldTable(t) = value {
                    for (k, v) in t {
                        producer.insert(k.clone(), v.clone());
                    }
                }
            } else {
                envelope.read(name, value);
            }
            continue;
        }
        producer.insert(name.into(), value.clone());
    }
    (producer, envelope)
}

/// The headers of a copy: the producer's (their `sluice-*` ones nested apart) plus ours.
fn copy_headers(producer: &FieldTable, ours: &[(&str, String)]) -> FieldTable {
    let mut out = FieldTable::default();
    let mut nested = FieldTable::default();
    for (name, value) in producer {
        if name.as_str().starts_with(header::RESERVED_PREFIX) {
            nested.insert(name.clone(), value.clone());
        } else {
            out.insert(name.clone(), value.clone());
        }
    }
    if !nested.inner().is_empty() {
        out.insert(
            own_header::PRODUCER_HEADERS.into(),
            AMQPValue::FieldTable(nested),
        );
    }
    for (name, value) in ours {
        out.insert((*name).into(), long_string(value));
    }
    out
}

/// Properties of a copy: the original's, minus what must not be copied (`expiration` would
/// expire the copy on a delay step; `user-id` is checked against our connection's user).
fn copy_properties(orig: &BasicProperties, id: &str, headers: FieldTable) -> BasicProperties {
    let enqueued = orig.timestamp().map_or_else(SystemTime::now, |s| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    });
    copy_properties_at(orig, id, headers, enqueued)
}

fn copy_properties_at(
    orig: &BasicProperties,
    id: &str,
    headers: FieldTable,
    enqueued_at: SystemTime,
) -> BasicProperties {
    let mut p = BasicProperties::default()
        .with_message_id(id.into())
        .with_timestamp(unix_secs(enqueued_at))
        .with_delivery_mode(PERSISTENT)
        .with_headers(headers);
    if let Some(v) = orig.content_type() {
        p = p.with_content_type(v.clone());
    }
    if let Some(v) = orig.content_encoding() {
        p = p.with_content_encoding(v.clone());
    }
    if let Some(v) = orig.priority() {
        p = p.with_priority(*v);
    }
    if let Some(v) = orig.correlation_id() {
        p = p.with_correlation_id(v.clone());
    }
    if let Some(v) = orig.reply_to() {
        p = p.with_reply_to(v.clone());
    }
    if let Some(v) = orig.kind() {
        p = p.with_type(v.clone());
    }
    if let Some(v) = orig.app_id() {
        p = p.with_app_id(v.clone());
    }
    p
}

/// Producer headers as strings, names in lower case.
fn to_headers(t: &FieldTable) -> Headers {
    t.into_iter()
        .map(|(k, v)| (k.as_str().to_ascii_lowercase(), as_string(v)))
        .collect()
}

fn field_table(h: &Headers) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in h {
        t.insert(k.as_str().into(), long_string(v));
    }
    t
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// A header value as text (numbers in decimal, tables and arrays as JSON).
fn as_string(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ByteArray(b) => hex::encode(b.as_slice()),
        AMQPValue::Void => String::new(),
        AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_) | AMQPValue::DecimalValue(_) => {
            serde_json::to_string(v).unwrap_or_default()
        }
        other => as_u64(other)
            .map(|n| n.to_string())
            .or_else(|| as_i64(other).map(|n| n.to_string()))
            .or_else(|| match other {
                AMQPValue::Float(f) => Some(f.to_string()),
                AMQPValue::Double(d) => Some(d.to_string()),
                _ => None,
            })
            .unwrap_or_default(),
    }
}

fn as_i64(v: &AMQPValue) -> Option<i64> {
    Some(match v {
        AMQPValue::ShortShortInt(n) => i64::from(*n),
        AMQPValue::ShortInt(n) => i64::from(*n),
        AMQPValue::LongInt(n) => i64::from(*n),
        AMQPValue::LongLongInt(n) => *n,
        _ => return as_u64(v).and_then(|n| i64::try_from(n).ok()),
    })
}

fn as_u64(v: &AMQPValue) -> Option<u64> {
    match v {
        AMQPValue::ShortShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::Timestamp(n) => Some(*n),
        AMQPValue::ShortShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.parse().ok(),
        _ => None,
    }
}

/// The message id: `message-id` as published, or (for producers that set none) a digest of
/// the content, which stays the same across redeliveries.
fn message_id(p: &BasicProperties, body: &[u8]) -> String {
    if let Some(id) = p.message_id() {
        return id.as_str().to_owned();
    }
    let mut h = Sha256::new();
    h.update(body);
    h.update(format!("{:?}{:?}", p.timestamp(), p.headers()).as_bytes());
    format!("sha256-{}", &hex::encode(h.finalize())[..32])
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// Limits checked before any network call.
fn check_outgoing(m: &OutgoingMessage) -> Result<()> {
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
                "header name {:?}... is {} bytes, AMQP allows {MAX_NAME_BYTES}",
                cut(k, 32),
                k.len()
            )));
        }
        total += k.len() + v.len();
    }
    if total > MAX_HEADER_BYTES {
        return Err(Error::Limit(format!(
            "headers are {total} bytes, this adapter allows {MAX_HEADER_BYTES} (they must fit in one AMQP frame with the failure history)"
        )));
    }
    Ok(())
}

fn mandatory() -> BasicPublishOptions {
    BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    }
}

fn check_confirm(c: Confirmation, routing_key: &str) -> Result<()> {
    match c {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) => Err(Error::Transport(format!(
            "rabbitmq: a message to {routing_key:?} was unroutable ({}): is the topology provisioned?",
            returned.reply_text
        ))),
        Confirmation::Nack(_) => Err(Error::Transport(format!(
            "rabbitmq: the broker refused a message to {routing_key:?} (nack)"
        ))),
        Confirmation::NotRequested => Err(Error::Transport(
            "rabbitmq: publisher confirms are off on the publishing channel".into(),
        )),
    }
}

/// The outcome of an ack/nack through the [`AckWindow`]: `Ok(false)` (its channel is gone or
/// it was settled) and errors both mean the broker will redeliver: the lease is lost.
fn settled(r: lapin::Result<bool>, id: &str) -> Result<()> {
    match r {
        Ok(true) => Ok(()),
        Ok(false) => Err(Error::LeaseLost(id.to_owned())),
        Err(e) => {
            tracing::debug!(id, error = %e, "settling failed on a closed channel");
            Err(Error::LeaseLost(id.to_owned()))
        }
    }
}

async fn queue_depth(ch: &Channel, name: &str) -> Result<u64> {
    let q = ch
        .queue_declare(
            name.into(),
            QueueDeclareOptions::default().passive(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| missing_queue(name, e))?;
    Ok(u64::from(q.message_count()))
}

fn broker(what: &str, e: lapin::Error) -> Error {
    Error::Transport(format!("rabbitmq {what}: {e}"))
}

/// A queue that should exist but does not (declaring is off, or someone deleted it).
fn missing_queue(name: &str, e: lapin::Error) -> Error {
    match e.kind() {
        ErrorKind::ProtocolError(amqp)
            if amqp.kind() == &AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) =>
        {
            Error::Transport(format!(
                "RabbitMQ has no queue {name:?}: run `provision`, or import \
                 infra/rabbitmq/definitions.json (declaring at start is off: \
                 transport.declare = false)"
            ))
        }
        _ => broker(&format!("queue {name:?}"), e),
    }
}

/// A refused login, an unknown virtual host or a failed TLS handshake is a configuration
/// error: retrying cannot help.
fn connect_error(url: &str, e: lapin::Error) -> Error {
    let shown = redact_url(url);
    if let ErrorKind::IOError(io) = e.kind() {
        // rustls reports a peer that does not speak TLS, or a certificate it rejects, as
        // invalid data; a broker going away mid-handshake is a reset or an EOF instead.
        if url.starts_with("amqps://") && io.kind() == std::io::ErrorKind::InvalidData {
            return Error::Config(format!(
                "key `transport.url`: the TLS handshake with {shown} failed ({io}): is that \
                 port a TLS listener (5671 by default, 5672 is plain amqp://), and does the \
                 broker's certificate name that host?"
            ));
        }
    }
    if let ErrorKind::ProtocolError(amqp) = e.kind() {
        match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => {
                return Error::Config(format!(
                    "key `transport.url`: RabbitMQ refused the login to {shown} (user, password \
                     or permissions on the virtual host): {}",
                    amqp.get_message()
                ))
            }
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => {
                return Error::Config(format!(
                    "key `transport.url`: RabbitMQ does not allow {shown} (does the virtual host \
                     exist?): {}",
                    amqp.get_message()
                ))
            }
            _ => {}
        }
    }
    Error::Transport(format!("rabbitmq: connect to {shown}: {e}"))
}

fn declare_error(name: &str, e: lapin::Error) -> Error {
    if let ErrorKind::ProtocolError(amqp) = e.kind() {
        if amqp.kind() == &AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) {
            return Error::Config(format!(
                "RabbitMQ has {name:?} with other arguments than Sluice declares ({}): a changed \
                 retry.max_deliveries cannot be applied to an existing queue; use a policy or \
                 recreate the queue",
                amqp.get_message()
            ));
        }
    }
    broker(&format!("declare {name:?}"), e)
}

// ---------------------------------------------------------------------------------------------
// The contract

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
        self.inner.dlq_list(limit).await
    }

    async fn dlq_get(&self, id: &str) -> Result<Option<DeadLetter>> {
        self.inner.dlq_get(id).await
    }

    async fn redrive(&self, filter: &RedriveFilter) -> Result<Vec<DeadLetter>> {
        self.inner.redrive(filter).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_topology_policies_repeat_the_quorum_arguments_and_match_only_their_queues() {
        let t = topology("pay.v2", 10).unwrap();
        assert_eq!(t.queues.len(), 14);
        assert_eq!(t.queues[0].arguments["x-delivery-limit"], ArgValue::Int(9));
        assert_eq!(t.policies[0].pattern, "^pay\\.v2$");
        assert_eq!(t.policies[1].pattern, "^pay\\.v2\\.delay\\.[0-9]+$");
        assert_eq!(
            t.policies[0].definition["dead-letter-routing-key"],
            ArgValue::Text("pay.v2.dlq".into())
        );
        assert_eq!(t.policies[0].definition["delivery-limit"], ArgValue::Int(9));
        assert!(!t.policies[1].definition.contains_key("delivery-limit"));
        assert!(!t.policies[1].definition.contains_key("message-ttl"));
        // Each policy's keys are exactly the queue arguments of the queues it names.
        for q in t.queues.iter().filter(|q| q.kind == "quorum") {
            let policy = if q.name == "pay.v2" {
                &t.policies[0]
            } else {
                &t.policies[1]
            };
            for (k, v) in &policy.definition {
                assert_eq!(
                    q.arguments.get(format!("x-{k}").as_str()),
                    Some(v),
                    "{}",
                    q.name
                );
            }
        }
        assert_eq!(regex_escape("a.b+c"), "a\\.b\\+c");
    }

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

    #[test]
    fn the_ladder_routes_to_the_largest_step_not_above_the_delay_and_rounds_short_ones_up() {
        let n = Names::new("q").unwrap();
        assert_eq!(n.route(Duration::ZERO), "q");
        assert_eq!(n.route(Duration::from_millis(100)), "q.delay.250");
        assert_eq!(n.route(Duration::from_millis(250)), "q.delay.250");
        assert_eq!(n.route(Duration::from_millis(1_999)), "q.delay.1000");
        assert_eq!(n.route(Duration::from_secs(3_600)), "q.delay.512000");
    }
}
