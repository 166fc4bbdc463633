//! Where a run's messages live and how the workers reach them: the transport (embedded file,
//! a RabbitMQ virtual host of its own, an SQS queue on moto) and the PostgreSQL store, each
//! server behind a [`TcpProxy`] the harness owns, so it can cut the workers' connections while
//! its own (publishing, counting) go straight to the server.

use anyhow::{bail, Context as _};
use sluice::{
    store::postgres::tokio_postgres,
    transport::{AnyTransport, Purpose},
    Settings,
};
use sluice_tests::{postgres_url, rabbit, Sandbox, TcpProxy};

/// charge-payment's own settings: the harness reads the queue with the same ones.
const CHARGE_PAYMENT_TOML: &str = include_str!("../../../functions/charge-payment/sluice.toml");

/// The transports a run can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// The embedded SQLite queue (a file: only the store connection can be cut).
    Embedded,
    /// RabbitMQ (a virtual host of the run's own).
    Rabbitmq,
    /// SQS on moto (`eval "$(scripts/moto.sh start)"` first).
    Sqs,
}

impl Kind {
    /// As in `transport.kind`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Embedded => "embedded",
            Kind::Rabbitmq => "rabbitmq",
            Kind::Sqs => "sqs",
        }
    }
}

/// One run's servers, as the harness and as the workers see them.
pub struct Target {
    /// The queue's name.
    pub queue: String,
    /// The workers' broker connections pass through it (`None`: embedded, a file).
    pub broker: Option<TcpProxy>,
    /// The workers' store connections pass through it.
    pub store: TcpProxy,
    /// `SLUICE__*` (and AWS) variables of a worker process.
    pub worker_env: Vec<(String, String)>,
    /// The harness's own handle on the queue, straight to the broker.
    pub queue_handle: AnyTransport,
    vhost: Option<rabbit::Vhost>,
}

/// `scheme://user@host:port/rest` with `host:port` replaced by `addr`.
pub fn retarget(url: &str, addr: &str) -> anyhow::Result<String> {
    let (scheme, rest) = url.split_once("://").context("URL without scheme")?;
    let (userinfo, hostpath) = match rest.rsplit_once('@') {
        Some((u, h)) => (format!("{u}@"), h),
        None => (String::new(), rest),
    };
    let path = hostpath.find('/').map_or("", |i| &hostpath[i..]);
    Ok(format!("{scheme}://{userinfo}{addr}{path}"))
}

/// `host:port` of a URL.
pub fn host_port(url: &str) -> anyhow::Result<String> {
    let rest = url.split_once("://").context("URL without scheme")?.1;
    let hostpath = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    Ok(hostpath.split('/').next().unwrap_or(hostpath).to_owned())
}

/// Settings shared by the workers and the harness's handle: the exactly-once configuration
/// (PostgreSQL store and ledger) with a short lease, so that a killed worker's messages and
/// in-progress records come back within seconds, and room for many deliveries, so that
/// outages delay valid messages but never dead-letter them.
pub const RUN_SETTINGS: [(&str, &str); 9] = [
    ("STORE__KIND", "postgres"),
    ("APP__LEDGER", "postgres"),
    ("TRANSPORT__LEASE", "3s"),
    ("RETRY__BASE", "100ms"),
    ("RETRY__CAP", "2s"),
    ("RETRY__MAX_DELIVERIES", "1000"),
    // The store outage opens the breaker; a short open period brings intake back soon after.
    ("BREAKER__FAILURES", "20"),
    ("BREAKER__WINDOW", "5s"),
    ("BREAKER__OPEN_FOR", "1s"),
];

