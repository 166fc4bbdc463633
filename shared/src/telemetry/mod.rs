//! Logs (tracing, JSON by default), the panic hook, the counters of one worker
//! ([`metrics`], with its [`histogram`]s and their Prometheus text, [`exposition`]), what
//! the probes report ([`health`]), and the spans of the messaging conventions ([`trace`]),
//! exported over OTLP with the feature `otlp` (`otlp`).

mod export;
pub mod exposition;
pub mod health;
pub mod histogram;
pub mod metrics;
#[cfg(feature = "otlp")]
mod otlp;
pub mod trace;

use std::{
    cell::Cell,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt, EnvFilter, Layer};

pub use self::metrics::{inc, ErrorClass, Labels, Metrics, Outcome, RunSummary};
use crate::config::{LogFormat, TelemetrySettings};

/// Installs the global subscriber (logs to stderr; stdout is for command output), the span
/// exporter when built with `otlp` and an endpoint is set (spans named after `function`
/// unless `telemetry.otlp.service_name` says otherwise), and the panic hook. Call it inside the
/// tokio runtime: the exporter's requests run there.
pub fn init_logging(settings: &TelemetrySettings, function: &str) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(settings.log_level.as_str()));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match settings.log_format {
        LogFormat::Json => fmt
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
        LogFormat::Pretty => fmt.boxed(),
    };
    let registry = tracing_subscriber::registry().with(fmt);
    #[cfg(feature = "otlp")]
    let registry = registry.with(otlp::layer(&settings.otlp, function));
    #[cfg(not(feature = "otlp"))]
    let _ = function;
    let _ = registry.with(filter).try_init();
    // A panic becomes a log event, not raw stderr text. A handler's panic is caught and
    // counted by the pipeline; any other panic is a bug of ours and says so.
    std::panic::set_hook(Box::new(|info| {
        if IN_HANDLER.with(Cell::get) {
            tracing::error!(panic = %info, "handler panicked");
        } else {
            tracing::error!(panic = %info, "panicked outside any handler");
        }
    }));
}

thread_local! {
    /// Set while this thread polls a handler's future.
    static IN_HANDLER: Cell<bool> = const { Cell::new(false) };
}

/// A handler's future, marked so that the panic hook can tell its panics from the runtime's.
pub(crate) struct HandlerScope<F>(pub(crate) Pin<Box<F>>);

impl<F: Future> Future for HandlerScope<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        struct Reset(bool);
        impl Drop for Reset {
            fn drop(&mut self) {
                IN_HANDLER.with(|f| f.set(self.0));
            }
        }
        let _reset = Reset(IN_HANDLER.with(|f| f.replace(true)));
        self.0.as_mut().poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_is_set_only_while_the_handler_is_polled() {
        let fut = HandlerScope(Box::pin(async { IN_HANDLER.with(Cell::get) }));
        let inside = futures_util::FutureExt::now_or_never(fut).unwrap();
        assert!(inside);
        assert!(!IN_HANDLER.with(Cell::get));
    }
}
