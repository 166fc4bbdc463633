//! A local SQS event source mapping: what the AWS trigger does between an SQS queue and a
//! Lambda function, on a laptop, against moto.
//!
//! - polls the queue (batches of up to 10, long poll), the queue's own visibility timeout;
//! - invokes the function with the SQS event (`ReportBatchItemFailures` semantics);
//! - deletes the records that succeeded, leaves reported failures to their visibility timeout;
//!   an invocation error or timeout leaves the whole batch;
//! - the queue's `RedrivePolicy.maxReceiveCount` moves poison that keeps coming back to the DLQ.
//!
//! By default it serves the Lambda Runtime API itself to the prebuilt function binary (started
//! in Lambda mode, restarted when it dies, as Lambda replaces a crashed execution environment):
//! deterministic and no rebuild. With `--invoke-url` it invokes through `cargo lambda watch`'s
//! invoke endpoint instead (`scripts/lambda.sh watch`, the binary run against its `/.rt`).
//!
//! Needs the AWS environment pointing at moto (`eval "$(scripts/moto.sh start)"`).

use std::{
    collections::HashSet,
    path::PathBuf,
    process::Child,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use clap::Parser;
use serde_json::{json, Value};
use sluice::transport::sqs::{
    aws_sdk_sqs::{
        types::{DeleteMessageBatchRequestEntry, MessageSystemAttributeName, QueueAttributeName},
        Client,
    },
    sdk_config_from_env,
};
use sluice_tests::lambda::{
    lambda_binary, queue_arn, record_template, spawn_lambda, sqs_event, Outcome, RuntimeApi,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser, Debug)]
#[command(about = "A local SQS event source mapping for a Sluice function in Lambda mode")]
struct Args {
    /// The function (its Lambda build is found like the tests find it).
    #[arg(long, default_value = "charge-payment")]
    function: String,
    /// The queue: a name or a URL (created beforehand, with its DLQ: `<fn> provision`).
    #[arg(long)]
    queue: String,
    /// The function binary (default: the Lambda build in the target directory).
    #[arg(long)]
    bin: Option<PathBuf>,
    /// Invoke through this endpoint (`cargo lambda watch`, e.g. http://127.0.0.1:9000) instead
    /// of serving the Runtime API to the binary here.
    #[arg(long)]
    invoke_url: Option<String>,
    /// Records per batch (1..=10, the SQS receive limit).
    #[arg(long, default_value_t = 10)]
    batch: i32,
    /// Long poll seconds (0..=20).
    #[arg(long, default_value_t = 20)]
    wait: i32,
    /// The function's timeout (the invocation deadline).
    #[arg(long, default_value = "30s", value_parser = humantime_parse)]
    timeout: Duration,
    /// Exit once the queue is empty (nothing ready, in flight or delayed).
    #[arg(long)]
    drain: bool,
    /// Give up after this long (with --drain).
    #[arg(long, value_parser = humantime_parse)]
    max_time: Option<Duration>,
    /// Environment for the function, KEY=VALUE (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Where the function's stderr goes.
    #[arg(long, default_value = ".sluice/local-esm.log")]
    log: PathBuf,
}

fn humantime_parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|e| format!("{s:?}: {e}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?}: use ms, s or m")),
    }
}

/// What was done, printed as JSON at the end.
#[derive(Debug, Default, serde::Serialize)]
struct Summary {
    batches: u64,
    records: u64,
    deleted: u64,
    reported_failed: u64,
    invocation_errors: u64,
    restarts: u64,
}

enum Invoker {
    /// The binary here, under our own Runtime API.
    Local {
        api: Box<RuntimeApi>,
        child: Child,
        bin: PathBuf,
        env: Vec<(String, String)>,
        log: PathBuf,
        function: String,
    },
    /// `cargo lambda watch`'s invoke endpoint.
    Watch { url: String, function: String },
}

