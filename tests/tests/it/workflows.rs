//! Workflows carried by routing slips (docs/workflows.md), in-process, through the public API:
//! four step functions of a shop (reserve -> charge -> ship -> receipt; release, refund and
//! cancel as compensations, the receipt without one) share one [`Shop`] whose books the
//! invariants check. Each step runs on its own queue with several workers; orders carry the
//! faults they should meet (a permanent failure at a step, a transient one that passes on
//! retry, a slow step that misses the workflow's deadline, a compensation that keeps failing).
//!
//! The same scenario runs on the embedded queue, on RabbitMQ and on SQS (moto): [`scenario`]
//! is generic over the settings of one step. Everything is polled with a deadline, never
//! waited for with a fixed sleep.
//!
//! Run with `cargo nextest run -p sluice-tests -E 'test(/^workflows::/)'`.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use sluice::{
    conformance::{poll_until, unique},
    message::RedriveFilter,
    worker::{RunOptions, Runtime},
    workflow::{
        definition::Definition,
        status::{State, Status},
    },
    Context, Function, HandlerError, OutgoingMessage, Settings, Transport,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Settings of every step worker: short retries (50 ms doubling, capped at 200 ms), no
/// immediate retries, a quick idle receive.
const BASE_TOML: &str = r#"
[transport]
lease = "5s"
wait = "50ms"
poll_interval = "10ms"

[retry]
immediate = 0
base = "50ms"
cap = "200ms"
max_deliveries = 5

[worker]
concurrency = 4

[telemetry]
log_format = "pretty"
log_level = "warn"
"#;

/// Deadline of every poll: far above what the scenario needs, so only a hang trips it.
const WAIT: Duration = Duration::from_secs(60);

/// Stock each product starts with.
const INITIAL_STOCK: i64 = 1_000_000;

/// The steps, in order; `true`: has a compensation.
const STEPS: [(&str, bool); 4] = [
    ("reserve", true),
    ("charge", true),
    ("ship", true),
    ("receipt", false),
];

/// What an order meets on its way.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Order {
    id: String,
    qty: i64,
    cents: i64,
    /// The step that fails permanently.
    #[serde(default)]
    fail_at: Option<String>,
    /// The step that fails transiently on its first call, then passes.
    #[serde(default)]
    flaky_at: Option<String>,
    /// The step that sleeps this long (to miss the workflow's deadline).
    #[serde(default)]
    slow_at: Option<(String, u64)>,
}

/// The shop's books and what ran, shared by every step function of the test.
#[derive(Default)]
struct Shop {
    stock: Mutex<i64>,
    ledger: Mutex<i64>,
    shipments: Mutex<BTreeSet<String>>,
    /// Successful runs by (order, step, direction).
    runs: Mutex<BTreeMap<(String, String, &'static str), u32>>,
    /// First calls seen, for `flaky_at`.
    seen: Mutex<BTreeSet<(String, String)>>,
    /// While set, every `release` fails permanently.
    release_broken: AtomicBool,
}

type Cx = Context<Arc<Shop>>;

#[derive(Debug, Serialize, Deserialize)]
struct Done {
    qty: i64,
    cents: i64,
}

impl Shop {
    fn new() -> Arc<Self> {
        let shop = Shop::default();
        *shop.stock.lock().unwrap() = INITIAL_STOCK;
        Arc::new(shop)
    }

    fn ran(&self, order: &str, step: &str, dir: &'static str) {
        *self
            .runs
            .lock()
            .unwrap()
            .entry((order.to_owned(), step.to_owned(), dir))
            .or_default() += 1;
    }

