//! Span export over OTLP/HTTP with protobuf (feature `otlp`): the `tracing` spans of
//! `telemetry::trace` become OpenTelemetry spans through `tracing-opentelemetry`, and a batch
//! processor sends them from its own thread, so handling a message never waits for a
//! collector.
//!
//! - **Bounded.** At most [`MAX_QUEUED`] spans wait for export; past that a span is dropped
//!   and counted (`SPANS_DROPPED`, `sluice_trace_spans_dropped_total`), as are
//!   the spans of a batch whose export failed. An unreachable collector costs spans, never
//!   time on the message path.
//! - **Client.** The exporter's HTTP requests run on the process's tokio runtime with the
//!   workspace's reqwest (rustls), each cut off after [`EXPORT_TIMEOUT`].
//! - **Flushed** before each Lambda response and when a command ends.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering::Relaxed},
        Arc, OnceLock,
    },
    time::Duration,
};

use opentelemetry::{
    trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
    },
    Context, KeyValue,
};
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::{
    error::OTelSdkResult,
    trace::{
        BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, SpanData, SpanExporter,
        SpanProcessor,
    },
    Resource,
};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::export::{set_exporting, SPANS_DROPPED};
use crate::{config::OtlpSettings, envelope::TraceContext, tracecontext::TraceParent};

/// Most spans waiting for export; more are dropped and counted.
pub const MAX_QUEUED: usize = 4096;
/// Longest one export request may take.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long spans wait to be sent together.
const SCHEDULED_DELAY: Duration = Duration::from_millis(500);

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// The collector's traces URL: the setting (a base URL, `/v1/traces` appended), else the
/// standard variables, else none (no export).
fn traces_url(settings: &OtlpSettings) -> Option<String> {
    let with_path = |base: &str| {
        let base = base.trim_end_matches('/');
        if base.ends_with("/v1/traces") {
            base.to_owned()
        } else {
            format!("{base}/v1/traces")
        }
    };
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    if !settings.endpoint.is_empty() {
        return Some(with_path(&settings.endpoint));
    }
    // The signal's own variable is used as it is (the OTLP exporter specification).
    env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT").map(|b| with_path(&b)))
}

/// Builds the exporter and returns the layer that feeds it, or `None` when no endpoint is
/// configured (or `OTEL_SDK_DISABLED=true`). Must run inside the tokio runtime.
pub(crate) fn layer<S>(
    settings: &OtlpSettings,
    function: &str,
) -> Option<Box<dyn tracing_subscriber::Layer<S> + Send + Sync>>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync,
{
    use tracing_subscriber::Layer as _;

    if std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true")) {
        return None;
    }
    let url = traces_url(settings)?;
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    let client = TokioClient {
        client: reqwest::Client::builder()
            .timeout(EXPORT_TIMEOUT)
            .build()
            .ok()?,
        runtime,
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_endpoint(url.clone())
        .with_timeout(EXPORT_TIMEOUT)
        .build();
    let exporter = match exporter {
        Ok(e) => e,
        Err(e) => {
            eprintln!("warning: traces are not exported to {url}: {e}");
            return None;
        }
    };
    let queued = Arc::new(AtomicUsize::new(0));
    let batch = BatchSpanProcessor::builder(Counted {
        inner: exporter,
        queued: queued.clone(),
    })
    .with_batch_config(
        BatchConfigBuilder::default()
            // Room for more than the bound below, so the bound (which counts) is what drops.
            .with_max_queue_size(MAX_QUEUED * 2)
            .with_scheduled_delay(SCHEDULED_DELAY)
            .build(),
    )
    .build();
    let service = if !settings.service_name.is_empty() {
        settings.service_name.clone()
    } else {
        std::env::var("OTEL_SERVICE_NAME")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| function.to_owned())
    };
    let provider = SdkTracerProvider::builder()
        .with_span_processor(Bounded {
            inner: batch,
            queued,
        })
        .with_resource(
            Resource::builder()
                .with_service_name(service)
                .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                .build(),
        )
        .build();
    let tracer = provider.tracer("sluice");
    let _ = PROVIDER.set(provider);
    set_exporting();
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        // What the conventions ask for, not the layer's extras (and no clock read per poll).
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        // lambda_runtime's own span around each invocation would be the root of every
        // invocation's trace, above the invocation span that says what it was: left out.
        .with_filter(tracing_subscriber::filter::filter_fn(|m| {
            !m.target().starts_with("lambda_runtime")
        }));
    Some(layer.boxed())
}

/// The W3C context of an exported span.
pub(crate) fn context_of(span: &Span) -> Option<TraceContext> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| TraceContext {
        traceparent: TraceParent {
            trace_id: sc.trace_id().to_bytes(),
            span_id: sc.span_id().to_bytes(),
            flags: sc.trace_flags().to_u8(),
        }
        .to_string(),
        tracestate: Some(sc.trace_state().header()).filter(|s| !s.is_empty()),
    })
}

