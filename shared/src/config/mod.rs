//! Layered settings: built-in defaults < the function's `sluice.toml` < `SLUICE__SECTION__KEY`
//! environment variables < command-line `--set key=value` flags.
//!
//! Every struct refuses unknown fields, and errors carry the dotted key path, so a typo fails
//! at start-up naming the key. `docs/configuration.md` lists every key; keep it in step.

use std::time::Duration;

use serde::Deserialize;

mod sections;

#[cfg(feature = "faults")]
pub use self::sections::FaultSettings;
pub use self::sections::{
    BreakerSettings, LimitSettings, LogFormat, OtlpSettings, RateLimitSettings, RetrySettings,
    StoreKind, StoreSettings, TelemetrySettings, TransportKind, TransportSettings, WorkerSettings,
};
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
    /// Fault injection, for demos, drills and tests (feature `faults`).
    #[cfg(feature = "faults")]
    pub fault: FaultSettings,
    /// A `[fault]` table given to a binary built without the feature `faults`: refused by
    /// [`Settings::validate`], naming the key and the feature.
    #[cfg(not(feature = "faults"))]
    #[serde(rename = "fault")]
    fault_unbuilt: toml_value::Table,
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
        let mut d = f.debug_struct("Settings");
        d.field("queue", &self.queue)
            .field("transport", &self.transport)
            .field("store", &self.store)
            .field("worker", &self.worker)
            .field("retry", &self.retry)
            .field("breaker", &self.breaker)
            .field("rate_limit", &self.rate_limit)
            .field("limits", &self.limits)
            .field("telemetry", &self.telemetry);
        #[cfg(feature = "faults")]
        d.field("fault", &self.fault);
        d.field(
            "app",
            &self.app.keys().map(|k| (k, "<hidden>")).collect::<Vec<_>>(),
        )
        .field("deploy", &self.deploy)
        .finish()
    }
}

/// Masks the password of a `scheme://user:password@host/...` URL, for logs and errors. The
/// user information ends at the last `@`, so that a password with a raw `/` or `@` (or a URL
/// missing its `://`) is masked too; an `@` further on (rare) only masks more than needed.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    let Some((user, _password)) = userinfo.split_once(':') else {
        return url.to_owned();
    };
    match scheme {
        Some(scheme) => format!("{scheme}://{user}:***@{host}"),
        None => format!("{user}:***@{host}"),
    }
}

impl Settings {
    /// These settings for another queue (a workflow step's): SQS also names its queue in
    /// `transport.url` (a name, or a URL whose last segment is the name), so that changes too.
    pub fn for_queue(&self, queue: &str) -> Settings {
        let mut s = self.clone();
        s.queue = queue.to_owned();
        if s.transport.kind == TransportKind::Sqs {
            let url = s.transport.url.trim();
            s.transport.url = match url.rsplit_once('/') {
                Some((base, _)) if url.starts_with("http://") || url.starts_with("https://") => {
                    format!("{base}/{queue}")
                }
                _ => queue.to_owned(),
            };
        }
        s
    }

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
        if self.transport.consumer_timeout < Duration::from_secs(1) {
            return bad(
                "transport.consumer_timeout",
                "must be at least 1s (RabbitMQ's own minimum is 1s too)",
            );
        }
        #[cfg(feature = "faults")]
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
        #[cfg(not(feature = "faults"))]
        if let Some(key) = self.fault_unbuilt.keys().next() {
            return bad(
                &format!("fault.{key}"),
                "fault injection is not built into this binary (it needs the cargo feature \
                 `faults` of sluice, which production builds leave out)",
            );
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
        read_ca_file(
            "transport.tls_ca_file",
            self.transport.tls_ca_file.as_deref(),
        )?;
        read_ca_file("store.tls_ca_file", self.store.tls_ca_file.as_deref())?;
        self.validate_telemetry()
    }

