//! Kubernetes manifests (and KEDA scalers) under `infra/k8s/<function>/`, one resource per
//! file so that each validates on its own against `infra/k8s/schemas/` (scripts/k8s-check.sh):
//!
//! - `rabbitmq/`: Deployment (transport `rabbitmq`), PodDisruptionBudget, KEDA
//!   TriggerAuthentication (the AMQP URL from the function's Secret) and ScaledObject on the
//!   queue's length;
//! - `sqs/`: the same with transport `sqs`, the AWS workload identity and an `aws-sqs-queue`
//!   trigger;
//! - `rollout-rabbitmq/`, `rollout-sqs/`: the same two with an Argo Rollouts `Rollout` in place
//!   of the Deployment (a canary by replica ratio, no traffic router: the workers pull from one
//!   queue, so each pod's share of the messages is its share of the consumers), an
//!   `AnalysisTemplate` that compares the canary's error ratio with the stable version's on
//!   Prometheus (the `version` label is the pod template hash), and the ScaledObject scaling the
//!   Rollout.
//!
//! Everything the worker also reads (queue name, shutdown grace, concurrency) comes from the
//! function's settings; the rest (image, replica bounds, resources) from its
//! `[deploy.kubernetes]` table ([`K8sDeploy`]). docs/deploy.md walks through using them.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{
    slo::{num, Slo},
    yaml::yaml,
    Function, Output,
};

/// The port of `telemetry.listen` in the pod (probes and Prometheus scrape it).
const TELEMETRY_PORT: u16 = 9090;
/// What the worker takes after `worker.shutdown_grace` to cancel handlers and return their
/// messages (worker.rs `CANCEL_GRACE`).
const CANCEL_GRACE_S: u64 = 1;
/// Slack on top, for flushing acks and closing connections (docs/operations.md "Sizing").
const GRACE_MARGIN_S: u64 = 5;
/// The distroless `nonroot` user (infra/docker/Dockerfile).
const NONROOT: u32 = 65532;

/// `[deploy.kubernetes]` of a function's sluice.toml: values only the cluster needs.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct K8sDeploy {
    /// The container image; default `<function>:latest` (what `docker build` in
    /// docs/deploy.md tags, loadable into kind or minikube).
    pub image: Option<String>,
    /// KEDA's lower bound; 0 lets an idle queue scale the Deployment to zero.
    pub min_replicas: u32,
    /// KEDA's upper bound.
    pub max_replicas: u32,
    /// Ready messages per replica KEDA aims for; default twice `worker.concurrency`, so a
    /// replica has a batch waiting behind the one it works on.
    pub target_queue_length: Option<u32>,
    /// CPU request, e.g. `250m`.
    pub cpu: String,
    /// Memory request and limit, e.g. `128Mi`.
    pub memory: String,
    /// `store.kind` in the cluster (its URL from the Secret's `store-url`); unset keeps the
    /// file's store, e.g. SQLite in the pod's scratch volume (deduplication per pod only).
    pub store: Option<String>,
    /// The AWS region of the SQS variant.
    pub aws_region: String,
    /// The SQS variant's `transport.url`: a queue URL or name; default `queue`.
    pub sqs_queue_url: Option<String>,
    /// More environment variables from the function's Secret: variable name -> Secret key,
    /// e.g. `SLUICE__APP__SECRET = "app-secret"` for a key that must not sit in sluice.toml.
    pub secret_env: BTreeMap<String, String>,
    /// Rollout variant: the Prometheus the canary analysis queries (it must scrape the pods
    /// and load infra/prometheus/alerts.yml).
    pub prometheus_url: String,
    /// Rollout variant: the canary's share of the replicas at each step, in percent; after the
    /// last step the new version takes all.
    pub canary_steps: Vec<u32>,
    /// Rollout variant: how long each step holds while the analysis measures.
    #[serde(with = "humantime_serde")]
    pub canary_pause: Duration,
}

