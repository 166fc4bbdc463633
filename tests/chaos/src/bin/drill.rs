//! Incident drills: `just drill partition|auth|exhaustion` reproduces an incident on this
//! machine with charge-payment on RabbitMQ and the PostgreSQL store (exactly-once), runs the
//! commands of docs/runbook.md "Incidents" that look at it, recovers the way that section
//! says, and checks that every payment was charged once and nothing went to the DLQ.
//!
//! - `partition`: the worker's path to the broker is cut (the harness's TCP proxy refuses it).
//! - `auth`: the worker's RabbitMQ password is rotated on the broker (a user made for the
//!   drill with rabbitmqctl), then the worker is given the new one and restarted.
//! - `exhaustion`: the store role's connection limit is reached (`CONNECTION LIMIT 1`, held
//!   by another client), then raised.
//!
//! The runbook's blocks marked `# drill: <name> <step>` are read from docs/runbook.md and run
//! line by line with bash, so the drill runs exactly what the runbook tells an operator to
//! run. In them `charge-payment` is the function's CLI (pointed at the worker's queue),
//! `logs` prints the worker's log, `$SLUICE_METRICS` is its `telemetry.listen` address.

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use clap::Parser;
use sluice::{store::postgres::tokio_postgres, OutgoingMessage};
use sluice_chaos::{
    target::{check_servers, host_port, retarget, Kind, Ledger, Target},
    workers::Pool,
};
use sluice_tests::{function_binary, postgres_url, rabbit::rabbitmqctl, repo_root, Sandbox};

