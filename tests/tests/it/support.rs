//! What the test modules share and only tests need: a function binary run as a user runs it
//! ([`FunctionRun`]), waiting for processes, polling without async, the raw clients a test
//! uses to look behind Sluice's back, and the conformance suites as one test per check
//! ([`store_conformance!`], [`transport_conformance!`]). They panic on failure, as the tests
//! around them do. What the demo, the benchmarks and `local-esm` share as well is in the
//! library (`sluice_tests`).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use sluice::conformance::poll_until;
use sluice_tests::{function_binary, ledger_counts, LedgerCounts, Sandbox};

/// A charge request template for `send --count N`: `{{seq}}` becomes 1..=N, so each message
/// is a distinct payment; sending it twice sends every payment twice.
pub const CHARGE_TEMPLATE: &str =
    r#"{"payment_id":"pay-{{seq}}","amount_cents":1000,"currency":"EUR","customer":"c-1"}"#;

/// A loopback port nothing listens on (the moment it is returned).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("its address")
        .port()
}

/// Waits for `child` to exit; kills it and fails the test after `timeout` (naming `log`, where
/// the process wrote why it hangs, when there is one).
pub async fn wait_exit(child: &mut Child, timeout: Duration, log: Option<&Path>) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            match log {
                Some(log) => panic!(
                    "the process did not exit within {timeout:?}; see {}",
                    log.display()
                ),
                None => panic!("the process did not exit within {timeout:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends SIGTERM to `child`, as a container runtime does to stop it.
pub fn sigterm(child: &Child) {
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .stdout(Stdio::null())
        .status()
        .expect("run kill");
    assert!(term.success(), "kill -TERM {}", child.id());
}

/// A child process killed (and reaped) when the test ends, also when it fails.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `f` every 25 ms until it returns `Some`, failing the test with `what` after
/// `timeout`: [`poll_until`] for tests that do not run on an async runtime (or whose checks
/// block anyway: HTTP with std, `rabbitmqctl`).
pub fn poll_blocking<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The value of the sample of `name` whose labels include every one of `labels`, in a
/// Prometheus text exposition (`/metrics`); `None` when there is none.
pub fn metric_sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let (set, value) = match rest.strip_prefix('{') {
            Some(r) => r.split_once("} ")?,
            None => ("", rest.strip_prefix(' ')?),
        };
        let pairs: Vec<&str> = set.split(',').collect();
        labels
            .iter()
            .all(|(k, v)| pairs.contains(&format!("{k}=\"{v}\"").as_str()))
            .then(|| value.trim().parse().ok())?
    })
}

/// Messages a queue still holds to be worked, from `stats --json`: ready, in flight and
/// delayed (dead letters are not counted).
pub fn pending(stats: &serde_json::Value) -> u64 {
    ["ready", "in_flight", "delayed"]
        .iter()
        .map(|k| {
            stats[k]
                .as_u64()
                .unwrap_or_else(|| panic!("{k} in {stats}"))
        })
        .sum()
}

/// A function binary run as a user runs it: its queue, store and ledger files in a temporary
/// directory of its own (a [`Sandbox`], removed with the run), plus the environment and the
/// `--set` overrides every command of the run gets (the transport of a test, its queue).
pub struct FunctionRun {
    /// Where the run's files are.
    pub sandbox: Sandbox,
    /// The function binary.
    pub bin: PathBuf,
    env: Vec<(String, String)>,
    sets: Vec<String>,
    _dir: tempfile::TempDir,
}