impl Target {
    /// Sets up `kind` for a run named `run` in `sandbox`.
    pub async fn start(kind: Kind, run: &str, sandbox: &Sandbox) -> anyhow::Result<Self> {
        let queue = format!("chaos-{run}");
        let pg = postgres_url();
        let store = TcpProxy::start(&host_port(&pg)?).await?;
        let mut env: Vec<(String, String)> = RUN_SETTINGS
            .iter()
            .map(|(k, v)| (format!("SLUICE__{k}"), v.to_string()))
            .collect();
        env.push(("SLUICE__QUEUE".into(), queue.clone()));
        env.push(("SLUICE__TRANSPORT__KIND".into(), kind.name().into()));
        let mut harness_env = env.clone();
        env.push((
            "SLUICE__STORE__URL".into(),
            retarget(&pg, &store.host_port())?,
        ));
        harness_env.push(("SLUICE__STORE__URL".into(), pg));
        let (broker, vhost) = match kind {
            Kind::Embedded => {
                let file = sandbox.queue_db().display().to_string();
                env.push(("SLUICE__TRANSPORT__URL".into(), file.clone()));
                harness_env.push(("SLUICE__TRANSPORT__URL".into(), file));
                (None, None)
            }
            Kind::Rabbitmq => {
                let vhost = rabbit::Vhost::create("chaos")?;
                let proxy = TcpProxy::start(&host_port(&vhost.url)?).await?;
                env.push((
                    "SLUICE__TRANSPORT__URL".into(),
                    retarget(&vhost.url, &proxy.host_port())?,
                ));
                harness_env.push(("SLUICE__TRANSPORT__URL".into(), vhost.url.clone()));
                (Some(proxy), Some(vhost))
            }
            Kind::Sqs => {
                let moto = std::env::var("SLUICE_TEST_MOTO")
                    .map_err(|_| anyhow::anyhow!("{}", sluice_tests::START_MOTO))?;
                // Panics unless the SDK's endpoint is moto: never real AWS.
                sluice_tests::moto("SQS");
                let proxy = TcpProxy::start(&host_port(&moto)?).await?;
                let endpoint = format!("http://{}", proxy.host_port());
                for var in [
                    "AWS_ENDPOINT_URL",
                    "AWS_ENDPOINT_URL_SQS",
                    "AWS_ENDPOINT_URL_S3",
                ] {
                    env.push((var.into(), endpoint.clone()));
                }
                env.push(("SLUICE__TRANSPORT__URL".into(), queue.clone()));
                harness_env.push(("SLUICE__TRANSPORT__URL".into(), queue.clone()));
                (Some(proxy), None)
            }
        };
        let settings = Settings::load(
            "charge-payment",
            Some(CHARGE_PAYMENT_TOML),
            harness_env,
            &[],
        )?;
        let queue_handle = AnyTransport::open("chaos", &settings, Purpose::Admin).await?;
        sluice::Transport::provision(&queue_handle).await?;
        Ok(Self {
            queue,
            broker,
            store,
            worker_env: env,
            queue_handle,
            vhost,
        })
    }

    /// RabbitMQ: the run's virtual host.
    pub fn vhost_name(&self) -> Option<&str> {
        self.vhost.as_ref().map(|v| v.name.as_str())
    }

    /// Messages not settled yet: ready, leased (by any worker) and delayed.
    pub async fn pending(&self) -> anyhow::Result<Pending> {
        let s = sluice::Transport::stats(&self.queue_handle).await?;
        let mut in_flight = s.in_flight;
        if let (Some(vhost), 0) = (&self.vhost, s.ready + s.delayed) {
            // AMQP reports a queue's ready messages only; the broker knows the unacked ones
            // of every worker (half a second a call: asked only once the rest is empty).
            in_flight = vhost
                .queue_counts(&self.queue)?
                .map_or(0, |(_, unacked)| unacked);
        }
        Ok(Pending {
            ready: s.ready,
            in_flight,
            delayed: s.delayed,
            dead_lettered: s.dead_lettered,
        })
    }
}

/// Queue depths.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pending {
    /// Visible now.
    pub ready: u64,
    /// Leased by some worker (RabbitMQ: unacked, asked of the broker).
    pub in_flight: u64,
    /// Waiting for a retry delay.
    pub delayed: u64,
    /// On the dead-letter queue.
    pub dead_lettered: u64,
}

impl Pending {
    /// Nothing left to work.
    pub fn is_empty(&self) -> bool {
        self.ready + self.in_flight + self.delayed == 0
    }
}

/// The ledger behind the workers' backs (straight to PostgreSQL, never through the proxy).
pub struct Ledger {
    client: tokio_postgres::Client,
    prefix: String,
}

/// What the ledger holds for one run.
#[derive(Debug, Clone, Copy, Default)]
pub struct LedgerCounts {
    /// Rows for valid payments.
    pub charges: u64,
    /// Distinct valid payments charged.
    pub distinct: u64,
    /// Rows for poison (must be 0).
    pub poison_charged: u64,
}

impl Ledger {
    /// Connects for the run whose payment ids start with `prefix`.
    pub async fn connect(prefix: &str) -> anyhow::Result<Self> {
        Self::connect_to(&postgres_url(), prefix).await
    }

