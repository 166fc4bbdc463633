//! The generated CloudFormation template (`infra/aws/charge-payment.json`) deployed into moto's
//! CloudFormation, then used by the real charge-payment binary in container mode: a poison
//! message lands in the *deployed* DLQ with its history, good ones are charged once with their
//! records in the deployed bucket. The Lambda build, given exactly the environment the
//! template gives the function, drains the deployed queue through `local-esm`. And
//! `sluice-infra check` names a template that drifted from its function's `sluice.toml`.
//!
//! Needs moto (`eval "$(scripts/moto.sh start)"`; the deploy script runs with its venv's boto3)
//! and the binaries `charge-payment`, `sluice-infra` and the Lambda build of charge-payment
//! (`cargo build -p charge-payment -p sluice-infra` and `cargo build -p charge-payment
//! --no-default-features --features lambda --target x86_64-unknown-linux-gnu`; `just test`
//! builds them). Without moto the test fails: it never touches real
//! AWS. moto cannot run the Lambda function, so the stack is deployed with
//! `DeployFunction=false` (queues, bucket, alarms); `scripts/infra-check.sh` deploys the full
//! template, and docs/deploy.md lists what moto accepts without creating.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use sluice::conformance::unique;
use sluice_tests::{function_binary, repo_root};

use crate::support::{wait_exit, FunctionRun, CHARGE_TEMPLATE};

/// Longest `run --drain` may take for a handful of messages on moto.
const TIMEOUT: Duration = Duration::from_secs(120);

/// The moto venv's python (boto3), where scripts/moto.sh installs it.
fn venv_python() -> PathBuf {
    sluice_tests::venv_dir().join("bin/python")
}

/// Runs the venv's python with `args` from the repository root; panics on failure; stdout.
fn python(args: &[&str]) -> String {
    let out = Command::new(venv_python())
        .args(args)
        .current_dir(repo_root())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run scripts/moto.sh install)",
                venv_python().display()
            )
        });
    assert!(
        out.status.success(),
        "python {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `scripts/cfn-deploy.py` on a template: the created resources and the outputs.
fn deploy(stack: &str, template: &str, params: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "scripts/cfn-deploy.py",
        "--stack",
        stack,
        "--template",
        template,
    ];
    for p in params {
        args.extend(["--param", *p]);
    }
    serde_json::from_str(&python(&args)).unwrap()
}

/// charge-payment's generated template deployed into moto (SQS, S3 and CloudFormation) as a
/// new stack named after `prefix`, without the function and its mapping (moto cannot run
/// them; see docs/deploy.md): its queues, bucket and alarms. Returns the stack's `Name`
/// parameter and what cfn-deploy.py printed.
fn deploy_charge_payment_without_function(prefix: &str) -> (String, serde_json::Value) {
    sluice_tests::moto("SQS");
    sluice_tests::moto("S3");
    sluice_tests::moto("CLOUDFORMATION");
    let name = unique(prefix);
    let stack = deploy(
        &name,
        "infra/aws/charge-payment.json",
        &[
            &format!("Name={name}"),
            "DeployFunction=false",
            "CodeBucket=unused-without-function",
        ],
    );
    (name, stack)
}

/// Messages waiting in a queue, read from SQS itself (not through Sluice).
fn queue_depth(url: &str) -> u64 {
    let script = "import boto3, os, sys\n\
        sqs = boto3.session.Session(region_name=os.environ['AWS_REGION']).client('sqs')\n\
        a = sqs.get_queue_attributes(QueueUrl=sys.argv[1], AttributeNames=['All'])['Attributes']\n\
        print(int(a['ApproximateNumberOfMessages']) + int(a['ApproximateNumberOfMessagesNotVisible']))";
    python(&["-c", script, url]).trim().parse().unwrap()
}

/// Objects under an `s3://bucket/prefix` URL, read from S3 itself.
fn object_count(store_url: &str) -> u64 {
    let script = "import boto3, os, sys\n\
        bucket, _, prefix = sys.argv[1].removeprefix('s3://').partition('/')\n\
        s3 = boto3.session.Session(region_name=os.environ['AWS_REGION']).client('s3')\n\
        print(s3.list_objects_v2(Bucket=bucket, Prefix=prefix + '/').get('KeyCount', 0))";
    python(&["-c", script, store_url]).trim().parse().unwrap()
}

