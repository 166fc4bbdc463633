//! `infra/rabbitmq/definitions.json` against the topology Sluice declares, on the real broker:
//! what `provision` declares for each example function is exactly what the file describes
//! (so they cannot drift apart), and a broker whose topology was imported from the file serves
//! a worker that declares nothing.
//!
//! Needs the broker and `rabbitmqctl` (`scripts/services.sh rabbitmq`) and the debug builds of
//! charge-payment and deliver-webhook (`cargo build --workspace --bins`; `just test` does).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde_json::Value;
use sluice::{
    conformance::unique,
    transport::{
        rabbitmq::{env, RabbitConfig, RabbitTransport},
        Transport, TransportOptions,
    },
};
use sluice_tests::{
    function_binary, ledger_counts,
    rabbit::{self, rabbitmqctl, Vhost},
    Sandbox,
};

/// The example functions the file describes.
const FUNCTIONS: [&str; 2] = ["charge-payment", "deliver-webhook"];

fn definitions_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../infra/rabbitmq/definitions.json")
}

fn definitions() -> Value {
    let text =
        std::fs::read_to_string(definitions_path()).expect("infra/rabbitmq/definitions.json");
    serde_json::from_str(&text).expect("definitions.json is JSON")
}

/// Whether a topology object belongs to the work queue `queue` (its exchange, its queues, its
/// binding).
fn belongs_to(object: &Value, queue: &str) -> bool {
    ["name", "source"].iter().any(|k| {
        object[*k].as_str().is_some_and(|n| {
            n == queue || n.strip_prefix(queue).is_some_and(|r| r.starts_with('.'))
        })
    })
}

/// The queues, exchanges and bindings of `queue` in `vhost` from a definitions document, with
/// the queue's name replaced by `as_name` and the virtual host dropped, sorted: comparable.
fn topology_of(defs: &Value, vhost: &str, queue: &str, as_name: &str) -> Value {
    let mut out = serde_json::Map::new();
    for kind in ["queues", "exchanges", "bindings"] {
        let mut items: Vec<Value> = defs[kind]
            .as_array()
            .unwrap_or(&Vec::new())
            .iter()
            .filter(|o| o["vhost"] == vhost && belongs_to(o, queue))
            .map(|o| {
                let mut o = o.clone();
                let obj = o.as_object_mut().expect("an object");
                obj.remove("vhost");
                // Names, routing keys and dead-letter targets all start with the queue name.
                let text = serde_json::to_string(&o).expect("serializes");
                let renamed = text.replace(&format!("\"{queue}"), &format!("\"{as_name}"));
                serde_json::from_str(&renamed).expect("still JSON")
            })
            .collect();
        items.sort_by_key(|o| serde_json::to_string(o).expect("serializes"));
        out.insert(kind.to_owned(), Value::Array(items));
    }
    Value::Object(out)
}

fn export() -> Value {
    serde_json::from_str(&rabbitmqctl(&["export_definitions", "-"]).expect("export_definitions"))
        .expect("exported definitions are JSON")
}

/// Deletes a topology declared in the default virtual host when the test ends, also when it
/// fails (in a thread of its own: a drop cannot await).
struct DeleteOnDrop(TransportOptions);

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        let opts = self.0.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let config = RabbitConfig {
                    declare: false,
                    ..RabbitConfig::default()
                };
                match RabbitTransport::open_with(opts, config).await {
                    Ok(t) => {
                        if let Err(e) = t.delete_topology().await {
                            eprintln!("could not delete the test topology: {e}");
                        }
                    }
                    Err(e) => eprintln!("could not delete the test topology: {e}"),
                }
            });
        })
        .join();
    }
}

fn options(queue: &str, url: &str) -> TransportOptions {
    TransportOptions {
        queue: queue.into(),
        function: "topology-test".into(),
        url: url.into(),
        lease: Duration::from_secs(30),
        max_deliveries: 10,
        poll_interval: Duration::from_millis(50),
    }
}

/// For each example function, `<fn> provision` on a fresh, unique queue name declares exactly
/// the exchange, queues (with their arguments) and binding that definitions.json lists for
/// that function, read back from the broker with `rabbitmqctl export_definitions`.
#[tokio::test]
async fn definitions_file_describes_exactly_what_provision_declares() {
    let file = definitions();
    let dir = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::new(dir.path()).unwrap();
    for function in FUNCTIONS {
        let queue = unique(&format!("defs-{function}"));
        let _cleanup = DeleteOnDrop(options(&queue, &rabbit::url()));
        let bin = function_binary(function).unwrap();
        // Only the transport and the store's file are set: each function refuses `[app]` keys
        // that are not its own.
        let out = Command::new(&bin)
            .args(["--set", &format!("queue={queue}"), "provision"])
            .current_dir(dir.path())
            .env("SLUICE__TRANSPORT__KIND", "rabbitmq")
            .env("SLUICE__TRANSPORT__URL", rabbit::url())
            .env("SLUICE__STORE__URL", sandbox.store_db())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{function} provision: {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );

        let declared = topology_of(&export(), "/", &queue, function);
        let described = topology_of(&file, "/", function, function);
        assert_eq!(
            declared["queues"].as_array().unwrap().len(),
            14,
            "work queue, DLQ and 12 delay steps: {declared:#}"
        );
        assert_eq!(
            declared, described,
            "definitions.json differs from what {function} provision declares"
        );
    }
    // The file holds nothing else.
    let listed: usize = ["queues", "exchanges", "bindings"]
        .iter()
        .map(|k| file[*k].as_array().unwrap().len())
        .sum();
    assert_eq!(listed, FUNCTIONS.len() * (14 + 1 + 1), "{file:#}");
}

