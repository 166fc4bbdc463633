//! Secrets never leak: a worker, the CLI and failing starts, with a password in every URL
//! (RabbitMQ, PostgreSQL, Redis), and the password in no log line (at `debug`), no error, no
//! `--help` and no run summary. Needs RabbitMQ, PostgreSQL and Redis (`scripts/services.sh
//! postgres redis rabbitmq`): the PostgreSQL server trusts local connections and Redis' default
//! user has no password, so both accept any password; RabbitMQ gets a user of the test's own.

use std::process::Output;

use sluice::conformance::unique;
use sluice_tests::rabbit::{rabbitmqctl, Vhost};

use crate::support::{FunctionRun, CHARGE_TEMPLATE};

/// Passwords no other text contains.
const RABBIT_PW: &str = "rmq-Pw-7f3a9c";
const POSTGRES_PW: &str = "pg-Pw-2b8e41";
const REDIS_PW: &str = "rds-Pw-91d0c6";

/// A RabbitMQ user of the test's own, with all permissions on `vhost`; deleted on drop.
struct User(String);

impl User {
    fn create(vhost: &Vhost) -> Self {
        let name = unique("secrets");
        rabbitmqctl(&["add_user", &name, RABBIT_PW]).expect("add a user");
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &vhost.name,
            &name,
            ".*",
            ".*",
            ".*",
        ])
        .expect("permissions");
        Self(name)
    }
}

impl Drop for User {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&["delete_user", &self.0]);
    }
}

