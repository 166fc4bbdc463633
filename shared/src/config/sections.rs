//! The settings sections, each refusing unknown keys, with their defaults.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::redact_url;

impl std::fmt::Debug for TransportSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransportSettings")
            .field("kind", &self.kind)
            .field("url", &redact_url(&self.url))
            .field("lease", &self.lease)
            .field("wait", &self.wait)
            .field("poll_interval", &self.poll_interval)
            .field("prefetch", &self.prefetch)
            .field("declare", &self.declare)
            .field("consumer_timeout", &self.consumer_timeout)
            .finish()
    }
}

impl std::fmt::Debug for StoreSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSettings")
            .field("kind", &self.kind)
            .field("url", &redact_url(&self.url))
            .field("ttl", &self.ttl)
            .field("max_output_bytes", &self.max_output_bytes)
            .field("fail_open", &self.fail_open)
            .field("cache_entries", &self.cache_entries)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Which transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TransportKind {
    /// The embedded SQLite queue.
    Embedded,
    /// RabbitMQ (feature `rabbitmq`).
    Rabbitmq,
    /// Amazon SQS (feature `sqs`).
    Sqs,
}

impl TransportKind {
    /// The configuration name (`embedded`, `rabbitmq`, `sqs`), also the cargo feature's name.
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Embedded => "embedded",
            TransportKind::Rabbitmq => "rabbitmq",
            TransportKind::Sqs => "sqs",
        }
    }
}

/// `[transport]`
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransportSettings {
    /// `embedded` (default), `rabbitmq` or `sqs`.
    pub kind: TransportKind,
    /// Embedded: SQLite file path. RabbitMQ: `amqp(s)://` URL. SQS: queue URL or name.
    pub url: String,
    /// How long a received message stays leased before it is redelivered.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How long one receive call waits for a message.
    #[serde(with = "humantime_serde")]
    pub wait: Duration,
    /// Embedded: how often an idle receive polls the file (other processes may publish).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// RabbitMQ: messages the broker may push ahead of the handlers (unacked, per process);
    /// 0 (the default) means 2 x `worker.concurrency`. See [`super::Settings::prefetch`].
    pub prefetch: u16,
    /// Create the broker topology when the worker starts (and on every reconnect). Off: it is
    /// only checked, for brokers provisioned by `provision` or `infra/`. RabbitMQ only; the
    /// other transports ignore it (docs/configuration.md says what each does at start).
    pub declare: bool,
    /// RabbitMQ: the broker's `consumer_timeout` (30 min by default). A delivery is requeued
    /// before it has been held this long, so that the broker never closes the channel.
    #[serde(with = "humantime_serde")]
    pub consumer_timeout: Duration,
    /// RabbitMQ `amqps://`: a PEM file of CA certificates to trust besides the system's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<std::path::PathBuf>,
}

impl Default for TransportSettings {
    fn default() -> Self {
        TransportSettings {
            kind: TransportKind::Embedded,
            url: ".sluice/queue.db".into(),
            lease: Duration::from_secs(30),
            wait: Duration::from_secs(1),
            poll_interval: Duration::from_millis(50),
            prefetch: 0,
            declare: true,
            consumer_timeout: Duration::from_secs(30 * 60),
            tls_ca_file: None,
        }
    }
}

/// Which idempotency store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// No idempotency records: at-least-once only.
    None,
    /// SQLite file (embedded default).
    Sqlite,
    /// PostgreSQL (feature `postgres`).
    Postgres,
    /// Redis (feature `redis`).
    Redis,
    /// S3 conditional writes (feature `s3`).
    S3,
}

impl StoreKind {
    /// The configuration name (`sqlite`, `postgres`, ...), also the cargo feature's name.
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::None => "none",
            StoreKind::Sqlite => "sqlite",
            StoreKind::Postgres => "postgres",
            StoreKind::Redis => "redis",
            StoreKind::S3 => "s3",
        }
    }
}

