//! The figures of `bench rabbitmq`: per consumer, the headline of `--json`, and the table.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Args, Kind, BODY_BYTES};

/// One consumer's figures.
#[derive(Debug, Clone, Default, Serialize)]
pub(super) struct Figures {
    pub(super) msgs_per_s: f64,
    /// Every round's throughput, in order.
    pub(super) rounds_msgs_per_s: Vec<f64>,
    pub(super) vs_raw: f64,
    /// CPU time per message while draining (median of the rounds): this process (the
    /// consumer, lapin's I/O thread included) and the broker (`beam.smp`), in us.
    pub(super) client_cpu_us_per_msg: f64,
    pub(super) broker_cpu_us_per_msg: f64,
    #[serde(skip)]
    pub(super) rounds_cpu: Vec<(f64, f64)>,
    pub(super) p50_ms: f64,
    pub(super) p95_ms: f64,
    pub(super) p99_ms: f64,
    pub(super) peak_rss_mb: f64,
}

/// `--json`: the headline figures (the Sluice no-op against raw) and every consumer's.
#[derive(Debug, Serialize)]
pub(super) struct Report {
    pub(super) raw_msgs_per_s: f64,
    pub(super) sluice_msgs_per_s: f64,
    pub(super) sluice_sqlite_msgs_per_s: f64,
    pub(super) ratio: f64,
    pub(super) sqlite_ratio: f64,
    /// The no-op with trace export on (`ratio` is the same run's no-op without it).
    pub(super) sluice_traced_msgs_per_s: f64,
    pub(super) traced_ratio: f64,
    pub(super) p50_ms: f64,
    pub(super) p95_ms: f64,
    pub(super) p99_ms: f64,
    pub(super) peak_rss_mb: f64,
    pub(super) messages: u64,
    pub(super) body_bytes: usize,
    pub(super) prefetch: u16,
    pub(super) concurrency: usize,
    pub(super) ack_batch: u64,
    pub(super) rounds: usize,
    pub(super) latency_rate: u64,
    pub(super) consumers: BTreeMap<&'static str, Figures>,
}

pub(super) fn print(a: &Args, r: &Report) -> anyhow::Result<()> {
    if a.json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    println!(
        "\nRabbitMQ, one quorum queue, {} persistent {BODY_BYTES}-byte messages a run, prefetch {} for every consumer (Sluice concurrency {}); throughput: median of {} round(s); latency: enqueue -> ack on the wire at {} msg/s\n",
        r.messages, r.prefetch, r.concurrency, r.rounds, r.latency_rate
    );
    println!("| consumer | msgs/s | vs raw | p50 ms | p95 ms | p99 ms | peak RSS MB | CPU us/msg: here + broker |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for kind in Kind::chosen(a) {
        let f = &r.consumers[kind.key()];
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} + {:.1} |",
            kind.label(a),
            f.msgs_per_s,
            f.vs_raw,
            f.p50_ms,
            f.p95_ms,
            f.p99_ms,
            f.peak_rss_mb,
            f.client_cpu_us_per_msg,
            f.broker_cpu_us_per_msg
        );
    }
    Ok(())
}

pub(super) fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}
