//! The Grafana dashboard `infra/grafana/sluice.json` (one for every function, picked with the
//! `function` variable) over the series of the metrics contract and the recording rules of
//! `infra/prometheus/alerts.yml`, and `infra/grafana/queries.json`: every panel query, for
//! tests that run them against a real Prometheus (scripts/grafana-queries.py reads either).
//!
//! The SLO lines come from Prometheus, not from the dashboard: alerts.yml records each
//! function's objectives as `sluice:slo:*` series ([`crate::prometheus`]), so one dashboard
//! shows each function against its own `[deploy.slo]`.

use anyhow::Result;
use serde_json::{json, Value};

use crate::{Function, Output};

pub const DASHBOARD: &str = "infra/grafana/sluice.json";
pub const QUERIES: &str = "infra/grafana/queries.json";

/// The function picked in the dashboard.
const F: &str = "function=\"$function\"";

/// One query of a panel: (legend, PromQL).
type Target = (&'static str, String);

struct Panel {
    title: &'static str,
    kind: &'static str,
    unit: &'static str,
    description: &'static str,
    targets: Vec<Target>,
    /// Fixed threshold lines (burn rates are the same numbers for every SLO).
    thresholds: Vec<f64>,
}

fn panel(
    title: &'static str,
    kind: &'static str,
    unit: &'static str,
    description: &'static str,
    targets: Vec<Target>,
) -> Panel {
    Panel {
        title,
        kind,
        unit,
        description,
        targets,
        thresholds: Vec::new(),
    }
}

fn quantiles(metric: &str) -> Vec<Target> {
    [("p50", "0.5"), ("p95", "0.95"), ("p99", "0.99")]
        .into_iter()
        .map(|(legend, q)| {
            (
                legend,
                format!(
                    "histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{F}}}[$__rate_interval])))"
                ),
            )
        })
        .collect()
}

/// The rows of the dashboard, each a title and its panels.
fn rows() -> Vec<(&'static str, Vec<Panel>)> {
    let ratio = |w: &str| format!("sluice:slo_errors:ratio_rate{w}{{{F}}}");
    let burn = |w: &str| {
        format!(
            "sluice:slo_errors:ratio_rate{w}{{{F}}} / on (function) group_left () (1 - sluice:slo:objective{{{F}}})"
        )
    };
    vec![
        (
            "SLO",
            vec![
                panel(
                    "Good deliveries (3 days)",
                    "stat",
                    "percentunit",
                    "Succeeded or duplicate, of all deliveries but permanent dead letters and released ones, over 3 days.",
                    vec![("good", format!("1 - {}", ratio("3d")))],
                ),
                panel(
                    "Objective",
                    "stat",
                    "percentunit",
                    "[deploy.slo] objective of the function (recorded by alerts.yml).",
                    vec![("objective", format!("sluice:slo:objective{{{F}}}"))],
                ),
                panel(
                    "Error ratio",
                    "timeseries",
                    "percentunit",
                    "Retried or dead-lettered (not for bad input), by window; the budget line is 1 - objective.",
                    vec![
                        ("5m", ratio("5m")),
                        ("1h", ratio("1h")),
                        ("6h", ratio("6h")),
                        ("1d", ratio("1d")),
                        ("budget", format!("1 - sluice:slo:objective{{{F}}}")),
                    ],
                ),
                Panel {
                    thresholds: vec![1.0, 3.0, 6.0, 14.4],
                    ..panel(
                        "Error budget burn rate",
                        "timeseries",
                        "none",
                        "Error ratio / budget: 1 spends the budget in exactly 30 days. The alerts: 14.4 (1h and 5m) and 6 (6h and 30m) page, 3 (1d and 2h) and 1 (3d and 6h) open a ticket.",
                        vec![
                            ("1h", burn("1h")),
                            ("6h", burn("6h")),
                            ("1d", burn("1d")),
                            ("3d", burn("3d")),
                        ],
                    )
                },
            ],
        ),
        (
            "Throughput",
            vec![
                panel(
                    "Deliveries by outcome",
                    "timeseries",
                    "ops",
                    "Settled deliveries per second.",
                    vec![(
                        "{{outcome}}",
                        format!("sum by (outcome) (rate(sluice_messages_total{{{F}}}[$__rate_interval]))"),
                    )],
                ),
                panel(
                    "Failures by class",
                    "timeseries",
                    "ops",
                    "Retried and dead-lettered deliveries per second, by error class.",
                    vec![(
                        "{{outcome}} {{error_class}}",
                        format!(
                            "sum by (outcome, error_class) (rate(sluice_messages_total{{{F}, outcome=~\"retried|dead_lettered\"}}[$__rate_interval]))"
                        ),
                    )],
                ),
                panel(
                    "Received, panics, immediate retries",
                    "timeseries",
                    "ops",
                    "Deliveries received, handler panics caught, in-slot retries, per second.",
                    vec![
                        ("received", format!("sum(rate(sluice_received_total{{{F}}}[$__rate_interval]))")),
                        ("panics", format!("sum(rate(sluice_panics_total{{{F}}}[$__rate_interval]))")),
                        (
                            "immediate retries",
                            format!("sum(rate(sluice_immediate_retries_total{{{F}}}[$__rate_interval]))"),
                        ),
                    ],
                ),
                panel(
                    "Error ratio by version",
                    "timeseries",
                    "percentunit",
                    "The canary against the stable version during a rollout (the `version` label: the pod template hash under Argo Rollouts).",
                    vec![(
                        "{{version}}",
                        format!(
                            "sum by (version) (rate(sluice_messages_total{{{F}, outcome=~\"retried|dead_lettered\", error_class!=\"permanent\"}}[$__rate_interval]))\n/\nsum by (version) (rate(sluice_messages_total{{{F}, outcome=~\"succeeded|duplicate|retried|dead_lettered\", error_class!=\"permanent\"}}[$__rate_interval]))"
                        ),
                    )],
                ),
            ],
        ),
        (
            "Latency",
            vec![
                panel(
                    "Receive to settle",
                    "timeseries",
                    "s",
                    "sluice_process_duration_seconds; the SLO line is [deploy.slo] latency_p95.",
                    {
                        let mut t = quantiles("sluice_process_duration_seconds");
                        t.push(("SLO p95", format!("sluice:slo:latency_p95_seconds{{{F}}}")));
                        t
                    },
                ),
                panel(
                    "Handler duration",
                    "timeseries",
                    "s",
                    "sluice_handler_duration_seconds: each try of the handler.",
                    quantiles("sluice_handler_duration_seconds"),
                ),
                panel(
                    "Queue lag (age at start)",
                    "timeseries",
                    "s",
                    "sluice_message_age_seconds: from enqueue to the start of the pipeline.",
                    quantiles("sluice_message_age_seconds"),
                ),
            ],
        ),
        (
            "Queue",
            vec![
                panel(
                    "Messages by state",
                    "timeseries",
                    "short",
                    "sluice_queue_messages, polled from the transport every 15 s (the largest report of any replica).",
                    vec![(
                        "{{state}}",
                        format!("max by (state) (sluice_queue_messages{{{F}}})"),
                    )],
                ),
                panel(
                    "Oldest ready message",
                    "timeseries",
                    "s",
                    "Age of the oldest ready message (0 when the queue is empty).",
                    vec![("oldest", format!("sluice:queue_oldest_age_seconds:max{{{F}}}"))],
                ),
                panel(
                    "Dead letters waiting",
                    "stat",
                    "short",
                    "Messages in the dead-letter queue: each is a decision (docs/runbook.md).",
                    vec![("dead letters", format!("sluice:queue_dead_lettered:max{{{F}}}"))],
                ),
            ],
        ),
        (
            "Workers",
            vec![
                panel(
                    "In flight",
                    "timeseries",
                    "short",
                    "Messages being worked, per replica.",
                    vec![(
                        "{{instance}}",
                        format!("sum by (instance) (sluice_in_flight{{{F}}})"),
                    )],
                ),
                panel(
                    "Circuit breaker",
                    "timeseries",
                    "short",
                    "0 closed, 1 half-open, 2 open; per replica.",
                    vec![(
                        "{{instance}}",
                        format!("max by (instance) (sluice_breaker_state{{{F}}})"),
                    )],
                ),
                panel(
                    "Ready replicas",
                    "stat",
                    "short",
                    "Replicas whose /readyz answers 200.",
                    vec![("ready", format!("sum(sluice_ready{{{F}}})"))],
                ),
                panel(
                    "Versions running",
                    "timeseries",
                    "short",
                    "Replicas per version and Sluice version (sluice_build_info).",
                    vec![(
                        "{{version}} (sluice {{sluice_version}})",
                        format!("count by (version, sluice_version) (sluice_build_info{{{F}}})"),
                    )],
                ),
            ],
        ),
    ]
}

fn datasource() -> Value {
    json!({ "type": "prometheus", "uid": "${datasource}" })
}

fn panel_json(id: u32, p: &Panel, x: u32, y: u32, w: u32) -> Value {
    let h = if p.kind == "stat" { 5 } else { 8 };
    let targets: Vec<Value> = p
        .targets
        .iter()
        .zip('A'..)
        .map(|((legend, expr), ref_id)| {
            json!({
                "datasource": datasource(),
                "expr": expr,
                "legendFormat": legend,
                "refId": ref_id.to_string(),
            })
        })
        .collect();
    let mut steps = vec![json!({ "color": "green", "value": null })];
    for (t, color) in p
        .thresholds
        .iter()
        .zip(["yellow", "orange", "red", "dark-red"])
    {
        steps.push(json!({ "color": color, "value": t }));
    }
    let mut custom = json!({});
    if !p.thresholds.is_empty() {
        custom = json!({ "thresholdsStyle": { "mode": "dashed" } });
    }
    json!({
        "id": id,
        "type": p.kind,
        "title": p.title,
        "description": p.description,
        "datasource": datasource(),
        "gridPos": { "x": x, "y": y, "w": w, "h": h },
        "targets": targets,
        "fieldConfig": {
            "defaults": {
                "unit": p.unit,
                "custom": custom,
                "thresholds": { "mode": "absolute", "steps": steps },
            },
            "overrides": [],
        },
        "options": {},
    })
}

fn dashboard(functions: &[Function]) -> Value {
    let mut panels = Vec::new();
    let mut id = 1;
    let mut y = 0;
    for (title, row) in rows() {
        panels.push(json!({
            "id": id,
            "type": "row",
            "title": title,
            "collapsed": false,
            "gridPos": { "x": 0, "y": y, "w": 24, "h": 1 },
            "panels": [],
        }));
        id += 1;
        y += 1;
        // Stats are narrow and share a line; graphs take half the width each.
        let (mut x, mut line_h) = (0, 0);
        for p in &row {
            let w = if p.kind == "stat" { 6 } else { 12 };
            if x + w > 24 {
                x = 0;
                y += line_h;
                line_h = 0;
            }
            let v = panel_json(id, p, x, y, w);
            line_h = line_h.max(v["gridPos"]["h"].as_u64().unwrap() as u32);
            panels.push(v);
            id += 1;
            x += w;
        }
        y += line_h;
    }
    let first = functions.first().map(|f| f.name.as_str()).unwrap_or("");
    json!({
        "title": "Sluice functions",
        "uid": "sluice-functions",
        "description": "Generated by sluice-infra (infra/gen/src/grafana.rs); import it, pick a Prometheus data source that loads infra/prometheus/alerts.yml.",
        "tags": ["sluice"],
        "editable": true,
        "schemaVersion": 39,
        "version": 1,
        "time": { "from": "now-6h", "to": "now" },
        "refresh": "30s",
        "annotations": { "list": [] },
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                },
                {
                    "name": "function",
                    "label": "Function",
                    "type": "query",
                    "datasource": datasource(),
                    "definition": "label_values(sluice_build_info, function)",
                    "query": {
                        "query": "label_values(sluice_build_info, function)",
                        "refId": "function",
                    },
                    "current": { "text": first, "value": first },
                    "refresh": 2,
                    "sort": 1,
                },
            ],
        },
        "panels": panels,
    })
}

