//! `[deploy.slo]` of a function's `sluice.toml`: the objectives the Prometheus alerts
//! (`infra/prometheus/alerts.yml`), the CloudWatch alarms of the CloudFormation template, the
//! Argo Rollouts analysis and the Grafana dashboard are built from, so that one number (say
//! the p95 target) can't say 200 ms in the alert and 500 ms in the alarm.
//!
//! The events (METRICS CONTRACT, docs/runbook.md): a *good* delivery is one settled as
//! `succeeded` or `duplicate`; a *bad* one was `retried`, or `dead_lettered` with a class other
//! than `permanent`. Permanent dead letters (bad input, business rejections: the producer's
//! error) and `released` deliveries (handed back at shutdown) count as neither.

use std::time::Duration;

use anyhow::{bail, Result};
use serde::Deserialize;

use crate::Function;

/// The longest receive-to-settle latency a bucket resolves (the contract's buckets end at
/// 60 s before `+Inf`); a p95 target above it could never be told from "above 60 s".
const MAX_LATENCY: Duration = Duration::from_secs(60);

/// `[deploy.slo]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Slo {
    /// The fraction of deliveries that must be good over the SLO's 30 days; the error budget
    /// is `1 - objective` (0.1 % at the default 0.999) and the burn-rate alerts spend it.
    pub objective: f64,
    /// The p95 of receive-to-settle time (`sluice_process_duration_seconds`; the Lambda
    /// alarm reads `HandlerDuration`) must stay below this. A value on one of the contract's
    /// bucket bounds (0.1, 0.15, 0.2, 0.25 s...) is answered exactly by `histogram_quantile`;
    /// between two, by interpolation.
    #[serde(with = "humantime_serde")]
    pub latency_p95: Duration,
    /// The error ratio over 5 minutes above which `SluiceErrorRatioHigh` fires, the
    /// CloudWatch error-ratio alarm (CodeDeploy's rollback trigger) breaches, and an Argo
    /// Rollouts canary fails.
    pub error_ratio: f64,
    /// `SluiceQueueLagGrowing` fires when the oldest ready message is older than this and
    /// still getting older.
    #[serde(with = "humantime_serde")]
    pub queue_lag: Duration,
}

impl Default for Slo {
    fn default() -> Self {
        Slo {
            objective: 0.999,
            latency_p95: Duration::from_millis(200),
            error_ratio: 0.01,
            queue_lag: Duration::from_secs(5 * 60),
        }
    }
}

impl Slo {
    /// The function's `[deploy.slo]`, checked; a bad value fails naming the key.
    pub fn of(f: &Function) -> Result<Slo> {
        let slo: Slo = f.settings.deploy("slo")?;
        let bad = |key: &str, why: String| bail!("key `deploy.slo.{key}`: {why}");
        // 0.9 is one bad delivery in ten; below that an "objective" is not one. Above 0.99999
        // the budget (26 s of a 30-day month) is smaller than one scrape can resolve.
        if !(0.9..=0.99999).contains(&slo.objective) {
            return bad(
                "objective",
                format!("{} must be 0.9 to 0.99999", slo.objective),
            );
        }
        if slo.latency_p95.is_zero() || slo.latency_p95 > MAX_LATENCY {
            return bad(
                "latency_p95",
                format!(
                    "{:?} must be above 0 and at most {}s (the last finite histogram bucket)",
                    slo.latency_p95,
                    MAX_LATENCY.as_secs()
                ),
            );
        }
        if !(slo.error_ratio > 0.0 && slo.error_ratio < 1.0) {
            return bad(
                "error_ratio",
                format!("{} must be between 0 and 1", slo.error_ratio),
            );
        }
        if slo.queue_lag < Duration::from_secs(60) {
            return bad("queue_lag", "must be at least 1m".into());
        }
        Ok(slo)
    }

    /// The error budget: the fraction of deliveries that may be bad.
    pub fn budget(&self) -> f64 {
        1.0 - self.objective
    }

    /// `latency_p95` in seconds, as PromQL compares it.
    pub fn latency_secs(&self) -> f64 {
        self.latency_p95.as_secs_f64()
    }
}

/// A number as PromQL and CloudWatch read it, without float noise: `1.0 - 0.999` prints as
/// `0.001`, not `0.0010000000000000009`.
pub fn num(x: f64) -> String {
    let s = format!("{:.10}", x);
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-" {
        "0".into()
    } else {
        s.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice::config::Settings;

    fn function(toml: &str) -> Function {
        Function {
            name: "f".into(),
            settings: Settings::load("f", Some(toml), std::iter::empty(), &[]).unwrap(),
        }
    }

    #[test]
    fn defaults_are_the_seed_slo() {
        let slo = Slo::of(&function("")).unwrap();
        assert_eq!(num(slo.budget()), "0.001");
        assert_eq!(num(slo.latency_secs()), "0.2");
        assert_eq!(num(slo.error_ratio), "0.01");
        assert_eq!(num(14.4 * slo.budget()), "0.0144");
    }

    #[test]
    fn a_bad_slo_value_fails_naming_the_key() {
        for (toml, key) in [
            ("[deploy.slo]\nobjective = 99.9\n", "deploy.slo.objective"),
            (
                "[deploy.slo]\nlatency_p95 = \"2m\"\n",
                "deploy.slo.latency_p95",
            ),
            (
                "[deploy.slo]\nerror_ratio = 0.0\n",
                "deploy.slo.error_ratio",
            ),
            (
                "[deploy.slo]\nqueue_lag = \"10s\"\n",
                "deploy.slo.queue_lag",
            ),
            ("[deploy.slo]\nlatency = \"1s\"\n", "deploy.slo"),
        ] {
            let err = format!("{:#}", Slo::of(&function(toml)).unwrap_err());
            assert!(err.contains(&format!("key `{key}")), "{toml}: {err}");
        }
    }
}
