//! CloudFormation templates under `infra/aws/`: one plain template per function,
//! `infra/aws/<function>.json`, everything it needs on AWS Lambda behind SQS.
//!
//! Plain CloudFormation, not SAM: moto (the emulator the tests deploy into) drops SAM
//! functions silently, so a SAM template could not be tested. JSON, as CDK emits it: no YAML
//! library, and `serde_json`'s sorted maps make the output deterministic, which the drift
//! check (`sluice-infra check`) needs.
//!
//! From the function's `sluice.toml` (the values the worker itself runs with):
//!
//! | template | from |
//! |---|---|
//! | queue `RedrivePolicy.maxReceiveCount` | `retry.max_deliveries` |
//! | Lambda `Timeout` | `worker.handler_timeout` + 2 x `store.timeout` + the Lambda safety margin |
//! | queue `VisibilityTimeout` | 6 x the Lambda timeout (AWS's guidance for SQS triggers) |
//! | bucket lifecycle `ExpirationInDays` | `store.ttl`, rounded up to days |
//! | default queue and function name | `queue` |
//! | the alarms' EMF `Namespace` | `telemetry.emf_namespace` (or `SLUICE__TELEMETRY__EMF_NAMESPACE` in `[deploy.lambda] env`) |
//!
//! Deployment-only knobs (memory, batch size and window, `MaximumConcurrency`, architecture,
//! extra environment, secrets, the age alarm, the CodeDeploy configuration) come from
//! `[deploy.lambda]`, [`LambdaDeploy`]; the alarm thresholds on the function's own metrics
//! from `[deploy.slo]` ([`Slo`]). The rest are CloudFormation parameters chosen at deploy time
//! (names, code location, alarm topic, `DeployFunction=false` for queues, bucket and alarms
//! only: a container worker, or an emulator that cannot run Lambda; `TrafficShifting=None`
//! for no alias or CodeDeploy). docs/deploy.md explains each choice.
//!
//! Staged rollout, as SAM's `AutoPublishAlias` + `DeploymentPreference` would generate it:
//! each deploy publishes a version (`Version`, replaced whenever the code or the function's
//! configuration changes), the alias `live` points at it with an `UpdatePolicy` of
//! `CodeDeployLambdaAliasUpdate`, so CloudFormation hands the alias change to CodeDeploy,
//! which shifts traffic by `DeploymentConfig` (10 % for 5 minutes, then all, by default) and
//! rolls back when the error-ratio alarm fires. The event source mapping invokes the alias.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{bail, Result};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{slo::num, slo::Slo, Function, Output};

/// Lambda's own safety margin (`sluice::lambda::SAFETY_MARGIN`, 1.5 s) rounded up: the
/// handler gets the invocation's remaining time minus it.
const LAMBDA_MARGIN_SECS: u64 = 2;
/// AWS: "set the source queue's visibility timeout to at least six times the timeout that
/// you configure on your function".
const VISIBILITY_FACTOR: u64 = 6;
/// Lambda's longest timeout.
const MAX_LAMBDA_TIMEOUT_SECS: u64 = 900;
/// SQS's longest visibility timeout (12 hours).
const MAX_VISIBILITY_SECS: u64 = 43_200;
/// The dead-letter queue keeps messages as long as SQS allows (14 days): an operator may need
/// days to look at them.
const DLQ_RETENTION_SECS: u64 = 1_209_600;
/// SQS's documented message size limit; moto defaults to 1 MiB, so it is set explicitly.
const MAX_MESSAGE_BYTES: u64 = 262_144;
/// The variable that sets `telemetry.emf_namespace` in the function's environment.
const EMF_NAMESPACE_ENV: &str = "SLUICE__TELEMETRY__EMF_NAMESPACE";
/// The alias the event source mapping invokes and CodeDeploy shifts.
const ALIAS: &str = "live";
/// CodeDeploy's predefined Lambda configurations (`CodeDeployDefault.*`); any other name is a
/// custom configuration the account must have created.
const PREDEFINED_CONFIGS: [&str; 9] = [
    "CodeDeployDefault.LambdaCanary10Percent5Minutes",
    "CodeDeployDefault.LambdaCanary10Percent10Minutes",
    "CodeDeployDefault.LambdaCanary10Percent15Minutes",
    "CodeDeployDefault.LambdaCanary10Percent30Minutes",
    "CodeDeployDefault.LambdaLinear10PercentEvery1Minute",
    "CodeDeployDefault.LambdaLinear10PercentEvery2Minutes",
    "CodeDeployDefault.LambdaLinear10PercentEvery3Minutes",
    "CodeDeployDefault.LambdaLinear10PercentEvery10Minutes",
    "CodeDeployDefault.LambdaAllAtOnce",
];
/// The longest `Name` parameter, which names the Lambda function (64 characters at most) and
/// the queues (80, with `-dlq.fifo` added for a FIFO DLQ): 60 is within both.
pub const MAX_NAME: usize = 60;
/// Variables the template sets itself from its own resources.
const GENERATED_ENV: [&str; 5] = [
    "SLUICE__TRANSPORT__KIND",
    "SLUICE__TRANSPORT__URL",
    "SLUICE__QUEUE",
    "SLUICE__STORE__KIND",
    "SLUICE__STORE__URL",
];

/// `[deploy.lambda]` of a function's `sluice.toml`: values only a deployment needs.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LambdaDeploy {
    /// `MemorySize` in MB (128 to 10240); Lambda gives CPU in proportion.
    pub memory_mb: u32,
    /// The default of the `Architecture` parameter: `x86_64` or `arm64`.
    pub architecture: String,
    /// Records per invocation (event source mapping `BatchSize`, 1 to 10000; above 10 needs a
    /// batch window).
    pub batch_size: u32,
    /// How long the mapping gathers records before invoking (`MaximumBatchingWindowInSeconds`,
    /// at most 5 minutes).
    #[serde(with = "humantime_serde")]
    pub batch_window: Duration,
    /// Concurrent invocations the mapping may run (`ScalingConfig.MaximumConcurrency`, 2 to
    /// 1000): a bulkhead for what the function calls.
    pub max_concurrency: u32,
    /// The Lambda timeout; derived from the settings when absent (module docs).
    #[serde(with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Extra environment of the function (e.g. a ledger path under `/tmp`).
    pub env: BTreeMap<String, String>,
    /// Environment variables read from Secrets Manager at deploy time: variable -> secret
    /// name (a dynamic reference, so the value is never in the template or its parameters).
    pub secrets: BTreeMap<String, String>,
    /// The work queue's `ApproximateAgeOfOldestMessage` alarm threshold.
    #[serde(with = "humantime_serde")]
    pub oldest_message_alarm: Duration,
    /// Days the function's log group keeps logs.
    pub log_retention_days: u32,
    /// The default of the `DeploymentConfig` parameter: how CodeDeploy shifts traffic to a
    /// new version (a `CodeDeployDefault.Lambda*` name, or a custom configuration's).
    pub deployment_config: String,
}