/// Every panel query, in dashboard order, for tests (the same list scripts/grafana-queries.py
/// extracts from the dashboard itself).
fn queries() -> Value {
    let mut list = Vec::new();
    for (row, panels) in rows() {
        for p in panels {
            for ((legend, expr), ref_id) in p.targets.iter().zip('A'..) {
                list.push(json!({
                    "row": row,
                    "panel": p.title,
                    "ref_id": ref_id.to_string(),
                    "legend": legend,
                    "expr": expr,
                    // Needs infra/prometheus/alerts.yml loaded as a rule file.
                    "uses_recording_rules": expr.contains("sluice:"),
                }));
            }
        }
    }
    json!({
        "about": "Every query of infra/grafana/sluice.json, generated with it. Before running one, replace $function with a function name and $__rate_interval with a range (at least 4 scrape intervals, e.g. 1m); queries with uses_recording_rules need infra/prometheus/alerts.yml loaded. scripts/grafana-queries.py does both.",
        "variables": ["function", "__rate_interval"],
        "queries": list,
    })
}

pub fn render(functions: &[Function]) -> Result<Vec<Output>> {
    let mut out = Vec::new();
    for (path, value) in [(DASHBOARD, dashboard(functions)), (QUERIES, queries())] {
        let mut contents = serde_json::to_string_pretty(&value)?;
        contents.push('\n');
        out.push(Output {
            path: path.into(),
            contents,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every target of every panel, walking the dashboard JSON the way Grafana does (rows
    /// included), so that the queries file can't miss one.
    fn dashboard_exprs(d: &Value) -> Vec<String> {
        let mut out = Vec::new();
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push(t["expr"].as_str().unwrap().to_owned());
            }
        }
        out
    }

    #[test]
    fn the_queries_file_lists_every_panel_query_once() {
        let d = dashboard(&[]);
        let q = queries();
        let listed: Vec<String> = q["queries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|q| q["expr"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(dashboard_exprs(&d), listed);
        assert!(
            listed.iter().all(|e| e.contains("$function")),
            "{listed:#?}"
        );
    }

    #[test]
    fn panels_do_not_overlap_and_ids_are_unique() {
        let d = dashboard(&[]);
        let panels = d["panels"].as_array().unwrap();
        let mut ids = std::collections::BTreeSet::new();
        let mut cells = std::collections::BTreeSet::new();
        for p in panels {
            assert!(
                ids.insert(p["id"].as_u64().unwrap()),
                "duplicate id {}",
                p["id"]
            );
            let g = &p["gridPos"];
            let (x, y, w, h) = (
                g["x"].as_u64().unwrap(),
                g["y"].as_u64().unwrap(),
                g["w"].as_u64().unwrap(),
                g["h"].as_u64().unwrap(),
            );
            assert!(x + w <= 24, "{}", p["title"]);
            for cx in x..x + w {
                for cy in y..y + h {
                    assert!(cells.insert((cx, cy)), "{} overlaps", p["title"]);
                }
            }
        }
    }
}