impl Default for K8sDeploy {
    fn default() -> Self {
        Self {
            image: None,
            min_replicas: 1,
            max_replicas: 10,
            target_queue_length: None,
            cpu: "250m".into(),
            memory: "128Mi".into(),
            store: None,
            aws_region: "us-east-1".into(),
            sqs_queue_url: None,
            secret_env: BTreeMap::new(),
            prometheus_url: "http://prometheus.monitoring.svc:9090".into(),
            canary_steps: vec![10, 50],
            canary_pause: Duration::from_secs(5 * 60),
        }
    }
}

/// The manifests of all functions.
pub fn render(functions: &[Function]) -> Result<Vec<Output>> {
    let mut out = Vec::new();
    for f in functions {
        let d: K8sDeploy = f
            .settings
            .deploy("kubernetes")
            .with_context(|| format!("functions/{}/sluice.toml", f.name))?;
        if d.min_replicas > d.max_replicas {
            anyhow::bail!(
                "functions/{}/sluice.toml: key `deploy.kubernetes.min_replicas`: must not exceed max_replicas",
                f.name
            );
        }
        check_rollout(&d).with_context(|| format!("functions/{}/sluice.toml", f.name))?;
        let slo = Slo::of(f).with_context(|| format!("functions/{}/sluice.toml", f.name))?;
        for variant in [Variant::Rabbitmq, Variant::Sqs] {
            let dir = format!("infra/k8s/{}/{}", f.name, variant.name());
            let rollout_dir = format!("infra/k8s/{}/rollout-{}", f.name, variant.name());
            for (file, value) in [
                (format!("{dir}/deployment.yaml"), deployment(f, &d, variant)),
                (format!("{dir}/pdb.yaml"), pdb(f)),
                (
                    format!("{dir}/triggerauthentication.yaml"),
                    trigger_auth(f, variant),
                ),
                (
                    format!("{dir}/scaledobject.yaml"),
                    scaled_object(f, &d, variant, Target::Deployment),
                ),
                (
                    format!("{rollout_dir}/rollout.yaml"),
                    rollout(f, &d, variant),
                ),
                (
                    format!("{rollout_dir}/analysistemplate.yaml"),
                    analysis_template(f, &d, &slo),
                ),
                (format!("{rollout_dir}/pdb.yaml"), pdb(f)),
                (
                    format!("{rollout_dir}/triggerauthentication.yaml"),
                    trigger_auth(f, variant),
                ),
                (
                    format!("{rollout_dir}/scaledobject.yaml"),
                    scaled_object(f, &d, variant, Target::Rollout),
                ),
            ] {
                out.push(Output {
                    path: file.into(),
                    contents: format!(
                        "# Generated by `sluice-infra generate` from functions/{}/sluice.toml: edit that file, not this one.\n{}",
                        f.name,
                        yaml(&value)
                    ),
                });
            }
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Rabbitmq,
    Sqs,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Rabbitmq => "rabbitmq",
            Variant::Sqs => "sqs",
        }
    }
}

/// The Secret every variant reads: `transport-url` (the AMQP URL; the SQS variant needs none),
/// `store-url` when `deploy.kubernetes.store` is set, and the keys of `secret_env`.
fn secret_name(f: &Function) -> String {
    format!("{}-sluice", f.name)
}

fn labels(f: &Function) -> Value {
    json!({ "app.kubernetes.io/name": f.name, "app.kubernetes.io/part-of": "sluice" })
}

fn metadata(f: &Function, name: &str) -> Value {
    json!({ "name": name, "labels": labels(f) })
}

/// `terminationGracePeriodSeconds`, as docs/operations.md "Sizing" has it: a receive already
/// waiting (`transport.wait`) + `worker.shutdown_grace` + the cancel second, rounded up to
/// whole seconds, + [`GRACE_MARGIN_S`].
fn termination_grace_s(f: &Function) -> u64 {
    let s = &f.settings;
    let total = s.transport.wait + s.worker.shutdown_grace;
    total.as_secs() + u64::from(total.subsec_nanos() > 0) + CANCEL_GRACE_S + GRACE_MARGIN_S
}

fn secret_env(name: &str, secret: &str, key: &str) -> Value {
    json!({ "name": name, "valueFrom": { "secretKeyRef": { "name": secret, "key": key } } })
}

