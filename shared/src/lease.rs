//! The local lease clock of transports whose broker does not refuse a stale handle by itself.
//!
//! RabbitMQ has no lease at all (an unacked delivery stays with its channel), and SQS may
//! accept a settle with an old receipt handle ("succeeds, but the message might not be
//! deleted"). So each adapter keeps, per delivery it handed out, the end of the lease (pushed by
//! `extend`, never past a cap: RabbitMQ's `consumer_timeout`, SQS's 12 hours in flight) and
//! whether it was settled. A settle after the end, or a second one, is refused without a
//! broker call. Settled entries stay as tombstones until their lease would have ended, so a
//! late second settle is still refused.

use std::{
    collections::HashMap,
    hash::Hash,
    time::{Duration, Instant},
};

use crate::sync::Mutex;

/// When one delivery was received, when its lease ends, and the latest it may be pushed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Monotonic time of the receive.
    pub received: Instant,
    /// End of the lease.
    pub until: Instant,
    /// No lease goes past this.
    pub cap: Instant,
}

impl Span {
    /// A lease of `lease` from `received`, never past `cap`.
    pub fn new(received: Instant, lease: Duration, cap: Instant) -> Self {
        Self {
            received,
            until: (received + lease).min(cap),
            cap,
        }
    }
}

/// What [`LeaseClock::take`] found.
#[derive(Debug)]
pub enum Taken<V> {
    /// Ours, in time: settle it. The entry is now a tombstone.
    Live(V),
    /// The lease ended unsettled: the broker redelivers (or the caller must put it back).
    Expired(V),
    /// Settled already (or expired and taken by the keeper).
    Settled,
    /// Never handed out by this clock.
    Unknown,
}

struct Entry<V> {
    span: Span,
    value: Option<V>,
}

/// Leases by key (a typed receipt), each with a value the adapter needs to settle it.
pub struct LeaseClock<K, V> {
    map: Mutex<HashMap<K, Entry<V>>>,
}

impl<K: Eq + Hash + Clone, V> Default for LeaseClock<K, V> {
    fn default() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash + Clone, V> LeaseClock<K, V> {
    /// Starts the lease of a delivery just handed out.
    pub fn hold(&self, key: K, span: Span, value: V) {
        self.map.lock().insert(
            key,
            Entry {
                span,
                value: Some(value),
            },
        );
    }

    /// The lease of `key` while it is live.
    pub fn live(&self, key: &K, now: Instant) -> Option<Span> {
        let map = self.map.lock();
        let e = map.get(key)?;
        (e.value.is_some() && now < e.span.until).then_some(e.span)
    }

    /// Whether the clock knows `key` at all (live, expired or settled).
    pub fn knows(&self, key: &K) -> bool {
        self.map.lock().contains_key(key)
    }

    /// Takes the delivery to settle it; from here on this caller settles it or puts it back.
    pub fn take(&self, key: &K, now: Instant) -> Taken<V> {
        let mut map = self.map.lock();
        let Some(e) = map.get_mut(key) else {
            return Taken::Unknown;
        };
        match e.value.take() {
            None => Taken::Settled,
            Some(v) if now < e.span.until => Taken::Live(v),
            Some(v) => Taken::Expired(v),
        }
    }

    /// Records that `key`, not known to this clock, was settled (a handle it never received).
    pub fn tombstone(&self, key: K, span: Span) {
        self.map.lock().insert(key, Entry { span, value: None });
    }

    /// Puts a taken delivery back after a settle that failed, so its lease runs on.
    pub fn restore(&self, key: &K, value: V) {
        if let Some(e) = self.map.lock().get_mut(key) {
            e.value = Some(value);
        }
    }

    /// Moves the end of a live lease to `until`, never past its cap; returns the new end, or
    /// `None` when the lease is not live (expired, settled, unknown).
    pub fn push(&self, key: &K, until: Instant, now: Instant) -> Option<Instant> {
        let mut map = self.map.lock();
        let e = map.get_mut(key)?;
        if e.value.is_none() || now >= e.span.until {
            return None;
        }
        e.span.until = until.min(e.span.cap);
        Some(e.span.until)
    }

    /// Takes every live delivery whose lease has ended, for the keeper to return.
    pub fn take_expired(&self, now: Instant) -> Vec<(K, Span, V)> {
        let mut map = self.map.lock();
        map.iter_mut()
            .filter(|(_, e)| e.value.is_some() && e.span.until <= now)
            .filter_map(|(k, e)| Some((k.clone(), e.span, e.value.take()?)))
            .collect()
    }

    /// Forgets tombstones whose lease would have ended by now.
    pub fn prune(&self, now: Instant) {
        self.map
            .lock()
            .retain(|_, e| e.value.is_some() || e.span.until > now);
    }

    /// Keeps only the entries `keep` says yes to (a reconnect forgets an old connection's).
    pub fn retain(&self, mut keep: impl FnMut(&K) -> bool) {
        self.map.lock().retain(|k, _| keep(k));
    }

    /// Deliveries handed out and not settled.
    pub fn live_count(&self) -> usize {
        self.map
            .lock()
            .values()
            .filter(|e| e.value.is_some())
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn a_lease_is_settled_once_in_time_and_pushed_never_past_its_cap() {
        let t0 = Instant::now();
        let clock = LeaseClock::<u64, &str>::default();
        clock.hold(
            1,
            Span::new(t0, Duration::from_millis(100), at(t0, 250)),
            "a",
        );
        assert!(clock.live(&1, at(t0, 50)).is_some());
        assert_eq!(clock.push(&1, at(t0, 400), at(t0, 90)), Some(at(t0, 250)));
        assert!(matches!(clock.take(&1, at(t0, 200)), Taken::Live("a")));
        assert!(matches!(clock.take(&1, at(t0, 201)), Taken::Settled));
        clock.restore(&1, "a");
        assert!(matches!(clock.take(&1, at(t0, 260)), Taken::Expired("a")));
        assert!(matches!(clock.take(&2, t0), Taken::Unknown));
    }

    #[test]
    fn the_keeper_takes_expired_leases_and_tombstones_are_pruned() {
        let t0 = Instant::now();
        let clock = LeaseClock::<u64, u8>::default();
        let far = at(t0, 10_000);
        clock.hold(1, Span::new(t0, Duration::from_millis(10), far), 1);
        clock.hold(2, Span::new(t0, Duration::from_millis(500), far), 2);
        let expired = clock.take_expired(at(t0, 20));
        assert_eq!(expired.len(), 1);
        assert_eq!((expired[0].0, expired[0].2), (1, 1));
        assert_eq!(clock.live_count(), 1);
        assert!(matches!(clock.take(&1, at(t0, 21)), Taken::Settled));
        clock.prune(at(t0, 21));
        assert!(!clock.knows(&1) && clock.knows(&2));
        assert_eq!(clock.push(&1, far, at(t0, 22)), None);
    }
}
