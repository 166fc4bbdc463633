//! The command line every function binary gets, driven as a user would: input from an
//! argument, a file and stdin; JSON output; exit codes; configuration errors naming the key;
//! poison payloads from fault injection.

use std::{
    io::Write,
    path::Path,
    process::{Command, Output, Stdio},
};

use sluice_tests::{function_binary, Sandbox};

const BODY: &str =
    r#"{"payment_id":"p-{{seq}}","amount_cents":700,"currency":"EUR","customer":"c"}"#;

fn run(sandbox: &Sandbox, bin: &Path, args: &[&str]) -> Output {
    sandbox
        .command(bin, args, "cli.log")
        .unwrap()
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

fn ok(sandbox: &Sandbox, bin: &Path, args: &[&str]) -> String {
    let out = run(sandbox, bin, args);
    assert!(out.status.success(), "{args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

fn json(sandbox: &Sandbox, bin: &Path, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ok(sandbox, bin, args)).unwrap()
}

fn setup() -> (tempfile::TempDir, Sandbox, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::new(dir.path()).unwrap();
    (dir, sandbox, function_binary("charge-payment").unwrap())
}

#[test]
fn send_reads_the_body_from_an_argument_a_file_and_stdin() {
    let (_dir, sb, bin) = setup();
    ok(&sb, &bin, &["send", &BODY.replace("{{seq}}", "arg")]);
    let file = sb.dir.join("body.json");
    std::fs::write(&file, BODY.replace("{{seq}}", "file")).unwrap();
    ok(&sb, &bin, &["send", "--file", file.to_str().unwrap()]);
    let mut child = sb
        .command(&bin, &["send"], "cli.log")
        .unwrap()
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(BODY.replace("{{seq}}", "stdin").as_bytes())
        .unwrap();
    assert!(child.wait_with_output().unwrap().status.success());
    let stats = json(&sb, &bin, &["stats", "--json"]);
    assert_eq!(stats["ready"], 3, "{stats}");
    for key in ["in_flight", "delayed", "dead_lettered"] {
        assert_eq!(stats[key], 0, "{stats}");
    }
}

#[test]
fn send_count_fills_the_seq_template_and_a_delayed_send_counts_as_delayed() {
    let (_dir, sb, bin) = setup();
    let out = ok(&sb, &bin, &["send", "--count", "25", BODY]);
    assert!(out.contains("sent 25"), "{out}");
    assert_eq!(json(&sb, &bin, &["stats", "--json"])["ready"], 25);
    let out = ok(
        &sb,
        &bin,
        &["run", "--drain", "--set", "transport.wait=100ms"],
    );
    assert!(out.is_empty(), "run prints nothing on stdout: {out}");
    // 25 distinct payments were charged: the template made each body different.
    let ledger = sluice_tests::ledger_counts(&sb.ledger_db()).unwrap();
    assert_eq!(ledger.distinct_payments, 25);
    ok(
        &sb,
        &bin,
        &["send", "--delay", "1h", &BODY.replace("{{seq}}", "later")],
    );
    let stats = json(&sb, &bin, &["stats", "--json"]);
    assert_eq!(
        (stats["ready"].as_u64(), stats["delayed"].as_u64()),
        (Some(0), Some(1))
    );
}

#[test]
fn poison_rate_corrupts_a_fraction_of_sent_bodies_and_each_is_dead_lettered_with_its_bytes() {
    let (_dir, sb, bin) = setup();
    ok(
        &sb,
        &bin,
        &[
            "send",
            "--count",
            "100",
            "--set",
            "fault.poison_rate=0.3",
            BODY,
        ],
    );
    ok(
        &sb,
        &bin,
        &["run", "--drain", "--set", "transport.wait=100ms"],
    );
    let dlq = json(&sb, &bin, &["dlq", "list", "--limit", "1000", "--json"]);
    let dead = dlq.as_array().unwrap();
    let ledger = sluice_tests::ledger_counts(&sb.ledger_db()).unwrap();
    assert!(
        !dead.is_empty() && dead.len() < 100,
        "about 30 of 100: {}",
        dead.len()
    );
    assert_eq!(
        dead.len() as u64 + ledger.charges,
        100,
        "every message either charged or dead-lettered"
    );
    for d in dead {
        assert_eq!(d["error_class"], "permanent");
        assert_eq!(d["attempts"], 1);
        let hex = d["body_hex"]
            .as_str()
            .expect("a corrupted body is shown as hex");
        assert!(hex.ends_with(
            &"\u{ff}<poison>"
                .bytes()
                .skip(2)
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        ));
        assert!(
            d["last_error"].as_str().unwrap().contains("not UTF-8"),
            "{d}"
        );
    }
}

#[test]
fn dlq_json_and_redrive_filter_by_class_with_dry_run() {
    let (_dir, sb, bin) = setup();
    ok(&sb, &bin, &["send", "this is not json"]);
    ok(&sb, &bin, &["send", &BODY.replace("{{seq}}", "ok")]);
    ok(
        &sb,
        &bin,
        &["run", "--drain", "--set", "transport.wait=100ms"],
    );
    let dlq = json(&sb, &bin, &["dlq", "list", "--json"]);
    let item = &dlq.as_array().unwrap()[0];
    for key in ["id", "attempts", "error_class", "last_error", "body"] {
        assert!(
            item.get(key).is_some(),
            "dlq list --json item has {key}: {item}"
        );
    }
    assert_eq!(item["body"], "this is not json");
    let id = item["id"].as_str().unwrap();
    let shown = json(&sb, &bin, &["dlq", "show", id, "--json"]);
    assert_eq!(shown["id"], id);
    assert_eq!(shown["original_queue"], "charge-payment");

    let transient = json(
        &sb,
        &bin,
        &["redrive", "--error-class", "transient", "--json"],
    );
    assert_eq!(transient.as_array().unwrap().len(), 0, "class filter");
    let dry = json(&sb, &bin, &["redrive", "--dry-run", "--json"]);
    assert_eq!(dry.as_array().unwrap().len(), 1);
    assert_eq!(
        json(&sb, &bin, &["stats", "--json"])["dead_lettered"],
        1,
        "dry run moves nothing"
    );
    let moved = json(
        &sb,
        &bin,
        &["redrive", "--error-class", "permanent", "--json"],
    );
    assert_eq!(moved.as_array().unwrap().len(), 1);
    let stats = json(&sb, &bin, &["stats", "--json"]);
    assert_eq!(
        (stats["ready"].as_u64(), stats["dead_lettered"].as_u64()),
        (Some(1), Some(0))
    );
    assert_eq!(
        json(&sb, &bin, &["dlq", "list", "--json"])
            .as_array()
            .unwrap()
            .len(),
        0
    );
}

#[test]
fn exit_codes_follow_the_documented_table() {
    let (_dir, sb, bin) = setup();
    // 3: not found.
    let out = run(&sb, &bin, &["dlq", "show", "no-such-id"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no dead letter with id no-such-id"));
    // 4: the handler failed under invoke (permanent: zero amount), with the class named.
    let out = run(
        &sb,
        &bin,
        &[
            "invoke",
            r#"{"payment_id":"p","amount_cents":0,"currency":"EUR","customer":"c"}"#,
        ],
    );
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("(permanent)"));
    // 0: invoke prints the handler's output.
    let out = ok(&sb, &bin, &["invoke", &BODY.replace("{{seq}}", "inv")]);
    let receipt: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(receipt["payment_id"], "p-inv");
    // 2: bad configuration, naming the key, from a flag and from the environment.
    let out = run(&sb, &bin, &["stats", "--set", "worker.concurency=2"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        err.contains("worker.concurency") && err.lines().count() == 1,
        "{err}"
    );
    let out = Command::new(&bin)
        .args(["stats"])
        .envs(sb.env())
        .env("SLUICE__RETRY__MAX_DELIVERIES", "many")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("retry.max_deliveries"));
    // 2: usage errors (clap).
    assert_eq!(run(&sb, &bin, &["frobnicate"]).status.code(), Some(2));
}

/// `[app]` is the state initializer's: `run` and `invoke` validate it at start, naming the key
/// (the queue commands do not run the initializer, so they do not read it).
#[test]
fn the_function_section_is_validated_at_start_naming_the_key() {
    let (_dir, sb, bin) = setup();
    for args in [
        &["run", "--drain", "--set", "app.failure_rte=0.5"][..],
        &["invoke", "--set", "app.failure_rte=0.5", "{}"][..],
    ] {
        let out = run(&sb, &bin, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("app.failure_rte"), "{err}");
    }
}

#[test]
fn redrive_rate_paces_the_moves() {
    let (_dir, sb, bin) = setup();
    for i in 0..5 {
        ok(&sb, &bin, &["send", &format!("not json {i}")]);
    }
    ok(
        &sb,
        &bin,
        &["run", "--drain", "--set", "transport.wait=100ms"],
    );
    assert_eq!(json(&sb, &bin, &["stats", "--json"])["dead_lettered"], 5);
    let started = std::time::Instant::now();
    let moved = json(
        &sb,
        &bin,
        &["redrive", "--rate", "10", "--limit", "4", "--json"],
    );
    let took = started.elapsed();
    assert_eq!(
        moved.as_array().unwrap().len(),
        4,
        "the limit holds with a rate"
    );
    // Four moves at 10/s: the 2nd, 3rd and 4th wait 100 ms each.
    assert!(
        took >= std::time::Duration::from_millis(300),
        "paced: {took:?}"
    );
    let stats = json(&sb, &bin, &["stats", "--json"]);
    assert_eq!(
        (stats["ready"].as_u64(), stats["dead_lettered"].as_u64()),
        (Some(4), Some(1))
    );
    let out = run(&sb, &bin, &["redrive", "--rate", "0"]);
    assert_eq!(out.status.code(), Some(2), "a rate of 0 is refused");
}

/// The queue commands open the transport alone: with an idempotency store that cannot be
/// reached and a state initializer that would fail (charge-payment's PostgreSQL ledger on a
/// closed port), `send`, `stats`, `dlq list`, `dlq show` and `redrive` work on the embedded
/// queue; `run` and `invoke`, which need them, fail at start naming what is wrong.
#[test]
fn queue_commands_touch_neither_the_store_nor_the_state_initializer() {
    let (_dir, sb, bin) = setup();
    // Nothing listens on port 9: a connection to it is refused at once.
    let unreachable = [
        "--set",
        "store.kind=postgres",
        "--set",
        "store.url=postgres://nobody@127.0.0.1:9/none",
        "--set",
        "app.ledger=postgres",
    ];
    let with = |args: &[&str]| -> Vec<String> {
        args.iter()
            .chain(unreachable.iter())
            .map(|s| s.to_string())
            .collect()
    };
    fn strs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let id = ok(&sb, &bin, &strs(&with(&["send", "not json"])));
    let stats = json(&sb, &bin, &strs(&with(&["stats", "--json"])));
    assert_eq!(stats["ready"], 1);
    assert_eq!(
        json(&sb, &bin, &strs(&with(&["dlq", "list", "--json"]))),
        serde_json::json!([])
    );
    let out = run(&sb, &bin, &strs(&with(&["dlq", "show", id.trim()])));
    assert_eq!(
        out.status.code(),
        Some(3),
        "not found, not a store error: {out:?}"
    );
    let moved = json(&sb, &bin, &strs(&with(&["redrive", "--dry-run", "--json"])));
    assert_eq!(moved, serde_json::json!([]));
    for args in [with(&["run", "--drain"]), with(&["invoke", BODY])] {
        let out = run(&sb, &bin, &strs(&args));
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("start-up") || stderr.contains("postgres"),
            "{args:?}: {stderr}"
        );
    }
    // The message is still there, untouched.
    assert_eq!(json(&sb, &bin, &["stats", "--json"])["ready"], 1);
}

/// `invoke --file event.json` takes a Lambda SQS event: every record through the handler, the
/// partial batch response on stdout (transient failures reported, permanent ones not: Lambda
/// mode dead-letters those), one line per record on stderr; exit 4 when a record failed.
#[test]
fn invoke_runs_each_record_of_an_sqs_event_and_prints_the_batch_response() {
    let (_dir, sb, bin) = setup();
    let fixture = sluice_tests::fixture("sqs-event.json");
    let fixture = fixture.to_str().unwrap();
    let out = run(&sb, &bin, &["invoke", "--file", fixture]);
    assert!(out.status.success(), "{out:?}");
    let response: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(response, serde_json::json!({ "batchItemFailures": [] }));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches(": ok ").count(), 2, "{stderr}");
    assert_eq!(
        sluice_tests::ledger_counts(&sb.ledger_db())
            .unwrap()
            .charges,
        2
    );

    // One record the handler rejects (permanent), one the gateway cannot take (transient).
    let mut event: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    event["Records"][0]["messageId"] = "rejected".into();
    event["Records"][0]["body"] = sluice_tests::charge_body("zero", 0).into();
    event["Records"][1]["messageId"] = "unreachable".into();
    event["Records"][1]["body"] = sluice_tests::charge_body("later", 700).into();
    let file = sb.dir.join("event.json");
    std::fs::write(&file, event.to_string()).unwrap();
    let file = file.to_str().unwrap();
    let out = run(
        &sb,
        &bin,
        &["invoke", "--file", file, "--set", "app.failure_rate=1"],
    );
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let response: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        response,
        serde_json::json!({ "batchItemFailures": [{ "itemIdentifier": "unreachable" }] })
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("record rejected: permanent"), "{stderr}");
    assert!(stderr.contains("record unreachable: transient"), "{stderr}");
    assert_eq!(
        sluice_tests::ledger_counts(&sb.ledger_db())
            .unwrap()
            .charges,
        2
    );
}