/// Everything a command printed.
fn printed(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_no_password(what: &str, text: &str) {
    for pw in [RABBIT_PW, POSTGRES_PW, REDIS_PW] {
        assert!(!text.contains(pw), "{what} shows a password: {text}");
    }
}

/// `postgres://` and `amqp://` URLs of the test's servers, with passwords.
fn urls(vhost: &Vhost, user: &User) -> (String, String) {
    let pg =
        sluice_tests::postgres_url().replacen("://root@", &format!("://root:{POSTGRES_PW}@"), 1);
    assert!(
        pg.contains(POSTGRES_PW),
        "SLUICE_TEST_POSTGRES_URL is postgres://root@...: {pg}"
    );
    let path = vhost.url.rsplit_once('/').expect("a vhost path").1;
    let amqp = format!("amqp://{}:{RABBIT_PW}@127.0.0.1:5672/{path}", user.0);
    (pg, amqp)
}

#[tokio::test]
async fn no_password_shows_in_logs_errors_help_or_summaries() {
    let vhost = Vhost::create("secrets").expect("a test virtual host (is RabbitMQ up?)");
    let user = User::create(&vhost);
    let (pg, amqp) = urls(&vhost, &user);
    let queue = unique("secrets");
    let run = FunctionRun::new("charge-payment")
        .env("SLUICE__TRANSPORT__KIND", "rabbitmq")
        .env("SLUICE__TRANSPORT__URL", &amqp)
        .env("SLUICE__STORE__KIND", "postgres")
        .env("SLUICE__STORE__URL", &pg)
        .env("SLUICE__TELEMETRY__LOG_LEVEL", "debug")
        .set(format!("queue={queue}"));

    // Payment ids of this run only: the PostgreSQL store outlives it.
    let template = CHARGE_TEMPLATE.replace("pay-", &format!("{}-", unique("sec")));
    // The CLI, help included (clap shows the values of settings taken from the environment).
    let mut seen = Vec::new();
    for args in [
        vec!["--help"],
        vec!["run", "--help"],
        vec!["send", "--help"],
        vec!["provision"],
        vec!["send", "--count", "5", template.as_str()],
        vec!["stats"],
        vec!["stats", "--json"],
        vec!["dlq", "list"],
    ] {
        let out = run.command(&args, "cli.log").output().expect("run the CLI");
        assert!(out.status.success(), "{args:?}: {}", run.log("cli.log"));
        assert_no_password(&format!("{args:?}"), &printed(&out));
        seen.push(args);
    }

    // A worker that works the messages and writes its summary.
    let summary = run.path("summary.json");
    let summary_arg = summary.display().to_string();
    let out = run
        .command(&["run", "--drain", "--summary", &summary_arg], "worker.log")
        .output()
        .expect("run the worker");
    assert!(out.status.success(), "{}", run.log("worker.log"));
    assert_eq!(
        run.ledger().charges,
        5,
        "the worker worked: {}",
        std::fs::read_to_string(&summary).unwrap_or_default()
    );
    assert_no_password("the worker's output", &printed(&out));
    // Logs go to stderr, which the run keeps in files.
    assert_no_password("the CLI's logs", &run.log("cli.log"));
    let log = run.log("worker.log");
    assert!(
        log.contains("DEBUG") || log.contains("debug"),
        "debug logs: {log}"
    );
    assert_no_password("the worker's logs", &log);
    assert_no_password("the summary", &std::fs::read_to_string(&summary).unwrap());

    // No function binary carries the Redis store: it is opened as a function's runtime opens
    // it, with the password, working and failing.
    use sluice::{
        store::{redis::RedisStore, Token},
        IdempotencyStore,
    };
    let redis = sluice_tests::redis_url().replacen("://", &format!("://default:{REDIS_PW}@"), 1);
    let store = RedisStore::open(&redis, 1024)
        .await
        .expect("Redis accepts any password");
    store.release("secrets-never-claimed", Token(0)).await.ok();
    let closed = crate::support::free_port();
    let down = format!("redis://default:{REDIS_PW}@127.0.0.1:{closed}/0");
    match RedisStore::open(&down, 1024).await {
        Ok(store) => {
            let err = store
                .release("k", Token(0))
                .await
                .expect_err("nothing listens");
            assert_no_password("a Redis error", &format!("{} {err:?}", err.report()));
        }
        Err(err) => assert_no_password("a Redis error", &format!("{} {err:?}", err.report())),
    }

    // Failing starts: a wrong password, servers that are not there, a URL that does not parse.
    let wrong = amqp.replace(RABBIT_PW, &format!("{RABBIT_PW}x"));
    let failing: [(&str, &str, &str, &str); 4] = [
        ("rabbitmq", &wrong, "sqlite", ""),
        (
            "rabbitmq",
            &format!("amqp://u:{RABBIT_PW}@127.0.0.1:{closed}/%2f"),
            "sqlite",
            "",
        ),
        (
            "embedded",
            "",
            "postgres",
            &format!("postgres://root:{POSTGRES_PW}@127.0.0.1:{closed}/test"),
        ),
        (
            "rabbitmq",
            &format!("amqp://u:{RABBIT_PW}@127.0.0.1:notaport/%2f"),
            "sqlite",
            "",
        ),
    ];
    for (kind, url, store, store_url) in failing {
        let mut f = FunctionRun::new("charge-payment")
            .env("SLUICE__TRANSPORT__KIND", kind)
            .env("SLUICE__STORE__KIND", store)
            .env("SLUICE__TELEMETRY__LOG_LEVEL", "debug")
            .set(format!("queue={queue}"));
        if !url.is_empty() {
            f = f.env("SLUICE__TRANSPORT__URL", url);
        }
        if !store_url.is_empty() {
            f = f.env("SLUICE__STORE__URL", store_url);
        }
        // `stats` opens the transport only. (A broker that is not there is retried for the
        // reconnect budget, about 13 s: `run` alone shows what that says.)
        let commands = if kind == "rabbitmq" && !url.contains(&format!(":{closed}/")) {
            vec![vec!["run", "--drain"], vec!["stats"]]
        } else {
            vec![vec!["run", "--drain"]]
        };
        for args in commands {
            let log = format!("fail-{}.log", args[0]);
            let out = f.command(&args, &log).output().expect("run");
            assert!(
                !out.status.success(),
                "{kind} {url} {store_url} {args:?} must fail"
            );
            let text = format!("{}{}", printed(&out), f.log(&log));
            assert!(!text.trim().is_empty(), "it says why");
            assert_no_password(&format!("{kind}/{store} {args:?}"), &text);
        }
    }
    eprintln!(
        "secrets: {} CLI commands, a worker, the Redis store, 4 failing starts checked",
        seen.len()
    );
}