impl FunctionRun {
    /// A run of the debug build of `function` (`cargo build -p <function>`).
    pub fn new(function: &str) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        Self {
            sandbox: Sandbox::new(dir.path()).expect("a sandbox"),
            bin: function_binary(function).expect("the function binary"),
            env: Vec::new(),
            sets: Vec::new(),
            _dir: dir,
        }
    }

    /// Every command gets `key=value` in its environment (over the sandbox's own variables).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Every command gets `--set <key_value>` before its own arguments.
    pub fn set(mut self, key_value: impl Into<String>) -> Self {
        self.sets.push(key_value.into());
        self
    }

    /// `<function> [--set ...] <args>`, logs appended to `log` in the sandbox.
    pub fn command(&self, args: &[&str], log: &str) -> Command {
        let mut full: Vec<&str> = Vec::new();
        for s in &self.sets {
            full.extend(["--set", s.as_str()]);
        }
        full.extend_from_slice(args);
        let mut cmd = self
            .sandbox
            .command(&self.bin, &full, log)
            .expect("the log file");
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd
    }

    /// Runs a command to completion; fails the test unless it succeeds; returns its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self.command(args, "cli.log").output().expect("run the CLI");
        assert!(
            out.status.success(),
            "{} {args:?} failed ({:?}); see {}",
            self.bin.display(),
            out.status,
            self.path("cli.log").display()
        );
        String::from_utf8(out.stdout).expect("UTF-8 output")
    }

    /// [`cli`](Self::cli), its output parsed as JSON.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.cli(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?} printed {out:?}: {e}"))
    }

    /// `stats --json`.
    pub fn stats(&self) -> serde_json::Value {
        self.json(&["stats", "--json"])
    }

    /// `run <extra>` in the background (stdout discarded), logs appended to `log`.
    pub fn worker(&self, extra: &[&str], log: &str) -> Child {
        let mut args = vec!["run"];
        args.extend_from_slice(extra);
        self.command(&args, log)
            .stdout(Stdio::null())
            .spawn()
            .expect("start the worker")
    }

    /// charge-payment's ledger.
    pub fn ledger(&self) -> LedgerCounts {
        ledger_counts(&self.sandbox.ledger_db()).expect("read the ledger")
    }

    /// A file of the sandbox (a log, a summary).
    pub fn path(&self, name: &str) -> PathBuf {
        self.sandbox.dir.join(name)
    }

    /// A log of the sandbox (empty if it was not written).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    /// Waits until the ledger holds at least `n` charges; fails the test with `what` after
    /// `timeout`.
    pub async fn charges_at_least(&self, n: u64, timeout: Duration, what: &str) {
        poll_until(timeout, what, || async {
            (self.ledger().charges >= n).then_some(())
        })
        .await;
    }
}

/// A raw SDK client on moto (failing the test unless the AWS endpoint is moto), for what a
/// test does behind Sluice's back: forged attributes, bare queues, receiving as Lambda would.
#[cfg(feature = "sqs")]
pub async fn sqs_client() -> sluice::transport::sqs::aws_sdk_sqs::Client {
    use sluice::transport::sqs::{aws_sdk_sqs::Client, sdk_config_from_env};
    sluice_tests::moto("SQS");
    Client::from_conf(sdk_config_from_env().await.expect("sdk config").build())
}

