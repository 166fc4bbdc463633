//! The transport conformance suite on the embedded SQLite queue.

use std::time::Duration;

use sluice::transport::{embedded::EmbeddedTransport, TransportOptions};

use crate::support;

/// Each check gets its own file; handles made with the same queue share it.
async fn make(mut opts: TransportOptions) -> EmbeddedTransport {
    let dir = std::env::temp_dir().join("sluice-conformance");
    opts.url = dir
        .join(format!("{}.db", opts.queue))
        .to_string_lossy()
        .into_owned();
    EmbeddedTransport::open(opts)
        .await
        .expect("open embedded transport")
}

support::transport_conformance!(
    // The embedded queue stores exact times: no rounding allowed.
    rounding: Duration::ZERO,
    |check| {
        check(make).await;
    }
);
