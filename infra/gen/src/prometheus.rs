//! `infra/prometheus/alerts.yml`: the recording rules and alerts of every function, from its
//! `[deploy.slo]` ([`Slo`]) and its other settings, over the series of the metrics contract
//! (docs/runbook.md has one section per alert; `infra/prometheus/tests/` holds the
//! `promtool test rules` unit tests, run by scripts/infra-check.sh).
//!
//! One group of recording rules serves every function (each aggregates `by (function,
//! queue)`); then one group of alerts per function, with that function's thresholds.
//! The error-budget alerts are the multiwindow, multi-burn-rate alerts of the Google SRE
//! workbook (chapter "Alerting on SLOs"): each pairs a long window, which says the budget is
//! burning fast enough to matter, with a short one a twelfth as long, which says it is still
//! burning now (so the alert resets minutes after a fix, not hours).

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::{
    slo::{num, Slo},
    yaml::yaml,
    Function, Output,
};

/// The file's path, relative to the repository root.
pub const PATH: &str = "infra/prometheus/alerts.yml";
/// Where the alerts' `runbook_url` points (docs/runbook.md has a section per alert, whose
/// anchor is the alert's name in lower case).
const RUNBOOK: &str = "docs/runbook.md";

/// The windows the error ratio is recorded over: 5m for the plain ratio alert, the others
/// for the burn-rate pairs.
const WINDOWS: [&str; 7] = ["5m", "30m", "1h", "2h", "6h", "1d", "3d"];

/// The burn-rate pairs of the SRE workbook for a 30-day SLO: (long window, short window,
/// burn rate, severity). 14.4x for an hour spends 2 % of the month's budget, 6x for six
/// hours 5 %: someone should look now. 3x for a day and 1x for three days spend 10 %: a
/// ticket for the working day.
const BURNS: [(&str, &str, f64, &str); 4] = [
    ("1h", "5m", 14.4, "page"),
    ("6h", "30m", 6.0, "page"),
    ("1d", "2h", 3.0, "ticket"),
    ("3d", "6h", 1.0, "ticket"),
];

/// Bad deliveries (the SLO's error events): retried, or dead-lettered for anything but a
/// permanent reason. `retried` never carries `permanent` (a permanent error is dead-lettered
/// at once), so one selector covers both.
const ERRORS: &str =
    r#"sluice_messages_total{outcome=~"retried|dead_lettered", error_class!="permanent"}"#;
/// Good and bad deliveries: what the ratio divides by. Permanent dead letters (the producer's
/// error) and `released` (handed back at shutdown) are neither.
const VALID: &str = r#"sluice_messages_total{outcome=~"succeeded|duplicate|retried|dead_lettered", error_class!="permanent"}"#;

/// The recording rule of the error ratio over `window`.
pub fn ratio_rule(window: &str) -> String {
    format!("sluice:slo_errors:ratio_rate{window}")
}

/// The p95 receive-to-settle latency over 5 minutes.
pub const P95_RULE: &str = "sluice:process_duration_seconds:p95_rate5m";
/// The age of the oldest ready message, per queue (every replica polls the same queue, so
/// the largest report is the freshest enough one; they differ by at most a poll).
pub const OLDEST_RULE: &str = "sluice:queue_oldest_age_seconds:max";
/// Dead letters waiting, per queue.
pub const DEAD_RULE: &str = "sluice:queue_dead_lettered:max";

