//! Cold start of a function in Lambda mode: process start -> first `GET /next` (the whole
//! start-up: settings, logging, the SQS client and its queue check on moto, the idempotency
//! store, the function's state), against a bare `lambda_runtime` SQS handler (`bare-lambda`)
//! in the same run, both timed by the Runtime API stub. Prints the medians of N starts each,
//! and the resident memory at the first `/next`; then the first invocation's latency (one
//! record: what laziness at start moves to the first event shows here) and a second, warm one.
//!
//! `just bench lambda [--runs N] [--json]` (needs moto: the function checks its queue at start).

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use sluice::transport::{sqs::SqsTransport, TransportOptions};
use sluice_tests::lambda::{spawn_lambda, RuntimeApi, LAMBDA_TARGET};

#[derive(Parser, Debug)]
#[command(about = "Cold start: Sluice's Lambda mode against a bare lambda_runtime handler")]
struct Args {
    /// Starts per binary.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// The Sluice function binary (default: the `lambda`-profile build `just package` zips).
    #[arg(long)]
    function_bin: Option<PathBuf>,
    /// The baseline (default: `bare-lambda` beside this executable).
    #[arg(long)]
    bare_bin: Option<PathBuf>,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, serde::Serialize)]
struct Row {
    name: String,
    binary: String,
    binary_bytes: u64,
    runs: usize,
    median_ms: f64,
    min_ms: f64,
    p90_ms: f64,
    max_ms: f64,
    rss_kib_median: u64,
    first_invoke_ms_median: f64,
    warm_invoke_ms_median: f64,
}

