//! A Prometheus histogram with the buckets of the metrics contract: lock-free counts per
//! bucket, so observing on the pipeline's path is a few atomic adds.

use std::{
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

/// The upper bounds (seconds) of the contract's buckets, `+Inf` left out. Dense between 100 ms
/// and 500 ms, so that `histogram_quantile` resolves the 200 ms p95 objective to a bucket edge
/// on either side instead of interpolating across a wide one.
pub const BUCKETS: [f64; 18] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// [`BUCKETS`] in nanoseconds, for comparing without floating point.
const BOUNDS_NS: [u64; 18] = {
    let mut out = [0u64; 18];
    let mut i = 0;
    while i < BUCKETS.len() {
        // Rounded: 0.15 x 1e9 is not exactly 150000000 in binary floating point.
        out[i] = (BUCKETS[i] * 1e9 + 0.5) as u64;
        i += 1;
    }
    out
};

/// Observations of one duration, by bucket.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    counts: [AtomicU64; 19],
    /// The sum of all observations, in nanoseconds (584 years before it wraps).
    sum_ns: AtomicU64,
}

/// A consistent reading: the cumulative counts per [`BUCKETS`] bound then `+Inf` (whose
/// value is the count), and the sum in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Cumulative counts, one per bound of [`BUCKETS`] and a last one for `+Inf`.
    pub cumulative: [u64; 19],
    /// The sum of the observations in seconds.
    pub sum: f64,
}

impl Snapshot {
    /// Observations in all.
    pub fn count(&self) -> u64 {
        self.cumulative[18]
    }
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        // `le` is inclusive: a value equal to a bound belongs to that bound's bucket.
        let i = BOUNDS_NS.iter().position(|&b| ns <= b).unwrap_or(18);
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    /// The counts as `/metrics` shows them. `_count` is the `+Inf` bucket by construction, so
    /// a scrape that races an observation is still a valid histogram.
    pub fn snapshot(&self) -> Snapshot {
        let mut cumulative = [0u64; 19];
        let mut total = 0u64;
        for (c, out) in self.counts.iter().zip(cumulative.iter_mut()) {
            total += c.load(Relaxed);
            *out = total;
        }
        Snapshot {
            cumulative,
            sum: self.sum_ns.load(Relaxed) as f64 / 1e9,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(5)); // le=0.005 exactly
        h.observe(Duration::from_millis(150)); // le=0.15
        h.observe(Duration::from_millis(151)); // le=0.2
        h.observe(Duration::from_secs(61)); // +Inf only
        let s = h.snapshot();
        assert_eq!(s.cumulative[0], 1);
        assert_eq!(
            s.cumulative[BUCKETS.iter().position(|&b| b == 0.1).unwrap()],
            1
        );
        assert_eq!(
            s.cumulative[BUCKETS.iter().position(|&b| b == 0.15).unwrap()],
            2
        );
        assert_eq!(
            s.cumulative[BUCKETS.iter().position(|&b| b == 0.2).unwrap()],
            3
        );
        assert_eq!(s.cumulative[17], 3, "60 s holds all but the last");
        assert_eq!(s.count(), 4);
        assert!((s.sum - 61.306).abs() < 1e-9, "{}", s.sum);
    }

    #[test]
    fn bounds_rise_and_match_the_seconds() {
        assert!(BUCKETS.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(BOUNDS_NS[0], 5_000_000);
        assert_eq!(BOUNDS_NS[17], 60_000_000_000);
    }
}
