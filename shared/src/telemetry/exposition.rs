//! The Prometheus text exposition (format 0.0.4) of one worker: the series of the metrics
//! contract, each labelled `function`, `queue` and `version` (docs/operations.md lists them).
//! `serve.rs` answers `/metrics` with it.

use std::{fmt::Write as _, sync::atomic::Ordering::Relaxed};

use super::{
    histogram::{Snapshot, BUCKETS},
    metrics::{Labels, Metrics},
};
use crate::{breaker::BreakerState, message::OldestAge};

/// The version of Sluice itself (`sluice_build_info`'s `sluice_version`).
const SLUICE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Appends the worker's series: counters, histograms, gauges, the polled queue and the build
/// information.
pub fn render(m: &Metrics, breaker: BreakerState, out: &mut String) {
    let l = label_set(m.labels());

    let name = "sluice_messages_total";
    family(
        out,
        name,
        "counter",
        "Settled deliveries by outcome and error class.",
    );
    for (outcome, class, n) in m.settled_counts() {
        let (o, c) = (outcome.as_str(), class.as_str());
        let _ = writeln!(out, "{name}{{{l},outcome=\"{o}\",error_class=\"{c}\"}} {n}");
    }
    for (name, value, help) in [
        ("sluice_received_total", &m.received, "Deliveries received."),
        ("sluice_panics_total", &m.panics, "Handler panics caught."),
        (
            "sluice_immediate_retries_total",
            &m.immediate_retries,
            "In-slot retries of the handler.",
        ),
    ] {
        family(out, name, "counter", help);
        let _ = writeln!(out, "{name}{{{l}}} {}", value.load(Relaxed));
    }
    // Spans the exporter could not send (a full queue, a failed export): 0 without export.
    let name = "sluice_trace_spans_dropped_total";
    family(
        out,
        name,
        "counter",
        "Spans dropped by the trace exporter (queue full or export failed).",
    );
    let _ = writeln!(
        out,
        "{name}{{{l}}} {}",
        super::export::SPANS_DROPPED.load(Relaxed)
    );
    // Beyond the contract: which check dead-lettered what. The reasons are fixed texts of the
    // code (docs/operations.md "Reason labels"), a bounded set.
    let name = "sluice_dead_lettered_by_reason_total";
    family(out, name, "counter", "Dead-lettered deliveries by reason.");
    for (reason, n) in m.dead_letter_reasons() {
        let _ = writeln!(out, "{name}{{{l},reason=\"{}\"}} {n}", escape(reason));
    }

    let events = m.workflow_events();
    if !events.is_empty() {
        let name = "sluice_workflow_events_total";
        family(
            out,
            name,
            "counter",
            "Workflow events reported by this worker, by workflow and event.",
        );
        for ((workflow, event), n) in events {
            let _ = writeln!(
                out,
                "{name}{{{l},workflow=\"{}\",event=\"{event}\"}} {n}",
                escape(&workflow)
            );
        }
    }

    for (name, h, help) in [
        (
            "sluice_handler_duration_seconds",
            &m.handler_duration,
            "Each handler try, timeouts and panics included.",
        ),
        (
            "sluice_process_duration_seconds",
            &m.process_duration,
            "Receive to settle of each delivery.",
        ),
        (
            "sluice_message_age_seconds",
            &m.message_age,
            "From when a message was due (or published) to the start of its pipeline.",
        ),
    ] {
        family(out, name, "histogram", help);
        histogram(out, name, &l, &h.snapshot());
    }

    family(
        out,
        "sluice_in_flight",
        "gauge",
        "Messages being worked now.",
    );
    let _ = writeln!(out, "sluice_in_flight{{{l}}} {}", m.in_flight.load(Relaxed));
    let state = match breaker {
        BreakerState::Closed => 0,
        BreakerState::HalfOpen => 1,
        BreakerState::Open => 2,
    };
    family(
        out,
        "sluice_breaker_state",
        "gauge",
        "Circuit breaker: 0 closed, 1 half-open, 2 open.",
    );
    let _ = writeln!(out, "sluice_breaker_state{{{l}}} {state}");

    // Polled from the transport (telemetry.queue_poll_interval); absent until the first poll
    // and after a failed one, rather than stale.
    if let Some(q) = m.queue() {
        let name = "sluice_queue_messages";
        family(
            out,
            name,
            "gauge",
            "Messages on the queue by state, as last polled.",
        );
        for (state, n) in [
            ("ready", q.ready),
            ("in_flight", q.in_flight),
            ("delayed", q.delayed),
            ("dead_lettered", q.dead_lettered),
        ] {
            let _ = writeln!(out, "{name}{{{l},state=\"{state}\"}} {n}");
        }
        // A transport that cannot tell (docs/cli.md "stats") exports no age, not a made-up one.
        if let OldestAge::Known(age) = q.oldest_ready {
            let name = "sluice_queue_oldest_age_seconds";
            family(
                out,
                name,
                "gauge",
                "How long the oldest ready message has been ready (0 when none is).",
            );
            let _ = writeln!(out, "{name}{{{l}}} {}", age.as_secs_f64());
        }
    }

    family(
        out,
        "sluice_build_info",
        "gauge",
        "Always 1: the function's version and Sluice's.",
    );
    let _ = writeln!(
        out,
        "sluice_build_info{{{l},sluice_version=\"{SLUICE_VERSION}\"}} 1"
    );
}

