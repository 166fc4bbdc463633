//! Traces, black box: charge-payment (built with `otlp` and `faults`) exports its spans to an
//! OTLP/HTTP receiver the test runs itself, which decodes the real protobuf
//! (`opentelemetry-proto`). One message that fails twice and then succeeds is one trace: the
//! `send` span and three `process` spans under it, each with its attempt and outcome and a link
//! to the attempt before; a message dead-lettered and redriven has its redrive delivery in the
//! same trace. On the embedded queue and on RabbitMQ.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{any_value::Value, KeyValue},
    trace::v1::span::SpanKind,
};
use prost::Message as _;
use sluice::conformance::poll_until;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpListener,
};

use crate::support::{
    free_port, metric_sample, sigterm, wait_exit, FunctionRun, KillOnDrop, CHARGE_TEMPLATE,
};

/// Longest wait for spans to arrive: the exporter sends every 500 ms, retries back off by
/// 50 ms to 200 ms here; a few seconds in all.
const SPANS_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a worker may take to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// One span as the receiver decoded it.
#[derive(Debug, Clone)]
struct Span {
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    kind: SpanKind,
    attrs: BTreeMap<String, String>,
    /// (trace id, span id, `sluice.link`) of each link.
    links: Vec<(String, String, String)>,
    error_status: bool,
    service: String,
}

impl Span {
    fn attr(&self, k: &str) -> Option<&str> {
        self.attrs.get(k).map(String::as_str)
    }
}

