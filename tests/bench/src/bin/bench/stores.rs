//! `just bench stores`: claim + complete operations per second and latency per idempotency
//! store (SQLite, PostgreSQL, Redis, S3 on moto), with SQLite, the embedded default, as the
//! baseline column. `--json` prints one object keyed by store name.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use sluice::{
    store::{AnyStore, Claim, IdempotencyStore},
    Settings,
};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Operations per store.
    #[arg(long, default_value_t = 4000)]
    ops: usize,
    /// Concurrent claimers.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Only these stores (default: all).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Print one JSON object keyed by store name.
    #[arg(long)]
    json: bool,
}

/// The stores and the URLs the tests use (override with SLUICE_TEST_*_URL).
fn stores(dir: &std::path::Path) -> Vec<(&'static str, String)> {
    vec![
        ("sqlite", dir.join("bench.db").display().to_string()),
        ("postgres", sluice_tests::postgres_url()),
        ("redis", sluice_tests::redis_url()),
        (
            "s3",
            format!("s3://sluice-bench-{}/bench", std::process::id()),
        ),
    ]
}

#[derive(Debug, serde::Serialize)]
struct StoreResult {
    ops_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    ops: usize,
    vs_sqlite: f64,
}

/// Runs every chosen store in turn and prints the table (or the JSON object).
pub async fn run(a: Args) -> anyhow::Result<()> {
    let Args {
        ops,
        concurrency,
        only,
        json,
    } = a;
    let dir = tempfile::tempdir()?;
    let mut results = BTreeMap::new();
    let mut order = Vec::new();
    for (name, url) in stores(dir.path()) {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        if !json {
            eprintln!("{name}: {ops} claim+complete operations, {concurrency} at a time...");
        }
        let settings = Settings::load(
            "bench",
            None,
            std::iter::empty(),
            &[format!("store.kind={name}"), format!("store.url={url}")],
        )?;
        let store = AnyStore::open(&settings)
            .await
            .with_context(|| {
                format!("opening the {name} store (is it running? just bench starts it)")
            })?
            .context("store.kind none")?;
        prepare(&store).await?;
        let (elapsed, hist) = claim_complete(Arc::new(store), ops, concurrency).await?;
        let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
        results.insert(
            name.to_owned(),
            StoreResult {
                ops_per_s: ops as f64 / elapsed.as_secs_f64(),
                p50_ms: ms(0.5),
                p99_ms: ms(0.99),
                ops,
                vs_sqlite: 0.0,
            },
        );
        order.push(name);
    }
    if let Some(base) = results.get("sqlite").map(|r| r.ops_per_s) {
        for r in results.values_mut() {
            r.vs_sqlite = r.ops_per_s / base;
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&results)?);
        return Ok(());
    }
    println!("\nclaim + complete, {ops} operations per store, {concurrency} concurrent (one machine, 2 cores)\n");
    println!("| store | ops/s | p50 ms | p99 ms | vs sqlite |");
    println!("|---|---:|---:|---:|---:|");
    for name in order {
        let r = &results[name];
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} | {:.2}x |",
            r.ops_per_s, r.p50_ms, r.p99_ms, r.vs_sqlite
        );
    }
    Ok(())
}

/// Creates what a store needs before its first call (the S3 bucket).
async fn prepare(store: &AnyStore) -> anyhow::Result<()> {
    match store {
        AnyStore::S3(s) => Ok(s.ensure_bucket().await?),
        _ => Ok(()),
    }
}

async fn claim_complete(
    store: Arc<AnyStore>,
    ops: usize,
    concurrency: usize,
) -> anyhow::Result<(Duration, Histogram<u64>)> {
    let run = uuid::Uuid::new_v4().simple().to_string();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (store, next, run) = (store.clone(), next.clone(), run.clone());
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= ops {
                    return Ok::<_, anyhow::Error>(hist);
                }
                let key = format!("bench-{run}-{i}");
                let t = Instant::now();
                let Claim::Acquired(token) =
                    store.claim(&key, "fp", Duration::from_secs(30)).await?
                else {
                    anyhow::bail!("fresh key {key} was not acquired");
                };
                store
                    .complete(&key, token, br#"{"ok":true}"#, Duration::from_secs(3600))
                    .await?;
                hist.record(t.elapsed().as_micros().max(1) as u64)?;
            }
        }));
    }
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for t in tasks {
        total.add(t.await??)?;
    }
    Ok((started.elapsed(), total))
}