impl Default for LambdaDeploy {
    fn default() -> Self {
        LambdaDeploy {
            memory_mb: 128,
            // What `just package` builds by default (arm64 cannot be built on every machine).
            architecture: "x86_64".into(),
            batch_size: 10,
            batch_window: Duration::ZERO,
            max_concurrency: 2,
            timeout: None,
            env: BTreeMap::new(),
            secrets: BTreeMap::new(),
            oldest_message_alarm: Duration::from_secs(15 * 60),
            log_retention_days: 14,
            deployment_config: PREDEFINED_CONFIGS[0].into(),
        }
    }
}

/// The templates of all functions.
pub fn render(functions: &[Function]) -> Result<Vec<Output>> {
    functions
        .iter()
        .map(|f| {
            let template = template(f)?;
            let mut contents = serde_json::to_string_pretty(&template)?;
            contents.push('\n');
            Ok(Output {
                path: format!("infra/aws/{}.json", f.name).into(),
                contents,
            })
        })
        .collect()
}

/// Whole seconds, rounded up (SQS and Lambda take whole seconds; never shorter than asked).
fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The Lambda timeout in seconds.
fn lambda_timeout(f: &Function, deploy: &LambdaDeploy) -> Result<u64> {
    let s = &f.settings;
    let secs = match deploy.timeout {
        Some(t) => ceil_secs(t),
        // One try of the handler with its full timeout, the idempotency claim and complete
        // at their store timeout each, and the margin Lambda mode keeps before the deadline.
        None => ceil_secs(s.worker.handler_timeout + s.store.timeout * 2) + LAMBDA_MARGIN_SECS,
    };
    if !(1..=MAX_LAMBDA_TIMEOUT_SECS).contains(&secs) {
        bail!(
            "key `deploy.lambda.timeout`: {secs}s (derived from worker.handler_timeout and \
             store.timeout when unset) must be 1 to {MAX_LAMBDA_TIMEOUT_SECS} seconds"
        );
    }
    Ok(secs)
}

fn check(deploy: &LambdaDeploy) -> Result<()> {
    let bad = |key: &str, why: String| bail!("key `deploy.lambda.{key}`: {why}");
    if !(128..=10_240).contains(&deploy.memory_mb) {
        return bad(
            "memory_mb",
            format!("{} must be 128 to 10240", deploy.memory_mb),
        );
    }
    if !["x86_64", "arm64"].contains(&deploy.architecture.as_str()) {
        return bad(
            "architecture",
            format!("{:?} must be x86_64 or arm64", deploy.architecture),
        );
    }
    if !(1..=10_000).contains(&deploy.batch_size) {
        return bad(
            "batch_size",
            format!("{} must be 1 to 10000", deploy.batch_size),
        );
    }
    if deploy.batch_size > 10 && deploy.batch_window < Duration::from_secs(1) {
        return bad(
            "batch_size",
            "above 10 needs deploy.lambda.batch_window of at least 1s (an AWS rule)".into(),
        );
    }
    if deploy.batch_window > Duration::from_secs(300) {
        return bad("batch_window", "must be at most 5m".into());
    }
    if !(2..=1000).contains(&deploy.max_concurrency) {
        return bad(
            "max_concurrency",
            format!("{} must be 2 to 1000", deploy.max_concurrency),
        );
    }
    if deploy.oldest_message_alarm < Duration::from_secs(60) {
        return bad("oldest_message_alarm", "must be at least 1m".into());
    }
    for (table, keys) in [("env", &deploy.env), ("secrets", &deploy.secrets)] {
        for key in keys.keys() {
            if GENERATED_ENV.contains(&key.as_str()) {
                return bad(
                    &format!("{table}.{key}"),
                    "is set by the template from its own resources".into(),
                );
            }
        }
    }
    let config = deploy.deployment_config.as_str();
    if config.is_empty()
        || (config.starts_with("CodeDeployDefault.") && !PREDEFINED_CONFIGS.contains(&config))
    {
        return bad(
            "deployment_config",
            format!(
                "{config:?} is not one of CodeDeploy's Lambda configurations \
                 (CodeDeployDefault.LambdaCanary10Percent5Minutes, ...LambdaLinear10PercentEvery1Minute, \
                 ...LambdaAllAtOnce; docs/deploy.md) nor a custom configuration's name"
            ),
        );
    }
    if let Some(key) = deploy.env.keys().find(|k| deploy.secrets.contains_key(*k)) {
        return bad(
            &format!("secrets.{key}"),
            "is also in deploy.lambda.env".into(),
        );
    }
    Ok(())
}

fn r(name: &str) -> Value {
    json!({ "Ref": name })
}

fn arn(resource: &str) -> Value {
    json!({ "Fn::GetAtt": [resource, "Arn"] })
}

fn sub(text: &str) -> Value {
    json!({ "Fn::Sub": text })
}