#[tokio::test]
async fn charge_payment_runs_on_the_deployed_stack_and_a_poison_message_lands_in_its_dlq() {
    let (name, stack) = deploy_charge_payment_without_function("infra-cp");
    let created: Vec<&str> = stack["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["logical"].as_str().unwrap())
        .collect();
    for logical in ["Queue", "DeadLetterQueue", "Bucket"] {
        assert!(created.contains(&logical), "{logical} not created: {stack}");
    }
    for logical in ["Function", "EventSourceMapping", "Role"] {
        assert!(
            !created.contains(&logical),
            "{logical} deployed with DeployFunction=false"
        );
    }
    let outputs = &stack["outputs"];
    let out = |key: &str| {
        outputs[key]
            .as_str()
            .unwrap_or_else(|| panic!("output {key} missing: {outputs}"))
            .to_owned()
    };
    assert_eq!(out("QueueName"), name);

    // The worker's whole AWS configuration comes from the stack's `Environment` output, as
    // docs/deploy.md tells an operator to use it.
    let env: BTreeMap<String, String> = out("Environment")
        .split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect();
    assert_eq!(env["SLUICE__TRANSPORT__URL"], out("QueueUrl"));
    assert_eq!(env["SLUICE__STORE__URL"], out("StoreUrl"));

    let run = env
        .iter()
        .fold(FunctionRun::new("charge-payment"), |run, (k, v)| {
            run.env(k, v)
        });

    run.cli(&["send", "--count", "5", CHARGE_TEMPLATE]);
    run.cli(&["send", "this is not a charge request"]);
    assert_eq!(queue_depth(&out("QueueUrl")), 6);

    // `run --drain` exits once the queue is empty; the deadline only guards against a hang.
    let mut worker = run.worker(&["--drain"], "worker.log");
    let log = run.path("worker.log");
    let status = wait_exit(&mut worker, TIMEOUT, Some(&log)).await;
    assert!(
        status.success(),
        "run --drain: {status}; see {}",
        log.display()
    );

    let ledger = run.ledger();
    assert_eq!((ledger.charges, ledger.distinct_payments), (5, 5));
    // One idempotency record per charge, in the deployed bucket under the deployed prefix.
    assert_eq!(object_count(&out("StoreUrl")), 5);

    // The poison message is in the stack's DLQ (read from SQS directly), with its history
    // (read through the function, which found the DLQ through the deployed RedrivePolicy).
    assert_eq!(queue_depth(&out("DeadLetterQueueUrl")), 1);
    assert_eq!(queue_depth(&out("QueueUrl")), 0);
    let dead = run.json(&["dlq", "list", "--json"]);
    let dead = dead.as_array().unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["error_class"], "permanent", "{}", dead[0]);
    assert_eq!(dead[0]["attempts"], 1, "{}", dead[0]);
    assert_eq!(dead[0]["function"], "charge-payment", "{}", dead[0]);
    assert_eq!(dead[0]["original_queue"], name.as_str(), "{}", dead[0]);
    assert_eq!(
        dead[0]["body"], "this is not a charge request",
        "{}",
        dead[0]
    );
}

/// The generated template's Lambda environment, its references resolved with the stack's
/// outputs as CloudFormation resolves them on AWS.
fn function_environment(outputs: &serde_json::Value) -> BTreeMap<String, String> {
    let template: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("infra/aws/charge-payment.json")).unwrap(),
    )
    .unwrap();
    let vars = template["Resources"]["Function"]["Properties"]["Environment"]["Variables"]
        .as_object()
        .unwrap();
    let out = |key: &str| outputs[key].as_str().unwrap().to_owned();
    vars.iter()
        .map(|(k, v)| {
            let value = match v {
                serde_json::Value::String(s) => s.clone(),
                v if *v == serde_json::json!({ "Ref": "Queue" }) => out("QueueUrl"),
                v if *v == serde_json::json!({ "Fn::GetAtt": ["Queue", "QueueName"] }) => {
                    out("QueueName")
                }
                v if *v == serde_json::json!({ "Fn::Sub": "s3://${Bucket}/${StorePrefix}" }) => {
                    out("StoreUrl")
                }
                other => panic!("{k}: no resolution for {other} in this test"),
            };
            (k.clone(), value)
        })
        .collect()
}