fn text(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                Some(Value::IntValue(i)) => i.to_string(),
                Some(Value::BoolValue(b)) => b.to_string(),
                Some(Value::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

/// A minimal OTLP/HTTP receiver: HTTP/1.1 with keep-alive, `POST /v1/traces` with a protobuf
/// body of known length (what the exporter sends), answered `200` with an empty
/// `ExportTraceServiceResponse`.
struct Collector {
    url: String,
    spans: Arc<Mutex<Vec<Span>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
        let sink = spans.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let sink = sink.clone();
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut r = BufReader::new(r);
                    loop {
                        let mut len = 0usize;
                        let mut line = String::new();
                        loop {
                            line.clear();
                            if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if line == "\r\n" {
                                break;
                            }
                            if let Some((k, v)) = line.split_once(':') {
                                if k.eq_ignore_ascii_case("content-length") {
                                    len = v.trim().parse().unwrap_or(0);
                                }
                            }
                        }
                        let mut body = vec![0; len];
                        if r.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        let req = ExportTraceServiceRequest::decode(body.as_slice())
                            .expect("the exporter sends ExportTraceServiceRequest protobuf");
                        sink.lock().unwrap().extend(decode(req));
                        let ok = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                        if w.write_all(ok.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Collector { url, spans, task }
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits until `pick` finds what it wants among the spans received so far.
    async fn until<T>(&self, what: &str, pick: impl Fn(&[Span]) -> Option<T>) -> T {
        poll_until(SPANS_TIMEOUT, what, || {
            let found = pick(&self.spans());
            async move { found }
        })
        .await
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn decode(req: ExportTraceServiceRequest) -> Vec<Span> {
    let mut out = Vec::new();
    for rs in req.resource_spans {
        let resource = rs.resource.map(|r| text(&r.attributes)).unwrap_or_default();
        let service = resource.get("service.name").cloned().unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                out.push(Span {
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent: hex(&s.parent_span_id),
                    name: s.name.clone(),
                    kind: SpanKind::try_from(s.kind).unwrap_or(SpanKind::Unspecified),
                    attrs: text(&s.attributes),
                    links: s
                        .links
                        .iter()
                        .map(|l| {
                            let kind = text(&l.attributes)
                                .get("sluice.link")
                                .cloned()
                                .unwrap_or_default();
                            (hex(&l.trace_id), hex(&l.span_id), kind)
                        })
                        .collect(),
                    // STATUS_CODE_ERROR = 2
                    error_status: s.status.is_some_and(|st| st.code == 2),
                    service: service.clone(),
                });
            }
        }
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The process spans of message `id`, by attempt, once there are `n`.
fn process_spans(spans: &[Span], id: &str, n: usize) -> Option<Vec<Span>> {
    let mut p: Vec<Span> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Consumer && s.attr("messaging.message.id") == Some(id))
        .cloned()
        .collect();
    p.sort_by_key(|s| s.attr("sluice.attempt").and_then(|a| a.parse::<u32>().ok()));
    (p.len() >= n).then_some(p)
}

/// The `send <queue>` span.
fn send_span(spans: &[Span], queue: &str) -> Option<Span> {
    spans
        .iter()
        .find(|s| s.kind == SpanKind::Producer && s.name == format!("send {queue}"))
        .cloned()
}

/// What every process span of one message on `system` must say.
fn assert_process_span(s: &Span, system: &str, queue: &str, id: &str, send: &Span) {
    assert_eq!(s.name, format!("process {queue}"), "{s:#?}");
    assert_eq!(s.kind, SpanKind::Consumer);
    assert_eq!(
        s.service, "charge-payment",
        "service.name defaults to the function"
    );
    assert_eq!(s.attr("messaging.system"), Some(system), "{s:#?}");
    assert_eq!(s.attr("messaging.operation.type"), Some("process"));
    assert_eq!(s.attr("messaging.operation.name"), Some("process"));
    assert_eq!(s.attr("messaging.destination.name"), Some(queue));
    assert_eq!(s.attr("messaging.message.id"), Some(id));
    assert_eq!(s.attr("sluice.function"), Some("charge-payment"));
    if system == "rabbitmq" {
        assert!(
            s.attr("messaging.rabbitmq.destination.routing_key")
                .is_some(),
            "{s:#?}"
        );
        let tag = s.attr("messaging.rabbitmq.message.delivery_tag");
        assert!(tag.is_some_and(|t| t.parse::<u64>().is_ok()), "{s:#?}");
    } else {
        assert_eq!(s.attr("messaging.rabbitmq.message.delivery_tag"), None);
    }
    assert_eq!(s.trace_id, send.trace_id, "one trace: {s:#?}");
    assert_eq!(
        s.parent, send.span_id,
        "the creation context is the parent: {s:#?}"
    );
    assert!(
        s.links
            .iter()
            .any(|l| l.1 == send.span_id && l.2 == "creation"),
        "links to its creation context: {s:#?}"
    );
}

/// Fails twice (`fault.fail_first = 2`), then succeeds: three process spans in the send's
/// trace, each with its attempt and outcome, each retry linked to the attempt before it.
async fn fails_twice_then_succeeds(run: FunctionRun, system: &str, queue: &str, payment: &str) {
    let collector = Collector::start().await;
    let run = run.set(format!("telemetry.otlp.endpoint={}", collector.url));
    let id = run
        .cli(&["send", &sluice_tests::charge_body(payment, 1200)])
        .trim()
        .to_owned();
    let mut worker = run.worker(
        &[
            "--set",
            "fault.fail_first=2",
            "--set",
            "retry.immediate=0",
            "--set",
            "retry.base=50ms",
            "--set",
            "retry.cap=200ms",
        ],
        "worker.log",
    );
    let attempts = collector
        .until("three process spans of the message", |s| {
            process_spans(s, &id, 3)
        })
        .await;
    let send = collector
        .until("the send span", |s| send_span(s, queue))
        .await;
    sigterm(&worker);
    assert!(
        wait_exit(&mut worker, STOP_TIMEOUT, Some(&run.path("worker.log")))
            .await
            .success()
    );

    // The trace as received (`--no-capture` shows it).
    for s in std::iter::once(&send).chain(&attempts) {
        eprintln!(
            "{} {:?} trace={} span={} parent={} attrs={:?} links={:?}",
            s.name, s.kind, s.trace_id, s.span_id, s.parent, s.attrs, s.links
        );
    }
    assert_eq!(send.attr("messaging.system"), Some(system));
    assert_eq!(send.attr("messaging.operation.type"), Some("send"));
    assert_eq!(
        attempts.len(),
        3,
        "one process span per delivery: {attempts:#?}"
    );
    for (i, s) in attempts.iter().enumerate() {
        assert_process_span(s, system, queue, &id, &send);
        assert_eq!(s.attr("sluice.attempt"), Some((i + 1).to_string().as_str()));
        assert_eq!(s.attr("sluice.idempotency_key"), Some(payment));
    }
    for s in &attempts[..2] {
        assert_eq!(s.attr("sluice.outcome"), Some("retried"), "{s:#?}");
        assert_eq!(s.attr("sluice.error_class"), Some("transient"));
        assert_eq!(s.attr("error.type"), Some("transient"));
        assert!(s.error_status, "a failed attempt has the error status");
    }
    let last = &attempts[2];
    assert_eq!(last.attr("sluice.outcome"), Some("succeeded"), "{last:#?}");
    assert_eq!(last.attr("error.type"), None);
    assert!(!last.error_status);
    for pair in attempts.windows(2) {
        assert!(
            pair[1].links.iter().any(|l| l.0 == pair[0].trace_id
                && l.1 == pair[0].span_id
                && l.2 == "previous_attempt"),
            "a retry links to the attempt before it: {:#?}",
            pair[1]
        );
    }
    assert!(
        !attempts[0].links.iter().any(|l| l.2 == "previous_attempt"),
        "the first attempt has none before it"
    );
}

/// Dead-lettered after two deliveries, redriven, then handled: the redrive delivery is in the
/// message's trace, linked to the delivery that dead-lettered it.
async fn dead_lettered_then_redriven(run: FunctionRun, system: &str, queue: &str) {
    let collector = Collector::start().await;
    let run = run.set(format!("telemetry.otlp.endpoint={}", collector.url));
    let id = run
        .cli(&["send", &sluice_tests::charge_body("p-redrive", 700)])
        .trim()
        .to_owned();
    let failing = [
        "--set",
        "fault.fail_first=100",
        "--set",
        "retry.immediate=0",
        "--set",
        "retry.base=50ms",
        "--set",
        "retry.cap=200ms",
    ];
    let mut worker = run.worker(&failing, "failing.log");
    let dead = collector
        .until("the dead-lettering process span", |s| {
            process_spans(s, &id, 2).and_then(|p| {
                p.into_iter()
                    .find(|s| s.attr("sluice.outcome") == Some("dead_lettered"))
            })
        })
        .await;
    sigterm(&worker);
    assert!(
        wait_exit(&mut worker, STOP_TIMEOUT, Some(&run.path("failing.log")))
            .await
            .success()
    );
    assert_eq!(
        dead.attr("error.type"),
        Some("retries_exhausted"),
        "{dead:#?}"
    );
    assert_eq!(dead.attr("sluice.error_class"), Some("transient"));
    // The dead letter names its trace, for the operator who finds it on the DLQ.
    let listed = run.json(&["dlq", "list", "--json"]);
    assert_eq!(listed[0]["id"], id.as_str(), "{listed}");
    assert_eq!(listed[0]["trace_id"], dead.trace_id.as_str(), "{listed}");

    run.cli(&["redrive"]);
    let mut worker = run.worker(&[], "worker.log");
    let redriven = collector
        .until("the redrive delivery's process span", |s| {
            process_spans(s, &id, 3).and_then(|p| {
                p.into_iter()
                    .find(|s| s.attr("sluice.outcome") == Some("succeeded"))
            })
        })
        .await;
    sigterm(&worker);
    assert!(
        wait_exit(&mut worker, STOP_TIMEOUT, Some(&run.path("worker.log")))
            .await
            .success()
    );
    let send = send_span(&collector.spans(), queue).expect("the send span");
    assert_process_span(&dead, system, queue, &id, &send);
    assert_process_span(&redriven, system, queue, &id, &send);
    assert_eq!(
        redriven.attr("sluice.attempt"),
        Some("1"),
        "a redrive starts over"
    );
    assert!(
        redriven
            .links
            .iter()
            .any(|l| l.1 == dead.span_id && l.2 == "previous_attempt"),
        "the redrive links to the delivery that dead-lettered it: {redriven:#?}"
    );
}

/// `GET path` of the worker's listener: the body of a 200.
async fn get(port: u16, path: &str) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).await.ok()?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

#[tokio::test]
async fn embedded_an_unreachable_collector_costs_spans_and_never_messages() {
    const MESSAGES: f64 = 40.0;
    // Nothing listens there: every export fails (connection refused).
    let dead = free_port();
    let port = free_port();
    let run = FunctionRun::new("charge-payment")
        .set(format!("telemetry.otlp.endpoint=http://127.0.0.1:{dead}"))
        .set(format!("telemetry.listen=127.0.0.1:{port}"));
    run.cli(&["send", "--count", "40", CHARGE_TEMPLATE]);
    let worker = KillOnDrop(run.worker(&[], "worker.log"));
    let labels = [
        ("function", "charge-payment"),
        ("queue", "charge-payment"),
        ("version", env!("CARGO_PKG_VERSION")),
    ];
    let (succeeded, dropped) = poll_until(
        SPANS_TIMEOUT,
        "every message settled and spans dropped",
        || async {
            let m = get(port, "/metrics").await?;
            let mut ok = labels.to_vec();
            ok.extend([("outcome", "succeeded"), ("error_class", "none")]);
            let succeeded = metric_sample(&m, "sluice_messages_total", &ok)?;
            let dropped = metric_sample(&m, "sluice_trace_spans_dropped_total", &labels)?;
            (succeeded >= MESSAGES && dropped > 0.0).then_some((succeeded, dropped))
        },
    )
    .await;
    assert_eq!(succeeded, MESSAGES, "every message handled");
    assert!(
        dropped <= MESSAGES,
        "only the process spans of this worker: {dropped}"
    );
    assert_eq!(run.ledger().charges, 40);
    drop(worker);
}

#[tokio::test]
async fn embedded_a_message_that_fails_twice_then_succeeds_is_one_trace_of_three_process_spans() {
    let run = FunctionRun::new("charge-payment");
    fails_twice_then_succeeds(run, "sluice", "charge-payment", "p-trace").await;
}

#[tokio::test]
async fn embedded_a_redriven_message_is_handled_in_the_trace_it_was_dead_lettered_in() {
    let run = FunctionRun::new("charge-payment").set("retry.max_deliveries=2");
    dead_lettered_then_redriven(run, "sluice", "charge-payment").await;
}

#[cfg(feature = "rabbitmq")]
mod rabbitmq {
    use sluice::conformance::unique;
    use sluice_tests::rabbit::Vhost;

    use super::*;

    fn rig(name: &str, sets: &[&str]) -> (FunctionRun, Vhost, String) {
        let vhost = Vhost::create(name).expect("a test virtual host (is RabbitMQ up?)");
        let queue = unique(name);
        let mut run = FunctionRun::new("charge-payment")
            .env("SLUICE__TRANSPORT__KIND", "rabbitmq")
            .env("SLUICE__TRANSPORT__URL", &vhost.url)
            .set(format!("queue={queue}"));
        for s in sets {
            run = run.set(*s);
        }
        run.cli(&["provision"]);
        (run, vhost, queue)
    }

    #[tokio::test]
    async fn rabbitmq_a_message_that_fails_twice_then_succeeds_is_one_trace_of_three_process_spans()
    {
        let (run, _vhost, queue) = rig("traces-retry", &[]);
        fails_twice_then_succeeds(run, "rabbitmq", &queue, "p-trace-rmq").await;
    }

    #[tokio::test]
    async fn rabbitmq_a_redriven_message_is_handled_in_the_trace_it_was_dead_lettered_in() {
        let (run, _vhost, queue) = rig("traces-redrive", &["retry.max_deliveries=2"]);
        dead_lettered_then_redriven(run, "rabbitmq", &queue).await;
    }
}

/// Lambda mode: the Lambda build of charge-payment (with `otlp`) fed one SQS event by the
/// Runtime API stub; the record comes from moto and carries a creation context in its
/// envelope and an X-Ray `AWSTraceHeader`.
#[cfg(feature = "lambda")]
mod lambda {
    use sluice::{
        conformance::unique,
        envelope::{Envelope, TraceContext},
        transport::{
            sqs::{aws_sdk_sqs::types::MessageSystemAttributeName, SqsTransport},
            Transport, TransportOptions,
        },
        OutgoingMessage,
    };
    use sluice_tests::lambda::{
        lambda_binary, queue_arn, record_template, spawn_lambda, sqs_event, RuntimeApi,
    };

    use super::*;
    use crate::support::sqs_client;

    /// The producer's creation context the message carries.
    const CREATION: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    /// The X-Ray context SQS would add (`AWSTraceHeader`).
    const XRAY: &str = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1";

    #[tokio::test]
    async fn lambda_an_invocation_span_with_faas_attributes_holds_one_process_span_per_record_linked_to_its_context(
    ) {
        sluice_tests::moto("SQS");
        let name = unique("traces-lambda");
        let sqs = SqsTransport::open(TransportOptions {
            queue: name.clone(),
            function: "charge-payment".into(),
            url: name.clone(),
            lease: Duration::from_secs(30),
            max_deliveries: 5,
            poll_interval: Duration::from_millis(100),
            declare: true,
        })
        .await
        .expect("provision the queue on moto");
        let mut m = OutgoingMessage::new(sluice_tests::charge_body("p-lambda", 300));
        m.envelope = Envelope {
            trace: Some(TraceContext {
                traceparent: CREATION.into(),
                tracestate: None,
            }),
            ..Envelope::default()
        };
        let id = sqs.publish(vec![m]).await.expect("publish")[0].clone();
        let client = sqs_client().await;
        let received = client
            .receive_message()
            .queue_url(sqs.queue_url().await.unwrap())
            .wait_time_seconds(5)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .message_attribute_names("All")
            .send()
            .await
            .expect("receive")
            .messages
            .unwrap_or_default();
        assert_eq!(received.len(), 1);
        let mut event = sqs_event(&record_template(), &queue_arn(&name), &received);
        event["Records"][0]["attributes"]["AWSTraceHeader"] = XRAY.into();

        let collector = Collector::start().await;
        let dir = tempfile::tempdir().unwrap();
        let env: Vec<(String, String)> = [
            ("SLUICE__TRANSPORT__KIND", "sqs".to_owned()),
            ("SLUICE__TRANSPORT__URL", name.clone()),
            ("SLUICE__QUEUE", name.clone()),
            (
                "SLUICE__STORE__URL",
                dir.path().join("idempotency.db").display().to_string(),
            ),
            (
                "SLUICE__APP__LEDGER",
                dir.path().join("ledger.db").display().to_string(),
            ),
            ("SLUICE__TELEMETRY__OTLP__ENDPOINT", collector.url.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let api = RuntimeApi::start("charge-payment").await.expect("stub");
        let bin = lambda_binary("charge-payment").expect("the Lambda build");
        let log = dir.path().join("lambda.log");
        let _child =
            KillOnDrop(spawn_lambda(&bin, api.addr, "charge-payment", &env, &log).expect("start"));
        api.wait_ready(Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| {
                panic!("{e}: {}", std::fs::read_to_string(&log).unwrap_or_default())
            });
        let outcome = api
            .invoke(&event, Duration::from_secs(30))
            .await
            .expect("invocation");
        assert!(outcome.failed_ids().is_empty(), "{outcome:?}");

        let (invocation, record) = collector
            .until("the invocation span and its record's span", |spans| {
                let inv = spans
                    .iter()
                    .find(|s| s.attr("faas.trigger") == Some("pubsub"))?
                    .clone();
                let rec = process_spans(spans, &id, 1)?.pop()?;
                Some((inv, rec))
            })
            .await;
        eprintln!("{invocation:?}\n{record:?}");
        assert_eq!(invocation.name, "charge-payment");
        assert_eq!(invocation.kind, SpanKind::Consumer);
        assert!(invocation.parent.is_empty(), "the invocation is a root");
        for (k, v) in [
            ("faas.coldstart", "true"),
            ("faas.name", "charge-payment"),
            ("faas.version", "$LATEST"),
            ("cloud.provider", "aws"),
            ("cloud.platform", "aws_lambda"),
            ("messaging.system", "aws_sqs"),
            ("messaging.destination.name", &name),
        ] {
            assert_eq!(invocation.attr(k), Some(v), "{k}: {invocation:#?}");
        }
        assert!(invocation
            .attr("faas.invocation_id")
            .is_some_and(|v| !v.is_empty()));
        assert!(invocation
            .attr("cloud.resource_id")
            .is_some_and(|v| v.starts_with("arn:aws:lambda:")));

        assert_eq!(record.name, format!("process {name}"));
        assert_eq!(record.kind, SpanKind::Consumer);
        assert_eq!(record.attr("messaging.system"), Some("aws_sqs"));
        assert_eq!(record.attr("sluice.outcome"), Some("succeeded"));
        assert_eq!(
            (record.trace_id.as_str(), record.parent.as_str()),
            (invocation.trace_id.as_str(), invocation.span_id.as_str()),
            "a record's span is the invocation's child"
        );
        let link = |kind: &str| {
            record
                .links
                .iter()
                .find(|l| l.2 == kind)
                .map(|l| (l.0.as_str(), l.1.as_str()))
        };
        assert_eq!(
            link("creation"),
            Some(("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")),
            "linked to its creation context: {record:#?}"
        );
        assert_eq!(
            link("aws_trace_header"),
            Some(("5759e988bd862e3fe1be46a994272793", "53995c3f42cd8ad8")),
            "linked to its X-Ray context: {record:#?}"
        );
    }
}