/// One function's template.
fn template(f: &Function) -> Result<Value> {
    let s = &f.settings;
    let deploy: LambdaDeploy = s.deploy("lambda")?;
    check(&deploy)?;
    let slo = Slo::of(f)?;
    let timeout = lambda_timeout(f, &deploy)?;
    let visibility = timeout * VISIBILITY_FACTOR;
    if visibility > MAX_VISIBILITY_SECS {
        bail!(
            "key `deploy.lambda.timeout`: {timeout}s x {VISIBILITY_FACTOR} exceeds SQS's longest \
             visibility timeout ({MAX_VISIBILITY_SECS}s)"
        );
    }
    let expire_days = ceil_secs(s.store.ttl).div_ceil(86_400).max(1);
    let (base, fifo) = match s.queue.strip_suffix(".fifo") {
        Some(base) => (base, true),
        None => (s.queue.as_str(), false),
    };
    let suffix = if fifo { ".fifo" } else { "" };
    let name = &f.name;

    let mut env: BTreeMap<String, Value> = BTreeMap::new();
    env.insert("SLUICE__TRANSPORT__KIND".into(), json!("sqs"));
    env.insert("SLUICE__TRANSPORT__URL".into(), r("Queue"));
    env.insert(
        "SLUICE__QUEUE".into(),
        json!({ "Fn::GetAtt": ["Queue", "QueueName"] }),
    );
    env.insert("SLUICE__STORE__KIND".into(), json!("s3"));
    env.insert(
        "SLUICE__STORE__URL".into(),
        sub("s3://${Bucket}/${StorePrefix}"),
    );
    for (k, v) in &deploy.env {
        env.insert(k.clone(), json!(v));
    }
    for (k, secret) in &deploy.secrets {
        env.insert(
            k.clone(),
            json!(format!("{{{{resolve:secretsmanager:{secret}}}}}")),
        );
    }

    let queue_props = |dlq: bool| {
        let mut p = json!({
            "QueueName": sub(&format!("${{Name}}{}{suffix}", if dlq { "-dlq" } else { "" })),
            "MaximumMessageSize": MAX_MESSAGE_BYTES,
            "SqsManagedSseEnabled": true,
        });
        if fifo {
            p["FifoQueue"] = json!(true);
        }
        if dlq {
            p["MessageRetentionPeriod"] = json!(DLQ_RETENTION_SECS);
        } else {
            p["VisibilityTimeout"] = json!(visibility);
            p["RedrivePolicy"] = json!({
                "deadLetterTargetArn": arn("DeadLetterQueue"),
                "maxReceiveCount": s.retry.max_deliveries,
            });
        }
        p
    };

    let alarm_actions = json!({
        "Fn::If": ["HasAlarmTopic", [r("AlarmTopicArn")], r("AWS::NoValue")]
    });
    let alarm = |description: &str, queue: &str, metric: &str, threshold: u64| {
        json!({
            "Type": "AWS::CloudWatch::Alarm",
            "Properties": {
                "AlarmDescription": sub(description),
                "Namespace": "AWS/SQS",
                "MetricName": metric,
                "Dimensions": [{
                    "Name": "QueueName",
                    "Value": { "Fn::GetAtt": [queue, "QueueName"] },
                }],
                "Statistic": "Maximum",
                "Period": 60,
                "EvaluationPeriods": 1,
                "Threshold": threshold,
                "ComparisonOperator": "GreaterThanThreshold",
                // An idle queue publishes no data points: not a problem.
                "TreatMissingData": "notBreaching",
                "AlarmActions": alarm_actions.clone(),
                "OKActions": alarm_actions.clone(),
            }
        })
    };

    let mut template = json!({
        "AWSTemplateFormatVersion": "2010-09-09",
        "Description": format!(
            "Sluice function {name} on AWS Lambda behind SQS: work queue, DLQ, S3 idempotency \
             store, alarms, role, function, version and alias shifted by CodeDeploy, event source \
             mapping. Generated by sluice-infra from functions/{name}/sluice.toml; do not edit \
             (just infra-generate)."
        ),
        "Parameters": {
            "Name": {
                "Type": "String",
                "Default": base,
                "AllowedPattern": format!("[A-Za-z0-9_-]{{1,{MAX_NAME}}}"),
                "Description": format!(
                    "The Lambda function and the work queue `<Name>{suffix}`; its DLQ is \
                     `<Name>-dlq{suffix}` (the names `provision` uses)."
                ),
            },
            "DeployFunction": {
                "Type": "String",
                "Default": "true",
                "AllowedValues": ["true", "false"],
                "Description": "false: only the queues, the bucket and the alarms (a container \
                    worker, or an emulator that cannot run Lambda).",
            },
            "Architecture": {
                "Type": "String",
                "Default": deploy.architecture,
                "AllowedValues": ["x86_64", "arm64"],
                "Description": "The architecture `just package <arch>` built the zip for.",
            },
            // No default: a bucket name is account-specific. With DeployFunction=false it is
            // unused, but CloudFormation still wants a value.
            "CodeBucket": {
                "Type": "String",
                "AllowedPattern": "[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]",
                "Description": "S3 bucket holding the function's bootstrap.zip (`just package`); \
                    unused when DeployFunction is false.",
            },
            "CodeKey": {
                "Type": "String",
                "Default": format!("{name}/bootstrap.zip"),
                "Description": "Key of the zip in CodeBucket.",
            },
            "StorePrefix": {
                "Type": "String",
                "Default": "idempotency",
                "AllowedPattern": "[a-z0-9][a-z0-9-]*",
                "Description": "Folder of the idempotency records in the bucket.",
            },
            "AlarmTopicArn": {
                "Type": "String",
                "Default": "",
                "Description": "SNS topic the alarms notify (empty: alarms without actions).",
            },
        },
        "Conditions": {
            "WithFunction": { "Fn::Equals": [r("DeployFunction"), "true"] },
            "HasAlarmTopic": { "Fn::Not": [{ "Fn::Equals": [r("AlarmTopicArn"), ""] }] },
        },
        "Resources": {
            "DeadLetterQueue": {
                "Type": "AWS::SQS::Queue",
                "Properties": queue_props(true),
            },
            "Queue": {
                "Type": "AWS::SQS::Queue",
                "Properties": queue_props(false),
            },
            "Bucket": {
                "Type": "AWS::S3::Bucket",
                "Properties": {
                    "LifecycleConfiguration": {
                        "Rules": [{
                            "Id": "expire-idempotency-records",
                            "Status": "Enabled",
                            "Prefix": sub("${StorePrefix}/"),
                            // An expired record already counts as absent (store.ttl); this
                            // is garbage collection, never earlier than the ttl.
                            "ExpirationInDays": expire_days,
                        }],
                    },
                    "PublicAccessBlockConfiguration": {
                        "BlockPublicAcls": true,
                        "BlockPublicPolicy": true,
                        "IgnorePublicAcls": true,
                        "RestrictPublicBuckets": true,
                    },
                    "BucketEncryption": {
                        "ServerSideEncryptionConfiguration": [{
                            "ServerSideEncryptionByDefault": { "SSEAlgorithm": "AES256" },
                        }],
                    },
                },
            },
            "BucketPolicy": {
                "Type": "AWS::S3::BucketPolicy",
                "Properties": {
                    "Bucket": r("Bucket"),
                    "PolicyDocument": {
                        "Version": "2012-10-17",
                        "Statement": [{
                            "Sid": "DenyInsecureTransport",
                            "Effect": "Deny",
                            "Principal": "*",
                            "Action": "s3:*",
                            "Resource": [arn("Bucket"), sub("${Bucket.Arn}/*")],
                            "Condition": { "Bool": { "aws:SecureTransport": "false" } },
                        }],
                    },
                },
            },
            "DeadLetterQueueDepthAlarm": alarm(
                "${Name}: messages in the dead-letter queue (inspect with `dlq list`, then `redrive`)",
                "DeadLetterQueue",
                "ApproximateNumberOfMessagesVisible",
                0,
            ),
            "OldestMessageAgeAlarm": alarm(
                &format!(
                    "${{Name}}: the oldest message waits longer than {}s (the function is down, \
                     throttled or too slow)",
                    ceil_secs(deploy.oldest_message_alarm)
                ),
                "Queue",
                "ApproximateAgeOfOldestMessage",
                ceil_secs(deploy.oldest_message_alarm),
            ),
            "LogGroup": {
                "Type": "AWS::Logs::LogGroup",
                "Condition": "WithFunction",
                "Properties": {
                    "LogGroupName": sub("/aws/lambda/${Name}"),
                    "RetentionInDays": deploy.log_retention_days,
                },
            },
            "Role": {
                "Type": "AWS::IAM::Role",
                "Condition": "WithFunction",
                "Properties": {
                    "AssumeRolePolicyDocument": {
                        "Version": "2012-10-17",
                        "Statement": [{
                            "Effect": "Allow",
                            "Principal": { "Service": "lambda.amazonaws.com" },
                            "Action": "sts:AssumeRole",
                        }],
                    },
                    "Policies": [{
                        "PolicyName": "sluice-function",
                        "PolicyDocument": {
                            "Version": "2012-10-17",
                            "Statement": [
                                {
                                    // Receive and settle; SendMessage for retry copies, which
                                    // go back to the same queue with a delay.
                                    "Sid": "WorkQueue",
                                    "Effect": "Allow",
                                    "Action": [
                                        "sqs:ChangeMessageVisibility",
                                        "sqs:DeleteMessage",
                                        "sqs:GetQueueAttributes",
                                        "sqs:GetQueueUrl",
                                        "sqs:ReceiveMessage",
                                        "sqs:SendMessage",
                                    ],
                                    "Resource": arn("Queue"),
                                },
                                {
                                    // Dead letters with their history are sent by the function.
                                    "Sid": "DeadLetterQueue",
                                    "Effect": "Allow",
                                    "Action": [
                                        "sqs:GetQueueAttributes",
                                        "sqs:GetQueueUrl",
                                        "sqs:SendMessage",
                                    ],
                                    "Resource": arn("DeadLetterQueue"),
                                },
                                {
                                    "Sid": "IdempotencyRecords",
                                    "Effect": "Allow",
                                    "Action": ["s3:DeleteObject", "s3:GetObject", "s3:PutObject"],
                                    "Resource": sub("${Bucket.Arn}/${StorePrefix}/*"),
                                },
                                {
                                    // Without ListBucket a missing record reads as 403, not
                                    // 404, and a first claim could not tell "absent" from
                                    // "denied".
                                    "Sid": "IdempotencyRecordsAbsent",
                                    "Effect": "Allow",
                                    "Action": "s3:ListBucket",
                                    "Resource": arn("Bucket"),
                                    "Condition": {
                                        "StringLike": { "s3:prefix": sub("${StorePrefix}/*") },
                                    },
                                },
                                {
                                    "Sid": "Logs",
                                    "Effect": "Allow",
                                    "Action": ["logs:CreateLogStream", "logs:PutLogEvents"],
                                    "Resource": arn("LogGroup"),
                                },
                            ],
                        },
                    }],
                },
            },
            "Function": {
                "Type": "AWS::Lambda::Function",
                "Condition": "WithFunction",
                "DependsOn": ["LogGroup"],
                "Properties": {
                    "FunctionName": r("Name"),
                    "Runtime": "provided.al2023",
                    "Handler": "bootstrap",
                    "Architectures": [r("Architecture")],
                    "Code": { "S3Bucket": r("CodeBucket"), "S3Key": r("CodeKey") },
                    "MemorySize": deploy.memory_mb,
                    "Timeout": timeout,
                    "Role": arn("Role"),
                    "Environment": { "Variables": env },
                },
            },
            "EventSourceMapping": {
                "Type": "AWS::Lambda::EventSourceMapping",
                "Condition": "WithFunction",
                "Properties": {
                    "EventSourceArn": arn("Queue"),
                    "FunctionName": r("Function"),
                    "BatchSize": deploy.batch_size,
                    "MaximumBatchingWindowInSeconds": ceil_secs(deploy.batch_window),
                    // Only the records the function lists are retried, never the whole batch.
                    "FunctionResponseTypes": ["ReportBatchItemFailures"],
                    "ScalingConfig": { "MaximumConcurrency": deploy.max_concurrency },
                },
            },
        },
        "Outputs": {
            "QueueUrl": {
                "Description": "transport.url (SLUICE__TRANSPORT__URL)",
                "Value": r("Queue"),
            },
            "QueueName": {
                "Description": "queue (SLUICE__QUEUE)",
                "Value": { "Fn::GetAtt": ["Queue", "QueueName"] },
            },
            "QueueArn": { "Value": arn("Queue") },
            "DeadLetterQueueUrl": { "Value": r("DeadLetterQueue") },
            "DeadLetterQueueArn": { "Value": arn("DeadLetterQueue") },
            "BucketName": { "Value": r("Bucket") },
            "StoreUrl": {
                "Description": "store.url (SLUICE__STORE__URL)",
                "Value": sub("s3://${Bucket}/${StorePrefix}"),
            },
            "Environment": {
                "Description": "The settings a CLI or container worker needs for these \
                    resources: `export $(...)`.",
                "Value": sub(
                    "SLUICE__TRANSPORT__KIND=sqs SLUICE__TRANSPORT__URL=${Queue} \
                     SLUICE__QUEUE=${Queue.QueueName} SLUICE__STORE__KIND=s3 \
                     SLUICE__STORE__URL=s3://${Bucket}/${StorePrefix}"
                ),
            },
            "FunctionArn": {
                "Condition": "WithFunction",
                "Value": arn("Function"),
            },
            "VisibilityTimeout": {
                "Description": "6 x the function timeout (seconds)",
                "Value": visibility.to_string(),
            },
        },
    });
    staged_rollout(&mut template, f, &deploy, &slo)?;
    Ok(template)
}