    fn runs(&self, order: &str, step: &str, dir: &'static str) -> u32 {
        let runs = self.runs.lock().unwrap();
        runs.get(&(order.to_owned(), step.to_owned(), dir))
            .copied()
            .unwrap_or(0)
    }
}

/// The faults an order asks for at `step`, before any effect.
async fn faults(o: &Order, step: &str, ctx: &Cx) -> Result<(), HandlerError> {
    if o.fail_at.as_deref() == Some(step) {
        return Err(HandlerError::permanent(format!("{step} refused {}", o.id)));
    }
    if o.flaky_at.as_deref() == Some(step)
        && ctx
            .state()
            .seen
            .lock()
            .unwrap()
            .insert((o.id.clone(), step.to_owned()))
    {
        return Err(HandlerError::transient(format!(
            "{step} flaked on {}",
            o.id
        )));
    }
    if let Some((s, ms)) = &o.slow_at {
        if s == step {
            tokio::time::sleep(Duration::from_millis(*ms)).await;
        }
    }
    Ok(())
}

async fn step(o: Order, ctx: &Cx) -> Result<Done, HandlerError> {
    let wf = ctx
        .workflow()
        .ok_or_else(|| HandlerError::permanent("not a workflow message"))?;
    let name = wf.step().to_owned();
    faults(&o, &name, ctx).await?;
    let shop = ctx.state();
    match name.as_str() {
        "reserve" => *shop.stock.lock().unwrap() -= o.qty,
        "charge" => {
            *shop.ledger.lock().unwrap() += o.cents;
            wf.set_variable("charged", o.cents);
        }
        "ship" => {
            // A variable set by an earlier step.
            let charged: i64 = wf
                .variable("charged")
                .map_err(HandlerError::permanent)?
                .ok_or_else(|| HandlerError::permanent("ship before charge"))?;
            assert_eq!(charged, o.cents);
            shop.shipments.lock().unwrap().insert(o.id.clone());
        }
        _ => {}
    }
    shop.ran(&o.id, &name, "forward");
    Ok(Done {
        qty: o.qty,
        cents: o.cents,
    })
}

async fn compensate(o: Order, ctx: &Cx) -> Result<(), HandlerError> {
    let wf = ctx
        .workflow()
        .ok_or_else(|| HandlerError::permanent("not a workflow message"))?;
    let name = wf.step().to_owned();
    let done: Done = wf.compensation_data().map_err(HandlerError::permanent)?;
    let shop = ctx.state();
    match name.as_str() {
        "reserve" => {
            if shop.release_broken.load(Ordering::SeqCst) {
                return Err(HandlerError::permanent("the warehouse is closed"));
            }
            *shop.stock.lock().unwrap() += done.qty;
        }
        "charge" => *shop.ledger.lock().unwrap() -= done.cents,
        "ship" => {
            shop.shipments.lock().unwrap().remove(&o.id);
        }
        other => {
            return Err(HandlerError::permanent(format!(
                "no compensation for {other}"
            )))
        }
    }
    shop.ran(&o.id, &name, "compensate");
    Ok(())
}

/// The workflow: its steps on `queues`, with a deadline.
fn definition(name: &str, queues: &[String], deadline: &str) -> Definition {
    let mut toml = format!("name = \"{name}\"\ndeadline = \"{deadline}\"\n");
    for ((step, comp), q) in STEPS.iter().zip(queues) {
        toml += &format!("\n[[steps]]\nname = \"{step}\"\nqueue = \"{q}\"\ncompensate = {comp}\n");
    }
    Definition::parse(&toml).expect("the test definition parses")
}

/// A running shop: every step's workers, the definition, the books.
struct Running {
    shop: Arc<Shop>,
    def: Definition,
    /// The first worker of each step, in order.
    heads: Vec<Arc<Runtime>>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// Starts `workers` workers per step; `settings(queue)` gives one step's settings.
async fn start(settings: impl Fn(&str) -> Settings, workers: usize, deadline: &str) -> Running {
    let shop = Shop::new();
    let wf = unique("order");
    let queues: Vec<String> = STEPS.iter().map(|(s, _)| format!("{wf}-{s}")).collect();
    let def = definition(&wf, &queues, deadline);
    let stop = CancellationToken::new();
    let (mut heads, mut tasks) = (Vec::new(), Vec::new());
    for q in &queues {
        for n in 0..workers {
            let s = shop.clone();
            let f = Function::new("shop-step", step)
                .compensate(compensate)
                .state(move |_| async move { Ok(s) });
            let rt = Arc::new(f.build(settings(q)).await.expect("the step worker builds"));
            if n == 0 {
                heads.push(rt.clone());
            }
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                rt.run(RunOptions { drain: false }, stop)
                    .await
                    .expect("the step worker runs");
            }));
        }
    }
    Running {
        shop,
        def,
        heads,
        stop,
        tasks,
    }
}