/// The file imported into an empty virtual host (its "/" replaced by the test's) is enough for
/// charge-payment with declaring off: payments are charged, retries go through the delay
/// ladder, bad input reaches the DLQ, and the worker creates nothing besides.
#[tokio::test]
async fn imported_definitions_serve_a_worker_that_declares_nothing() {
    const PAYMENTS: u64 = 40;
    let vhost = Vhost::create("defs-import").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::new(dir.path()).unwrap();

    let text = std::fs::read_to_string(definitions_path()).unwrap();
    let moved = text.replace(
        "\"vhost\": \"/\"",
        &format!("\"vhost\": \"{}\"", vhost.name),
    );
    let file = dir.path().join("definitions.json");
    std::fs::write(&file, moved).unwrap();
    rabbitmqctl(&["import_definitions", file.to_str().unwrap()]).expect("import_definitions");
    let imported = queue_names(&vhost.name);
    let expected: BTreeSet<String> = definitions()["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(imported, expected);

    let bin = function_binary("charge-payment").unwrap();
    let run = |args: &[&str], log: &str| -> Command {
        let mut cmd = sandbox.command(&bin, args, log).unwrap();
        cmd.env("SLUICE__TRANSPORT__KIND", "rabbitmq")
            .env("SLUICE__TRANSPORT__URL", &vhost.url)
            .env(env::DECLARE, "false");
        cmd
    };
    let ok = |args: &[&str]| {
        let out = run(args, "cli.log").output().unwrap();
        assert!(
            out.status.success(),
            "charge-payment {args:?}: {:?}",
            out.status
        );
        String::from_utf8(out.stdout).unwrap()
    };
    ok(&[
        "send",
        "--count",
        &PAYMENTS.to_string(),
        r#"{"payment_id":"pay-{{seq}}","amount_cents":700,"currency":"EUR","customer":"c-2"}"#,
    ]);
    ok(&["send", "not json"]);

    let summary = dir.path().join("summary.json");
    let status = run(
        &[
            "--set",
            "app.failure_rate=0.3",
            "--set",
            "retry.immediate=0",
            "--set",
            "retry.base=300ms",
            "--set",
            "retry.cap=600ms",
            "--set",
            "breaker.enabled=false",
            "run",
            "--drain",
            "--summary",
            summary.to_str().unwrap(),
        ],
        "worker.log",
    )
    .status()
    .unwrap();
    assert!(status.success(), "worker: {status:?}");

    let log = std::fs::read_to_string(dir.path().join("worker.log")).unwrap();
    assert!(
        !log.contains("topology is incomplete"),
        "the imported topology is complete:\n{log}"
    );
    let summary: Value = serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap();
    assert!(
        summary["retried"].as_u64().unwrap() > 0,
        "retries went through the delay ladder: {summary}"
    );
    let ledger = ledger_counts(&sandbox.ledger_db()).unwrap();
    assert_eq!(
        (ledger.charges, ledger.distinct_payments),
        (PAYMENTS, PAYMENTS)
    );
    let stats: Value = serde_json::from_str(&ok(&["stats", "--json"])).unwrap();
    assert_eq!(
        (&stats["ready"], &stats["delayed"], &stats["dead_lettered"]),
        (&Value::from(0), &Value::from(0), &Value::from(1)),
        "{stats}"
    );
    assert_eq!(
        queue_names(&vhost.name),
        expected,
        "the worker declared nothing of its own"
    );
}

/// With declaring off and no topology, a handle still opens (so that `provision` can run),
/// and receiving says what is missing and how to fix it.
#[tokio::test]
async fn with_declaring_off_a_missing_topology_is_named() {
    let queue = unique("defs-missing");
    let config = RabbitConfig {
        declare: false,
        ..RabbitConfig::default()
    };
    let t = RabbitTransport::open_with(options(&queue, &rabbit::url()), config)
        .await
        .expect("opens without the topology");
    let err = t
        .receive(1, Duration::from_millis(100))
        .await
        .expect_err("no queue to consume")
        .to_string();
    assert!(err.contains(&queue) && err.contains("provision"), "{err}");
    assert!(
        rabbit::queue_counts(&queue).unwrap().is_none(),
        "nothing was declared"
    );
}

fn queue_names(vhost: &str) -> BTreeSet<String> {
    rabbitmqctl(&[
        "list_queues",
        "-p",
        vhost,
        "-q",
        "--no-table-headers",
        "name",
    ])
    .unwrap()
    .lines()
    .map(|l| l.trim().to_owned())
    .filter(|l| !l.is_empty())
    .collect()
}