#[derive(Parser, Debug)]
#[command(about = "Sluice incident drills: partition, auth, exhaustion (docs/runbook.md)")]
struct Args {
    /// Which incident.
    #[arg(value_enum)]
    drill: Which,
    /// Working directory (wiped at start; the worker's log stays there).
    #[arg(long, default_value = ".sluice/drill")]
    dir: PathBuf,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Which {
    Partition,
    Auth,
    Exhaustion,
}

/// Longest wait for each step (the worker's own reconnect backoff is at most 5 s a try).
const STEP: Duration = Duration::from_secs(90);

/// Payments sent before the incident, and during it.
const BEFORE: u64 = 50;
const DURING: u64 = 100;

struct Drill {
    target: Target,
    ledger: Ledger,
    pool: Pool,
    prefix: String,
    sent: u64,
    log: PathBuf,
    metrics: String,
    /// Variables of the runbook commands.
    vars: Vec<(String, String)>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match drill(&args).await {
        Ok(true) => {
            println!("\n✓ drill passed: every payment charged once, nothing dead-lettered");
            ExitCode::SUCCESS
        }
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("drill failed: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn say(s: &str) {
    println!("\n== {s}");
}

async fn drill(args: &Args) -> anyhow::Result<bool> {
    check_servers(Kind::Rabbitmq)?;
    let bin = function_binary("charge-payment")?;
    if args.dir.exists() {
        std::fs::remove_dir_all(&args.dir)?;
    }
    let sandbox = Sandbox::new(&args.dir)?;
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let target = Target::start(Kind::Rabbitmq, &run, &sandbox).await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut env = target.worker_env.clone();
    env.push((
        "SLUICE__TELEMETRY__LISTEN".into(),
        format!("127.0.0.1:{port}"),
    ));
    let mut vars = vec![
        (
            "SLUICE_METRICS".to_owned(),
            format!("http://127.0.0.1:{port}"),
        ),
        (
            "SLUICE_LOG".to_owned(),
            sandbox.dir.join("worker-0.log").display().to_string(),
        ),
        (
            "PATH".to_owned(),
            format!(
                "{}:{}",
                bin.parent().context("binary dir")?.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        ),
    ];
    // What a drill sets up before the worker starts: its own user, or role and database.
    let mut cleanup: Vec<String> = Vec::new();
    let mut ledger_url = postgres_url();
    match args.drill {
        Which::Partition => {}
        Which::Auth => {
            let user = format!("sluice-drill-{run}");
            let (old, new) = (
                uuid::Uuid::new_v4().simple().to_string(),
                uuid::Uuid::new_v4().simple().to_string(),
            );
            rabbitmqctl(&["add_user", &user, &old])?;
            let vhost = target.vhost_name().context("a virtual host")?.to_owned();
            rabbitmqctl(&["set_permissions", "-p", &vhost, &user, ".*", ".*", ".*"])?;
            let broker = target.broker.as_ref().context("a broker proxy")?;
            let url = format!("amqp://{user}:{old}@{}/{vhost}", broker.host_port());
            set(&mut env, "SLUICE__TRANSPORT__URL", &url);
            vars.push(("RABBIT_USER".into(), user.clone()));
            vars.push(("NEW_PASSWORD".into(), new.clone()));
            vars.push((
                "NEW_URL".into(),
                format!("amqp://{user}:{new}@{}/{vhost}", broker.host_port()),
            ));
            cleanup.push(format!("rabbitmqctl delete_user {user}"));
        }
        Which::Exhaustion => {
            let role = format!("sluice_drill_{run}");
            let admin = admin_client().await?;
            admin
                .batch_execute(&format!("CREATE ROLE {role} LOGIN CONNECTION LIMIT 40"))
                .await?;
            admin
                .batch_execute(&format!("CREATE DATABASE {role} OWNER {role}"))
                .await?;
            let base = retarget(&postgres_url(), &target.store.host_port())?;
            let url = format!("postgres://{role}@{}/{role}", host_port(&base)?);
            set(&mut env, "SLUICE__STORE__URL", &url);
            // The harness reads the ledger as the admin, so the incident does not cut it off.
            let admin_url = postgres_url();
            ledger_url = format!(
                "{}/{role}",
                admin_url.rsplit_once('/').context("a database path")?.0
            );
            vars.push(("SLUICE_PG_ADMIN".into(), postgres_url()));
            vars.push(("SLUICE_PG_ROLE".into(), role.clone()));
            // One statement each: DROP DATABASE cannot run in a transaction.
            cleanup.push(format!("DROP DATABASE IF EXISTS {role} WITH (FORCE)"));
            cleanup.push(format!("DROP ROLE IF EXISTS {role}"));
        }
    }
    vars.extend(env.iter().cloned());
    let prefix = format!("drill-{run}-");
    let mut d = Drill {
        ledger: Ledger::connect_to(&ledger_url, &prefix).await?,
        pool: Pool::start(&bin, &sandbox.dir, env, 1)?,
        target,
        prefix,
        sent: 0,
        log: sandbox.dir.join("worker-0.log"),
        metrics: format!("127.0.0.1:{port}"),
        vars,
    };
    let outcome = match args.drill {
        Which::Partition => partition(&mut d).await,
        Which::Auth => auth(&mut d).await,
        Which::Exhaustion => exhaustion(&mut d).await,
    };
    d.pool.stop(Duration::from_secs(20)).await;
    for c in cleanup {
        let done = if c.starts_with("rabbitmqctl ") {
            let parts: Vec<&str> = c.split(' ').skip(1).collect();
            rabbitmqctl(&parts).map(drop)
        } else {
            admin_client()
                .await?
                .batch_execute(&c)
                .await
                .map_err(Into::into)
        };
        if let Err(e) = done {
            eprintln!("clean-up `{c}` failed: {e:#}");
        }
    }
    outcome
}

fn set(env: &mut Vec<(String, String)>, key: &str, value: &str) {
    env.retain(|(k, _)| k != key);
    env.push((key.into(), value.into()));
}

async fn admin_client() -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

impl Drill {
    /// Sends `n` new payments, straight to the broker (producers are not in the incident).
    async fn send(&mut self, n: u64) -> anyhow::Result<()> {
        let msgs = (self.sent..self.sent + n)
            .map(|i| {
                OutgoingMessage::new(format!(
                    r#"{{"payment_id":"{}pay-{i:05}","amount_cents":1250,"currency":"EUR","customer":"c-drill"}}"#,
                    self.prefix
                ))
            })
            .collect();
        sluice::Transport::publish(&self.target.queue_handle, msgs).await?;
        self.sent += n;
        println!("sent {n} payments ({} in all)", self.sent);
        Ok(())
    }

    /// Polls until `f` holds (the worker restarted as a supervisor would if it exits).
    async fn until(
        &mut self,
        what: &str,
        mut f: impl AsyncFnMut(&mut Self) -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        let start = Instant::now();
        while start.elapsed() < STEP {
            self.pool.supervise()?;
            if f(self).await? {
                println!("({what}: after {:.1} s)", start.elapsed().as_secs_f64());
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        bail!("{what}: not within {STEP:?}; see {}", self.log.display())
    }

    async fn charged_all(&mut self) -> anyhow::Result<()> {
        let want = self.sent;
        self.until(&format!("{want} payments charged"), async move |d| {
            Ok(d.ledger.counts().await?.distinct >= want && d.target.pending().await?.is_empty())
        })
        .await
    }

    async fn log_shows(&mut self, needle: &str) -> anyhow::Result<()> {
        let needle = needle.to_owned();
        self.until(&format!("the log shows {needle:?}"), async move |d| {
            Ok(std::fs::read_to_string(&d.log)
                .unwrap_or_default()
                .contains(&needle))
        })
        .await
    }

    async fn ready(&mut self) -> anyhow::Result<()> {
        self.until("/readyz answers 200", async |d| {
            Ok(http_status(&d.metrics, "/readyz") == Some(200))
        })
        .await
    }

    /// Runs the runbook's block `# drill: <name>`.
    fn runbook(&self, name: &str) -> anyhow::Result<()> {
        for line in runbook_block(&repo_root().join("docs/runbook.md"), name)? {
            println!("$ {line}");
            let out = Command::new("bash")
                .arg("-c")
                .arg(format!("logs() {{ cat \"$SLUICE_LOG\"; }}\n{line}"))
                .envs(self.vars.iter().map(|(k, v)| (k, v)))
                .output()?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            for l in text.lines().take(12) {
                println!("  {}", cut(l, 220));
            }
            if !out.status.success() {
                println!("  (exit {})", out.status.code().unwrap_or(-1));
            }
        }
        Ok(())
    }

    /// Every payment charged once, nothing on the DLQ.
    async fn verify(&mut self) -> anyhow::Result<bool> {
        self.charged_all().await?;
        self.runbook("verify")?;
        let c = self.ledger.counts().await?;
        let dead = self.target.pending().await?.dead_lettered;
        println!(
            "\nledger: {} charges for {} payments sent ({} distinct); dead-lettered: {dead}; worker exits on their own: {}",
            c.charges, self.sent, c.distinct, self.pool.exits.len()
        );
        Ok(c.charges == self.sent && c.distinct == self.sent && dead == 0)
    }
}

fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        s.chars().take(n).collect::<String>() + "…"
    }
}

/// The command lines of the fenced block whose first line is `# drill: <name>`.
fn runbook_block(path: &Path, name: &str) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)?;
    let marker = format!("# drill: {name}");
    let mut lines = text.lines().skip_while(|l| l.trim() != marker);
    if lines.next().is_none() {
        bail!("{} has no block `{marker}`", path.display());
    }
    Ok(lines
        .take_while(|l| !l.starts_with("```"))
        .map(|l| l.trim())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect())
}

/// The status of `GET path` on `addr`, `None` if nothing answers.
fn http_status(addr: &str, path: &str) -> Option<u16> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut head = String::new();
    s.read_to_string(&mut head).ok()?;
    head.split_whitespace().nth(1)?.parse().ok()
}

async fn partition(d: &mut Drill) -> anyhow::Result<bool> {
    say("before: the worker is up and charging");
    d.ready().await?;
    d.send(BEFORE).await?;
    d.charged_all().await?;
    say("incident: the worker's network path to RabbitMQ is cut (connections dropped, new ones refused)");
    d.target.broker.as_ref().context("broker proxy")?.cut();
    d.send(DURING).await?;
    d.log_shows("could not connect to RabbitMQ").await?;
    say("look (docs/runbook.md, Broker unreachable)");
    d.runbook("partition look")?;
    // A partition longer than one reconnect budget (15 s): intake logs `receive failed` and
    // keeps trying, with its own backoff; the process stays up.
    d.log_shows("receive failed").await?;
    anyhow::ensure!(
        d.pool.exits.is_empty(),
        "the worker exited during the partition: {:?}",
        d.pool.exits
    );
    d.runbook("partition look-longer")?;
    say("recover: the path is back; the worker reconnects on its own");
    d.target.broker.as_ref().context("broker proxy")?.restore();
    d.verify().await
}

async fn auth(d: &mut Drill) -> anyhow::Result<bool> {
    let user = d
        .vars
        .iter()
        .find(|(k, _)| k == "RABBIT_USER")
        .map(|(_, v)| v.clone())
        .context("user")?;
    let new = d
        .vars
        .iter()
        .find(|(k, _)| k == "NEW_PASSWORD")
        .map(|(_, v)| v.clone())
        .context("password")?;
    say("before: the worker is up and charging");
    d.ready().await?;
    d.send(BEFORE).await?;
    d.charged_all().await?;
    say("incident: the password is rotated on the broker, not in the worker's secret; its connections are closed");
    rabbitmqctl(&["change_password", &user, &new])?;
    rabbitmqctl(&[
        "close_all_user_connections",
        &user,
        "drill: credentials rotated",
    ])?;
    d.send(DURING).await?;
    d.log_shows("refused the login").await?;
    anyhow::ensure!(
        d.pool.exits.is_empty(),
        "the worker exited on the refused login: {:?}",
        d.pool.exits
    );
    say("look (docs/runbook.md, Credentials rotated or wrong)");
    d.runbook("auth look")?;
    say("recover (docs/runbook.md): check the new secret, then give it to the worker and restart it");
    d.runbook("auth recover")?;
    d.pool.stop(Duration::from_secs(20)).await;
    let new_url = d
        .vars
        .iter()
        .find(|(k, _)| k == "NEW_URL")
        .map(|(_, v)| v.clone())
        .context("url")?;
    d.pool.set_env("SLUICE__TRANSPORT__URL", &new_url);
    set(&mut d.vars, "SLUICE__TRANSPORT__URL", &new_url);
    d.pool.restart_all()?;
    d.ready().await?;
    d.verify().await
}

async fn exhaustion(d: &mut Drill) -> anyhow::Result<bool> {
    let role = d
        .vars
        .iter()
        .find(|(k, _)| k == "SLUICE_PG_ROLE")
        .map(|(_, v)| v.clone())
        .context("role")?;
    say("before: the worker is up and charging");
    d.ready().await?;
    d.send(BEFORE).await?;
    d.charged_all().await?;
    say("incident: another client holds the store role's only allowed connection (CONNECTION LIMIT 1)");
    let holder_url = format!("postgres://{role}@{}/{role}", host_port(&postgres_url())?);
    let (holder, conn) = tokio_postgres::connect(&holder_url, tokio_postgres::NoTls).await?;
    let _holder_conn = tokio::spawn(conn);
    let holder_pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .await?
        .get(0);
    let admin = admin_client().await?;
    admin
        .batch_execute(&format!("ALTER ROLE {role} CONNECTION LIMIT 1"))
        .await?;
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1 AND pid <> $2",
            &[&role, &holder_pid],
        )
        .await?;
    d.send(DURING).await?;
    d.log_shows("too many connections for role").await?;
    say("look (docs/runbook.md, Store connections exhausted)");
    d.runbook("exhaustion look")?;
    say("recover (docs/runbook.md): raise the role's limit above what the replicas' pools need");
    d.runbook("exhaustion recover")?;
    let outcome = d.verify().await;
    drop(holder);
    outcome
}
