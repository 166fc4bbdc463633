//! The workflow demo: 1,000 orders through `workflows/order.toml` (reserve -> charge -> ship
//! -> receipt, compensated by release, refund and cancel) on the embedded queue, worked by the
//! real `order-steps` binary, two processes per step. Orders carry injected faults at every
//! step (a rejection, a transient failure, a compensation that fails until it is
//! dead-lettered); one worker is SIGKILLed mid-run and restarted; the compensations that
//! failed are redriven. Then the invariants are checked against the shop's books.
//!
//! Run with `just demo workflow` (or `just demo workflow --json`).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Child, ExitCode},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{rngs::StdRng, Rng, SeedableRng};
use sluice::{
    store::{sqlite::SqliteStore, AnyStore},
    telemetry::RunSummary,
    transport::{embedded::EmbeddedTransport, TransportOptions},
    workflow::{
        definition::Definition,
        status::{State, Status},
        EventKind,
    },
    Transport,
};
use sluice_tests::{function_binary, repo_root, Sandbox};

#[derive(Parser, Debug)]
#[command(about = "Sluice workflow demo: the order workflow on the embedded queue")]
struct Args {
    /// Orders to start.
    #[arg(long, default_value_t = 1_000)]
    orders: usize,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Working directory (wiped at start).
    #[arg(long, default_value = ".sluice/demo-workflow")]
    dir: PathBuf,
    /// Seed of the fault mix.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Worker processes per step.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// The order-steps binary (default: the one built beside this driver).
    #[arg(long)]
    function_bin: Option<PathBuf>,
}

/// The steps; `true`: compensated.
const STEPS: [(&str, bool); 4] = [
    ("reserve", true),
    ("charge", true),
    ("ship", true),
    ("receipt", false),
];

/// Stock each SKU starts with (the function's `app.initial_stock`).
const INITIAL_STOCK: i64 = 1_000_000;

/// Deliveries before a failure is dead-lettered: small, so the compensations that fail on
/// purpose reach the dead-letter queue quickly.
const MAX_DELIVERIES: i64 = 4;

/// Settings every worker gets (short retries: the injected transient failures pass quickly).
const WORKER_SETTINGS: [&str; 11] = [
    "worker.concurrency=8",
    // The injected failures are the orders', not a sick downstream: a breaker that opens on
    // them (the default: 5 in 60 s, open 30 s) would only stall the run.
    "breaker.failures=1000",
    "breaker.window=5s",
    "breaker.open_for=1s",
    "retry.immediate=0",
    // A killed worker's messages and claims come back after this.
    "transport.lease=3s",
    "retry.base=50ms",
    "retry.cap=500ms",
    "retry.max_deliveries=4",
    "transport.poll_interval=20ms",
    "telemetry.log_level=warn",
];

#[derive(Debug, Clone, serde::Serialize)]
struct Order {
    order: String,
    sku: String,
    qty: i64,
    cents: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    fail_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    flaky_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    undo_fails: Option<(String, i64)>,
}