/// Sends SIGINT, as Ctrl-C in a terminal does.
fn sigint(child: &std::process::Child) {
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn stats_tells_the_oldest_ready_age_and_it_grows_while_the_message_waits() {
    let (_dir, sb, bin) = setup();
    let stats = json(&sb, &bin, &["stats", "--json"]);
    assert_eq!(stats["oldest_ready_age_s"], 0.0, "an empty queue: {stats}");
    assert!(stats.get("oldest_ready_age_unknown").is_none(), "{stats}");
    ok(&sb, &bin, &["send", &BODY.replace("{{seq}}", "old")]);
    let age = |sb: &Sandbox| {
        json(sb, &bin, &["stats", "--json"])["oldest_ready_age_s"]
            .as_f64()
            .unwrap()
    };
    let first = age(&sb);
    crate::support::poll_blocking(
        std::time::Duration::from_secs(10),
        "the age to grow",
        || (age(&sb) > first).then_some(()),
    );
    let table = ok(&sb, &bin, &["stats"]);
    assert!(
        table.lines().any(|l| l.starts_with("oldest_ready   ")),
        "{table}"
    );
}

#[test]
fn stats_watch_prints_a_reading_a_line_until_ctrl_c() {
    use std::io::BufRead;

    let (_dir, sb, bin) = setup();
    let mut watch = sb
        .command(
            &bin,
            &["stats", "--watch", "--interval", "100ms", "--json"],
            "cli.log",
        )
        .unwrap()
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(watch.stdout.take().unwrap()).lines();
    let mut next = || -> serde_json::Value {
        serde_json::from_str(&lines.next().expect("a reading").unwrap()).unwrap()
    };
    let first = next();
    assert_eq!(first["ready"], 0, "{first}");
    assert!(first["at"].is_string(), "{first}");
    ok(&sb, &bin, &["send", &BODY.replace("{{seq}}", "watched")]);
    // Each later reading is a new line; one of them sees the message.
    let seen = (0..200).map(|_| next()).find(|r| r["ready"] == 1);
    assert!(seen.is_some(), "the watch never saw the message");
    sigint(&watch);
    let status = watch.wait().unwrap();
    assert!(
        status.success(),
        "Ctrl-C ends the watch cleanly: {status:?}"
    );

    // To a pipe without --json: one line a reading.
    let mut watch = sb
        .command(
            &bin,
            &["stats", "--watch", "--interval", "100ms"],
            "cli.log",
        )
        .unwrap()
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Kept open until the watch has ended: a closed pipe would end it first.
    let mut lines = std::io::BufReader::new(watch.stdout.take().unwrap()).lines();
    let line = lines.next().unwrap().unwrap();
    assert!(
        line.contains("ready=1 ") && line.contains("oldest_ready="),
        "{line}"
    );
    sigint(&watch);
    assert!(watch.wait().unwrap().success());
    drop(lines);

    // A watch interval below 100 ms, or an interval without --watch, is bad usage.
    for args in [
        &["stats", "--watch", "--interval", "10ms"][..],
        &["stats", "--interval", "2s"][..],
    ] {
        assert_eq!(run(&sb, &bin, args).status.code(), Some(2), "{args:?}");
    }
}
