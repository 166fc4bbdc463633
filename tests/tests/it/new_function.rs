//! `sluice-infra new` (what `just new-function` runs) in a copy of the repository, as a new
//! user would use it: the function it writes builds without warnings, passes its
//! own unit tests, and works on the embedded queue (a good message succeeds, a rejected one is
//! dead-lettered with its reason, `invoke` prints the output); its deploy files are written
//! and in step. Names that cannot be a function are refused, with the reason and exit 2, and
//! leave nothing behind.
//!
//! Needs the `sluice-infra` binary (`cargo build -p sluice-infra`; `just test` builds it) and
//! cargo with clippy. The copy is built with this test's own target directory, so whatever an
//! earlier build compiled with the same features is reused (cargo hashes path crates by their
//! place in the workspace, so that holds for the copy's `sluice` too); the first run compiles
//! `sluice` and a few dependencies once for the new function's feature set. The copy stays under
//! `target/tmp/new-function/` for a look after a failure; a lock there makes runs that share the
//! target directory take turns, as they build and run the same `target/debug/thumbnail`.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use sluice_tests::function_binary;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The target directory this test was built in (`<target>/debug/deps/<test>`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors()
        .nth(3)
        .expect("the test runs from <target>/<profile>/deps")
        .to_path_buf()
}

/// Copies every tracked file (`git ls-files`, as they are in the working tree) to `to`.
fn copy_repository(to: &Path) {
    let out = Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(out.status.success(), "git ls-files: {out:?}");
    let mut copied = 0;
    for path in out.stdout.split(|b| *b == 0).filter(|p| !p.is_empty()) {
        let path = std::str::from_utf8(path).unwrap();
        let from = repo().join(path);
        if !from.is_file() {
            continue; // deleted in the working tree, not yet in the index
        }
        let target = to.join(path);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(&from, &target).unwrap();
        copied += 1;
    }
    assert!(copied > 50, "copied only {copied} files");
}

fn show(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn sluice_infra(root: &Path, args: &[&str]) -> Output {
    Command::new(function_binary("sluice-infra").unwrap())
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .unwrap()
}

/// `cargo <args>` in the copy, with this test's target directory; panics with the output
/// unless it succeeds; returns it.
fn cargo(root: &Path, args: &[&str]) -> Output {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(root)
        .env("CARGO_TARGET_DIR", target_dir())
        .output()
        .unwrap();
    assert!(out.status.success(), "cargo {args:?}: {}", show(&out));
    out
}

/// The compiler's warnings in cargo's output (the `warning: ...` lines).
fn warnings(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("warning"))
        .map(str::to_owned)
        .collect()
}

/// Runs the new function's binary on a queue and store in `state`.
fn function(bin: &Path, state: &Path, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .env("SLUICE__TRANSPORT__KIND", "embedded")
        .env("SLUICE__TRANSPORT__URL", state.join("queue.db"))
        .env("SLUICE__STORE__URL", state.join("idempotency.db"))
        .output()
        .unwrap()
}