/// `[store]`
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSettings {
    /// `sqlite` (default), `none`, `postgres`, `redis`, `s3`.
    pub kind: StoreKind,
    /// SQLite path, or the backend URL.
    pub url: String,
    /// How long a completed record is kept (duplicates within it are absorbed).
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Largest stored handler output.
    pub max_output_bytes: usize,
    /// Run the handler unclaimed when the store is down (logged on every message). Off: the
    /// message is retried instead and the handler never runs unclaimed.
    pub fail_open: bool,
    /// Completed keys remembered in the worker's memory (0 = off), so duplicates of recent
    /// work are answered without a store round trip.
    pub cache_entries: usize,
    /// Longest wait for one store call; a store slower than this counts as unavailable.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// PostgreSQL (TLS) and Redis (`rediss://`): a PEM file of the CA certificates to trust
    /// instead of the system's roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<std::path::PathBuf>,
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings {
            kind: StoreKind::Sqlite,
            url: ".sluice/idempotency.db".into(),
            ttl: Duration::from_secs(24 * 3600),
            max_output_bytes: 64 * 1024,
            fail_open: false,
            cache_entries: 0,
            timeout: Duration::from_secs(5),
            tls_ca_file: None,
        }
    }
}

/// `[worker]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSettings {
    /// Messages handled at once (the bulkhead).
    pub concurrency: usize,
    /// Per-message handler timeout (each immediate retry gets a fresh one).
    #[serde(with = "humantime_serde")]
    pub handler_timeout: Duration,
    /// On SIGTERM/SIGINT: how long in-flight messages may take to finish before they are
    /// cancelled and returned to the queue.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            concurrency: 8,
            handler_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(20),
        }
    }
}

/// `[retry]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySettings {
    /// Immediate retries inside one delivery (the slot stays held, so keep them short).
    pub immediate: u32,
    /// First immediate retry delay (doubling, full jitter).
    #[serde(with = "humantime_serde")]
    pub immediate_base: Duration,
    /// First delayed retry (goes back to the broker).
    #[serde(with = "humantime_serde")]
    pub base: Duration,
    /// Growth factor of delayed retries.
    pub factor: f64,
    /// Largest delayed retry.
    #[serde(with = "humantime_serde")]
    pub cap: Duration,
    /// Dead-letter after this many deliveries (also the crash-loop guard).
    pub max_deliveries: u32,
    /// Longest wait ever taken while holding a slot; longer waits go back to the broker.
    #[serde(with = "humantime_serde")]
    pub max_in_slot_wait: Duration,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            immediate: 2,
            immediate_base: Duration::from_millis(200),
            base: Duration::from_secs(1),
            factor: 2.0,
            cap: Duration::from_secs(30),
            max_deliveries: 10,
            max_in_slot_wait: Duration::from_secs(2),
        }
    }
}

/// `[breaker]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerSettings {
    /// Whether the breaker is used at all.
    pub enabled: bool,
    /// Transient failures within `window` that open it.
    pub failures: u32,
    /// The counting window.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// How long it stays open before one probe.
    #[serde(with = "humantime_serde")]
    pub open_for: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            enabled: true,
            failures: 5,
            window: Duration::from_secs(60),
            open_for: Duration::from_secs(30),
        }
    }
}

/// `[rate_limit]`
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitSettings {
    /// Messages per second; 0 turns the limit off.
    pub per_second: f64,
    /// Bucket size (default: one second's worth, at least 1).
    pub burst: Option<u32>,
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    /// Largest accepted body (256 KiB, SQS's limit, so a function moves between transports).
    pub max_body_bytes: usize,
    /// Most headers on one message.
    pub max_headers: usize,
    /// Longest header value.
    pub max_header_bytes: usize,
    /// Require an `idempotency-key` header (when the handler derives no key).
    pub require_idempotency_key: bool,
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            max_body_bytes: 256 * 1024,
            max_headers: 16,
            max_header_bytes: 1024,
            require_idempotency_key: false,
        }
    }
}

