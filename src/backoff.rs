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

/// The most added to a server's `Retry-After`: it is given in whole
/// seconds, so clients told the same second spread over at most that
/// second instead of arriving in the same millisecond.
pub const RETRY_AFTER_JITTER: Duration = Duration::from_secs(1);

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

    /// The next wait. Without a `Retry-After` (or with one shorter than the
    /// initial delay): full jitter under the ceiling, never shorter than the
    /// `Retry-After` nor than a tenth of the initial delay (no tight loop
    /// even if the jitter draws zero). With a `Retry-After` of at least the
    /// initial delay: that time (up to [`MAX_RETRY_AFTER`]) plus a jitter of
    /// at most a tenth of it and at most [`RETRY_AFTER_JITTER`], whatever
    /// the ceiling. The ceiling doubles either way.
    ///
    /// Why the server's time wins: an orchestrator that books each refused
    /// client a later slot (`429` with `Retry-After`) spreads a herd itself;
    /// with the old rule (the longer of the two) the doubling ceiling
    /// passed the booked slot by the third refusal, and the server idled
    /// while its clients slept (docs/performance.md, the write path at
    /// fleet scale). A `Retry-After` under the initial delay does not set
    /// the schedule: a server answering `Retry-After: 0` forever (hostile
    /// or broken) meets the exponential backoff, not a loop at the floor.
    pub fn next_delay(&mut self, retry_after: Option<Duration>) -> Duration {
        self.next_delay_with(retry_after, random_fraction())
    }

    /// [`Backoff::next_delay`] with the random draw given (for tests).
    pub fn next_delay_with(&mut self, retry_after: Option<Duration>, fraction: f64) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let retry_after = retry_after.map(|r| r.min(MAX_RETRY_AFTER));
        match retry_after {
            Some(r) if r >= self.initial => r + scale((r / 10).min(RETRY_AFTER_JITTER), fraction),
            _ => scale(ceiling, fraction)
                .max(retry_after.unwrap_or_default())
                .max(self.initial / 10),
        }
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
    const MS: Duration = Duration::from_millis(1);

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
        assert_eq!(
            b.next_delay_with(Some(86_400 * S), 1.0),
            MAX_RETRY_AFTER + RETRY_AFTER_JITTER,
            "the jitter is bounded too"
        );
    }

    #[test]
    fn retry_after_sets_the_schedule_however_high_the_ceiling() {
        let mut b = Backoff::new(S, 300 * S);
        // Five refusals: the ceiling is 32 s. The old rule (the longer of
        // jitter and Retry-After) waited up to 32 s here.
        for _ in 0..5 {
            b.next_delay_with(Some(2 * S), 0.5);
        }
        assert_eq!(b.ceiling(), 32 * S, "the ceiling still doubles");
        assert_eq!(b.next_delay_with(Some(3 * S), 0.0), 3 * S);
        // A jitter of at most a tenth of the time given...
        assert_eq!(b.next_delay_with(Some(3 * S), 1.0), 3 * S + 300 * MS);
        assert_eq!(b.next_delay_with(Some(3 * S), 0.5), 3 * S + 150 * MS);
        // ... and at most a second.
        assert_eq!(b.next_delay_with(Some(40 * S), 1.0), 41 * S);
        for _ in 0..1000 {
            let d = b.next_delay(Some(5 * S));
            assert!(d >= 5 * S && d <= 5 * S + 500 * MS, "{d:?}");
        }
        // Without a Retry-After, the exponential backoff from where it is.
        assert_eq!(b.next_delay_with(None, 1.0), 300 * S);
    }

    #[test]
    fn a_retry_after_of_zero_forever_backs_off_exponentially() {
        // A hostile or broken server: the floor and the doubling ceiling
        // hold, as without a Retry-After.
        let mut b = Backoff::new(S, 300 * S);
        let waits: Vec<Duration> = (0..10)
            .map(|_| b.next_delay_with(Some(Duration::ZERO), 1.0))
            .collect();
        assert_eq!(waits[..4], [S, 2 * S, 4 * S, 8 * S]);
        assert_eq!(waits[9], 300 * S);
        assert_eq!(b.next_delay_with(Some(Duration::ZERO), 0.0), S / 10);
        // Under the initial delay it is a floor, not the schedule.
        let mut b = Backoff::new(S, 300 * S);
        assert_eq!(b.next_delay_with(Some(500 * MS), 0.0), 500 * MS);
        assert_eq!(b.next_delay_with(Some(500 * MS), 1.0), 2 * S);
    }

    #[test]
    fn random_fraction_is_in_range_and_varies() {
        let draws: Vec<f64> = (0..64).map(|_| random_fraction()).collect();
        assert!(draws.iter().all(|f| (0.0..1.0).contains(f)));
        assert!(draws.windows(2).any(|w| (w[0] - w[1]).abs() > f64::EPSILON));
    }
}