fn recording_rules() -> Vec<Value> {
    let mut rules = Vec::new();
    for w in WINDOWS {
        let errors = format!("sum by (function, queue) (rate({ERRORS}[{w}]))");
        let valid = format!("sum by (function, queue) (rate({VALID}[{w}]))");
        rules.push(json!({
            "record": ratio_rule(w),
            // `or 0 * valid`: a function with traffic but no error series yet records 0, not
            // nothing, so dashboards and "is it firing" both have a value to show.
            "expr": format!("(\n  {errors}\n  or\n  0 * {valid}\n)\n/\n{valid}"),
        }));
    }
    rules.push(json!({
        "record": P95_RULE,
        "expr": "histogram_quantile(0.95,\n  sum by (function, queue, le) (rate(sluice_process_duration_seconds_bucket[5m]))\n)",
    }));
    rules.push(json!({
        "record": OLDEST_RULE,
        "expr": "max by (function, queue) (sluice_queue_oldest_age_seconds)",
    }));
    rules.push(json!({
        "record": DEAD_RULE,
        "expr": "max by (function, queue) (sluice_queue_messages{state=\"dead_lettered\"})",
    }));
    rules
}

fn alert(
    f: &Function,
    name: &str,
    expr: String,
    for_: Option<&str>,
    severity: &str,
    summary: String,
    description: String,
) -> Value {
    let mut a = json!({
        "alert": name,
        "expr": expr,
        // `function` again (the series have it): the same alert in two functions' groups
        // would otherwise be the same rule to promtool's duplicate check.
        "labels": { "severity": severity, "function": f.name },
        "annotations": {
            "summary": summary,
            "description": description,
            "runbook_url": format!("{RUNBOOK}#{}", name.to_lowercase()),
        },
    });
    if let Some(d) = for_ {
        a["for"] = json!(d);
    }
    a
}

/// A percentage for a description: 0.001 -> "0.1%".
fn pct(x: f64) -> String {
    format!("{}%", num(x * 100.0))
}

/// The function's objectives as series, so that a dashboard (or an ad-hoc query) can draw
/// each function against its own `[deploy.slo]`: `vector(x)` labelled with the function.
fn objective_rules(f: &Function, slo: &Slo) -> Vec<Value> {
    [
        ("sluice:slo:objective", num(slo.objective)),
        ("sluice:slo:latency_p95_seconds", num(slo.latency_secs())),
        ("sluice:slo:error_ratio_threshold", num(slo.error_ratio)),
    ]
    .into_iter()
    .map(|(record, value)| {
        json!({
            "record": record,
            "expr": format!("vector({value})"),
            "labels": { "function": f.name },
        })
    })
    .collect()
}

