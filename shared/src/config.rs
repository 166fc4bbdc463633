//! Layered settings: built-in defaults < the function's `sluice.toml` < `SLUICE__SECTION__KEY`
//! environment variables < command-line `--set key=value` flags.
//!
//! Every struct refuses unknown fields, and errors carry the dotted key path, so a typo fails
//! at start-up naming the key. `docs/configuration.md` lists every key; keep it in step.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// All settings of one function.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// The work queue name (default: the function name).
    pub queue: String,
    /// Which broker and where.
    pub transport: TransportSettings,
    /// The idempotency store.
    pub store: StoreSettings,
    /// Concurrency, timeouts and shutdown.
    pub worker: WorkerSettings,
    /// Retry policy.
    pub retry: RetrySettings,
    /// Circuit breaker.
    pub breaker: BreakerSettings,
    /// Token-bucket rate limit.
    pub rate_limit: RateLimitSettings,
    /// Input limits.
    pub limits: LimitSettings,
    /// Fault injection (off by default).
    pub fault: FaultSettings,
    /// Logs.
    pub telemetry: TelemetrySettings,
    /// Function-specific settings, read with [`Settings::app`].
    pub app: toml_value::Table,
    /// Deployment-only settings (Lambda memory, Kubernetes replicas, ...): the worker ignores
    /// them; `sluice-infra` reads them to generate `infra/` from the same file.
    pub deploy: toml_value::Table,
}

/// The free-form `[app]` table, kept as configuration values (not JSON) so that strings from
/// the environment are converted only when the function's own type asks for a number.
pub mod toml_value {
    /// The `[app]` table.
    pub type Table = config::Map<String, config::Value>;
}

/// Settings print without secrets: URL passwords are masked and `[app]` values hidden (they
/// often hold API keys).
impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("queue", &self.queue)
            .field("transport", &self.transport)
            .field("store", &self.store)
            .field("worker", &self.worker)
            .field("retry", &self.retry)
            .field("breaker", &self.breaker)
            .field("rate_limit", &self.rate_limit)
            .field("limits", &self.limits)
            .field("fault", &self.fault)
            .field("telemetry", &self.telemetry)
            .field(
                "app",
                &self.app.keys().map(|k| (k, "<hidden>")).collect::<Vec<_>>(),
            )
            .field("deploy", &self.deploy)
            .finish()
    }
}

impl std::fmt::Debug for TransportSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransportSettings")
            .field("kind", &self.kind)
            .field("url", &redact_url(&self.url))
            .field("lease", &self.lease)
            .field("wait", &self.wait)
            .field("poll_interval", &self.poll_interval)
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

/// Masks the password of a `scheme://user:password@host/...` URL, for logs and errors.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{scheme}://{user}:***@{host}{path}")
        }
        None => url.to_owned(),
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
}