/// The pod template of the Deployment and of the Rollout. `version_label`: the pod label
/// whose value becomes `telemetry.version` (the `version` label of every series), so that a
/// canary's metrics can be told from the stable version's.
fn pod_template(
    f: &Function,
    d: &K8sDeploy,
    variant: Variant,
    version_label: Option<&str>,
) -> Value {
    let secret = secret_name(f);
    let mut env = vec![json!({ "name": "SLUICE__TRANSPORT__KIND", "value": variant.name() })];
    match variant {
        Variant::Rabbitmq => env.push(secret_env(
            "SLUICE__TRANSPORT__URL",
            &secret,
            "transport-url",
        )),
        Variant::Sqs => {
            env.push(json!({ "name": "SLUICE__TRANSPORT__URL", "value": sqs_url(f, d) }));
            env.push(json!({ "name": "AWS_REGION", "value": d.aws_region }));
        }
    }
    if let Some(store) = &d.store {
        env.push(json!({ "name": "SLUICE__STORE__KIND", "value": store }));
        env.push(secret_env("SLUICE__STORE__URL", &secret, "store-url"));
    }
    for (name, key) in &d.secret_env {
        env.push(secret_env(name, &secret, key));
    }
    env.push(json!({
        "name": "SLUICE__TELEMETRY__LISTEN",
        "value": format!("0.0.0.0:{TELEMETRY_PORT}"),
    }));
    if let Some(label) = version_label {
        env.push(json!({
            "name": "SLUICE__TELEMETRY__VERSION",
            "valueFrom": { "fieldRef": { "fieldPath": format!("metadata.labels['{label}']") } },
        }));
    }
    let probe = |path: &str, period: u32, failures: u32| {
        json!({
            "httpGet": { "path": path, "port": "telemetry" },
            "periodSeconds": period,
            "timeoutSeconds": 2,
            "failureThreshold": failures,
        })
    };
    let image = d
        .image
        .clone()
        .unwrap_or_else(|| format!("{}:latest", f.name));
    let mut pod_spec = json!({
        // Past the worker's own grace, so kubelet's SIGKILL never lands while in-flight
        // messages are still finishing or being returned to the queue.
        "terminationGracePeriodSeconds": termination_grace_s(f),
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": NONROOT,
            "runAsGroup": NONROOT,
            "fsGroup": NONROOT,
            "seccompProfile": { "type": "RuntimeDefault" },
        },
        "containers": [{
            "name": f.name,
            "image": image,
            "imagePullPolicy": "IfNotPresent",
            "env": env,
            "ports": [{ "name": "telemetry", "containerPort": TELEMETRY_PORT, "protocol": "TCP" }],
            "livenessProbe": probe("/healthz", 10, 3),
            "readinessProbe": probe("/readyz", 5, 2),
            "resources": {
                "requests": { "cpu": d.cpu, "memory": d.memory },
                "limits": { "memory": d.memory },
            },
            "securityContext": {
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "capabilities": { "drop": ["ALL"] },
            },
            // Relative paths in sluice.toml (SQLite files under .sluice/) land in the pod's
            // scratch volume: the root filesystem is read-only.
            "workingDir": "/data",
            "volumeMounts": [{ "name": "data", "mountPath": "/data" }],
        }],
        "volumes": [{ "name": "data", "emptyDir": {} }],
    });
    if variant == Variant::Sqs {
        // The AWS identity (IRSA or EKS Pod Identity) is bound to this service account.
        pod_spec["serviceAccountName"] = json!(f.name);
    }
    json!({
        "metadata": {
            "labels": labels(f),
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": TELEMETRY_PORT.to_string(),
                "prometheus.io/path": "/metrics",
            },
        },
        "spec": pod_spec,
    })
}

fn deployment(f: &Function, d: &K8sDeploy, variant: Variant) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(f, &f.name),
        // No `replicas`: KEDA's HPA owns the count, and re-applying must not reset it.
        "spec": {
            "selector": { "matchLabels": { "app.kubernetes.io/name": f.name } },
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": { "maxSurge": 1, "maxUnavailable": 0 },
            },
            "template": pod_template(f, d, variant, None),
        },
    })
}

