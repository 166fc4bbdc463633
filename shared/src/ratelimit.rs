//! A token bucket per function, for downstreams that throttle. Off when the rate is 0.

use std::time::{Duration, Instant};

use crate::{config::RateLimitSettings, sync::Mutex};

/// Token bucket limiter.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    inner: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    /// `None` when the limit is off.
    pub fn new(settings: &RateLimitSettings) -> Option<Self> {
        if settings.per_second <= 0.0 {
            return None;
        }
        let burst = settings
            .burst
            .map(f64::from)
            .unwrap_or(settings.per_second)
            .max(1.0);
        Some(Self {
            rate: settings.per_second,
            burst,
            inner: Mutex::new((burst, Instant::now())),
        })
    }

    /// Takes one token, or says how long until one is there.
    pub fn try_take(&self) -> Result<(), Duration> {
        let mut g = self.inner.lock();
        let now = Instant::now();
        let (tokens, last) = *g;
        let tokens = (tokens + now.duration_since(last).as_secs_f64() * self.rate).min(self.burst);
        if tokens >= 1.0 {
            *g = (tokens - 1.0, now);
            Ok(())
        } else {
            *g = (tokens, now);
            Err(Duration::from_secs_f64((1.0 - tokens) / self.rate))
        }
    }

    /// Waits for a token.
    pub async fn take(&self) {
        while let Err(wait) = self.try_take() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_when_rate_is_zero() {
        assert!(RateLimiter::new(&RateLimitSettings::default()).is_none());
    }

    #[test]
    fn burst_is_spent_then_refused_with_the_wait_until_the_next_token() {
        let l = RateLimiter::new(&RateLimitSettings {
            per_second: 10.0,
            burst: Some(3),
        })
        .unwrap();
        for _ in 0..3 {
            assert!(l.try_take().is_ok());
        }
        let wait = l.try_take().unwrap_err();
        assert!(
            wait <= Duration::from_millis(100) && wait > Duration::ZERO,
            "{wait:?}"
        );
    }
}