/// A plain connection to the test server (`SLUICE_TEST_POSTGRES_URL`), outside any store, to
/// set up and to look.
#[cfg(feature = "postgres")]
pub async fn postgres_client() -> sluice::store::postgres::tokio_postgres::Client {
    use sluice::store::postgres::tokio_postgres;
    let (client, conn) =
        tokio_postgres::connect(&sluice_tests::postgres_url(), tokio_postgres::NoTls)
            .await
            .expect("connect to postgres (is it up? scripts/services.sh postgres)");
    tokio::spawn(conn);
    client
}
/// The idempotency store conformance suite (`sluice::conformance::store`) as one test per
/// check, in the calling module. `$make` names an `async fn() -> S` that opens a new handle
/// (its own connections) on the same store each call.
macro_rules! store_conformance {
    ($make:path) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn claim_race_has_exactly_one_winner() {
            ::sluice::conformance::store::claim_race_has_exactly_one_winner($make).await;
        }

        #[tokio::test]
        async fn completed_record_replays_the_output() {
            ::sluice::conformance::store::completed_record_replays_the_output($make).await;
        }

        #[tokio::test]
        async fn live_lease_reports_in_progress() {
            ::sluice::conformance::store::live_lease_reports_in_progress($make).await;
        }

        #[tokio::test]
        async fn expired_lease_is_taken_over_and_the_old_token_is_stale() {
            ::sluice::conformance::store::expired_lease_is_taken_over_and_the_old_token_is_stale(
                $make,
            )
            .await;
        }

        #[tokio::test]
        async fn fingerprint_mismatch_is_reported() {
            ::sluice::conformance::store::fingerprint_mismatch_is_reported($make).await;
        }

        #[tokio::test]
        async fn record_ttl_expires() {
            ::sluice::conformance::store::record_ttl_expires($make).await;
        }

        #[tokio::test]
        async fn release_lets_the_key_be_claimed_again() {
            ::sluice::conformance::store::release_lets_the_key_be_claimed_again($make).await;
        }

        #[tokio::test]
        async fn extend_keeps_the_lease() {
            ::sluice::conformance::store::extend_keeps_the_lease($make).await;
        }

        #[tokio::test]
        async fn oversized_output_is_refused() {
            ::sluice::conformance::store::oversized_output_is_refused($make).await;
        }

        #[tokio::test]
        async fn odd_keys_are_safe_and_distinct() {
            ::sluice::conformance::store::odd_keys_are_safe_and_distinct($make).await;
        }

        #[tokio::test]
        async fn claim_many_answers_like_single_claims() {
            ::sluice::conformance::store::claim_many_answers_like_single_claims($make).await;
        }
    };
}
pub(crate) use store_conformance;

/// The transport conformance suite (`sluice::conformance::transport`) as one test per check,
/// in the calling module. In each test `$check` is bound to the check, a function of one
/// argument (the transport's `make`: `TransportOptions` in, a new handle on `opts.queue` out)
/// that `$body` calls and awaits, with what the transport needs around it (setup, cleanup).
/// `$rounding` is how much earlier than asked the transport may deliver a retry (its delay
/// granularity).
macro_rules! transport_conformance {
    (rounding: $rounding:expr, racing: $racing:expr, |$check:ident| $body:block) => {
        #[tokio::test]
        async fn ack_removes_the_message() {
            let $check = ::sluice::conformance::transport::ack_removes_the_message;
            $body
        }

        #[tokio::test]
        async fn retry_after_hides_the_message_until_the_delay() {
            let $check = |make| {
                ::sluice::conformance::transport::retry_after_hides_the_message_until_the_delay(
                    make, $rounding,
                )
            };
            $body
        }

        #[tokio::test]
        async fn dead_letter_keeps_bytes_and_history() {
            let $check = ::sluice::conformance::transport::dead_letter_keeps_bytes_and_history;
            $body
        }

        #[tokio::test]
        async fn crash_loop_guard_dead_letters_after_max_deliveries() {
            let $check =
                ::sluice::conformance::transport::crash_loop_guard_dead_letters_after_max_deliveries;
            $body
        }

        #[tokio::test]
        async fn expired_lease_redelivers_and_stale_holder_cannot_settle() {
            let $check =
                ::sluice::conformance::transport::expired_lease_redelivers_and_stale_holder_cannot_settle;
            $body
        }

        #[tokio::test]
        async fn extend_keeps_the_message_leased() {
            let $check = ::sluice::conformance::transport::extend_keeps_the_message_leased;
            $body
        }

        #[tokio::test]
        async fn release_returns_the_message_at_once() {
            let $check = ::sluice::conformance::transport::release_returns_the_message_at_once;
            $body
        }

        #[tokio::test]
        async fn redrive_moves_dead_letters_back_with_attempts_reset() {
            let $check =
                ::sluice::conformance::transport::redrive_moves_dead_letters_back_with_attempts_reset;
            $body
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn concurrent_consumers_never_share_a_lease() {
            let $check = |make| {
                ::sluice::conformance::transport::concurrent_consumers_never_share_a_lease(
                    make, $racing,
                )
            };
            $body
        }

        #[tokio::test]
        async fn stats_count_each_state() {
            let $check = ::sluice::conformance::transport::stats_count_each_state;
            $body
        }
    };
}
pub(crate) use transport_conformance;