/// A one-record SQS event with a valid charge request (the bare handler ignores it).
fn one_record(queue_arn: &str) -> serde_json::Value {
    let mut r = sluice_tests::lambda::record_template();
    let id = uuid::Uuid::new_v4().to_string();
    r["messageId"] = serde_json::json!(id);
    r["receiptHandle"] = serde_json::json!(format!("rh-{id}"));
    r["body"] = serde_json::json!(format!(
        r#"{{"payment_id":"p-{id}","amount_cents":1250,"currency":"EUR","customer":"c-9"}}"#
    ));
    r["eventSourceARN"] = serde_json::json!(queue_arn);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    r["attributes"] = serde_json::json!({
        "ApproximateReceiveCount": "1",
        "SentTimestamp": now_ms.to_string(),
        "ApproximateFirstReceiveTimestamp": now_ms.to_string(),
    });
    serde_json::json!({ "Records": [r] })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

async fn measure(
    name: &str,
    bin: &PathBuf,
    env: &dyn Fn(&std::path::Path) -> Vec<(String, String)>,
    runs: usize,
    queue_arn: &str,
) -> anyhow::Result<Row> {
    let mut times = Vec::with_capacity(runs);
    let mut rss = Vec::with_capacity(runs);
    let (mut first, mut warm) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for _ in 0..runs {
        let dir = tempfile::tempdir()?;
        let api = RuntimeApi::start(name).await?;
        let started = std::time::Instant::now();
        let mut child = spawn_lambda(
            bin,
            api.addr,
            name,
            &env(dir.path()),
            &dir.path().join("log"),
        )?;
        let ready = api.wait_ready(Duration::from_secs(30)).await;
        let ready = match ready {
            Ok(t) => t,
            Err(e) => {
                let _ = child.kill();
                let log = std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
                anyhow::bail!("{name}: {e}\n{log}");
            }
        };
        times.push(ready.duration_since(started).as_secs_f64() * 1000.0);
        rss.push(rss_kib(child.id()));
        for latencies in [&mut first, &mut warm] {
            let sent = std::time::Instant::now();
            let outcome = api
                .invoke(&one_record(queue_arn), Duration::from_secs(30))
                .await;
            latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
            if let Err(e) = outcome {
                let _ = child.kill();
                let log = std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
                anyhow::bail!("{name}: invocation: {e}\n{log}");
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    times.sort_by(|a, b| a.total_cmp(b));
    rss.sort();
    let pick = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    Ok(Row {
        name: name.to_owned(),
        binary: bin.display().to_string(),
        binary_bytes: std::fs::metadata(bin).map(|m| m.len()).unwrap_or(0),
        runs,
        median_ms: pick(0.5),
        min_ms: times[0],
        p90_ms: pick(0.9),
        max_ms: *times.last().unwrap(),
        rss_kib_median: rss[rss.len() / 2],
        first_invoke_ms_median: median(first),
        warm_invoke_ms_median: median(warm),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let exe = std::env::current_exe()?;
    let exe_dir = exe.parent().context("exe dir")?.to_owned();
    let target_root = exe_dir.parent().context("target dir")?.to_owned();
    let function_bin = match args.function_bin {
        Some(b) => b,
        // What `just package` zipped as `bootstrap`.
        None => target_root
            .join(LAMBDA_TARGET)
            .join("lambda/charge-payment"),
    };
    let bare_bin = args.bare_bin.unwrap_or_else(|| exe_dir.join("bare-lambda"));
    for b in [&function_bin, &bare_bin] {
        anyhow::ensure!(
            b.exists(),
            "{} is not built (`just bench lambda` builds it)",
            b.display()
        );
    }
    std::env::var("SLUICE_TEST_MOTO").context("needs moto: eval \"$(scripts/moto.sh start)\"")?;

    // The queue exists before the starts (as under a real trigger): each start only checks it.
    let queue = format!(
        "cold-start-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    SqsTransport::open(TransportOptions {
        queue: queue.clone(),
        function: "charge-payment".into(),
        url: queue.clone(),
        lease: Duration::from_secs(30),
        max_deliveries: 10,
        poll_interval: Duration::from_millis(100),
        declare: true,
    })
    .await?;
    let arn = sluice_tests::lambda::queue_arn(&queue);
    let q = queue.clone();
    let sluice_env = move |dir: &std::path::Path| {
        vec![
            ("SLUICE__TRANSPORT__KIND".to_owned(), "sqs".to_owned()),
            ("SLUICE__TRANSPORT__URL".to_owned(), q.clone()),
            (
                "SLUICE__STORE__URL".to_owned(),
                dir.join("idempotency.db").display().to_string(),
            ),
            (
                "SLUICE__APP__LEDGER".to_owned(),
                dir.join("ledger.db").display().to_string(),
            ),
        ]
    };
    let bare_env = |_: &std::path::Path| Vec::new();

    // Interleaved warm-up of the page cache, then the measured runs.
    measure("bare-lambda", &bare_bin, &bare_env, 2, &arn).await?;
    measure("charge-payment", &function_bin, &sluice_env, 2, &arn).await?;
    let bare = measure("bare-lambda", &bare_bin, &bare_env, args.runs, &arn).await?;
    let sluice = measure(
        "charge-payment",
        &function_bin,
        &sluice_env,
        args.runs,
        &arn,
    )
    .await?;
    let rows = [bare, sluice];
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "cold start, process start -> first GET /next, {} starts each (moto on loopback)",
        args.runs
    );
    println!(
        "{:<16} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>12} {:>11}",
        "binary", "size", "median", "min", "p90", "max", "RSS", "1st invoke", "2nd invoke"
    );
    for r in &rows {
        println!(
            "{:<16} {:>8.1}MB {:>7.2}ms {:>7.2}ms {:>7.2}ms {:>7.2}ms {:>7.1}MB {:>10.2}ms {:>9.2}ms",
            r.name,
            r.binary_bytes as f64 / 1e6,
            r.median_ms,
            r.min_ms,
            r.p90_ms,
            r.max_ms,
            r.rss_kib_median as f64 / 1024.0,
            r.first_invoke_ms_median,
            r.warm_invoke_ms_median
        );
    }
    println!(
        "Sluice's start-up costs {:.2} ms more than the bare handler (median), {:.2}x; its first invocation {:.2} ms more",
        rows[1].median_ms - rows[0].median_ms,
        rows[1].median_ms / rows[0].median_ms,
        rows[1].first_invoke_ms_median - rows[0].first_invoke_ms_median
    );
    Ok(())
}