fn remote(tp: TraceParent, state: Option<&str>) -> SpanContext {
    SpanContext::new(
        TraceId::from_bytes(tp.trace_id),
        SpanId::from_bytes(tp.span_id),
        TraceFlags::new(tp.flags),
        true,
        state
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default(),
    )
}

/// Makes `span` (not yet entered) a child of the caller's context.
pub(crate) fn continue_from(span: &Span, caller: &TraceContext) {
    if let Some(tp) = TraceParent::parse(&caller.traceparent) {
        let sc = remote(tp, caller.tracestate.as_deref());
        let _ = span.set_parent(Context::new().with_remote_span_context(sc));
    }
}

/// Parent and links of a process span (see `telemetry::trace`): the creation context as
/// parent when `creation_is_parent`, and links.
pub(crate) fn connect(
    span: &Span,
    creation: Option<&TraceContext>,
    previous: Option<TraceParent>,
    xray: Option<TraceParent>,
    creation_is_parent: bool,
) {
    let creation = creation.and_then(|c| {
        TraceParent::parse(&c.traceparent).map(|tp| remote(tp, c.tracestate.as_deref()))
    });
    if let (Some(sc), true) = (&creation, creation_is_parent) {
        // A span whose parent is set before it is first entered: cannot fail but for a
        // subscriber without the layer, when nothing is exported anyway.
        let _ = span.set_parent(Context::new().with_remote_span_context(sc.clone()));
    }
    if let Some(sc) = creation {
        span.add_link_with_attributes(sc, vec![KeyValue::new("sluice.link", "creation")]);
    }
    if let Some(tp) = previous {
        span.add_link_with_attributes(
            remote(tp, None),
            vec![KeyValue::new("sluice.link", "previous_attempt")],
        );
    }
    if let Some(tp) = xray {
        span.add_link_with_attributes(
            remote(tp, None),
            vec![KeyValue::new("sluice.link", "aws_trace_header")],
        );
    }
}

/// Longest a Lambda response waits for the flush: an unreachable collector must not hold the
/// batch's response (the flush goes on in the background; spans lost then are the cost).
pub const FLUSH_WAIT: Duration = Duration::from_secs(1);

/// Exports what is queued now, off the async threads (the SDK's flush blocks), waiting at
/// most [`FLUSH_WAIT`].
pub(crate) async fn flush() {
    if let Some(p) = PROVIDER.get() {
        let p = p.clone();
        let flush = tokio::task::spawn_blocking(move || p.force_flush());
        let _ = tokio::time::timeout(FLUSH_WAIT, flush).await;
    }
}

/// Exports what is queued and stops the batch thread.
pub(crate) fn shutdown() {
    if let Some(p) = PROVIDER.get() {
        let _ = p.shutdown_with_timeout(EXPORT_TIMEOUT * 2);
    }
}

/// The bound on spans waiting: counts what it drops (the SDK's own queue drops silently).
#[derive(Debug)]
struct Bounded {
    inner: BatchSpanProcessor,
    queued: Arc<AtomicUsize>,
}

impl SpanProcessor for Bounded {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.queued.fetch_add(1, Relaxed) >= MAX_QUEUED {
            self.queued.fetch_sub(1, Relaxed);
            SPANS_DROPPED.fetch_add(1, Relaxed);
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The exporter, releasing the bound's places as batches leave and counting failed ones.
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    queued: Arc<AtomicUsize>,
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        let result = self.inner.export(batch).await;
        self.queued.fetch_sub(n, Relaxed);
        if result.is_err() {
            SPANS_DROPPED.fetch_add(n as u64, Relaxed);
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// An HTTP client for the batch thread, which has no tokio runtime of its own: each request
/// runs on the process's runtime and the thread awaits its result.
#[derive(Debug)]
struct TokioClient {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

impl HttpClient for TokioClient {
    fn send_bytes<'a, 'b>(
        &'a self,
        request: Request<bytes::Bytes>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<bytes::Bytes>, HttpError>> + Send + 'b>>
    where
        'a: 'b,
        Self: 'b,
    {
        let client = self.client.clone();
        let task = self.runtime.spawn(async move {
            let (parts, body) = request.into_parts();
            let mut req = client.request(parts.method, parts.uri.to_string());
            for (name, value) in &parts.headers {
                req = req.header(name, value);
            }
            let res = req.body(body).send().await?;
            let mut out = Response::builder().status(res.status().as_u16());
            for (name, value) in res.headers() {
                out = out.header(name.as_str(), value.as_bytes());
            }
            let body = res.bytes().await?;
            Ok::<_, HttpError>(out.body(body)?)
        });
        Box::pin(async move { task.await? })
    }
}