/// `sluice_ready`, which the listener answers even before the worker exists.
pub fn render_ready(labels: &Labels, ready: bool, out: &mut String) {
    family(out, "sluice_ready", "gauge", "1 when /readyz answers 200.");
    let _ = writeln!(
        out,
        "sluice_ready{{{}}} {}",
        label_set(labels),
        u8::from(ready)
    );
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, l: &str, s: &Snapshot) {
    for (le, n) in BUCKETS.iter().zip(&s.cumulative) {
        let _ = writeln!(out, "{name}_bucket{{{l},le=\"{le}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{{l},le=\"+Inf\"}} {}", s.count());
    let _ = writeln!(out, "{name}_sum{{{l}}} {}", s.sum);
    let _ = writeln!(out, "{name}_count{{{l}}} {}", s.count());
}

/// `function="..",queue="..",version=".."`.
fn label_set(l: &Labels) -> String {
    format!(
        "function=\"{}\",queue=\"{}\",version=\"{}\"",
        escape(&l.function),
        escape(&l.queue),
        escape(&l.version)
    )
}

/// A label value in the exposition format: backslash, double quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{envelope::FailureClass, message::QueueStats, telemetry::metrics::*};

    fn labels() -> Labels {
        Labels {
            function: "fn-a".into(),
            queue: "q \"1\"".into(),
            version: "1.2.3".into(),
        }
    }

    /// The value of the sample line `series` (name and labels exactly as written).
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn every_series_carries_function_queue_and_version() {
        let m = Metrics::new(labels());
        m.on_receive(Duration::from_millis(30));
        m.settled(Outcome::Succeeded, ErrorClass::None);
        m.dead_lettered(FailureClass::Permanent, "malformed JSON");
        m.observe(Duration::from_millis(120));
        m.handler_duration.observe(Duration::from_millis(100));
        m.set_queue(Some(QueueStats {
            ready: 4,
            oldest_ready: OldestAge::Known(Duration::from_millis(2500)),
            ..QueueStats::default()
        }));
        let mut out = String::new();
        render(&m, BreakerState::Open, &mut out);
        render_ready(m.labels(), true, &mut out);
        let l = r#"function="fn-a",queue="q \"1\"",version="1.2.3""#;
        for (series, want) in [
            (
                format!("sluice_messages_total{{{l},outcome=\"succeeded\",error_class=\"none\"}}"),
                1.0,
            ),
            (
                format!("sluice_messages_total{{{l},outcome=\"retried\",error_class=\"transient\"}}"),
                0.0,
            ),
            (
                format!(
                    "sluice_messages_total{{{l},outcome=\"dead_lettered\",error_class=\"permanent\"}}"
                ),
                1.0,
            ),
            (format!("sluice_received_total{{{l}}}"), 1.0),
            (
                format!("sluice_dead_lettered_by_reason_total{{{l},reason=\"malformed JSON\"}}"),
                1.0,
            ),
            (format!("sluice_process_duration_seconds_bucket{{{l},le=\"0.1\"}}"), 0.0),
            (format!("sluice_process_duration_seconds_bucket{{{l},le=\"0.15\"}}"), 1.0),
            (format!("sluice_process_duration_seconds_bucket{{{l},le=\"+Inf\"}}"), 1.0),
            (format!("sluice_process_duration_seconds_count{{{l}}}"), 1.0),
            (format!("sluice_process_duration_seconds_sum{{{l}}}"), 0.12),
            (format!("sluice_handler_duration_seconds_bucket{{{l},le=\"0.1\"}}"), 1.0),
            (format!("sluice_message_age_seconds_bucket{{{l},le=\"0.05\"}}"), 1.0),
            (format!("sluice_breaker_state{{{l}}}"), 2.0),
            (format!("sluice_queue_messages{{{l},state=\"ready\"}}"), 4.0),
            (format!("sluice_queue_oldest_age_seconds{{{l}}}"), 2.5),
            (format!("sluice_build_info{{{l},sluice_version=\"{SLUICE_VERSION}\"}}"), 1.0),
            (format!("sluice_ready{{{l}}}"), 1.0),
        ] {
            assert_eq!(sample(&out, &series), Some(want), "{series} in\n{out}");
        }
        // Every sample line belongs to the family announced by the # TYPE line before it,
        // and carries the three labels.
        let mut family = String::new();
        for line in out.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                family = rest.split(' ').next().unwrap().to_owned();
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(name.starts_with(family.as_str()), "{line} after {family}");
                assert!(line.contains(l), "{line}");
            }
        }
    }

    #[test]
    fn an_unknown_oldest_age_is_left_out_and_no_poll_means_no_queue_series() {
        let m = Metrics::new(labels());
        let mut out = String::new();
        render(&m, BreakerState::Closed, &mut out);
        assert!(!out.contains("sluice_queue_"), "{out}");
        m.set_queue(Some(QueueStats {
            oldest_ready: OldestAge::Unknown("cannot tell"),
            ..QueueStats::default()
        }));
        let mut out = String::new();
        render(&m, BreakerState::Closed, &mut out);
        assert!(out.contains("sluice_queue_messages{"), "{out}");
        assert!(!out.contains("sluice_queue_oldest_age_seconds"), "{out}");
    }
}
