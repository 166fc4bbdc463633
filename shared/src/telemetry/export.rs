//! Whether spans leave the process, and how many the exporter dropped: shared by the spans
//! (`trace`), the exporter (`otlp`) and `/metrics` (`exposition`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

/// Whether spans are being exported (set once by the OTLP set-up).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Spans the exporter dropped: its queue was full (a slow or unreachable collector) or the
/// export failed. `sluice_trace_spans_dropped_total` on `/metrics`.
pub static SPANS_DROPPED: AtomicU64 = AtomicU64::new(0);

/// Whether spans leave the process (feature `otlp` with an endpoint).
pub fn exporting() -> bool {
    EXPORTING.load(Relaxed)
}

#[cfg_attr(not(feature = "otlp"), allow(dead_code))]
pub(crate) fn set_exporting() {
    EXPORTING.store(true, Relaxed);
}