fn ok(bin: &Path, state: &Path, args: &[&str]) -> String {
    let out = function(bin, state, args);
    assert!(out.status.success(), "{args:?}: {}", show(&out));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_new_function_builds_and_works_on_the_embedded_queue() {
    let place = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("new-function");
    std::fs::create_dir_all(&place).unwrap();
    // Held to the end of the test: one run at a time uses the copy and its build outputs.
    let lock = std::fs::File::create(place.join("lock")).unwrap();
    lock.lock().unwrap();
    let root = place.join("repo");
    if root.exists() {
        std::fs::remove_dir_all(&root).unwrap();
    }
    copy_repository(&root);

    let out = sluice_infra(&root, &["new", "thumbnail"]);
    assert!(out.status.success(), "{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in [
        "created functions/thumbnail/Cargo.toml",
        "created functions/thumbnail/sluice.toml",
        "created functions/thumbnail/src/main.rs",
        "wrote infra/aws/thumbnail.json",
        "wrote infra/k8s/thumbnail/rabbitmq/deployment.yaml",
        "wrote infra/k8s/thumbnail/sqs/scaledobject.yaml",
        "wrote infra/rabbitmq/definitions.json",
        "cargo run -p thumbnail -- run --drain",
        "cargo run -p thumbnail -- dlq list",
        "just local-lambda thumbnail --drain",
    ] {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}");
    }
    // The files it wrote are the ones `generate` writes: nothing drifted.
    let check = sluice_infra(&root, &["check"]);
    assert!(check.status.success(), "{}", show(&check));
    let definitions =
        std::fs::read_to_string(root.join("infra/rabbitmq/definitions.json")).unwrap();
    assert!(definitions.contains("\"thumbnail.dlq\""), "{definitions}");

    let build = cargo(&root, &["build", "--offline", "-p", "thumbnail"]);
    assert_eq!(warnings(&build), Vec::<String>::new(), "{}", show(&build));
    // Not clippy here: in a workspace of its own it would check every dependency again for
    // this feature set (most of a minute of CI); rustc's warnings are checked above and below.
    let test = cargo(&root, &["test", "--offline", "-p", "thumbnail"]);
    assert_eq!(warnings(&test), Vec::<String>::new(), "{}", show(&test));
    let test_out = String::from_utf8_lossy(&test.stdout);
    assert!(test_out.contains("test result: ok. 4 passed"), "{test_out}");

    let bin = target_dir().join("debug/thumbnail");
    let state = tempfile::tempdir().unwrap();
    let state = state.path();
    let good = r#"{"id":"job-1","item":"hello"}"#;
    let rejected = r#"{"id":"job-2","item":"rejected"}"#;
    let good_id = ok(&bin, state, &["send", good]);
    let rejected_id = ok(&bin, state, &["send", rejected]);
    assert_ne!(good_id.trim(), rejected_id.trim());
    let summary = state.join("summary.json");
    ok(
        &bin,
        state,
        &["run", "--drain", "--summary", summary.to_str().unwrap()],
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(summary["succeeded"], 1, "{summary}");
    assert_eq!(summary["dead_lettered"], 1, "{summary}");

    let stats: serde_json::Value =
        serde_json::from_str(&ok(&bin, state, &["stats", "--json"])).unwrap();
    assert_eq!(stats["ready"], 0, "{stats}");
    assert_eq!(stats["dead_lettered"], 1, "{stats}");
    let dlq: serde_json::Value =
        serde_json::from_str(&ok(&bin, state, &["dlq", "list", "--json"])).unwrap();
    let dlq = dlq.as_array().unwrap();
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    let dead = &dlq[0];
    assert_eq!(dead["id"], rejected_id.trim(), "{dead}");
    assert_eq!(dead["error_class"], "permanent", "{dead}");
    assert_eq!(dead["last_error"], "downstream rejected item \"rejected\"");
    assert_eq!(dead["body"], rejected, "{dead}");
    assert_eq!(dead["attempts"], 1, "{dead}");

    let output: serde_json::Value = serde_json::from_str(&ok(
        &bin,
        state,
        &["invoke", r#"{"id":"job-3","item":"hi"}"#],
    ))
    .unwrap();
    assert_eq!(output, serde_json::json!({"id": "job-3", "result": "HI"}));
    let failed = function(&bin, state, &["invoke", r#"{"id":"job-4","item":"busy"}"#]);
    assert_eq!(failed.status.code(), Some(4), "{}", show(&failed));
    assert!(
        String::from_utf8_lossy(&failed.stderr).contains("(retry_after): downstream is busy"),
        "{}",
        show(&failed)
    );
}

#[test]
fn names_that_cannot_be_a_function_are_refused_with_the_reason_and_nothing_is_written() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    copy_repository(root);
    let before = files(root);
    let long = "a".repeat(77);
    for (name, reason) in [
        ("charge-payment", "functions/charge-payment already exists"),
        (
            "sluice",
            "the workspace already has a package named \"sluice\"",
        ),
        ("Thumbnail_1", "it contains 'T', '_'"),
        ("9lives", "it must start with a letter"),
        ("thumb.nail", "it contains '.'"),
        ("fn", "\"fn\" is a Rust keyword"),
        (long.as_str(), "its SQS dead-letter queue `aaaa"),
        (long.as_str(), "would be 81, and SQS allows 80"),
        ("", "the name is empty"),
    ] {
        let out = sluice_infra(root, &["new", name]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name:?}: {}", show(&out));
        assert!(
            stderr.contains(&format!("cannot create function {name:?}")),
            "{name:?}: {stderr}"
        );
        assert!(stderr.contains(reason), "{name:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{name:?}: {}", show(&out));
    }
    assert_eq!(files(root), before, "a refused name changed the copy");
}

/// Every file under `root`, with its contents.
fn files(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                let contents = std::fs::read(&path).unwrap();
                out.insert(path.strip_prefix(root).unwrap().to_path_buf(), contents);
            }
        }
    }
    out
}
