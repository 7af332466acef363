//! Reconnect delays. rumqttc reconnects as soon as it is polled again, so
//! without this a dead broker would be hammered in a tight loop.

use std::time::Duration;

/// Exponential backoff with "equal jitter": the n-th delay is uniformly
/// random in `[base/2, base]` with `base = min(max, min * 2^n)`. The lower
/// half keeps a fleet of agents from reconnecting in one burst after a
/// broker restart while never waiting less than half the base.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The next delay; `unit` in `[0, 1)` is the jitter source.
    pub(crate) fn next_delay(&mut self, unit: f64) -> Duration {
        let base = self
            .min
            .checked_mul(1u32.checked_shl(self.attempt).unwrap_or(u32::MAX))
            .unwrap_or(self.max)
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1).min(31);
        let half = base / 2;
        half + half.mul_f64(unit.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_maximum_within_jitter_bounds() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        let bases = [1, 2, 4, 8, 10, 10, 10];
        for base in bases {
            let low = b.clone().next_delay(0.0);
            let high = b.clone().next_delay(0.999_999);
            assert_eq!(low, Duration::from_secs(base) / 2);
            assert!(high <= Duration::from_secs(base) && high > low);
            b.next_delay(0.5);
        }
        b.reset();
        assert_eq!(b.next_delay(0.0), Duration::from_millis(500));
    }

    #[test]
    fn many_failures_never_overflow() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        for _ in 0..1000 {
            assert!(b.next_delay(0.9) <= Duration::from_secs(60));
        }
    }
}