impl Running {
    async fn send(&self, orders: &[Order]) {
        let msgs: Vec<OutgoingMessage> = orders
            .iter()
            .map(|o| {
                let body = serde_json::to_vec(o).unwrap();
                self.def
                    .start(&o.id, body, Default::default())
                    .expect("the first message")
                    .1
            })
            .collect();
        self.heads[0]
            .transport()
            .publish(msgs)
            .await
            .expect("publish the first steps");
    }

    async fn status(&self, id: &str) -> Option<Status> {
        self.heads[0].workflow_status(id).await.expect("status")
    }

    /// Waits until every order's record is in a terminal state (or in `also`).
    async fn settle(&self, orders: &[Order], also: Option<State>) -> BTreeMap<String, Status> {
        poll_until(WAIT, "every order settles", || async {
            let mut out = BTreeMap::new();
            for o in orders {
                let s = self.status(&o.id).await?;
                if !(s.state.is_terminal() || Some(s.state) == also) {
                    return None;
                }
                out.insert(o.id.clone(), s);
            }
            Some(out)
        })
        .await
    }

    async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            t.await.unwrap();
        }
    }

    /// The invariants of docs/workflows.md, asserted; returns (completed, compensated).
    fn check(&self, orders: &[Order], statuses: &BTreeMap<String, Status>) -> (usize, usize) {
        let shop = &self.shop;
        let (mut completed, mut compensated) = (0, 0);
        let (mut sold, mut charged) = (0, 0);
        for o in orders {
            let s = &statuses[&o.id];
            match s.state {
                State::Completed => {
                    completed += 1;
                    sold += o.qty;
                    charged += o.cents;
                    for (step, _) in STEPS {
                        assert_eq!(
                            shop.runs(&o.id, step, "forward"),
                            1,
                            "{} {step} ran once",
                            o.id
                        );
                        assert_eq!(shop.runs(&o.id, step, "compensate"), 0, "{} {step}", o.id);
                    }
                    assert_eq!(s.steps_done, STEPS.len() as u32);
                }
                State::Compensated => {
                    compensated += 1;
                    for (step, has) in STEPS {
                        let ran = shop.runs(&o.id, step, "forward");
                        assert!(ran <= 1, "{} {step} ran {ran} times", o.id);
                        let undone = shop.runs(&o.id, step, "compensate");
                        let want = if ran == 1 && has { 1 } else { 0 };
                        assert_eq!(undone, want, "{} {step}: compensated once iff it ran", o.id);
                    }
                }
                other => panic!("{} ended {other:?}", o.id),
            }
        }
        assert_eq!(
            *shop.stock.lock().unwrap(),
            INITIAL_STOCK - sold,
            "stock balances"
        );
        assert_eq!(*shop.ledger.lock().unwrap(), charged, "money balances");
        assert_eq!(
            shop.shipments.lock().unwrap().len(),
            completed,
            "shipments balance"
        );
        (completed, compensated)
    }
}

/// `n` orders: every fifth fails permanently at a step (round robin), every third of the rest
/// flakes once at a step.
fn orders(n: usize) -> Vec<Order> {
    (0..n)
        .map(|i| {
            let step = STEPS[i % STEPS.len()].0.to_owned();
            Order {
                id: unique("o"),
                qty: 1 + (i as i64 % 3),
                cents: 100 * (1 + i as i64 % 7),
                fail_at: (i % 5 == 0).then(|| step.clone()),
                flaky_at: (i % 5 != 0 && i % 3 == 0).then_some(step),
                slow_at: None,
            }
        })
        .collect()
}

/// The scenario on any transport: `n` orders with faults, `workers` workers per step.
pub(crate) async fn scenario(settings: impl Fn(&str) -> Settings, workers: usize, n: usize) {
    let shop = start(settings, workers, "5m").await;
    let orders = orders(n);
    shop.send(&orders).await;
    let statuses = shop.settle(&orders, None).await;
    let (completed, compensated) = shop.check(&orders, &statuses);
    assert_eq!(completed + compensated, n);
    assert_eq!(
        compensated,
        orders.iter().filter(|o| o.fail_at.is_some()).count()
    );
    eprintln!("workflows: {n} orders, {completed} completed, {compensated} compensated");
    shop.stop().await;
}