#[test]
fn the_lambda_build_with_the_templates_environment_drains_the_deployed_queue() {
    sluice_tests::lambda::lambda_binary("charge-payment").expect("the Lambda build");
    let (_, stack) = deploy_charge_payment_without_function("infra-lambda");
    let outputs = &stack["outputs"];
    let env = function_environment(outputs);
    // The template's ledger is /tmp/ledger.db (Lambda's only writable place); this test
    // counts charges in its own.
    assert_eq!(env["SLUICE__APP__LEDGER"], "/tmp/ledger.db");
    let run = env
        .iter()
        .fold(FunctionRun::new("charge-payment"), |run, (k, v)| {
            run.env(k, v)
        });
    let ledger = format!("SLUICE__APP__LEDGER={}", run.sandbox.ledger_db().display());
    run.cli(&["send", "--count", "8", CHARGE_TEMPLATE]);
    run.cli(&["send", "--count", "1", "this is not a charge request"]);

    // local-esm invokes the Lambda build the way the event source mapping the template
    // declares would: batches of 10, the function's timeout, partial batch responses. Only the
    // template's environment reaches the function (plus the ledger above).
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_local-esm"));
    cmd.args([
        "--function",
        "charge-payment",
        "--drain",
        "--max-time",
        "120s",
    ])
    .args(["--queue", &env["SLUICE__TRANSPORT__URL"]])
    .args(["--timeout", "22s", "--env", &ledger])
    .arg("--log")
    .arg(run.path("lambda.log"));
    for (k, v) in &env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "local-esm: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        run.log("lambda.log")
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["reported_failed"], 0, "{summary}");
    assert_eq!(summary["invocation_errors"], 0, "{summary}");

    let ledger = run.ledger();
    assert_eq!((ledger.charges, ledger.distinct_payments), (8, 8));
    assert_eq!(object_count(&env["SLUICE__STORE__URL"]), 8);
    assert_eq!(
        queue_depth(outputs["DeadLetterQueueUrl"].as_str().unwrap()),
        1
    );
}

/// Copies a directory tree (the deploy files and the functions' settings, a few KB).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
fn sluice_infra_check_names_the_template_that_drifted_from_a_changed_sluice_toml() {
    let bin = function_binary("sluice-infra").unwrap();
    let root = tempfile::tempdir().unwrap();
    copy_tree(&repo_root().join("infra"), &root.path().join("infra"));
    // Every function's settings, and the workflows (their step queues are in the RabbitMQ
    // definitions).
    for entry in std::fs::read_dir(repo_root().join("functions")).unwrap() {
        let f = entry.unwrap().file_name();
        let dir = root.path().join("functions").join(&f);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(
            repo_root().join("functions").join(&f).join("sluice.toml"),
            dir.join("sluice.toml"),
        )
        .unwrap();
    }
    copy_tree(
        &repo_root().join("workflows"),
        &root.path().join("workflows"),
    );
    let check = || {
        Command::new(&bin)
            .arg("--root")
            .arg(root.path())
            .arg("check")
            .output()
            .unwrap()
    };
    let clean = check();
    assert!(
        clean.status.success(),
        "the committed files drifted: {}",
        String::from_utf8_lossy(&clean.stderr)
    );

    let toml_path = root.path().join("functions/charge-payment/sluice.toml");
    let toml = std::fs::read_to_string(&toml_path).unwrap();
    assert!(toml.contains("max_deliveries = 10"), "the fixture moved");
    std::fs::write(
        &toml_path,
        toml.replace("max_deliveries = 10", "max_deliveries = 4"),
    )
    .unwrap();

    let drifted = check();
    let stderr = String::from_utf8_lossy(&drifted.stderr);
    assert_eq!(drifted.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("drifted: infra/aws/charge-payment.json"),
        "{stderr}"
    );
    assert!(!stderr.contains("deliver-webhook"), "{stderr}");
}
