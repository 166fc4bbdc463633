//! Lambda helpers: a stub of the Lambda Runtime API (the small HTTP API a function binary
//! polls under Lambda), the function binary started in Lambda mode against it, and SQS events
//! built from real messages received from moto (so receipt handles are real).
//!
//! The stub serves `GET /2018-06-01/runtime/invocation/next` with the invocation headers
//! (`Lambda-Runtime-Aws-Request-Id`, `Lambda-Runtime-Deadline-Ms`,
//! `Lambda-Runtime-Invoked-Function-Arn`) and records what the function POSTs to
//! `/invocation/{id}/response`, `/invocation/{id}/error` and `/init/error`. It also notes when
//! the first `/next` arrived: the cold-start init time (process start -> first `/next`).

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};

/// The target triple the Lambda flavour of the function binaries is built for, so that build
/// lands beside (not over) the host build in the target directory.
pub const LAMBDA_TARGET: &str = "x86_64-unknown-linux-gnu";

/// What the function posted back for one invocation.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// `POST /invocation/{id}/response`: the handler's result.
    Response(Value),
    /// `POST /invocation/{id}/error`: the handler failed the invocation.
    Error(Value),
    /// `POST /init/error`: the function could not start.
    InitError(Value),
}

impl Outcome {
    /// The `batchItemFailures` ids of an SQS batch response (panics on anything else).
    pub fn failed_ids(&self) -> Vec<String> {
        let Outcome::Response(v) = self else {
            panic!("expected a batch response, got {self:?}");
        };
        let mut ids: Vec<String> = v["batchItemFailures"]
            .as_array()
            .unwrap_or_else(|| panic!("not an SqsBatchResponse: {v}"))
            .iter()
            .map(|f| f["itemIdentifier"].as_str().unwrap_or_default().to_owned())
            .collect();
        ids.sort();
        ids
    }
}

struct Invocation {
    id: String,
    deadline_ms: u64,
    payload: Vec<u8>,
}

struct Shared {
    events: tokio::sync::Mutex<mpsc::UnboundedReceiver<Invocation>>,
    outcomes: mpsc::UnboundedSender<(Option<String>, Outcome)>,
    first_next: OnceLock<Instant>,
    function_name: String,
}

/// A Lambda Runtime API stub on a free loopback port.
pub struct RuntimeApi {
    /// Its address (give it as `AWS_LAMBDA_RUNTIME_API`).
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    events: mpsc::UnboundedSender<Invocation>,
    outcomes: tokio::sync::Mutex<mpsc::UnboundedReceiver<(Option<String>, Outcome)>>,
    /// Outcomes that arrived for other invocations than the one awaited.
    early: Mutex<HashMap<Option<String>, Outcome>>,
    accept: tokio::task::JoinHandle<()>,
}