/// `[fault]`: fault injection for demos, drills and tests, usable in any function built with
/// the cargo feature `faults` (never in production builds).
#[cfg(feature = "faults")]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultSettings {
    /// Fraction of handler calls that fail transiently before the handler runs.
    pub failure_rate: f64,
    /// Every delivery of a message up to this attempt number fails transiently before the
    /// handler runs (2: the first two deliveries fail, the third runs): a retry history that
    /// tests and drills can count on.
    pub fail_first: u32,
    /// Fraction of handler calls that panic.
    pub panic_rate: f64,
    /// Added latency per handler call.
    #[serde(with = "humantime_serde")]
    pub latency: Duration,
    /// Fraction of messages sent by `send` whose body is corrupted (not UTF-8, not JSON).
    pub poison_rate: f64,
    /// Fraction of successful handler calls after which the process aborts before recording
    /// the outcome: the crash between an effect and its ack, for drills and tests. A workflow
    /// step may also abort, at the same rate each, after its record and after its hand-off.
    pub crash_rate: f64,
}

/// Log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One JSON object per line (containers, Lambda).
    Json,
    /// Human-readable.
    Pretty,
}

/// `[telemetry]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// `json` (default) or `pretty`.
    pub log_format: LogFormat,
    /// An `EnvFilter` directive, e.g. `info` or `sluice=debug`. `RUST_LOG` wins when set.
    pub log_level: String,
    /// Where `run` serves `/healthz`, `/readyz` and `/metrics` (`serve.rs`), e.g.
    /// `0.0.0.0:9090`; empty (the default) = no listener.
    #[serde(with = "listen_addr")]
    pub listen: Option<std::net::SocketAddr>,
    /// The `version` label of every series and the `version` of every EMF document, so that a
    /// canary and the stable version can be told apart. Empty (the default): Lambda's
    /// `AWS_LAMBDA_FUNCTION_VERSION` in Lambda mode, else the version the function declared
    /// (`Function::version`), else Sluice's own.
    pub version: String,
    /// How often `run` reads the queue's depths and its oldest message's age from the
    /// transport for `/metrics` (`sluice_queue_messages`, `sluice_queue_oldest_age_seconds`),
    /// while `telemetry.listen` is set; `0s` = never.
    #[serde(with = "humantime_serde")]
    pub queue_poll_interval: Duration,
    /// The CloudWatch namespace of Lambda mode's embedded metric format documents (the
    /// generated alarms read the same key).
    pub emf_namespace: String,
    /// Trace export over OTLP/HTTP (cargo feature `otlp`).
    pub otlp: OtlpSettings,
}

/// `[telemetry.otlp]`: where spans go (docs/operations.md#traces). Export is on when the binary
/// has the cargo feature `otlp` and an endpoint is known: this key, else the standard
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpSettings {
    /// The collector's OTLP/HTTP base URL, e.g. `http://otel-collector:4318` (`/v1/traces` is
    /// appended unless the URL already ends with it). Empty (the default): the `OTEL_*`
    /// variables decide.
    pub endpoint: String,
    /// The `service.name` of the spans. Empty (the default): `OTEL_SERVICE_NAME`, else the
    /// function's name.
    pub service_name: String,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            log_format: LogFormat::Json,
            log_level: "info".into(),
            listen: None,
            version: String::new(),
            queue_poll_interval: Duration::from_secs(15),
            emf_namespace: "Sluice".into(),
            otlp: OtlpSettings::default(),
        }
    }
}

/// `telemetry.listen` as a string: empty = off, else `ip:port`, so a bad value fails while
/// loading, with the key named, not when the listener starts.
mod listen_addr {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.map(|a| a.to_string()).unwrap_or_default())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(d)?;
        let text = text.trim();
        if text.is_empty() {
            return Ok(None);
        }
        text.parse().map(Some).map_err(|_| {
            serde::de::Error::custom(format!(
                "`{text}` is not an ip:port address such as 0.0.0.0:9090 (empty = off)"
            ))
        })
    }
}