/// Settings of one embedded step: one queue file and one store file for every step.
fn embedded(dir: &Path) -> impl Fn(&str) -> Settings + '_ {
    move |queue| {
        Settings::load(
            "shop-step",
            Some(BASE_TOML),
            std::iter::empty(),
            &[
                format!("queue={queue}"),
                format!("transport.url={}", dir.join("queue.db").display()),
                format!("store.url={}", dir.join("store.db").display()),
            ],
        )
        .expect("test settings are valid")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_orders_complete_or_compensate_and_the_books_balance() {
    let dir = tempfile::tempdir().unwrap();
    scenario(embedded(dir.path()), 2, 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_copy_of_a_completed_step_forwards_again_but_runs_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let shop = start(embedded(dir.path()), 1, "5m").await;
    let order = Order {
        id: unique("o"),
        qty: 2,
        cents: 500,
        ..Order::default()
    };
    // Three copies of the first step: what a redelivery after a crash looks like.
    let three = [order.clone(), order.clone(), order.clone()];
    shop.send(&three).await;
    let statuses = shop.settle(&three[..1], None).await;
    assert_eq!(shop.check(&three[..1], &statuses), (1, 0));
    // The copies were absorbed step after step: each worker skipped duplicates.
    poll_until(WAIT, "the copies are absorbed", || async {
        let dups: u64 = shop
            .heads
            .iter()
            .map(|rt| rt.metrics.duplicates_skipped.load(Ordering::Relaxed))
            .sum();
        (dups >= 2).then_some(())
    })
    .await;
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_step_that_misses_the_workflow_deadline_compensates_the_steps_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let shop = start(embedded(dir.path()), 1, "300ms").await;
    let order = Order {
        id: unique("o"),
        qty: 1,
        cents: 100,
        slow_at: Some(("charge".into(), 600)),
        ..Order::default()
    };
    shop.send(std::slice::from_ref(&order)).await;
    let statuses = shop.settle(std::slice::from_ref(&order), None).await;
    let s = &statuses[&order.id];
    assert_eq!(s.state, State::Compensated, "{s:?}");
    // The slow charge finished before the deadline was checked at the next step: charge and
    // reserve are both undone, ship never ran.
    assert_eq!(shop.shop.runs(&order.id, "ship", "forward"), 0);
    shop.check(std::slice::from_ref(&order), &statuses);
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_compensation_is_dead_lettered_and_its_redrive_resumes_it() {
    let dir = tempfile::tempdir().unwrap();
    let shop = start(embedded(dir.path()), 1, "5m").await;
    shop.shop.release_broken.store(true, Ordering::SeqCst);
    let order = Order {
        id: unique("o"),
        qty: 3,
        cents: 700,
        fail_at: Some("ship".into()),
        ..Order::default()
    };
    let one = std::slice::from_ref(&order);
    shop.send(one).await;
    let statuses = shop.settle(one, Some(State::CompensationFailed)).await;
    assert_eq!(statuses[&order.id].state, State::CompensationFailed);
    let reason = statuses[&order.id].reason.clone().unwrap_or_default();
    assert!(reason.contains("warehouse is closed"), "{reason}");
    assert_eq!(
        *shop.shop.stock.lock().unwrap(),
        INITIAL_STOCK - 3,
        "not released yet"
    );
    // The reserve queue's dead letter carries the slip; redriving it resumes the compensation.
    let reserve = &shop.heads[0];
    let dead = reserve.transport().dlq_list(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    shop.shop.release_broken.store(false, Ordering::SeqCst);
    let moved = reserve
        .transport()
        .redrive(&RedriveFilter::default())
        .await
        .unwrap();
    assert_eq!(moved.len(), 1);
    let statuses = shop.settle(one, None).await;
    assert_eq!(statuses[&order.id].state, State::Compensated);
    shop.check(one, &statuses);
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redrive_of_the_failed_step_of_a_compensated_workflow_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let shop = start(embedded(dir.path()), 1, "5m").await;
    let order = Order {
        id: unique("o"),
        qty: 1,
        cents: 100,
        fail_at: Some("charge".into()),
        ..Order::default()
    };
    let one = std::slice::from_ref(&order);
    shop.send(one).await;
    let statuses = shop.settle(one, None).await;
    assert_eq!(statuses[&order.id].state, State::Compensated);
    let charge = &shop.heads[1];
    assert_eq!(charge.transport().dlq_list(10).await.unwrap().len(), 1);
    charge
        .transport()
        .redrive(&RedriveFilter::default())
        .await
        .unwrap();
    let refused = poll_until(WAIT, "the redrive is refused", || async {
        let dead = charge.transport().dlq_list(10).await.unwrap();
        dead.into_iter()
            .find(|d| d.last_error.contains("not run again"))
    })
    .await;
    assert!(refused.last_error.contains(&order.id));
    assert_eq!(shop.shop.runs(&order.id, "charge", "forward"), 0);
    shop.check(one, &statuses);
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_or_misrouted_slip_is_dead_lettered_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let shop = start(embedded(dir.path()), 1, "5m").await;
    let reserve = &shop.heads[0];
    let mut garbage = OutgoingMessage::new(b"{}".to_vec());
    garbage.envelope.slip = Some("{\"v\":1,\"id\":".into());
    // A well-formed slip for the charge step, sent to the reserve queue.
    let body = serde_json::to_vec(&Order::default()).unwrap();
    let (mut slip, mut misrouted) = shop.def.start("x-1", body, Default::default()).unwrap();
    slip.itinerary.remove(0);
    misrouted.envelope.slip = Some(serde_json::to_string(&slip).unwrap());
    reserve
        .transport()
        .publish(vec![garbage, misrouted])
        .await
        .unwrap();
    let dead = poll_until(WAIT, "both are dead-lettered", || async {
        let dead = reserve.transport().dlq_list(10).await.unwrap();
        (dead.len() == 2).then_some(dead)
    })
    .await;
    let reasons: Vec<String> = dead.into_iter().map(|d| d.last_error).collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("malformed workflow slip")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("is for queue")),
        "{reasons:?}"
    );
    assert_eq!(shop.shop.runs.lock().unwrap().len(), 0, "no step ran");
    shop.stop().await;
}

/// Settings of one step on another transport: `kind` and its URL, the store a shared file.
#[cfg(any(feature = "rabbitmq", feature = "sqs"))]
fn on<'a>(
    kind: &'static str,
    dir: &'a Path,
    url: impl Fn(&str) -> String + 'a,
) -> impl Fn(&str) -> Settings + 'a {
    move |queue| {
        Settings::load(
            "shop-step",
            Some(BASE_TOML),
            std::iter::empty(),
            &[
                format!("queue={queue}"),
                format!("transport.kind={kind}"),
                format!("transport.url={}", url(queue)),
                format!("store.url={}", dir.join("store.db").display()),
            ],
        )
        .expect("test settings are valid")
    }
}