fn function_alerts(f: &Function, slo: &Slo) -> Vec<Value> {
    let sel = format!("{{function=\"{}\"}}", f.name);
    let budget = slo.budget();
    let mut alerts = vec![
        alert(
            f,
            "SluiceErrorRatioHigh",
            format!("{}{sel} > {}", ratio_rule("5m"), num(slo.error_ratio)),
            Some("5m"),
            "ticket",
            format!(
                "{{{{ $labels.function }}}}: more than {} of deliveries fail",
                pct(slo.error_ratio)
            ),
            format!(
                "{{{{ $value | humanizePercentage }}}} of {{{{ $labels.function }}}}'s deliveries \
                 on {{{{ $labels.queue }}}} were retried or dead-lettered (not for bad input) \
                 over 5 minutes; the threshold is {}.",
                pct(slo.error_ratio)
            ),
        ),
        alert(
            f,
            "SluiceLatencyHigh",
            format!("{P95_RULE}{sel} > {}", num(slo.latency_secs())),
            Some("5m"),
            "ticket",
            "{{ $labels.function }}: p95 receive-to-settle time above the SLO".into(),
            format!(
                "The p95 of receive-to-settle time on {{{{ $labels.queue }}}} is \
                 {{{{ $value | humanizeDuration }}}} over 5 minutes; the SLO is below {}.",
                humantime::format_duration(slo.latency_p95)
            ),
        ),
        alert(
            f,
            "SluiceDeadLetterQueueNotEmpty",
            format!("{DEAD_RULE}{sel} > 0"),
            Some("1m"),
            "ticket",
            "{{ $labels.function }}: messages in the dead-letter queue".into(),
            "{{ $value }} dead letter(s) of {{ $labels.queue }} wait for a decision: read them \
             (`dlq list`, `dlq show`), fix the cause, then redrive or leave them."
                .into(),
        ),
        alert(
            f,
            "SluiceQueueLagGrowing",
            format!(
                "{OLDEST_RULE}{sel} > {lag}\nand\nderiv({OLDEST_RULE}{sel}[10m]) > 0",
                lag = slo.queue_lag.as_secs()
            ),
            Some("5m"),
            "page",
            "{{ $labels.function }}: the oldest message keeps getting older".into(),
            format!(
                "The oldest ready message on {{{{ $labels.queue }}}} is \
                 {{{{ $value | humanizeDuration }}}} old (threshold {}) and the age has grown \
                 over the last 10 minutes: consumers are down, stalled or too few.",
                humantime::format_duration(slo.queue_lag)
            ),
        ),
    ];
    if f.settings.breaker.enabled {
        // Open (2) at any time in each 2-minute window for 5 minutes: one opening of
        // `breaker.open_for` and a good probe is the breaker working, not an incident, while
        // open/half-open/open again flips the gauge between scrapes and would reset a plain
        // `== 2` condition.
        alerts.push(alert(
            f,
            "SluiceBreakerOpen",
            format!("max by (function, queue) (max_over_time(sluice_breaker_state{sel}[2m])) == 2"),
            Some("5m"),
            "page",
            "{{ $labels.function }}: the circuit breaker keeps intake paused".into(),
            "The breaker of {{ $labels.function }} has been open again and again for 5 minutes: \
             what it calls is failing, and no message on {{ $labels.queue }} is being worked."
                .into(),
        ));
    }
    for (name, severity, pairs) in [
        ("SluiceErrorBudgetBurnFast", "page", &BURNS[..2]),
        ("SluiceErrorBudgetBurnSlow", "ticket", &BURNS[2..]),
    ] {
        let expr = pairs
            .iter()
            .map(|(long, short, rate, _)| {
                let t = num(rate * budget);
                format!(
                    "(\n  {}{sel} > {t}\n  and\n  {}{sel} > {t}\n)",
                    ratio_rule(long),
                    ratio_rule(short)
                )
            })
            .collect::<Vec<_>>()
            .join("\nor\n");
        let windows = pairs
            .iter()
            .map(|(long, short, rate, _)| format!("{}x over {long} and {short}", num(*rate)))
            .collect::<Vec<_>>()
            .join(", or ");
        debug_assert!(pairs.iter().all(|p| p.3 == severity));
        alerts.push(alert(
            f,
            name,
            expr,
            None,
            severity,
            "{{ $labels.function }}: the error budget is burning".into(),
            format!(
                "{{{{ $labels.function }}}} spends its error budget ({} of deliveries, SLO {}) \
                 at {windows}; the error ratio is {{{{ $value | humanizePercentage }}}}.",
                pct(budget),
                pct(slo.objective)
            ),
        ));
    }
    alerts
}

/// The rule file of all functions.
pub fn render(functions: &[Function]) -> Result<Vec<Output>> {
    let mut groups = vec![json!({ "name": "sluice-slo", "rules": recording_rules() })];
    for f in functions {
        let slo = Slo::of(f).with_context(|| format!("functions/{}/sluice.toml", f.name))?;
        let mut rules = objective_rules(f, &slo);
        rules.extend(function_alerts(f, &slo));
        groups.push(json!({ "name": format!("sluice-{}", f.name), "rules": rules }));
    }
    Ok(vec![Output {
        path: PATH.into(),
        contents: format!(
            "# Generated by `sluice-infra generate` from functions/*/sluice.toml ([deploy.slo]): \
             edit those, not this file.\n# Alerts: docs/runbook.md. Tests: infra/prometheus/tests/ \
             (promtool test rules).\n{}",
            yaml(&json!({ "groups": groups }))
        ),
    }])
}