/// The label Argo Rollouts puts on every pod of a revision; the canary and the stable
/// version differ in it, whatever else changed (image, settings, resources).
const POD_TEMPLATE_HASH: &str = "rollouts-pod-template-hash";

/// The AnalysisTemplate of a function's Rollout.
fn analysis_name(f: &Function) -> String {
    format!("{}-error-ratio", f.name)
}

fn check_rollout(d: &K8sDeploy) -> Result<()> {
    let bad = |key: &str, why: String| anyhow::bail!("key `deploy.kubernetes.{key}`: {why}");
    if d.canary_steps.is_empty() {
        return bad("canary_steps", "needs at least one step".into());
    }
    if d.canary_steps.windows(2).any(|w| w[0] >= w[1])
        || d.canary_steps.iter().any(|w| !(1..=99).contains(w))
    {
        return bad(
            "canary_steps",
            format!(
                "{:?} must rise, each 1 to 99 (percent of the replicas; 100 is the end of the rollout)",
                d.canary_steps
            ),
        );
    }
    if d.canary_pause < Duration::from_secs(60) {
        return bad(
            "canary_pause",
            "must be at least 1m (the analysis measures once a minute)".into(),
        );
    }
    if !(d.prometheus_url.starts_with("http://") || d.prometheus_url.starts_with("https://")) {
        return bad(
            "prometheus_url",
            format!("{:?} must be an http(s) URL", d.prometheus_url),
        );
    }
    Ok(())
}

/// A duration as Argo Rollouts parses it (Go's `time.ParseDuration`, which knows no days):
/// whole hours, minutes or seconds, rounded up to the second.
fn go_duration(d: Duration) -> String {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    match secs {
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// The Argo Rollouts variant of the Deployment: the same pods, a canary by replica ratio.
fn rollout(f: &Function, d: &K8sDeploy, variant: Variant) -> Value {
    let mut steps = Vec::new();
    for weight in &d.canary_steps {
        steps.push(json!({ "setWeight": weight }));
        steps.push(json!({ "pause": { "duration": go_duration(d.canary_pause) } }));
    }
    json!({
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Rollout",
        "metadata": metadata(f, &f.name),
        // No `replicas`, as for the Deployment: KEDA scales the Rollout.
        "spec": {
            "selector": { "matchLabels": { "app.kubernetes.io/name": f.name } },
            "strategy": {
                "canary": {
                    // No trafficRouting: nothing routes a queue's messages. Every replica
                    // pulls from the same queue, so the canary's share of the messages is its
                    // share of the consumers: setWeight is exact up to rounding to whole pods.
                    "maxSurge": "25%",
                    "maxUnavailable": 0,
                    // From the second step on (the first created the canary pods), for the
                    // whole rollout; a failed measurement beyond the limit aborts it.
                    "analysis": {
                        "templates": [{ "templateName": analysis_name(f) }],
                        "startingStep": 1,
                        "args": [
                            { "name": "canary-hash", "valueFrom": { "podTemplateHashValue": "Latest" } },
                            { "name": "stable-hash", "valueFrom": { "podTemplateHashValue": "Stable" } },
                        ],
                    },
                    "steps": steps,
                },
            },
            "template": pod_template(f, d, variant, Some(POD_TEMPLATE_HASH)),
        },
    })
}

/// The canary analysis: two measurements a minute, on the canary's own deliveries (its
/// `version` label, which the Rollout's pods set to their pod template hash).
///
/// - `error-ratio`: the canary's error ratio must stay at or below `[deploy.slo]
///   error_ratio` (1 %);
/// - `error-ratio-vs-stable`: and at or below twice the stable version's. The stable ratio is
///   floored at the SLO's budget (`1 - objective`, 0.1 %): a quiet stable version at 0 would
///   otherwise fail a canary for its first retry.
///
/// A canary that received nothing measures NaN (0/0): neither success nor failure, so
/// Inconclusive; beyond `inconclusiveLimit` the rollout pauses for a person to decide.
fn analysis_template(f: &Function, d: &K8sDeploy, slo: &Slo) -> Value {
    let errors = |hash: &str| {
        format!(
            "sum(rate(sluice_messages_total{{function=\"{}\", version=\"{{{{args.{hash}}}}}\", outcome=~\"retried|dead_lettered\", error_class!=\"permanent\"}}[5m])) or vector(0)",
            f.name
        )
    };
    let valid = |hash: &str| {
        format!(
            "sum(rate(sluice_messages_total{{function=\"{}\", version=\"{{{{args.{hash}}}}}\", outcome=~\"succeeded|duplicate|retried|dead_lettered\", error_class!=\"permanent\"}}[5m])) or vector(0)",
            f.name
        )
    };
    let ratio = |hash: &str| format!("(\n  ({})\n  /\n  ({})\n)", errors(hash), valid(hash));
    let metric = |name: &str, query: String, limit: String| {
        json!({
            "name": name,
            // Two scrapes of the new pods before the first measurement.
            "initialDelay": "2m",
            "interval": "1m",
            "successCondition": format!("result[0] <= {limit}"),
            "failureCondition": format!("result[0] > {limit}"),
            // One bad minute is noise; two fail the analysis and abort the rollout.
            "failureLimit": 1,
            "inconclusiveLimit": 2,
            "provider": { "prometheus": { "address": d.prometheus_url, "query": query } },
        })
    };
    json!({
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "AnalysisTemplate",
        "metadata": metadata(f, &analysis_name(f)),
        "spec": {
            "args": [{ "name": "canary-hash" }, { "name": "stable-hash" }],
            "metrics": [
                metric("error-ratio", ratio("canary-hash"), num(slo.error_ratio)),
                metric(
                    "error-ratio-vs-stable",
                    format!(
                        "{}\n/\nclamp_min({}, {})",
                        ratio("canary-hash"),
                        ratio("stable-hash"),
                        num(slo.budget())
                    ),
                    "2".into(),
                ),
            ],
        },
    })
}

fn pdb(f: &Function) -> Value {
    json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(f, &f.name),
        // One pod at a time during node drains: its messages go back to the queue within the
        // grace, and the others keep consuming. (maxUnavailable, not minAvailable, so that a
        // Deployment KEDA scaled to zero or one never blocks a drain.)
        "spec": {
            "maxUnavailable": 1,
            "selector": { "matchLabels": { "app.kubernetes.io/name": f.name } },
        },
    })
}