/// 10% rejected at a step (round robin over the four), 20% flaky at a step, and a third of
/// the rejected ones with a compensation that fails until dead-lettered.
fn orders(n: usize, seed: u64) -> Vec<Order> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let r: f64 = rng.gen();
            let at = STEPS[rng.gen_range(0..STEPS.len())].0.to_owned();
            let fail_at = (r < 0.10).then(|| STEPS[i % STEPS.len()].0.to_owned());
            // A compensation of a step before the rejected one, failing MAX_DELIVERIES times.
            let undo_fails = match fail_at.as_deref() {
                Some(f) if r < 0.035 && f != "reserve" => {
                    let before: Vec<&str> = STEPS
                        .iter()
                        .take_while(|(s, _)| *s != f)
                        .filter(|(_, c)| *c)
                        .map(|(s, _)| *s)
                        .collect();
                    Some((
                        before[rng.gen_range(0..before.len())].to_owned(),
                        MAX_DELIVERIES,
                    ))
                }
                _ => None,
            };
            Order {
                order: format!("o-{i:05}"),
                sku: format!("sku-{}", rng.gen_range(0..20)),
                qty: rng.gen_range(1..5),
                cents: rng.gen_range(100..20_000),
                flaky_at: (fail_at.is_none() && r < 0.30).then_some(at),
                fail_at,
                undo_fails,
            }
        })
        .collect()
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match demo(&args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("workflow demo failed: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// The worker processes of every step.
struct Workers {
    bin: PathBuf,
    sandbox: Sandbox,
    shop: PathBuf,
    procs: Vec<(String, usize, Child)>,
}

impl Workers {
    fn spawn(&self, queue: &str, n: usize, generation: usize) -> anyhow::Result<Child> {
        let summary = self
            .sandbox
            .dir
            .join(format!("{queue}-{n}-{generation}.summary.json"));
        let mut args = vec![
            "--set".to_string(),
            format!("queue={queue}"),
            "--set".into(),
            format!("app.shop={}", self.shop.display()),
            "run".into(),
            "--summary".into(),
            summary.display().to_string(),
        ];
        for s in WORKER_SETTINGS {
            args.extend(["--set".into(), s.into()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = format!("{queue}-{n}.log");
        let mut cmd = self.sandbox.command(&self.bin, &args, &log)?;
        // The sandbox names charge-payment's ledger, a key order-steps does not have.
        cmd.env_remove("SLUICE__APP__LEDGER");
        Ok(cmd.spawn()?)
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        for (_, _, child) in &self.procs {
            // SIGTERM: a graceful stop that writes the run summary.
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        for (_, _, child) in &mut self.procs {
            child.wait()?;
        }
        Ok(())
    }
}

async fn demo(args: &Args) -> anyhow::Result<bool> {
    let bin = match &args.function_bin {
        Some(path) if path.exists() => path.clone(),
        Some(path) => bail!("{} does not exist: build it first", path.display()),
        None => function_binary("order-steps")?,
    };
    if args.dir.exists() {
        std::fs::remove_dir_all(&args.dir)
            .with_context(|| format!("wiping {}", args.dir.display()))?;
    }
    let sandbox = Sandbox::new(&args.dir)?;
    let say = |s: &str| {
        if !args.json {
            println!("{s}");
        }
    };
    let def = Definition::load(&repo_root().join("workflows"), "order")?;
    let shop = sandbox.dir.join("shop.db");

    // 1. Workers: `workers` processes per step.
    let mut workers = Workers {
        bin,
        sandbox: sandbox.clone(),
        shop: shop.clone(),
        procs: Vec::new(),
    };
    for q in def.queues() {
        for n in 0..args.workers {
            let child = workers.spawn(&q, n, 0)?;
            workers.procs.push((q.clone(), n, child));
        }
    }

    // 2. The orders, each with its slip, and its `started` record.
    let orders = orders(args.orders, args.seed);
    let first = def.queues()[0].clone();
    let queue = open_queue(&sandbox, &first).await?;
    let store = AnyStore::Sqlite(
        SqliteStore::open(&sandbox.store_db().display().to_string(), 1 << 16).await?,
    );
    say(&format!(
        "Starting {} orders ({} rejected at a step, {} flaky, {} with a failing compensation) on {} worker processes; logs in {}",
        orders.len(),
        orders.iter().filter(|o| o.fail_at.is_some()).count(),
        orders.iter().filter(|o| o.flaky_at.is_some()).count(),
        orders.iter().filter(|o| o.undo_fails.is_some()).count(),
        workers.procs.len(),
        sandbox.dir.display()
    ));
    let started = Instant::now();
    for chunk in orders.chunks(200) {
        let mut msgs = Vec::new();
        for o in chunk {
            let (slip, msg) = def.start(&o.order, serde_json::to_vec(o)?, Default::default())?;
            store
                .put_status(&Status {
                    id: slip.id.clone(),
                    workflow: slip.workflow.clone(),
                    state: State::Running,
                    event: EventKind::Started,
                    step: def.steps[0].name.clone(),
                    steps_done: 0,
                    compensated: 0,
                    reason: None,
                    updated_at: String::new(),
                })
                .await?;
            msgs.push(msg);
        }
        queue.publish(msgs).await?;
    }

    // 3. Progress; one charge worker SIGKILLed at a third, restarted; failed compensations
    //    redriven once everything else has settled.
    let bar = ProgressBar::new(orders.len() as u64);
    if args.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40.cyan/blue} {pos:>5}/{len}  {msg}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    let mut killed = false;
    let mut redriven = 0usize;
    let mut compensation_failures = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let all = store.list_status(None, usize::MAX).await?;
        let count = |s: State| all.iter().filter(|x| x.state == s).count();
        let done = count(State::Completed) + count(State::Compensated);
        for s in all.iter().filter(|s| s.state == State::CompensationFailed) {
            compensation_failures.insert(s.id.clone());
        }
        bar.set_position(done as u64);
        bar.set_message(format!(
            "completed {:>4}  compensated {:>4}  compensating {:>3}  compensation failed {:>3}",
            count(State::Completed),
            count(State::Compensated),
            count(State::Compensating),
            count(State::CompensationFailed)
        ));
        if !killed && done * 3 >= orders.len() {
            let i = workers
                .procs
                .iter()
                .position(|(q, _, _)| q == "order-charge")
                .expect("a charge worker");
            let (q, n, mut child) = workers.procs.remove(i);
            child.kill()?; // SIGKILL: no shutdown, no summary, leases left to run out
            child.wait()?;
            bar.println(format!(
                "SIGKILLed worker {q}#{n} (pid {}); restarting it",
                child.id()
            ));
            let child = workers.spawn(&q, n, 1)?;
            workers.procs.push((q, n, child));
            killed = true;
        }
        if done == orders.len() {
            break;
        }
        for (q, n, child) in &mut workers.procs {
            if let Some(status) = child.try_wait()? {
                bar.abandon();
                let (q, n) = (q.clone(), *n);
                workers.stop()?;
                bail!(
                    "worker {q}#{n} exited with {status}; see {}",
                    sandbox.dir.join(format!("{q}-{n}.log")).display()
                );
            }
        }
        // Everything not terminal is waiting in a dead-letter queue: redrive the
        // compensations that failed (retries used up: transient) and the copies the crash-loop
        // guard moved (a delivery cut short by the SIGKILL counted towards it); the steps
        // that faulted (permanent) stay.
        let waiting = count(State::CompensationFailed);
        if waiting > 0 && waiting + done == orders.len() {
            for q in def.queues() {
                let t = open_queue(&sandbox, &q).await?;
                for class in [
                    sluice::FailureClass::Transient,
                    sluice::FailureClass::CrashLoop,
                ] {
                    let moved = t
                        .redrive(&sluice::message::RedriveFilter {
                            error_class: Some(class),
                            ..Default::default()
                        })
                        .await?;
                    if !moved.is_empty() {
                        bar.println(format!(
                            "redrove {} failed compensation(s) on {q} ({})",
                            moved.len(),
                            class.as_str()
                        ));
                    }
                    redriven += moved.len();
                }
            }
        }
        if Instant::now() > deadline {
            bar.abandon();
            workers.stop()?;
            bail!(
                "orders did not settle within 10 minutes; see the logs in {}",
                sandbox.dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bar.finish_and_clear();
    let wall = started.elapsed();
    workers.stop()?;

    // 4. The books and the invariants.
    let statuses: BTreeMap<String, Status> = store
        .list_status(None, usize::MAX)
        .await?
        .into_iter()
        .map(|s| (s.id.clone(), s))
        .collect();
    let books = Books::read(&shop)?;
    let inv = invariants(&orders, &statuses, &books);
    let completed = statuses
        .values()
        .filter(|s| s.state == State::Completed)
        .count();
    let compensated = statuses
        .values()
        .filter(|s| s.state == State::Compensated)
        .count();
    let summaries = read_summaries(&sandbox.dir)?;
    let duplicates: u64 = summaries.iter().map(|s| s.duplicates_skipped).sum();
    let ok = inv.values().all(|v| *v);
    if args.json {
        let json = serde_json::json!({
            "orders": orders.len(),
            "completed": completed,
            "compensated": compensated,
            "compensation_failures": compensation_failures.len(),
            "compensations_redriven": redriven,
            "steps_run": books.calls,
            "step_effects": books.effects,
            "duplicates_absorbed": duplicates,
            "worker_sigkilled": killed,
            "invariants": inv,
            "elapsed_s": (wall.as_secs_f64() * 10.0).round() / 10.0,
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(ok);
    }
    let rows = [
        ("orders", orders.len().to_string()),
        ("  completed", completed.to_string()),
        ("  compensated", compensated.to_string()),
        (
            "compensation failures (dead-lettered, redriven)",
            format!("{} ({redriven} redriven)", compensation_failures.len()),
        ),
        (
            "steps run (handler calls, compensations included)",
            books.calls.to_string(),
        ),
        ("step effects applied", books.effects.to_string()),
        (
            "duplicates absorbed (idempotency records)",
            duplicates.to_string(),
        ),
        (
            "worker SIGKILLed and restarted",
            if killed { "1".into() } else { "0".into() },
        ),
        ("wall time", format!("{:.1} s", wall.as_secs_f64())),
    ];
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    println!();
    for (k, v) in rows {
        println!("  {k:<width$}  {v:>12}");
    }
    println!();
    for (name, holds) in &inv {
        println!("  [{}] {name}", if *holds { "ok" } else { "FAILED" });
    }
    println!();
    println!(
        "{}",
        if ok {
            "Every invariant holds."
        } else {
            "AN INVARIANT FAILED."
        }
    );
    Ok(ok)
}

async fn open_queue(sandbox: &Sandbox, queue: &str) -> anyhow::Result<EmbeddedTransport> {
    Ok(EmbeddedTransport::open(TransportOptions {
        queue: queue.into(),
        function: "workflow-demo".into(),
        url: sandbox.queue_db().display().to_string(),
        lease: Duration::from_secs(30),
        max_deliveries: MAX_DELIVERIES as u32,
        poll_interval: Duration::from_millis(50),
        declare: true,
    })
    .await?)
}

fn read_summaries(dir: &Path) -> anyhow::Result<Vec<RunSummary>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.to_string_lossy().ends_with(".summary.json") {
            out.push(serde_json::from_slice(&std::fs::read(&p)?)?);
        }
    }
    Ok(out)
}

/// What the shop's database says.
struct Books {
    /// (order, step, direction) of every effect applied.
    effects_by: BTreeMap<(String, String, String), i64>,
    effects: i64,
    calls: i64,
    stock_used: i64,
    net_cents: i64,
    shipped: BTreeSet<String>,
}

impl Books {
    fn read(path: &Path) -> anyhow::Result<Self> {
        let conn = rusqlite::Connection::open(path)?;
        let mut effects_by = BTreeMap::new();
        let mut stmt = conn.prepare(
            "SELECT order_id, step, direction, COUNT(*) FROM effects GROUP BY order_id, step, direction",
        )?;
        for row in stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))? {
            let (o, s, d, n): (String, String, String, i64) = row?;
            effects_by.insert((o, s, d), n);
        }
        let one = |sql: &str| -> anyhow::Result<i64> { Ok(conn.query_row(sql, [], |r| r.get(0))?) };
        let skus = one("SELECT COUNT(*) FROM stock")?;
        let mut shipped = BTreeSet::new();
        let mut stmt = conn.prepare("SELECT order_id FROM shipments WHERE cancelled = 0")?;
        for row in stmt.query_map([], |r| r.get::<_, String>(0))? {
            shipped.insert(row?);
        }
        Ok(Books {
            effects: one("SELECT COUNT(*) FROM effects")?,
            calls: one("SELECT COALESCE(SUM(n), 0) FROM calls")?,
            stock_used: skus * INITIAL_STOCK - one("SELECT COALESCE(SUM(qty), 0) FROM stock")?,
            net_cents: one("SELECT COALESCE(SUM(cents), 0) FROM charges WHERE refunded = 0")?,
            shipped,
            effects_by,
        })
    }

    fn applied(&self, order: &str, step: &str, dir: &str) -> i64 {
        self.effects_by
            .get(&(order.to_owned(), step.to_owned(), dir.to_owned()))
            .copied()
            .unwrap_or(0)
    }
}

fn invariants(
    orders: &[Order],
    statuses: &BTreeMap<String, Status>,
    books: &Books,
) -> BTreeMap<&'static str, bool> {
    let state = |o: &Order| statuses.get(&o.order).map(|s| s.state);
    let completed: Vec<&Order> = orders
        .iter()
        .filter(|o| state(o) == Some(State::Completed))
        .collect();
    let compensated: Vec<&Order> = orders
        .iter()
        .filter(|o| state(o) == Some(State::Compensated))
        .collect();
    let mut inv = BTreeMap::new();
    inv.insert(
        "every_order_terminal",
        completed.len() + compensated.len() == orders.len(),
    );
    inv.insert(
        "completed_ran_every_step_exactly_once",
        completed.iter().all(|o| {
            STEPS.iter().all(|(s, _)| {
                books.applied(&o.order, s, "forward") == 1
                    && books.applied(&o.order, s, "compensate") == 0
            })
        }),
    );
    inv.insert(
        "compensated_undid_every_completed_step_exactly_once",
        compensated.iter().all(|o| {
            STEPS.iter().all(|(s, has)| {
                let ran = books.applied(&o.order, s, "forward");
                let undone = books.applied(&o.order, s, "compensate");
                ran <= 1 && undone == i64::from(ran == 1 && *has)
            }) && o
                .fail_at
                .as_deref()
                .is_none_or(|f| books.applied(&o.order, f, "forward") == 0)
        }),
    );
    inv.insert(
        "only_rejected_orders_compensated",
        compensated.iter().all(|o| o.fail_at.is_some())
            && completed.iter().all(|o| o.fail_at.is_none()),
    );
    inv.insert(
        "stock_balances",
        books.stock_used == completed.iter().map(|o| o.qty).sum::<i64>(),
    );
    inv.insert(
        "money_balances",
        books.net_cents == completed.iter().map(|o| o.cents).sum::<i64>(),
    );
    inv.insert(
        "shipments_balance",
        books.shipped
            == completed
                .iter()
                .map(|o| o.order.clone())
                .collect::<BTreeSet<_>>(),
    );
    inv
}