/// FNV-1a, 64 bits: a stable fingerprint of the function's configuration (std's hasher may
/// change between Rust releases, and the drift check compares the output byte for byte).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The CloudWatch namespace the function writes its EMF documents under, which its alarms
/// must read: `telemetry.emf_namespace` of its `sluice.toml`, unless `[deploy.lambda] env`
/// sets the function's variable for it.
fn emf_namespace<'a>(f: &'a Function, deploy: &'a LambdaDeploy) -> &'a str {
    deploy
        .env
        .get(EMF_NAMESPACE_ENV)
        .unwrap_or(&f.settings.telemetry.emf_namespace)
}

/// One metric of the function's EMF document, as a metric-math input.
fn emf_metric(id: &str, f: &Function, namespace: &str, metric: &str, stat: &str) -> Value {
    json!({
        "Id": id,
        "MetricStat": {
            "Metric": {
                "Namespace": namespace,
                "MetricName": metric,
                "Dimensions": [
                    { "Name": "function", "Value": f.name },
                    { "Name": "queue", "Value": { "Fn::GetAtt": ["Queue", "QueueName"] } },
                ],
            },
            "Period": 60,
            "Stat": stat,
        },
        "ReturnData": false,
    })
}

/// The alarms on the function's EMF metrics, the published version, the alias, CodeDeploy's
/// application, deployment group and role, and the event source mapping pointed at the alias.
fn staged_rollout(t: &mut Value, f: &Function, deploy: &LambdaDeploy, slo: &Slo) -> Result<()> {
    let namespace = emf_namespace(f, deploy);
    let alarm_actions = json!({
        "Fn::If": ["HasAlarmTopic", [r("AlarmTopicArn")], r("AWS::NoValue")]
    });
    // 3 of the last 5 minutes: one noisy minute (a single batch of retries on a quiet queue)
    // does not roll a deploy back, a canary failing for 3 minutes of its 5 does.
    let per_minute = json!({
        "EvaluationPeriods": 5,
        "DatapointsToAlarm": 3,
        "ComparisonOperator": "GreaterThanThreshold",
        // No invocations, no data points: nothing is failing.
        "TreatMissingData": "notBreaching",
        "AlarmActions": alarm_actions.clone(),
        "OKActions": alarm_actions,
    });
    let mut error_ratio = per_minute.clone();
    error_ratio["AlarmDescription"] = sub(&format!(
        "${{Name}}: more than {} of records retried or dead-lettered in 3 of the last 5 minutes \
         (the CodeDeploy rollback trigger; docs/runbook.md)",
        num(slo.error_ratio)
    ));
    error_ratio["Threshold"] = json!(slo.error_ratio);
    error_ratio["Metrics"] = json!([
        emf_metric("records", f, namespace, "Records", "Sum"),
        emf_metric("retried", f, namespace, "Retried", "Sum"),
        emf_metric("dead", f, namespace, "DeadLettered", "Sum"),
        {
            "Id": "ratio",
            "Label": "error ratio",
            // FILL: a minute with records but no Retried/DeadLettered data point is a minute
            // without failures.
            "Expression": "IF(records > 0, (FILL(retried, 0) + FILL(dead, 0)) / records, 0)",
            "ReturnData": true,
        },
    ]);
    let mut duration = per_minute;
    let latency_ms = slo.latency_p95.as_millis();
    duration["AlarmDescription"] = sub(&format!(
        "${{Name}}: HandlerDuration p95 above {latency_ms} ms in 3 of the last 5 minutes \
         (docs/runbook.md)"
    ));
    duration["Namespace"] = json!(namespace);
    duration["MetricName"] = json!("HandlerDuration");
    duration["Dimensions"] = json!([
        { "Name": "function", "Value": f.name },
        { "Name": "queue", "Value": { "Fn::GetAtt": ["Queue", "QueueName"] } },
    ]);
    duration["ExtendedStatistic"] = json!("p95");
    duration["Period"] = json!(60);
    duration["Threshold"] = json!(latency_ms as u64);

    // A new version whenever the code or anything in the function's configuration changes:
    // a Version's properties cannot be updated, so a changed Description replaces it, which
    // publishes $LATEST as a new version. The code's key (a new key per build, docs/deploy.md)
    // and a fingerprint of the generated configuration cover both.
    let function_props = t["Resources"]["Function"]["Properties"].to_string();
    let fingerprint = format!("{:016x}", fnv1a(function_props.as_bytes()));

    let res = t["Resources"]
        .as_object_mut()
        .expect("Resources is an object");
    res.insert(
        "ErrorRatioAlarm".into(),
        json!({ "Type": "AWS::CloudWatch::Alarm", "Condition": "WithFunction", "Properties": error_ratio }),
    );
    res.insert(
        "DurationAlarm".into(),
        json!({ "Type": "AWS::CloudWatch::Alarm", "Condition": "WithFunction", "Properties": duration }),
    );
    res.insert(
        "Version".into(),
        json!({
            "Type": "AWS::Lambda::Version",
            "Condition": "Staged",
            // The old version must outlive its replacement: the alias still points at it
            // while CodeDeploy shifts traffic, and a rollback returns to it.
            "DeletionPolicy": "Retain",
            "UpdateReplacePolicy": "Retain",
            "Properties": {
                "FunctionName": r("Function"),
                "Description": sub(&format!(
                    "s3://${{CodeBucket}}/${{CodeKey}} (${{Architecture}}), configuration {fingerprint}"
                )),
            },
        }),
    );
    res.insert(
        "Alias".into(),
        json!({
            "Type": "AWS::Lambda::Alias",
            "Condition": "Staged",
            // On the first deploy the alias is created on version 1 at once; every later
            // change of FunctionVersion is a CodeDeploy deployment.
            "UpdatePolicy": {
                "CodeDeployLambdaAliasUpdate": {
                    "ApplicationName": r("DeploymentApplication"),
                    "DeploymentGroupName": r("DeploymentGroup"),
                },
            },
            "Properties": {
                "FunctionName": r("Function"),
                "FunctionVersion": { "Fn::GetAtt": ["Version", "Version"] },
                "Name": ALIAS,
            },
        }),
    );
    res.insert(
        "DeploymentApplication".into(),
        json!({
            "Type": "AWS::CodeDeploy::Application",
            "Condition": "Staged",
            "Properties": { "ApplicationName": r("Name"), "ComputePlatform": "Lambda" },
        }),
    );
    res.insert(
        "DeploymentRole".into(),
        json!({
            "Type": "AWS::IAM::Role",
            "Condition": "Staged",
            "Properties": {
                "AssumeRolePolicyDocument": {
                    "Version": "2012-10-17",
                    "Statement": [{
                        "Effect": "Allow",
                        "Principal": { "Service": "codedeploy.amazonaws.com" },
                        "Action": "sts:AssumeRole",
                    }],
                },
                // Read alarms, get and update aliases; no SNS (no CodeDeploy triggers here).
                "ManagedPolicyArns": [sub(
                    "arn:${AWS::Partition}:iam::aws:policy/service-role/AWSCodeDeployRoleForLambdaLimited"
                )],
            },
        }),
    );
    res.insert(
        "DeploymentGroup".into(),
        json!({
            "Type": "AWS::CodeDeploy::DeploymentGroup",
            "Condition": "Staged",
            "Properties": {
                "ApplicationName": r("DeploymentApplication"),
                "DeploymentGroupName": r("Name"),
                "ServiceRoleArn": arn("DeploymentRole"),
                "DeploymentConfigName": r("DeploymentConfig"),
                "DeploymentStyle": {
                    "DeploymentType": "BLUE_GREEN",
                    "DeploymentOption": "WITH_TRAFFIC_CONTROL",
                },
                "AlarmConfiguration": {
                    "Enabled": true,
                    "Alarms": [{ "Name": r("ErrorRatioAlarm") }],
                },
                // The alarm stops the deployment and the alias goes back to the old version;
                // so does a failed deployment or `aws deploy stop-deployment`.
                "AutoRollbackConfiguration": {
                    "Enabled": true,
                    "Events": [
                        "DEPLOYMENT_FAILURE",
                        "DEPLOYMENT_STOP_ON_ALARM",
                        "DEPLOYMENT_STOP_ON_REQUEST",
                    ],
                },
            },
        }),
    );
    res["EventSourceMapping"]["Properties"]["FunctionName"] =
        json!({ "Fn::If": ["Staged", r("Alias"), r("Function")] });

    let params = t["Parameters"]
        .as_object_mut()
        .expect("Parameters is an object");
    params.insert(
        "TrafficShifting".into(),
        json!({
            "Type": "String",
            "Default": "CodeDeploy",
            "AllowedValues": ["CodeDeploy", "None"],
            "Description": format!(
                "CodeDeploy: the mapping invokes the alias `{ALIAS}`, each deploy publishes a \
                 version and CodeDeploy shifts traffic to it by DeploymentConfig, rolling back \
                 on the error-ratio alarm. None: no version, alias or CodeDeploy; the mapping \
                 invokes $LATEST and a deploy replaces the code at once (an emulator such as \
                 moto, which creates neither aliases nor CodeDeploy resources)."
            ),
        }),
    );
    params.insert(
        "DeploymentConfig".into(),
        json!({
            "Type": "String",
            "Default": deploy.deployment_config,
            "AllowedPattern": "[A-Za-z0-9._-]{1,100}",
            "Description": "How CodeDeploy shifts traffic to a new version, e.g. \
                CodeDeployDefault.LambdaCanary10Percent5Minutes, \
                CodeDeployDefault.LambdaLinear10PercentEvery1Minute, \
                CodeDeployDefault.LambdaAllAtOnce (an urgent fix; the alarm still rolls back).",
        }),
    );
    t["Conditions"]["Staged"] = json!({
        "Fn::And": [
            { "Condition": "WithFunction" },
            { "Fn::Equals": [r("TrafficShifting"), "CodeDeploy"] },
        ]
    });
    let outputs = t["Outputs"].as_object_mut().expect("Outputs is an object");
    outputs.insert(
        "AliasArn".into(),
        json!({
            "Condition": "Staged",
            "Description": "What the event source mapping invokes",
            "Value": r("Alias"),
        }),
    );
    outputs.insert(
        "DeploymentGroup".into(),
        json!({
            "Condition": "Staged",
            "Description": "CodeDeploy application and deployment group (`aws deploy list-deployments \
                --application-name <this> --deployment-group-name <this>`)",
            "Value": r("DeploymentGroup"),
        }),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use sluice::config::Settings;

    use super::*;

    fn repo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    fn function(name: &str, toml: &str) -> Function {
        Function {
            name: name.into(),
            settings: Settings::load(name, Some(toml), std::iter::empty(), &[]).unwrap(),
        }
    }

    fn committed(name: &str) -> (String, Value) {
        let toml =
            std::fs::read_to_string(repo().join(format!("functions/{name}/sluice.toml"))).unwrap();
        let json = std::fs::read_to_string(repo().join(format!("infra/aws/{name}.json"))).unwrap();
        (toml, serde_json::from_str(&json).unwrap())
    }

    /// The JSON paths where `a` and `b` differ, with both values.
    fn differences(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let keys: std::collections::BTreeSet<_> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let (va, vb) = (
                        x.get(k).unwrap_or(&Value::Null),
                        y.get(k).unwrap_or(&Value::Null),
                    );
                    differences(va, vb, &format!("{path}.{k}"), out);
                }
            }
            _ if a != b => out.push(format!("{path}: {a} -> {b}")),
            _ => {}
        }
    }

    fn rendered(f: &Function) -> Value {
        let out = render(std::slice::from_ref(f)).unwrap();
        serde_json::from_str(&out[0].contents).unwrap()
    }

    #[test]
    fn committed_templates_match_their_functions_sluice_toml() {
        for name in ["charge-payment", "deliver-webhook"] {
            let (toml, json) = committed(name);
            let mut diff = Vec::new();
            differences(&json, &rendered(&function(name, &toml)), "", &mut diff);
            assert!(
                diff.is_empty(),
                "infra/aws/{name}.json drifted from functions/{name}/sluice.toml \
                 (run `just infra-generate`): {diff:#?}"
            );
        }
    }

    #[test]
    fn a_changed_max_deliveries_is_named_as_drift_in_the_redrive_policy() {
        let (toml, json) = committed("charge-payment");
        assert!(toml.contains("max_deliveries = 10"), "the fixture moved");
        let changed = toml.replace("max_deliveries = 10", "max_deliveries = 4");
        let mut diff = Vec::new();
        differences(
            &json,
            &rendered(&function("charge-payment", &changed)),
            "",
            &mut diff,
        );
        assert_eq!(
            diff,
            [".Resources.Queue.Properties.RedrivePolicy.maxReceiveCount: 10 -> 4"]
        );
    }

    #[test]
    fn visibility_is_six_times_the_timeout_derived_from_the_handler_timeout() {
        let f = function(
            "f",
            "[worker]\nhandler_timeout = \"10s\"\n[store]\ntimeout = \"2500ms\"\nttl = \"36h\"\n",
        );
        let t = rendered(&f);
        // 10 s + 2 x 2.5 s + 2 s margin.
        assert_eq!(t["Resources"]["Function"]["Properties"]["Timeout"], 17);
        assert_eq!(
            t["Resources"]["Queue"]["Properties"]["VisibilityTimeout"],
            17 * 6
        );
        // 36 h of records -> objects expire after 2 days, never earlier than the ttl.
        assert_eq!(
            t["Resources"]["Bucket"]["Properties"]["LifecycleConfiguration"]["Rules"][0]
                ["ExpirationInDays"],
            2
        );
    }

    #[test]
    fn deploy_lambda_values_reach_the_function_and_its_mapping() {
        let f = function(
            "f",
            "[deploy.lambda]\nmemory_mb = 512\nbatch_size = 50\nbatch_window = \"2s\"\n\
             max_concurrency = 5\narchitecture = \"arm64\"\n\
             env = { SLUICE__APP__LEDGER = \"/tmp/l.db\" }\n\
             secrets = { SLUICE__APP__SECRET = \"f/secret\" }\n",
        );
        let t = rendered(&f);
        let res = &t["Resources"];
        assert_eq!(res["Function"]["Properties"]["MemorySize"], 512);
        assert_eq!(t["Parameters"]["Architecture"]["Default"], "arm64");
        let esm = &res["EventSourceMapping"]["Properties"];
        assert_eq!(esm["BatchSize"], 50);
        assert_eq!(esm["MaximumBatchingWindowInSeconds"], 2);
        assert_eq!(esm["ScalingConfig"]["MaximumConcurrency"], 5);
        assert_eq!(esm["FunctionResponseTypes"][0], "ReportBatchItemFailures");
        let env = &res["Function"]["Properties"]["Environment"]["Variables"];
        assert_eq!(env["SLUICE__APP__LEDGER"], "/tmp/l.db");
        assert_eq!(
            env["SLUICE__APP__SECRET"],
            "{{resolve:secretsmanager:f/secret}}"
        );
    }

    #[test]
    fn a_bad_deploy_lambda_value_fails_naming_the_key() {
        for (toml, key) in [
            (
                "[deploy.lambda]\nmemory_mb = 64\n",
                "deploy.lambda.memory_mb",
            ),
            (
                "[deploy.lambda]\nbatch_size = 50\n",
                "deploy.lambda.batch_size",
            ),
            (
                "[deploy.lambda]\nmax_concurrency = 1\n",
                "deploy.lambda.max_concurrency",
            ),
            ("[deploy.lambda]\nmemmory_mb = 256\n", "deploy.lambda"),
            (
                "[deploy.lambda]\nenv = { SLUICE__TRANSPORT__URL = \"x\" }\n",
                "deploy.lambda.env.SLUICE__TRANSPORT__URL",
            ),
            (
                "[worker]\nhandler_timeout = \"20m\"\n",
                "deploy.lambda.timeout",
            ),
        ] {
            let err = render(&[function("f", toml)]).err().unwrap();
            let msg = format!("{err:#}");
            assert!(msg.contains(&format!("key `{key}")), "{toml}: {msg}");
        }
    }

    #[test]
    fn the_mapping_invokes_the_alias_that_codedeploy_shifts_and_the_error_alarm_rolls_back() {
        let t = rendered(&function("f", ""));
        let res = &t["Resources"];
        assert_eq!(
            res["EventSourceMapping"]["Properties"]["FunctionName"],
            json!({ "Fn::If": ["Staged", { "Ref": "Alias" }, { "Ref": "Function" }] })
        );
        let alias = &res["Alias"];
        assert_eq!(alias["Properties"]["Name"], "live");
        assert_eq!(
            alias["Properties"]["FunctionVersion"],
            json!({ "Fn::GetAtt": ["Version", "Version"] })
        );
        assert_eq!(
            alias["UpdatePolicy"]["CodeDeployLambdaAliasUpdate"],
            json!({
                "ApplicationName": { "Ref": "DeploymentApplication" },
                "DeploymentGroupName": { "Ref": "DeploymentGroup" },
            })
        );
        let group = &res["DeploymentGroup"]["Properties"];
        assert_eq!(
            group["DeploymentConfigName"],
            json!({ "Ref": "DeploymentConfig" })
        );
        assert_eq!(
            t["Parameters"]["DeploymentConfig"]["Default"],
            "CodeDeployDefault.LambdaCanary10Percent5Minutes"
        );
        assert_eq!(
            group["AlarmConfiguration"]["Alarms"],
            json!([{ "Name": { "Ref": "ErrorRatioAlarm" } }])
        );
        let events = group["AutoRollbackConfiguration"]["Events"]
            .as_array()
            .unwrap();
        for e in ["DEPLOYMENT_FAILURE", "DEPLOYMENT_STOP_ON_ALARM"] {
            assert!(events.contains(&json!(e)), "{events:?}");
        }
        assert_eq!(res["Version"]["DeletionPolicy"], "Retain");
        for logical in [
            "Version",
            "Alias",
            "DeploymentApplication",
            "DeploymentGroup",
            "DeploymentRole",
        ] {
            assert_eq!(res[logical]["Condition"], "Staged", "{logical}");
        }
    }

    #[test]
    fn alarm_thresholds_come_from_deploy_slo() {
        let t = rendered(&function(
            "f",
            "[deploy.slo]\nerror_ratio = 0.02\nlatency_p95 = \"250ms\"\n",
        ));
        let res = &t["Resources"];
        let ratio = &res["ErrorRatioAlarm"]["Properties"];
        assert_eq!(ratio["Threshold"], 0.02);
        let metrics = ratio["Metrics"].as_array().unwrap();
        let names: Vec<&str> = metrics
            .iter()
            .filter_map(|m| m["MetricStat"]["Metric"]["MetricName"].as_str())
            .collect();
        assert_eq!(names, ["Records", "Retried", "DeadLettered"]);
        assert_eq!(metrics[0]["MetricStat"]["Metric"]["Namespace"], "Sluice");
        assert_eq!(
            metrics[0]["MetricStat"]["Metric"]["Dimensions"][0],
            json!({ "Name": "function", "Value": "f" })
        );
        assert_eq!(
            metrics.iter().filter(|m| m["ReturnData"] == true).count(),
            1
        );
        let duration = &res["DurationAlarm"]["Properties"];
        assert_eq!(duration["ExtendedStatistic"], "p95");
        assert_eq!(duration["Threshold"], 250);
    }

    #[test]
    fn the_alarms_read_the_namespace_the_function_writes_its_emf_under() {
        let namespaces = |toml: &str| {
            let t = rendered(&function("f", toml));
            let res = &t["Resources"];
            let ratio = res["ErrorRatioAlarm"]["Properties"]["Metrics"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|m| m["MetricStat"]["Metric"]["Namespace"].as_str())
                .map(str::to_owned)
                .collect::<Vec<_>>();
            let duration = res["DurationAlarm"]["Properties"]["Namespace"].clone();
            (ratio, duration)
        };
        let (ratio, duration) = namespaces("");
        assert_eq!(ratio, ["Sluice"; 3]);
        assert_eq!(duration, "Sluice");
        let (ratio, duration) = namespaces("[telemetry]\nemf_namespace = \"Payments/Workers\"\n");
        assert_eq!(ratio, ["Payments/Workers"; 3]);
        assert_eq!(duration, "Payments/Workers");
        // The deployment's own environment wins, as it does in the running function.
        let (ratio, duration) = namespaces(
            "[telemetry]\nemf_namespace = \"A\"\n[deploy.lambda]\nenv = { SLUICE__TELEMETRY__EMF_NAMESPACE = \"B\" }\n",
        );
        assert_eq!(ratio, ["B"; 3]);
        assert_eq!(duration, "B");
    }

    #[test]
    fn a_changed_configuration_publishes_a_new_version_and_the_same_one_does_not() {
        let description = |toml: &str| {
            rendered(&function("f", toml))["Resources"]["Version"]["Properties"]["Description"]
                .clone()
        };
        assert_eq!(description(""), description(""));
        assert_ne!(
            description(""),
            description("[deploy.lambda]\nmemory_mb = 256\n")
        );
        assert_ne!(
            description(""),
            description("[worker]\nhandler_timeout = \"20s\"\n")
        );
        // The code's key is in it too: a new build under a new key is a new version.
        let d = description("");
        assert!(
            d["Fn::Sub"]
                .as_str()
                .unwrap()
                .starts_with("s3://${CodeBucket}/${CodeKey} "),
            "{d}"
        );
    }

    #[test]
    fn deploy_lambda_deployment_config_sets_the_default_and_a_bad_one_is_named() {
        let t = rendered(&function(
            "f",
            "[deploy.lambda]\ndeployment_config = \"CodeDeployDefault.LambdaLinear10PercentEvery1Minute\"\n",
        ));
        assert_eq!(
            t["Parameters"]["DeploymentConfig"]["Default"],
            "CodeDeployDefault.LambdaLinear10PercentEvery1Minute"
        );
        // A custom configuration's name is the account's business.
        render(&[function(
            "f",
            "[deploy.lambda]\ndeployment_config = \"Canary5Percent1Minute\"\n",
        )])
        .unwrap();
        let err = render(&[function(
            "f",
            "[deploy.lambda]\ndeployment_config = \"CodeDeployDefault.LambdaCanary5Percent5Minutes\"\n",
        )])
        .err()
        .unwrap();
        assert!(
            format!("{err:#}").contains("key `deploy.lambda.deployment_config`"),
            "{err:#}"
        );
    }

    #[test]
    fn a_fifo_queue_gets_a_fifo_dead_letter_queue() {
        let t = rendered(&function("f", "queue = \"orders.fifo\"\n"));
        assert_eq!(t["Parameters"]["Name"]["Default"], "orders");
        let res = &t["Resources"];
        assert_eq!(res["Queue"]["Properties"]["FifoQueue"], true);
        assert_eq!(
            res["Queue"]["Properties"]["QueueName"]["Fn::Sub"],
            "${Name}.fifo"
        );
        assert_eq!(
            res["DeadLetterQueue"]["Properties"]["QueueName"]["Fn::Sub"],
            "${Name}-dlq.fifo"
        );
    }
}