fn sqs_url(f: &Function, d: &K8sDeploy) -> String {
    d.sqs_queue_url
        .clone()
        .unwrap_or_else(|| f.settings.queue.clone())
}

fn trigger_auth(f: &Function, variant: Variant) -> Value {
    let spec = match variant {
        // The scaler reads the queue's length over the same AMQP URL the worker uses.
        Variant::Rabbitmq => json!({
            "secretTargetRef": [{
                "parameter": "host",
                "name": secret_name(f),
                "key": "transport-url",
            }],
        }),
        // The scaler calls GetQueueAttributes with the workload's own AWS identity.
        Variant::Sqs => json!({
            "podIdentity": { "provider": "aws", "identityOwner": "workload" },
        }),
    };
    json!({
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "TriggerAuthentication",
        "metadata": metadata(f, &format!("{}-{}", f.name, variant.name())),
        "spec": spec,
    })
}

/// What a ScaledObject scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Deployment,
    Rollout,
}

fn scaled_object(f: &Function, d: &K8sDeploy, variant: Variant, scales: Target) -> Value {
    let target = d
        .target_queue_length
        .unwrap_or(2 * f.settings.worker.concurrency as u32)
        .to_string();
    let (kind, trigger) = match variant {
        Variant::Rabbitmq => (
            "rabbitmq",
            json!({
                "protocol": "amqp",
                "queueName": f.settings.queue,
                "mode": "QueueLength",
                "value": target,
            }),
        ),
        Variant::Sqs => (
            "aws-sqs-queue",
            json!({
                "queueURL": sqs_url(f, d),
                "queueLength": target,
                "awsRegion": d.aws_region,
            }),
        ),
    };
    json!({
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": metadata(f, &f.name),
        "spec": {
            "scaleTargetRef": match scales {
                Target::Deployment => json!({ "name": f.name }),
                // KEDA scales any resource with a scale subresource; a Rollout has one.
                Target::Rollout => json!({
                    "apiVersion": "argoproj.io/v1alpha1",
                    "kind": "Rollout",
                    "name": f.name,
                }),
            },
            "minReplicaCount": d.min_replicas,
            "maxReplicaCount": d.max_replicas,
            "pollingInterval": 15,
            "cooldownPeriod": 300,
            "triggers": [{
                "type": kind,
                "metadata": trigger,
                "authenticationRef": { "name": format!("{}-{}", f.name, variant.name()) },
            }],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice::config::Settings;

    fn function(toml: &str) -> Function {
        Function {
            name: "fn-a".into(),
            settings: Settings::load("fn-a", Some(toml), std::iter::empty(), &[]).unwrap(),
        }
    }

    fn find<'a>(outs: &'a [Output], suffix: &str) -> &'a str {
        &outs
            .iter()
            .find(|o| o.path.to_string_lossy().ends_with(suffix))
            .unwrap_or_else(|| panic!("no {suffix}"))
            .contents
    }

    #[test]
    fn termination_grace_exceeds_the_worker_shutdown_grace() {
        let f = function("[worker]\nshutdown_grace = \"45s\"\n");
        let grace = termination_grace_s(&f);
        assert!(grace > 45, "{grace}");
        let outs = render(&[f]).unwrap();
        assert!(find(&outs, "rabbitmq/deployment.yaml")
            .contains(&format!("terminationGracePeriodSeconds: {grace}\n")));
        // The receive wait counts too, and fractions round up before the margin is added.
        let f = function("[worker]\nshutdown_grace = \"1500ms\"\n[transport]\nwait = \"20s\"\n");
        assert_eq!(
            termination_grace_s(&f),
            22 + CANCEL_GRACE_S + GRACE_MARGIN_S
        );
    }

    #[test]
    fn the_scaler_watches_the_queue_from_settings_and_deploy_knobs_apply() {
        let f = function(
            "queue = \"payments-in\"\n[worker]\nconcurrency = 3\n\
             [deploy.kubernetes]\nmax_replicas = 7\nimage = \"reg.example/fn-a:1\"\n\
             [deploy.kubernetes.secret_env]\nSLUICE__APP__TOKEN = \"app-token\"\n",
        );
        let outs = render(&[f]).unwrap();
        let so = find(&outs, "rabbitmq/scaledobject.yaml");
        assert!(so.contains("queueName: \"payments-in\"\n"), "{so}");
        assert!(so.contains("value: \"6\"\n"), "{so}");
        assert!(so.contains("maxReplicaCount: 7\n"), "{so}");
        let sqs = find(&outs, "sqs/scaledobject.yaml");
        assert!(sqs.contains("type: \"aws-sqs-queue\""), "{sqs}");
        assert!(sqs.contains("queueURL: \"payments-in\"\n"), "{sqs}");
        let dep = find(&outs, "rabbitmq/deployment.yaml");
        assert!(dep.contains("image: \"reg.example/fn-a:1\"\n"), "{dep}");
        assert!(dep.contains("path: \"/readyz\""), "{dep}");
        assert!(dep.contains("path: \"/healthz\""), "{dep}");
        assert!(
            dep.contains(
                "- name: \"SLUICE__APP__TOKEN\"\n          valueFrom:\n            secretKeyRef:\n              key: \"app-token\"\n              name: \"fn-a-sluice\"\n"
            ),
            "{dep}"
        );
        // Per transport: 4 files, and 5 in its Rollout variant.
        assert_eq!(outs.len(), 18);
    }

    #[test]
    fn the_rollout_variant_is_a_canary_by_replicas_scaled_by_keda_and_analysed_per_version() {
        let f = function(
            "[deploy.kubernetes]\ncanary_steps = [20, 40, 80]\ncanary_pause = \"10m\"\n\
             prometheus_url = \"http://prom.example:9090\"\n\
             [deploy.slo]\nerror_ratio = 0.02\nobjective = 0.99\n",
        );
        let outs = render(&[f]).unwrap();
        let ro = find(&outs, "rollout-rabbitmq/rollout.yaml");
        assert!(ro.contains("kind: \"Rollout\"\n"), "{ro}");
        assert!(
            ro.contains(
                "      - setWeight: 20\n      - pause:\n          duration: \"10m\"\n      - setWeight: 40\n"
            ),
            "{ro}"
        );
        assert!(ro.contains("- setWeight: 80\n"), "{ro}");
        assert!(!ro.contains("trafficRouting"), "{ro}");
        assert!(!ro.contains("replicas:"), "KEDA owns the count: {ro}");
        // The metrics' version label is the revision's pod template hash, which the analysis
        // gets for the canary (Latest) and the stable version.
        assert!(
            ro.contains("fieldPath: \"metadata.labels['rollouts-pod-template-hash']\"\n"),
            "{ro}"
        );
        assert!(ro.contains("podTemplateHashValue: \"Latest\""), "{ro}");
        assert!(ro.contains("podTemplateHashValue: \"Stable\""), "{ro}");
        assert!(ro.contains("templateName: \"fn-a-error-ratio\""), "{ro}");
        // The Deployment variant does not set the version: it keeps the crate's.
        assert!(!find(&outs, "/rabbitmq/deployment.yaml").contains("TELEMETRY__VERSION"));

        let at = find(&outs, "rollout-sqs/analysistemplate.yaml");
        assert!(at.contains("kind: \"AnalysisTemplate\"\n"), "{at}");
        assert!(
            at.contains("successCondition: \"result[0] <= 0.02\""),
            "{at}"
        );
        assert!(at.contains("failureCondition: \"result[0] > 2\""), "{at}");
        assert!(at.contains("address: \"http://prom.example:9090\""), "{at}");
        assert!(at.contains("version=\"{{args.canary-hash}}\""), "{at}");
        assert!(at.contains("version=\"{{args.stable-hash}}\""), "{at}");
        // The stable ratio is floored at the budget, 1 - 0.99.
        assert!(at.contains("), 0.01)"), "{at}");

        let so = find(&outs, "rollout-rabbitmq/scaledobject.yaml");
        assert!(
            so.contains(
                "  scaleTargetRef:\n    apiVersion: \"argoproj.io/v1alpha1\"\n    kind: \"Rollout\"\n    name: \"fn-a\"\n"
            ),
            "{so}"
        );
        assert!(find(&outs, "/rabbitmq/scaledobject.yaml")
            .contains("scaleTargetRef:\n    name: \"fn-a\"\n"));
    }

    #[test]
    fn pause_durations_are_what_go_parses() {
        assert_eq!(go_duration(Duration::from_secs(300)), "5m");
        assert_eq!(go_duration(Duration::from_secs(86_400)), "24h");
        assert_eq!(go_duration(Duration::from_millis(90_500)), "91s");
    }

    #[test]
    fn bad_canary_settings_are_named() {
        for (toml, key) in [
            (
                "[deploy.kubernetes]\ncanary_steps = []\n",
                "deploy.kubernetes.canary_steps",
            ),
            (
                "[deploy.kubernetes]\ncanary_steps = [50, 10]\n",
                "deploy.kubernetes.canary_steps",
            ),
            (
                "[deploy.kubernetes]\ncanary_steps = [10, 100]\n",
                "deploy.kubernetes.canary_steps",
            ),
            (
                "[deploy.kubernetes]\ncanary_pause = \"30s\"\n",
                "deploy.kubernetes.canary_pause",
            ),
            (
                "[deploy.kubernetes]\nprometheus_url = \"prom:9090\"\n",
                "deploy.kubernetes.prometheus_url",
            ),
        ] {
            let err = format!("{:#}", render(&[function(toml)]).err().unwrap());
            assert!(err.contains(&format!("key `{key}`")), "{toml}: {err}");
        }
    }

    #[test]
    fn an_unknown_deploy_key_is_named() {
        let f = function("[deploy.kubernetes]\nreplicas = 3\n");
        let err = format!("{:#}", render(&[f]).err().unwrap());
        assert!(err.contains("deploy.kubernetes"), "{err}");
        assert!(err.contains("replicas"), "{err}");
    }
}
