//! Helpers shared by the black-box tests, the demo driver, the benchmarks and `local-esm`: find
//! a function binary, run it as a separate process with its queue, store and ledger in one
//! directory, read its ledger; the servers the tests use and where the repository's files are.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{bail, Context as _};

mod proxy;
pub mod report;

/// The path of a function binary built in the same target directory as the running
/// executable (tests live in `target/<profile>/deps`, binaries in `target/<profile>`).
pub fn function_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("executable has no directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("deps has no parent")?;
    }
    let bin = dir.join(name);
    if !bin.exists() {
        bail!(
            "{} is not built: build it first (`cargo build -p {name}`, with `--release` for a \
             release run; `just test` and `just demo` do)",
            bin.display()
        );
    }
    Ok(bin)
}

/// Where one function run keeps its files.
#[derive(Debug, Clone)]
pub struct Sandbox {
    /// The directory.
    pub dir: PathBuf,
}

impl Sandbox {
    /// A sandbox in `dir` (created).
    pub fn new(dir: impl Into<PathBuf>) -> anyhow::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// The embedded queue file.
    pub fn queue_db(&self) -> PathBuf {
        self.dir.join("queue.db")
    }

    /// The idempotency store file.
    pub fn store_db(&self) -> PathBuf {
        self.dir.join("idempotency.db")
    }

    /// charge-payment's ledger file.
    pub fn ledger_db(&self) -> PathBuf {
        self.dir.join("ledger.db")
    }

    /// Environment that points a function at this sandbox.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                "SLUICE__TRANSPORT__URL".into(),
                self.queue_db().display().to_string(),
            ),
            (
                "SLUICE__STORE__URL".into(),
                self.store_db().display().to_string(),
            ),
            (
                "SLUICE__APP__LEDGER".into(),
                self.ledger_db().display().to_string(),
            ),
        ]
    }

    /// A command for `bin` with the sandbox environment, logs appended to `log`.
    pub fn command(&self, bin: &Path, args: &[&str], log: &str) -> anyhow::Result<Command> {
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .envs(self.env())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join(log))?,
            );
        Ok(cmd)
    }

    /// Starts `bin run` in the background with extra `--set` overrides.
    pub fn spawn_worker(&self, bin: &Path, extra: &[&str], log: &str) -> anyhow::Result<Child> {
        let mut args = vec!["run"];
        args.extend_from_slice(extra);
        Ok(self.command(bin, &args, log)?.spawn()?)
    }
}

/// The repository's root directory (the deploy files, scripts and functions' settings).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repository")
        .to_path_buf()
}

/// A file under `tests/fixtures/` (SQS events, ...).
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// The Python virtual environment `scripts/moto.sh` and `scripts/lambda.sh` install moto,
/// boto3 and cargo-lambda into (`SLUICE_VENV`, default `~/.cache/sluice/venv`).
pub fn venv_dir() -> PathBuf {
    match std::env::var_os("SLUICE_VENV") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is not set (nor SLUICE_VENV)"))
            .join(".cache/sluice/venv"),
    }
}

/// The PostgreSQL server of the tests and the benchmark (`SLUICE_TEST_POSTGRES_URL`, default
/// the local one `scripts/services.sh postgres` starts).
pub fn postgres_url() -> String {
    std::env::var("SLUICE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".into())
}