impl Default for TransportSettings {
    fn default() -> Self {
        TransportSettings {
            kind: TransportKind::Embedded,
            url: ".sluice/queue.db".into(),
            lease: Duration::from_secs(30),
            wait: Duration::from_secs(1),
            poll_interval: Duration::from_millis(50),
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

/// `[fault]`: fault injection for demos and tests, usable in any function.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultSettings {
    /// Fraction of handler calls that fail transiently before the handler runs.
    pub failure_rate: f64,
    /// Fraction of handler calls that panic.
    pub panic_rate: f64,
    /// Added latency per handler call.
    #[serde(with = "humantime_serde")]
    pub latency: Duration,
    /// Fraction of messages sent by `send` whose body is corrupted (not UTF-8, not JSON).
    pub poison_rate: f64,
    /// Fraction of successful handler calls after which the process aborts before recording
    /// the outcome: the crash between an effect and its ack, for drills and tests.
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
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            log_format: LogFormat::Json,
            log_level: "info".into(),
            listen: None,
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

impl Settings {
    /// Loads the layers. `file_toml` is the function's `sluice.toml` (baked into the binary or
    /// read from `--config`); `env` is the process environment; `overrides` are `key=value`.
    pub fn load(
        function: &str,
        file_toml: Option<&str>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &[String],
    ) -> Result<Settings> {
        let mut builder = config::Config::builder();
        if let Some(toml) = file_toml {
            builder = builder.add_source(config::File::from_str(toml, config::FileFormat::Toml));
        }
        // Environment: SLUICE__SECTION__KEY. Collected by hand (rather than
        // config::Environment) so that a typo'd variable is reported with its own name.
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("SLUICE__") else {
                continue;
            };
            let key = rest.to_ascii_lowercase().replace("__", ".");
            builder = builder
                .set_override(key.clone(), value.clone())
                .map_err(|e| Error::Config(format!("{name}: {e}")))?;
        }
        for kv in overrides {
            let (key, value) = kv.split_once('=').ok_or_else(|| {
                Error::Config(format!(
                    "--set {kv:?}: expected key=value, e.g. worker.concurrency=4"
                ))
            })?;
            builder = builder
                .set_override(key.trim(), value.trim().to_owned())
                .map_err(|e| Error::Config(format!("--set {key}: {e}")))?;
        }
        let cfg = builder.build().map_err(|e| Error::Config(e.to_string()))?;
        let mut settings: Settings = serde_path_to_error::deserialize(cfg).map_err(|e| {
            let path = e.path().to_string();
            Error::Config(format!("key `{path}`: {}", e.inner()))
        })?;
        if settings.queue.is_empty() {
            // An SQS transport.url names the queue (a URL or a name): use it, so logs, stats
            // and dead-letter history show the queue actually used.
            let from_url = (settings.transport.kind == TransportKind::Sqs)
                .then(|| {
                    settings
                        .transport
                        .url
                        .rsplit('/')
                        .next()
                        .unwrap_or_default()
                })
                .filter(|name| !name.is_empty() && !name.ends_with(".db"));
            settings.queue = from_url.unwrap_or(function).to_owned();
        }
        settings.validate()?;
        Ok(settings)
    }

    /// Value checks that types alone do not catch, each naming its key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, why: &str| Err(Error::Config(format!("key `{key}`: {why}")));
        if self.worker.concurrency == 0 {
            return bad("worker.concurrency", "must be at least 1");
        }
        if self.retry.max_deliveries == 0 {
            return bad("retry.max_deliveries", "must be at least 1");
        }
        if !(self.retry.factor >= 1.0 && self.retry.factor.is_finite()) {
            return bad("retry.factor", "must be a finite number >= 1");
        }
        if self.retry.base > self.retry.cap {
            return bad("retry.base", "must not exceed retry.cap");
        }
        if self.transport.lease < Duration::from_millis(100) {
            return bad("transport.lease", "must be at least 100ms");
        }
        for (key, rate) in [
            ("fault.failure_rate", self.fault.failure_rate),
            ("fault.panic_rate", self.fault.panic_rate),
            ("fault.poison_rate", self.fault.poison_rate),
            ("fault.crash_rate", self.fault.crash_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return bad(key, "must be between 0 and 1");
            }
        }
        if self.rate_limit.per_second < 0.0 || !self.rate_limit.per_second.is_finite() {
            return bad("rate_limit.per_second", "must be >= 0 (0 = off)");
        }
        if self.queue.is_empty() || self.queue.len() > 80 {
            return bad("queue", "must be 1 to 80 characters");
        }
        if self.transport.url.is_empty() {
            return bad("transport.url", "must not be empty");
        }
        Ok(())
    }

    /// Deserializes the function's `[app]` section, naming the key on error.
    pub fn app<C: serde::de::DeserializeOwned>(&self) -> Result<C> {
        section(&self.app, "app")
    }

    /// Deserializes `[deploy.<name>]` (an empty table when absent, so `#[serde(default)]`
    /// types get their defaults), naming the key on error. Read by `sluice-infra` only.
    pub fn deploy<C: serde::de::DeserializeOwned>(&self, name: &str) -> Result<C> {
        let table = match self.deploy.get(name) {
            Some(value) => value.clone().into_table().map_err(|e| {
                Error::Config(format!("key `deploy.{name}`: expected a table ({e})"))
            })?,
            None => toml_value::Table::new(),
        };
        section(&table, &format!("deploy.{name}"))
    }
}

/// Deserializes one free-form table, naming the key (`<prefix>.<key>`) on error.
fn section<C: serde::de::DeserializeOwned>(table: &toml_value::Table, prefix: &str) -> Result<C> {
    let value = config::Value::new(None, config::ValueKind::Table(table.clone()));
    serde_path_to_error::deserialize(value).map_err(|e| {
        // A missing field is reported at the table itself, whose path prints as ".".
        let path = e.path().to_string();
        let key = if path == "." {
            prefix.to_owned()
        } else {
            format!("{prefix}.{path}")
        };
        Error::Config(format!("key `{key}`: {}", e.inner()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml: &str, env: &[(&str, &str)], flags: &[&str]) -> Result<Settings> {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let flags: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
        Settings::load("fn-a", Some(toml), env, &flags)
    }

    #[test]
    fn layers_apply_in_order_defaults_file_env_flags() {
        let s = load("", &[], &[]).unwrap();
        assert_eq!(s.worker.concurrency, 8);
        assert_eq!(s.queue, "fn-a");
        let s = load("[worker]\nconcurrency = 3\n", &[], &[]).unwrap();
        assert_eq!(s.worker.concurrency, 3);
        let s = load(
            "[worker]\nconcurrency = 3\n",
            &[("SLUICE__WORKER__CONCURRENCY", "5")],
            &[],
        )
        .unwrap();
        assert_eq!(s.worker.concurrency, 5);
        let s = load(
            "[worker]\nconcurrency = 3\n",
            &[("SLUICE__WORKER__CONCURRENCY", "5")],
            &["worker.concurrency=7"],
        )
        .unwrap();
        assert_eq!(s.worker.concurrency, 7);
    }

    #[test]
    fn an_sqs_url_names_the_queue_unless_queue_is_set() {
        let env = [
            ("SLUICE__TRANSPORT__KIND", "sqs"),
            (
                "SLUICE__TRANSPORT__URL",
                "http://sqs.local/123456789012/orders",
            ),
        ];
        assert_eq!(load("", &env, &[]).unwrap().queue, "orders");
        assert_eq!(
            load("queue = \"other\"\n", &env, &[]).unwrap().queue,
            "other"
        );
        assert_eq!(
            load("", &[("SLUICE__TRANSPORT__KIND", "sqs")], &[])
                .unwrap()
                .queue,
            "fn-a"
        );
    }

    #[test]
    fn env_switches_transport_kind_and_parses_durations() {
        let s = load(
            "",
            &[
                ("SLUICE__TRANSPORT__KIND", "rabbitmq"),
                ("SLUICE__RETRY__CAP", "45s"),
                ("SLUICE__WORKER__HANDLER_TIMEOUT", "1m 30s"),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(s.transport.kind, TransportKind::Rabbitmq);
        assert_eq!(s.retry.cap, Duration::from_secs(45));
        assert_eq!(s.worker.handler_timeout, Duration::from_secs(90));
    }

    #[test]
    fn unknown_key_in_file_fails_naming_the_key() {
        let err = load("[worker]\nconcurrency = 3\nconcurency = 4\n", &[], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("worker"), "{err}");
        assert!(err.contains("concurency"), "{err}");
    }

    #[test]
    fn unknown_env_key_fails_naming_the_key() {
        let err = load("", &[("SLUICE__WORKER__CONCURENCY", "4")], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("concurency"), "{err}");
    }

    #[test]
    fn bad_value_fails_naming_the_key() {
        let err = load("[retry]\ncap = \"soon\"\n", &[], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("retry.cap"), "{err}");
        let err = load("", &[("SLUICE__TRANSPORT__KIND", "kafka")], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("transport.kind"), "{err}");
        let err = load("", &[], &["worker.concurrency=0"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("worker.concurrency"), "{err}");
        let err = load("", &[], &["fault.failure_rate=2"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("fault.failure_rate"), "{err}");
    }

    #[test]
    fn env_values_become_numbers_only_where_the_type_wants_one() {
        #[derive(Deserialize)]
        struct App {
            secret: String,
            rate: f64,
        }
        let s = load(
            "",
            &[
                ("SLUICE__APP__SECRET", "007"),
                ("SLUICE__APP__RATE", "0.25"),
            ],
            &["worker.concurrency=4"],
        )
        .unwrap();
        assert_eq!(s.worker.concurrency, 4);
        let app: App = s.app().unwrap();
        assert_eq!(app.secret, "007", "a numeric-looking secret stays a string");
        assert_eq!(app.rate, 0.25);
    }

    #[test]
    fn debug_output_hides_passwords_and_app_values() {
        let s = load(
            "[app]\napi_key = \"sk_live_123\"\n",
            &[(
                "SLUICE__TRANSPORT__URL",
                "amqp://guest:hunter2@rabbit:5672/%2f",
            )],
            &[],
        )
        .unwrap();
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("sk_live_123"), "{shown}");
        assert!(
            shown.contains("amqp://guest:***@rabbit:5672/%2f"),
            "{shown}"
        );
        assert_eq!(redact_url("/tmp/queue.db"), "/tmp/queue.db");
    }

    #[test]
    fn app_section_is_typed_by_the_function() {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct App {
            #[allow(dead_code)]
            ledger: String,
        }
        let s = load("[app]\nledger = \"x.db\"\n", &[], &[]).unwrap();
        assert!(s.app::<App>().is_ok());
        let s = load("[app]\nledgr = \"x.db\"\n", &[], &[]).unwrap();
        let err = s.app::<App>().err().unwrap().to_string();
        assert!(err.contains("app.") && err.contains("ledgr"), "{err}");
    }
}