impl RuntimeApi {
    /// Starts the stub for a function named `function_name`.
    pub async fn start(function_name: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            events: tokio::sync::Mutex::new(ev_rx),
            outcomes: out_tx,
            first_next: OnceLock::new(),
            function_name: function_name.to_owned(),
        });
        let s = shared.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let _ = serve_connection(stream, s).await;
                });
            }
        });
        Ok(Self {
            addr,
            shared,
            events: ev_tx,
            outcomes: tokio::sync::Mutex::new(out_rx),
            early: Mutex::new(HashMap::new()),
            accept,
        })
    }

    /// When the first `GET /next` arrived, if it did.
    pub fn first_next(&self) -> Option<Instant> {
        self.shared.first_next.get().copied()
    }

    /// Waits until the function asks for its first invocation (it has finished starting).
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<Instant> {
        let until = Instant::now() + timeout;
        loop {
            if let Some(t) = self.first_next() {
                return Ok(t);
            }
            if Instant::now() > until {
                bail!("the function did not call /next within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Invokes the function with `payload` and a deadline `budget` from now; waits (up to the
    /// budget plus 10 s) for what it posts back.
    pub async fn invoke(&self, payload: &Value, budget: Duration) -> anyhow::Result<Outcome> {
        self.invoke_raw(serde_json::to_vec(payload)?, budget).await
    }

    /// [`invoke`](Self::invoke) with raw bytes.
    pub async fn invoke_raw(&self, payload: Vec<u8>, budget: Duration) -> anyhow::Result<Outcome> {
        let id = uuid::Uuid::new_v4().to_string();
        let deadline_ms = (SystemTime::now() + budget)
            .duration_since(UNIX_EPOCH)?
            .as_millis() as u64;
        self.events
            .send(Invocation {
                id: id.clone(),
                deadline_ms,
                payload,
            })
            .map_err(|_| anyhow::anyhow!("runtime API stub stopped"))?;
        let key = Some(id.clone());
        let wait = async {
            let mut rx = self.outcomes.lock().await;
            loop {
                if let Some(o) = self.early.lock().expect("early").remove(&key) {
                    return Ok(o);
                }
                match rx.recv().await {
                    Some((k, o)) if k == key => return Ok(o),
                    // An init error answers whatever was asked.
                    Some((None, o)) => return Ok(o),
                    Some((k, o)) => {
                        self.early.lock().expect("early").insert(k, o);
                    }
                    None => bail!("runtime API stub stopped"),
                }
            }
        };
        tokio::time::timeout(budget + Duration::from_secs(10), wait)
            .await
            .with_context(|| format!("invocation {id}: no response from the function"))?
    }
}

impl Drop for RuntimeApi {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// One HTTP/1.1 connection: requests one after another (keep-alive).
async fn serve_connection(mut stream: TcpStream, shared: Arc<Shared>) -> anyhow::Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        // Head.
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or_default().to_owned();
        let mut parts = request_line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or_default().to_owned(),
            parts.next().unwrap_or_default().to_owned(),
        );
        let headers: HashMap<String, String> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        // Body: content-length or chunked.
        let body = if headers
            .get("transfer-encoding")
            .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
        {
            let mut body = Vec::new();
            loop {
                let line_end = loop {
                    if let Some(i) = find(&buf, b"\r\n") {
                        break i;
                    }
                    read_more(&mut stream, &mut buf).await?;
                };
                let size_text = String::from_utf8_lossy(&buf[..line_end]).into_owned();
                let size =
                    usize::from_str_radix(size_text.split(';').next().unwrap_or("0").trim(), 16)?;
                buf.drain(..line_end + 2);
                while buf.len() < size + 2 {
                    read_more(&mut stream, &mut buf).await?;
                }
                body.extend_from_slice(&buf[..size]);
                buf.drain(..size + 2);
                if size == 0 {
                    break;
                }
            }
            body
        } else {
            let len: usize = headers
                .get("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            while buf.len() < len {
                read_more(&mut stream, &mut buf).await?;
            }
            buf.drain(..len).collect()
        };

        let prefix = "/2018-06-01/runtime/";
        let route = path.strip_prefix(prefix).unwrap_or(&path);
        if method == "GET" && route == "invocation/next" {
            let _ = shared.first_next.set(Instant::now());
            let inv = {
                let mut rx = shared.events.lock().await;
                match rx.recv().await {
                    Some(inv) => inv,
                    None => return Ok(()),
                }
            };
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                 Lambda-Runtime-Aws-Request-Id: {id}\r\n\
                 Lambda-Runtime-Deadline-Ms: {deadline}\r\n\
                 Lambda-Runtime-Invoked-Function-Arn: arn:aws:lambda:us-east-1:123456789012:function:{name}\r\n\
                 Lambda-Runtime-Trace-Id: Root=1-00000000-000000000000000000000000;Sampled=0\r\n\
                 Content-Length: {len}\r\n\r\n",
                id = inv.id,
                deadline = inv.deadline_ms,
                name = shared.function_name,
                len = inv.payload.len(),
            );
            stream.write_all(head.as_bytes()).await?;
            stream.write_all(&inv.payload).await?;
            continue;
        }
        let parsed: Value = serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
        let outcome = if method == "POST" && route == "init/error" {
            Some((None, Outcome::InitError(parsed)))
        } else if let Some(rest) = route
            .strip_prefix("invocation/")
            .filter(|_| method == "POST")
        {
            match rest.rsplit_once('/') {
                Some((id, "response")) => Some((Some(id.to_owned()), Outcome::Response(parsed))),
                Some((id, "error")) => Some((Some(id.to_owned()), Outcome::Error(parsed))),
                _ => None,
            }
        } else {
            None
        };
        let status = match outcome {
            Some(o) => {
                let _ = shared.outcomes.send(o);
                "202 Accepted"
            }
            None => "404 Not Found",
        };
        let reply = r#"{"status":"OK"}"#;
        stream
            .write_all(
                format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{reply}",
                    reply.len()
                )
                .as_bytes(),
            )
            .await?;
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<()> {
    let mut chunk = [0u8; 4096];
    let n = stream.read(&mut chunk).await?;
    if n == 0 {
        bail!("connection closed mid-request");
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The Lambda flavour of a function binary (`--no-default-features --features lambda,faults,otlp`:
/// the tests inject faults into it), built
/// for [`LAMBDA_TARGET`] in the same profile as the running executable:
/// `<target>/x86_64-unknown-linux-gnu/<profile>/<name>`. `SLUICE_LAMBDA_BIN_DIR` overrides
/// the directory.
pub fn lambda_binary(name: &str) -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("SLUICE_LAMBDA_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe()?;
            let mut dir = exe.parent().context("executable has no directory")?;
            if dir.ends_with("deps") {
                dir = dir.parent().context("deps has no parent")?;
            }
            let profile = dir.file_name().context("no profile directory")?.to_owned();
            let root = dir.parent().context("no target directory")?;
            root.join(LAMBDA_TARGET).join(profile)
        }
    };
    let bin = dir.join(name);
    if !bin.exists() {
        bail!(
            "{} is not built: `cargo build -p {name} --no-default-features --features \
             lambda,faults,otlp --target {LAMBDA_TARGET}` (`just test` does)",
            bin.display()
        );
    }
    Ok(bin)
}

/// Starts `bin` in Lambda mode against the stub at `api`, with the environment Lambda sets and
/// `env` on top; stdout and stderr appended to `log`, as Lambda writes both to one log stream
/// (the EMF documents on stdout among the log lines).
pub fn spawn_lambda(
    bin: &Path,
    api: SocketAddr,
    function_name: &str,
    env: &[(String, String)],
    log: &Path,
) -> anyhow::Result<Child> {
    let mut cmd = Command::new(bin);
    cmd.env("AWS_LAMBDA_RUNTIME_API", api.to_string())
        .env("AWS_LAMBDA_FUNCTION_NAME", function_name)
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env(
            "AWS_LAMBDA_LOG_GROUP_NAME",
            format!("/aws/lambda/{function_name}"),
        )
        .env("AWS_LAMBDA_LOG_STREAM_NAME", "local")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    Ok(cmd.spawn()?)
}

/// An SQS event as Lambda's event source mapping builds it, from messages received from a
/// queue: `template` is one record of a fixture (tests/fixtures/sqs-event.json) whose fields
/// are replaced by each message's own.
pub fn sqs_event(
    template: &Value,
    queue_arn: &str,
    messages: &[sluice::transport::sqs::aws_sdk_sqs::types::Message],
) -> Value {
    let records: Vec<Value> = messages
        .iter()
        .map(|m| {
            let mut r = template.clone();
            r["messageId"] = json!(m.message_id());
            r["receiptHandle"] = json!(m.receipt_handle());
            r["body"] = json!(m.body());
            r["md5OfBody"] = json!(m.md5_of_body());
            r["eventSourceARN"] = json!(queue_arn);
            r["eventSource"] = json!("aws:sqs");
            r["awsRegion"] = json!("us-east-1");
            let attributes: serde_json::Map<String, Value> = m
                .attributes()
                .map(|a| {
                    a.iter()
                        .map(|(k, v)| (k.as_str().to_owned(), json!(v)))
                        .collect()
                })
                .unwrap_or_default();
            r["attributes"] = Value::Object(attributes);
            let message_attributes: serde_json::Map<String, Value> = m
                .message_attributes()
                .map(|a| {
                    a.iter()
                        .filter_map(|(k, v)| {
                            // Sluice's own attributes are strings; binary ones are not carried.
                            v.string_value().map(|s| {
                                (
                                    k.clone(),
                                    json!({
                                        "stringValue": s,
                                        "stringListValues": [],
                                        "binaryListValues": [],
                                        "dataType": v.data_type(),
                                    }),
                                )
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            r["messageAttributes"] = Value::Object(message_attributes);
            r
        })
        .collect();
    json!({ "Records": records })
}

/// One record in the shape of `aws_lambda_events`' own SQS example
/// (`fixtures/example-sqs-event.json`), for callers without a fixture file.
pub fn record_template() -> Value {
    json!({
        "messageId": "",
        "receiptHandle": "",
        "body": "",
        "md5OfBody": "",
        "eventSourceARN": "",
        "eventSource": "aws:sqs",
        "awsRegion": "us-east-1",
        "attributes": {},
        "messageAttributes": {}
    })
}

/// The ARN moto gives a queue of this name.
pub fn queue_arn(queue_name: &str) -> String {
    format!("arn:aws:sqs:us-east-1:123456789012:{queue_name}")
}