    /// The `[telemetry]` values that types alone do not check.
    fn validate_telemetry(&self) -> Result<()> {
        let bad = |key: &str, why: &str| Err(Error::Config(format!("key `{key}`: {why}")));
        let t = &self.telemetry;
        // A label value: any text Prometheus and CloudWatch take, kept short (it is on every
        // series) and on one line.
        if t.version.len() > 128 || t.version.chars().any(char::is_control) {
            return bad(
                "telemetry.version",
                "must be at most 128 bytes of text without control characters",
            );
        }
        if !t.queue_poll_interval.is_zero() && t.queue_poll_interval < Duration::from_secs(1) {
            return bad(
                "telemetry.queue_poll_interval",
                "must be at least 1s (or 0s: never)",
            );
        }
        let endpoint = &t.otlp.endpoint;
        if !endpoint.is_empty() {
            if cfg!(not(feature = "otlp")) {
                return bad(
                    "telemetry.otlp.endpoint",
                    "trace export is not built into this binary (it needs the cargo feature \
                     `otlp` of sluice)",
                );
            }
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return bad(
                    "telemetry.otlp.endpoint",
                    "must be an http:// or https:// URL (OTLP over HTTP, e.g. http://collector:4318)",
                );
            }
        }
        if t.otlp.service_name.len() > 255 || t.otlp.service_name.chars().any(char::is_control) {
            return bad(
                "telemetry.otlp.service_name",
                "must be at most 255 bytes of text without control characters",
            );
        }
        // CloudWatch's rules for a namespace (PutMetricData): 1 to 255 of these characters,
        // not only spaces, and not AWS's own prefix.
        let ns = &t.emf_namespace;
        let allowed = |c: char| c.is_ascii_alphanumeric() || ".-_/#: ".contains(c);
        if ns.is_empty()
            || ns.len() > 255
            || ns.trim().is_empty()
            || !ns.chars().all(allowed)
            || ns.starts_with("AWS/")
        {
            return bad(
                "telemetry.emf_namespace",
                "must be 1 to 255 of A-Z a-z 0-9 . - _ / # : and space, not only spaces, \
                 and not start with AWS/",
            );
        }
        Ok(())
    }

    /// The RabbitMQ prefetch in effect: `transport.prefetch`, or 2 x `worker.concurrency` when
    /// it is 0, so that a slot finishing finds the next message already here (at most 65535,
    /// AMQP's limit).
    pub fn prefetch(&self) -> u16 {
        if self.transport.prefetch > 0 {
            return self.transport.prefetch;
        }
        u16::try_from(self.worker.concurrency.saturating_mul(2)).unwrap_or(u16::MAX)
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

/// The PEM text of the CA file a `*.tls_ca_file` setting names (`None` when unset); a file
/// that cannot be read or holds no certificate fails naming `key`, so at start.
pub(crate) fn read_ca_file(key: &str, path: Option<&std::path::Path>) -> Result<Option<String>> {
    let Some(path) = path else { return Ok(None) };
    let pem = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("key `{key}`: cannot read {}: {e}", path.display())))?;
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(Error::Config(format!(
            "key `{key}`: {} holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)",
            path.display()
        )));
    }
    Ok(Some(pem))
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

    #[cfg(not(feature = "faults"))]
    #[test]
    fn a_fault_key_without_the_feature_names_the_key_and_the_feature() {
        for (env, flags) in [
            (vec![("SLUICE__FAULT__PANIC_RATE", "0.1")], vec![]),
            (vec![], vec!["fault.panic_rate=0"]),
        ] {
            let err = load("", &env, &flags).unwrap_err().to_string();
            assert!(err.contains("`fault.panic_rate`"), "{err}");
            assert!(err.contains("`faults`"), "{err}");
        }
        assert!(
            load("[fault]\n", &[], &[]).is_ok(),
            "an empty table names no fault"
        );
    }

    #[test]
    fn telemetry_keys_default_and_bad_values_name_the_key() {
        let s = load("", &[], &[]).unwrap();
        assert_eq!(s.telemetry.version, "");
        assert_eq!(s.telemetry.queue_poll_interval, Duration::from_secs(15));
        assert_eq!(s.telemetry.emf_namespace, "Sluice");
        let s = load(
            "[telemetry]\nemf_namespace = \"Team/Payments\"\n",
            &[("SLUICE__TELEMETRY__VERSION", "1.4.0-rc.1")],
            &["telemetry.queue_poll_interval=0s"],
        )
        .unwrap();
        assert_eq!(s.telemetry.version, "1.4.0-rc.1");
        assert_eq!(s.telemetry.emf_namespace, "Team/Payments");
        assert!(s.telemetry.queue_poll_interval.is_zero());
        for (flag, key) in [
            (
                "telemetry.queue_poll_interval=200ms",
                "telemetry.queue_poll_interval",
            ),
            (
                "telemetry.queue_poll_interval=often",
                "telemetry.queue_poll_interval",
            ),
            ("telemetry.emf_namespace=", "telemetry.emf_namespace"),
            (
                "telemetry.emf_namespace=AWS/Lambda",
                "telemetry.emf_namespace",
            ),
            ("telemetry.emf_namespace=a|b", "telemetry.emf_namespace"),
        ] {
            let err = load("", &[], &[flag]).unwrap_err().to_string();
            assert!(err.contains(&format!("`{key}`")), "{flag}: {err}");
        }
        let err = load("", &[("SLUICE__TELEMETRY__VERSION", "a\nb")], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("`telemetry.version`"), "{err}");
    }

    #[test]
    fn prefetch_defaults_to_twice_the_concurrency_and_declare_to_on() {
        let s = load("[worker]\nconcurrency = 5\n", &[], &[]).unwrap();
        assert_eq!((s.transport.prefetch, s.prefetch()), (0, 10));
        assert!(s.transport.declare);
        assert_eq!(s.transport.consumer_timeout, Duration::from_secs(1800));
        let s = load(
            "[transport]\nprefetch = 300\n",
            &[("SLUICE__TRANSPORT__DECLARE", "false")],
            &["transport.consumer_timeout=5m"],
        )
        .unwrap();
        assert_eq!(s.prefetch(), 300);
        assert!(!s.transport.declare);
        assert_eq!(s.transport.consumer_timeout, Duration::from_secs(300));
        // AMQP's prefetch is 16 bits: a huge concurrency is capped, not wrapped.
        let s = load("", &[], &["worker.concurrency=40000"]).unwrap();
        assert_eq!(s.prefetch(), u16::MAX);
    }

    #[test]
    fn bad_transport_values_fail_naming_the_key() {
        for (env, flag, key) in [
            (
                Some(("SLUICE__TRANSPORT__PREFETCH", "lots")),
                None,
                "transport.prefetch",
            ),
            (None, Some("transport.prefetch=70000"), "transport.prefetch"),
            (None, Some("transport.prefetch=-1"), "transport.prefetch"),
            (
                Some(("SLUICE__TRANSPORT__DECLARE", "maybe")),
                None,
                "transport.declare",
            ),
            (
                None,
                Some("transport.consumer_timeout=30"),
                "transport.consumer_timeout",
            ),
            (
                None,
                Some("transport.consumer_timeout=10ms"),
                "transport.consumer_timeout",
            ),
        ] {
            let env: Vec<(&str, &str)> = env.into_iter().collect();
            let flags: Vec<&str> = flag.into_iter().collect();
            let err = load("", &env, &flags).unwrap_err().to_string();
            assert!(
                err.contains(&format!("`{key}`")),
                "{env:?} {flags:?}: {err}"
            );
        }
        let err = load("[transport]\ndeclare = \"nope\"\n", &[], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("transport.declare"), "{err}");
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
        for (url, shown) in [
            ("redis://:pw1@h:6379/0", "redis://:***@h:6379/0"),
            ("amqp://u@h/%2f", "amqp://u@h/%2f"),
            ("amqp://u:pa/ss@h/%2f", "amqp://u:***@h/%2f"),
            ("amqp://u:p@ss@h/%2f", "amqp://u:***@h/%2f"),
            ("amqps//u:pw2@h", "amqps//u:***@h"),
        ] {
            assert_eq!(redact_url(url), shown);
        }
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
