//! Exponential backoff with full jitter ("sleep a uniformly random time
//! between zero and the current ceiling"), so that a fleet that lost its
//! orchestrator at the same moment does not come back at the same moment.

use std::time::Duration;

/// A uniformly random fraction in [0, 1) from the OS random source. Jitter
/// needs no cryptographic quality, but this avoids another dependency; if the
/// source fails we fall back to no jitter rather than stop.
pub fn random_fraction() -> f64 {
    let bits = getrandom::u64().unwrap_or(u64::MAX / 2) >> 11;
    // 53 random bits fill an f64 mantissa exactly.
    #[allow(clippy::cast_precision_loss)]
    let f = bits as f64 / (1u64 << 53) as f64;
    f
}

/// The longest `Retry-After` honoured: a hostile or confused server cannot
/// park the agent for a year.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// `d` scaled by a fraction in [0, 1].
pub fn scale(d: Duration, fraction: f64) -> Duration {
    d.mul_f64(fraction.clamp(0.0, 1.0))
}

/// Backoff state: ceilings `initial, 2*initial, ...` up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// The ceiling for the next wait (without jitter).
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The next wait: full jitter under the ceiling, but never shorter than
    /// the server's `Retry-After` (up to [`MAX_RETRY_AFTER`]) nor than a
    /// tenth of the initial delay (no tight loop even if the jitter draws
    /// zero).
    pub fn next_delay(&mut self, retry_after: Option<Duration>) -> Duration {
        self.next_delay_with(retry_after, random_fraction())
    }

    /// [`Backoff::next_delay`] with the random draw given (for tests).
    pub fn next_delay_with(&mut self, retry_after: Option<Duration>, fraction: f64) -> Duration {
        let jittered = scale(self.ceiling(), fraction);
        self.attempt = self.attempt.saturating_add(1);
        let floor = retry_after
            .map_or(Duration::ZERO, |r| r.min(MAX_RETRY_AFTER))
            .max(self.initial / 10);
        jittered.max(floor)
    }

    /// How many failures in a row so far.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Back to the initial ceiling after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn ceilings_double_up_to_the_bound() {
        let mut b = Backoff::new(S, 10 * S);
        let ceilings: Vec<u64> = (0..6)
            .map(|_| {
                let c = b.ceiling().as_secs();
                b.next_delay_with(None, 0.5);
                c
            })
            .collect();
        assert_eq!(ceilings, [1, 2, 4, 8, 10, 10]);
        for _ in 0..100 {
            b.next_delay_with(None, 1.0);
        }
        assert_eq!(b.ceiling(), 10 * S, "no overflow after many failures");
        b.reset();
        assert_eq!(b.ceiling(), S);
    }

    #[test]
    fn delays_are_jittered_under_the_ceiling_with_a_floor() {
        let mut b = Backoff::new(S, 60 * S);
        assert_eq!(b.next_delay_with(None, 0.0), S / 10);
        assert_eq!(b.next_delay_with(None, 0.5), S);
        assert_eq!(b.next_delay_with(None, 1.0), 4 * S);
        for _ in 0..1000 {
            let d = Backoff::new(S, 60 * S).next_delay(None);
            assert!(d >= S / 10 && d <= S, "{d:?}");
        }
    }

    #[test]
    fn retry_after_is_honoured_but_bounded() {
        let mut b = Backoff::new(S, 60 * S);
        assert_eq!(b.next_delay_with(Some(30 * S), 0.0), 30 * S);
        assert_eq!(
            b.next_delay_with(Some(120 * S), 0.0),
            120 * S,
            "above max too"
        );
        assert_eq!(b.next_delay_with(Some(86_400 * S), 0.0), MAX_RETRY_AFTER);
    }

    #[test]
    fn random_fraction_is_in_range_and_varies() {
        let draws: Vec<f64> = (0..64).map(|_| random_fraction()).collect();
        assert!(draws.iter().all(|f| (0.0..1.0).contains(f)));
        assert!(draws.windows(2).any(|w| (w[0] - w[1]).abs() > f64::EPSILON));
    }
}