    /// [`Ledger::connect`] to the database of `url`.
    pub async fn connect_to(url: &str, prefix: &str) -> anyhow::Result<Self> {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .context("connecting to PostgreSQL (scripts/services.sh postgres)")?;
        tokio::spawn(conn);
        Ok(Self {
            client,
            prefix: prefix.to_owned(),
        })
    }

    /// The counts (zero before the first worker created the table).
    pub async fn counts(&self) -> anyhow::Result<LedgerCounts> {
        let exists: bool = self
            .client
            .query_one("SELECT to_regclass('charge_ledger') IS NOT NULL", &[])
            .await?
            .get(0);
        if !exists {
            return Ok(LedgerCounts::default());
        }
        let row = self
            .client
            .query_one(
                "SELECT COUNT(*) FILTER (WHERE payment_id LIKE $1),
                        COUNT(DISTINCT payment_id) FILTER (WHERE payment_id LIKE $1),
                        COUNT(*) FILTER (WHERE payment_id NOT LIKE $1)
                 FROM charge_ledger WHERE payment_id LIKE $2",
                &[
                    &format!("{}pay-%", self.prefix),
                    &format!("{}%", self.prefix),
                ],
            )
            .await?;
        let n = |i: usize| -> u64 { row.get::<_, i64>(i) as u64 };
        Ok(LedgerCounts {
            charges: n(0),
            distinct: n(1),
            poison_charged: n(2),
        })
    }
}

/// What the dead-letter queue holds for a run.
#[derive(Debug, Default)]
pub struct DeadLetters {
    /// Distinct messages.
    pub distinct: u64,
    /// Copies beyond one per message (the dead letter written again after a cut or a kill
    /// before the ack, or a publish retried after a lost confirm).
    pub copies: u64,
    /// Valid payments found there, with their class and reason (must be none).
    pub valid: Vec<String>,
}

impl Target {
    /// Reads the dead-letter queue (a peek: nothing is consumed). `valid_marker` is the text
    /// only valid payments' bodies contain.
    pub async fn dead_letters(&self, valid_marker: &str) -> anyhow::Result<DeadLetters> {
        let total = self.pending().await?.dead_lettered;
        let letters = sluice::Transport::dlq_list(&self.queue_handle, total as usize + 100).await?;
        let ids: std::collections::HashSet<&str> = letters.iter().map(|d| d.id.as_str()).collect();
        Ok(DeadLetters {
            distinct: ids.len() as u64,
            copies: total.saturating_sub(ids.len() as u64),
            valid: letters
                .iter()
                .filter(|d| d.body.as_deref().is_some_and(|b| b.contains(valid_marker)))
                .map(|d| format!("{} ({:?}: {})", d.id, d.error_class, d.last_error))
                .collect(),
        })
    }
}

impl Ledger {
    /// The valid payments of `expected` that have no charge.
    pub async fn missing(&self, expected: &[String]) -> anyhow::Result<Vec<String>> {
        let rows = self
            .client
            .query(
                "SELECT DISTINCT payment_id FROM charge_ledger WHERE payment_id LIKE $1",
                &[&format!("{}pay-%", self.prefix)],
            )
            .await?;
        let charged: std::collections::HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
        Ok(expected
            .iter()
            .filter(|id| !charged.contains(*id))
            .cloned()
            .collect())
    }
}

/// Fails early, with the command to run, when a server the run needs is not up.
pub fn check_servers(kind: Kind) -> anyhow::Result<()> {
    let up = |addr: &str| std::net::TcpStream::connect(addr).is_ok();
    if !up(&host_port(&postgres_url())?) {
        bail!("PostgreSQL is not up: scripts/services.sh postgres");
    }
    if kind == Kind::Rabbitmq && !up(&host_port(&rabbit::url())?) {
        bail!("RabbitMQ is not up: scripts/services.sh rabbitmq");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retarget_keeps_user_and_path() {
        assert_eq!(
            retarget("amqp://guest:guest@127.0.0.1:5672/%2f", "127.0.0.1:9").unwrap(),
            "amqp://guest:guest@127.0.0.1:9/%2f"
        );
        assert_eq!(
            retarget("http://127.0.0.1:5000", "127.0.0.1:9").unwrap(),
            "http://127.0.0.1:9"
        );
        assert_eq!(
            host_port("postgres://root@127.0.0.1:5432/test").unwrap(),
            "127.0.0.1:5432"
        );
    }
}