/// The Redis server of the tests and the benchmark (`SLUICE_TEST_REDIS_URL`, default the
/// local one `scripts/services.sh redis` starts).
pub fn redis_url() -> String {
    std::env::var("SLUICE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// Counts in charge-payment's ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LedgerCounts {
    /// Rows (charges made).
    pub charges: u64,
    /// Distinct payment ids charged.
    pub distinct_payments: u64,
    /// Gateway calls answered from an earlier charge of the same idempotency key: the
    /// gateway absorbed a duplicate that Sluice ran the handler for. 0 unless a worker died
    /// between a charge and its record.
    pub replays: u64,
}

/// Reads the ledger (zero if it does not exist yet).
pub fn ledger_counts(path: &Path) -> anyhow::Result<LedgerCounts> {
    if !path.exists() {
        return Ok(LedgerCounts::default());
    }
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    let has_table: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM sqlite_master WHERE name = 'charges'",
        [],
        |r| r.get(0),
    )?;
    if !has_table {
        return Ok(LedgerCounts::default());
    }
    let (charges, distinct): (i64, i64) = conn.query_row(
        "SELECT COUNT(*), COUNT(DISTINCT payment_id) FROM charges",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    // Ledgers written before the gateway recorded replays have no such table.
    let replays: i64 = conn
        .query_row("SELECT COUNT(*) FROM replays", [], |r| r.get(0))
        .unwrap_or(0);
    Ok(LedgerCounts {
        charges: charges as u64,
        distinct_payments: distinct as u64,
        replays: replays as u64,
    })
}

/// A charge request body.
pub fn charge_body(payment_id: &str, amount_cents: u64) -> String {
    format!(
        r#"{{"payment_id":"{payment_id}","amount_cents":{amount_cents},"currency":"EUR","customer":"cust-{}"}}"#,
        amount_cents % 97
    )
}

pub use proxy::TcpProxy;

/// RabbitMQ helpers for the tests that run against the real broker: its URL, `rabbitmqctl`,
/// and the queue counts the AMQP protocol does not report (unacked messages).
#[cfg(feature = "rabbitmq")]
pub mod rabbit {
    use anyhow::{bail, Context as _};

    /// How long after their last use the broker removes the queues a test declares (with
    /// `x-expires`), should the test fail before deleting them.
    pub const TEST_QUEUE_EXPIRES: std::time::Duration = std::time::Duration::from_secs(10 * 60);

    /// The broker the tests use (`SLUICE_TEST_RABBITMQ_URL`, default the local `guest`).
    pub fn url() -> String {
        std::env::var("SLUICE_TEST_RABBITMQ_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
    }

    /// Runs `rabbitmqctl` (about half a second a call: it starts an Erlang VM) and returns
    /// its stdout.
    pub fn rabbitmqctl(args: &[&str]) -> anyhow::Result<String> {
        let out = std::process::Command::new("rabbitmqctl")
            .args(args)
            .output()
            .context("running rabbitmqctl (is RabbitMQ installed here?)")?;
        if !out.status.success() {
            bail!(
                "rabbitmqctl {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Messages in one queue of the default virtual host, as the broker counts them:
    /// (ready, unacknowledged). `None` if the queue does not exist.
    pub fn queue_counts(queue: &str) -> anyhow::Result<Option<(u64, u64)>> {
        queue_counts_in("/", queue)
    }

    fn queue_counts_in(vhost: &str, queue: &str) -> anyhow::Result<Option<(u64, u64)>> {
        for row in list_queues(
            vhost,
            &["name", "messages_ready", "messages_unacknowledged"],
        )? {
            if let [name, ready, unacked] = &row[..] {
                if name == queue {
                    return Ok(Some((ready.parse()?, unacked.parse()?)));
                }
            }
        }
        Ok(None)
    }

    /// `rabbitmqctl list_queues` of one virtual host: a row of the given columns per queue,
    /// each value trimmed.
    pub fn list_queues(vhost: &str, columns: &[&str]) -> anyhow::Result<Vec<Vec<String>>> {
        let mut args = vec!["list_queues", "-p", vhost, "-q", "--no-table-headers"];
        args.extend_from_slice(columns);
        Ok(rabbitmqctl(&args)?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.split('\t').map(|c| c.trim().to_owned()).collect())
            .collect())
    }

    /// A virtual host of one test: its queues, and its connections (so that
    /// `close_all_connections -p` hits that test alone). Deleted, with everything in it, on
    /// drop, also when the test fails.
    pub struct Vhost {
        /// The virtual host's name.
        pub name: String,
        /// [`url`] pointing at it.
        pub url: String,
    }

    impl Vhost {
        /// Creates `sluice-<prefix>-<random>` and gives the URL's user all permissions on it.
        pub fn create(prefix: &str) -> anyhow::Result<Self> {
            let name = format!(
                "sluice-{prefix}-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..10]
            );
            let base = url();
            let (before_path, _) = base
                .rsplit_once('/')
                .context("SLUICE_TEST_RABBITMQ_URL has no virtual host path")?;
            let user = before_path
                .split_once("://")
                .and_then(|(_, rest)| rest.split_once('@'))
                .map_or("guest", |(userinfo, _)| {
                    userinfo.split(':').next().unwrap_or("guest")
                })
                .to_owned();
            rabbitmqctl(&["add_vhost", &name])?;
            let vhost = Self {
                url: format!("{before_path}/{name}"),
                name,
            };
            rabbitmqctl(&[
                "set_permissions",
                "-p",
                &vhost.name,
                &user,
                ".*",
                ".*",
                ".*",
            ])?;
            Ok(vhost)
        }

        /// Closes every client connection to this virtual host, as a broker restart or a
        /// network failure would.
        pub fn close_all_connections(&self, reason: &str) -> anyhow::Result<()> {
            rabbitmqctl(&["close_all_connections", "-p", &self.name, reason])?;
            Ok(())
        }

        /// Messages in one of its queues: (ready, unacknowledged); `None` if there is no such
        /// queue.
        pub fn queue_counts(&self, queue: &str) -> anyhow::Result<Option<(u64, u64)>> {
            queue_counts_in(&self.name, queue)
        }
    }

    impl Drop for Vhost {
        fn drop(&mut self) {
            if let Err(e) = rabbitmqctl(&["delete_vhost", &self.name]) {
                eprintln!(
                    "could not delete the test virtual host {}: {e:#}",
                    self.name
                );
            }
        }
    }

    /// Closes, from the broker's side, every connection whose client-given name contains
    /// `needle` (Sluice names its connections `sluice <function> on <queue>`), as a network
    /// failure would. Returns how many it closed.
    pub fn close_connections_named(needle: &str, reason: &str) -> anyhow::Result<usize> {
        let listing = rabbitmqctl(&["list_connections", "-q", "pid", "client_properties"])?;
        let pids: Vec<&str> = listing
            .lines()
            .filter(|l| l.contains(needle))
            .filter_map(|l| l.split('\t').next())
            .collect();
        for pid in &pids {
            rabbitmqctl(&["close_connection", pid, reason])?;
        }
        Ok(pids.len())
    }
}

#[cfg(feature = "lambda")]
pub mod lambda;

/// How to start moto, for the messages of the tests that need it.
pub const START_MOTO: &str = "start moto: eval \"$(scripts/moto.sh start)\"";

/// The moto endpoint (`SLUICE_TEST_MOTO`, set by `scripts/moto.sh`). Panics unless the SDK's
/// own endpoint variable for `service` (`AWS_ENDPOINT_URL_S3`, `_SQS`) or `AWS_ENDPOINT_URL`
/// points at it too, so no request of a test, or of a process it starts, can reach real AWS.
pub fn moto(service: &str) -> String {
    let moto = std::env::var("SLUICE_TEST_MOTO")
        .unwrap_or_else(|_| panic!("SLUICE_TEST_MOTO is not set: {START_MOTO}"));
    let sdk = std::env::var(format!("AWS_ENDPOINT_URL_{service}"))
        .or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
        .unwrap_or_default();
    assert_eq!(
        sdk, moto,
        "AWS_ENDPOINT_URL must point at moto ({moto}), or the SDK would call real AWS: {START_MOTO}"
    );
    moto
}