#[cfg(feature = "rabbitmq")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_orders_complete_or_compensate_with_three_workers_per_step() {
    let dir = tempfile::tempdir().unwrap();
    let url = sluice_tests::rabbit::url();
    let t0 = std::time::Instant::now();
    scenario(on("rabbitmq", dir.path(), move |_| url.clone()), 3, 30).await;
    eprintln!("workflows on RabbitMQ: 30 orders in {:?}", t0.elapsed());
}

#[cfg(feature = "sqs")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqs_orders_complete_or_compensate_with_three_workers_per_step() {
    sluice_tests::moto("SQS");
    let dir = tempfile::tempdir().unwrap();
    let t0 = std::time::Instant::now();
    scenario(on("sqs", dir.path(), |q| q.to_owned()), 3, 20).await;
    eprintln!("workflows on SQS (moto): 20 orders in {:?}", t0.elapsed());
}

/// `order-steps` (the example binary) on the embedded queue, one worker per step, each
/// aborting now and then (`fault.crash_rate`: after the handler, after the step's record and
/// after its hand-off, the gaps between handler, record, hand-off and ack); a dead worker is
/// restarted at once. Every order completes, and the shop applied every step once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashing_step_workers_lose_no_order_and_apply_no_step_twice() {
    use crate::support::FunctionRun;
    const ORDERS: usize = 20;
    let run = FunctionRun::new("order-steps")
        .set("fault.crash_rate=0.05")
        .set("transport.lease=1s")
        .set("retry.immediate=0")
        .set("retry.base=50ms")
        .set("telemetry.log_level=warn")
        // Relative to the sandbox, every command's working directory.
        .set("app.shop=shop.db");
    let queues = [
        "order-reserve",
        "order-charge",
        "order-ship",
        "order-receipt",
    ];
    let spawn = |q: &str| {
        let mut cmd = run.command(
            &["--set", &format!("queue={q}"), "run"],
            &format!("{q}.log"),
        );
        // The sandbox names charge-payment's ledger, a key order-steps does not have.
        cmd.current_dir(&run.sandbox.dir)
            .env_remove("SLUICE__APP__LEDGER")
            .stdout(std::process::Stdio::null());
        cmd.spawn().expect("start a step worker")
    };
    let mut workers: Vec<(String, std::process::Child)> =
        queues.iter().map(|q| (q.to_string(), spawn(q))).collect();
    let workflows = sluice_tests::repo_root().join("workflows");
    let sent = run
        .command(
            &[
                "send",
                "--workflows",
                workflows.to_str().unwrap(),
                "--workflow",
                "order",
                "--count",
                &ORDERS.to_string(),
                "--id",
                "o-{{seq}}",
                r#"{"order":"o-{{seq}}","sku":"sku-1","qty":2,"cents":150}"#,
            ],
            "cli.log",
        )
        .current_dir(&run.sandbox.dir)
        .env_remove("SLUICE__APP__LEDGER")
        .output()
        .unwrap();
    assert!(sent.status.success(), "{}", run.log("cli.log"));
    let mut restarts = 0;
    let completed = poll_until(WAIT * 2, "every order completes", || {
        // Restart the workers that died.
        for (q, child) in workers.iter_mut() {
            if child.try_wait().unwrap().is_some() {
                *child = spawn(q);
                restarts += 1;
            }
        }
        let out = run
            .command(
                &[
                    "workflow",
                    "list",
                    "--state",
                    "completed",
                    "--limit",
                    "1000",
                    "--json",
                ],
                "cli.log",
            )
            .current_dir(&run.sandbox.dir)
            .env_remove("SLUICE__APP__LEDGER")
            .output()
            .unwrap();
        let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        async move { (list.len() == ORDERS).then_some(list) }
    })
    .await;
    for (_, child) in workers.iter_mut() {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert_eq!(completed.len(), ORDERS);
    let shop = rusqlite::Connection::open(run.sandbox.dir.join("shop.db")).unwrap();
    let count = |sql: &str| -> i64 { shop.query_row(sql, [], |r| r.get(0)).unwrap() };
    assert_eq!(
        count("SELECT COUNT(*) FROM effects WHERE direction = 'forward'"),
        4 * ORDERS as i64
    );
    assert_eq!(
        count("SELECT COUNT(*) FROM effects WHERE direction = 'compensate'"),
        0
    );
    assert_eq!(
        count("SELECT MAX(c) FROM (SELECT COUNT(*) AS c FROM effects GROUP BY order_id, step)"),
        1
    );
    assert_eq!(
        count("SELECT qty FROM stock WHERE sku = 'sku-1'"),
        1_000_000 - 2 * ORDERS as i64
    );
    assert_eq!(
        count("SELECT SUM(cents) FROM charges WHERE refunded = 0"),
        150 * ORDERS as i64
    );
    assert!(
        restarts > 0,
        "the drill crashed no worker; see {}",
        run.sandbox.dir.display()
    );
    eprintln!(
        "workflows: {ORDERS} orders completed through {restarts} worker crashes, {} handler calls for {} steps",
        count("SELECT SUM(n) FROM calls"),
        4 * ORDERS
    );
}