#[cfg(test)]
mod tests {
    use sluice::config::Settings;

    use super::*;

    fn function(name: &str, toml: &str) -> Function {
        Function {
            name: name.into(),
            settings: Settings::load(name, Some(toml), std::iter::empty(), &[]).unwrap(),
        }
    }

    fn rules(f: &Function) -> Vec<Value> {
        function_alerts(f, &Slo::of(f).unwrap())
    }

    fn find<'a>(rules: &'a [Value], name: &str) -> &'a Value {
        rules
            .iter()
            .find(|r| r["alert"] == name)
            .unwrap_or_else(|| panic!("no {name}"))
    }

    #[test]
    fn burn_rate_thresholds_follow_the_objective() {
        let f = function("f", "[deploy.slo]\nobjective = 0.99\n");
        let r = rules(&f);
        let fast = find(&r, "SluiceErrorBudgetBurnFast")["expr"]
            .as_str()
            .unwrap();
        // 14.4 x 1 % and 6 x 1 %, each on both windows of its pair.
        assert_eq!(fast.matches("> 0.144\n").count(), 2, "{fast}");
        assert_eq!(fast.matches("> 0.06\n").count(), 2, "{fast}");
        assert!(fast.contains("sluice:slo_errors:ratio_rate1h{function=\"f\"} > 0.144"));
        assert!(fast.contains("sluice:slo_errors:ratio_rate5m{function=\"f\"} > 0.144"));
        let slow = find(&r, "SluiceErrorBudgetBurnSlow")["expr"]
            .as_str()
            .unwrap();
        assert!(slow.contains("sluice:slo_errors:ratio_rate1d{function=\"f\"} > 0.03"));
        assert!(slow.contains("sluice:slo_errors:ratio_rate6h{function=\"f\"} > 0.01"));
        assert_eq!(
            find(&r, "SluiceErrorBudgetBurnFast")["labels"]["severity"],
            "page"
        );
        assert_eq!(
            find(&r, "SluiceErrorBudgetBurnSlow")["labels"]["severity"],
            "ticket"
        );
    }

    #[test]
    fn slo_settings_reach_their_alerts_and_every_alert_has_a_runbook_section() {
        let f = function(
            "f",
            "[deploy.slo]\nlatency_p95 = \"250ms\"\nerror_ratio = 0.05\nqueue_lag = \"10m\"\n",
        );
        let r = rules(&f);
        assert!(find(&r, "SluiceLatencyHigh")["expr"]
            .as_str()
            .unwrap()
            .ends_with("> 0.25"));
        assert!(find(&r, "SluiceErrorRatioHigh")["expr"]
            .as_str()
            .unwrap()
            .ends_with("> 0.05"));
        assert!(find(&r, "SluiceQueueLagGrowing")["expr"]
            .as_str()
            .unwrap()
            .contains("> 600\n"));
        let runbook = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/runbook.md"),
        )
        .unwrap();
        let with_breaker = rules(&function("g", "[breaker]\nenabled = true\n"));
        for rule in with_breaker.iter() {
            let name = rule["alert"].as_str().unwrap();
            assert_eq!(
                rule["annotations"]["runbook_url"],
                format!("docs/runbook.md#{}", name.to_lowercase())
            );
            assert!(
                runbook.contains(&format!("\n## {name}\n")),
                "docs/runbook.md has no section `## {name}`"
            );
        }
    }

    #[test]
    fn the_breaker_alert_exists_only_where_the_breaker_does() {
        assert!(!rules(&function("f", "[breaker]\nenabled = false\n"))
            .iter()
            .any(|r| r["alert"] == "SluiceBreakerOpen"));
        let on = rules(&function("f", "[breaker]\nenabled = true\n"));
        assert!(find(&on, "SluiceBreakerOpen")["expr"]
            .as_str()
            .unwrap()
            .contains("sluice_breaker_state{function=\"f\"}"));
    }
}