impl Invoker {
    async fn invoke(&mut self, event: &Value, timeout: Duration, s: &mut Summary) -> Outcome {
        match self {
            Invoker::Local {
                api,
                child,
                bin,
                env,
                log,
                function,
            } => {
                let died = async {
                    loop {
                        if let Ok(Some(status)) = child.try_wait() {
                            return status;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                };
                let outcome = tokio::select! {
                    o = api.invoke(event, timeout) => o.unwrap_or_else(|e| Outcome::Error(json!({"errorMessage": e.to_string()}))),
                    status = died => Outcome::Error(json!({"errorMessage": format!("the function exited ({status})")})),
                };
                // A dead execution environment is replaced, as Lambda does.
                if !matches!(child.try_wait(), Ok(None)) {
                    s.restarts += 1;
                    **api = RuntimeApi::start(function).await.expect("runtime API stub");
                    *child =
                        spawn_lambda(bin, api.addr, function, env, log).expect("restart function");
                }
                outcome
            }
            Invoker::Watch { url, function } => {
                match post_invoke(url, function, event, timeout).await {
                    Ok(v) if v.get("errorType").is_some() || v.get("errorMessage").is_some() => {
                        Outcome::Error(v)
                    }
                    Ok(v) => Outcome::Response(v),
                    Err(e) => Outcome::Error(json!({ "errorMessage": format!("{e:#}") })),
                }
            }
        }
    }
}

/// `POST /2015-03-31/functions/{fn}/invocations` (the Lambda Invoke API `cargo lambda watch`
/// serves), HTTP/1.1 with `Connection: close`.
async fn post_invoke(
    url: &str,
    function: &str,
    event: &Value,
    timeout: Duration,
) -> anyhow::Result<Value> {
    let host = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let body = serde_json::to_vec(event)?;
    let req = format!(
        "POST /2015-03-31/functions/{function}/invocations HTTP/1.1\r\nHost: {host}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let io = async {
        let mut stream = tokio::net::TcpStream::connect(&host).await?;
        stream.write_all(req.as_bytes()).await?;
        stream.write_all(&body).await?;
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await?;
        anyhow::Ok(out)
    };
    let out = tokio::time::timeout(timeout + Duration::from_secs(5), io)
        .await
        .context("invoke timed out")??;
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text.split_once("\r\n\r\n").context("bad HTTP response")?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok(serde_json::from_str(&body).unwrap_or(Value::String(body)))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

async fn queue_counts(client: &Client, url: &str) -> anyhow::Result<u64> {
    let attrs = client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
        .send()
        .await?;
    Ok(attrs
        .attributes()
        .map(|a| a.values().filter_map(|v| v.parse::<u64>().ok()).sum())
        .unwrap_or(0))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !(1..=10).contains(&args.batch) {
        bail!("--batch must be 1..=10 (the SQS receive limit)");
    }
    let client = Client::from_conf(sdk_config_from_env().await?.build());
    let (queue_name, queue_url) = if args.queue.starts_with("http") {
        let name = args.queue.rsplit('/').next().unwrap_or_default().to_owned();
        (name, args.queue.clone())
    } else {
        let url = client
            .get_queue_url()
            .queue_name(&args.queue)
            .send()
            .await
            .with_context(|| format!("queue {:?} (provision it first)", args.queue))?
            .queue_url()
            .unwrap_or_default()
            .to_owned();
        (args.queue.clone(), url)
    };
    let arn = queue_arn(&queue_name);
    let template = record_template();

    let mut invoker = match &args.invoke_url {
        Some(url) => Invoker::Watch {
            url: url.clone(),
            function: args.function.clone(),
        },
        None => {
            let bin = match &args.bin {
                Some(b) => b.clone(),
                None => lambda_binary(&args.function)?,
            };
            let env: Vec<(String, String)> = args
                .env
                .iter()
                .map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .with_context(|| format!("--env {kv:?}: KEY=VALUE"))
                })
                .collect::<anyhow::Result<_>>()?;
            if let Some(dir) = args.log.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let api = RuntimeApi::start(&args.function).await?;
            let child = spawn_lambda(&bin, api.addr, &args.function, &env, &args.log)?;
            api.wait_ready(Duration::from_secs(30)).await?;
            Invoker::Local {
                api: Box::new(api),
                child,
                bin,
                env,
                log: args.log.clone(),
                function: args.function.clone(),
            }
        }
    };

    let started = Instant::now();
    let mut s = Summary::default();
    loop {
        if let Some(max) = args.max_time {
            if started.elapsed() > max {
                eprintln!("local-esm: --max-time reached");
                break;
            }
        }
        let out = client
            .receive_message()
            .queue_url(&queue_url)
            .max_number_of_messages(args.batch)
            .wait_time_seconds(if args.drain {
                args.wait.min(1)
            } else {
                args.wait
            })
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .message_attribute_names("All")
            .send()
            .await?;
        let msgs = out.messages.unwrap_or_default();
        if msgs.is_empty() {
            if args.drain && queue_counts(&client, &queue_url).await? == 0 {
                break;
            }
            continue;
        }
        s.batches += 1;
        s.records += msgs.len() as u64;
        let event = sqs_event(&template, &arn, &msgs);
        let failed: HashSet<String> = match invoker.invoke(&event, args.timeout, &mut s).await {
            Outcome::Response(v) => {
                let ids: HashSet<String> = v["batchItemFailures"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|f| f["itemIdentifier"].as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                s.reported_failed += ids.len() as u64;
                ids
            }
            other => {
                // The whole batch comes back after its visibility timeout.
                s.invocation_errors += 1;
                eprintln!("local-esm: invocation failed, batch left to its visibility: {other:?}");
                msgs.iter()
                    .filter_map(|m| m.message_id().map(str::to_owned))
                    .collect()
            }
        };
        let entries: Vec<DeleteMessageBatchRequestEntry> = msgs
            .iter()
            .enumerate()
            .filter(|(_, m)| !failed.contains(m.message_id().unwrap_or_default()))
            .filter_map(|(i, m)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(m.receipt_handle().unwrap_or_default())
                    .build()
                    .ok()
            })
            .collect();
        if !entries.is_empty() {
            let res = client
                .delete_message_batch()
                .queue_url(&queue_url)
                .set_entries(Some(entries))
                .send()
                .await?;
            s.deleted += res.successful().len() as u64;
            for f in res.failed() {
                eprintln!("local-esm: delete failed: {} {:?}", f.code(), f.message());
            }
        }
        eprintln!(
            "local-esm: batch of {} -> {} failed ({} deleted so far)",
            msgs.len(),
            failed.len(),
            s.deleted
        );
    }
    if let Invoker::Local { mut child, .. } = invoker {
        let _ = child.kill();
        let _ = child.wait();
    }
    println!("{}", serde_json::to_string(&s)?);
    Ok(())
}
