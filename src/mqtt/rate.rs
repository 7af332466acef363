//! Token buckets that cap how often remote requests make the agent work.

use std::time::Duration;

use tokio::time::Instant;

/// Holds up to `burst` tokens and gains one every `refill`. Uses tokio's
/// clock so that tests can pause time.
#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    burst: u32,
    refill: Duration,
    tokens: u32,
    /// When the next token is added (if below `burst`).
    next_refill: Instant,
}

impl TokenBucket {
    pub(crate) fn new(burst: u32, refill: Duration) -> Self {
        let burst = burst.max(1);
        Self {
            burst,
            refill: refill.max(Duration::from_millis(1)),
            tokens: burst,
            next_refill: Instant::now(),
        }
    }

    /// Takes a token if there is one.
    pub(crate) fn try_take(&mut self) -> bool {
        self.refill_to(Instant::now());
        if self.tokens == 0 {
            return false;
        }
        if self.tokens == self.burst {
            // The refill clock starts when the bucket stops being full.
            self.next_refill = Instant::now() + self.refill;
        }
        self.tokens -= 1;
        true
    }

    fn refill_to(&mut self, now: Instant) {
        while self.tokens < self.burst && now >= self.next_refill {
            self.tokens += 1;
            self.next_refill += self.refill;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn allows_a_burst_then_one_per_refill() {
        let mut bucket = TokenBucket::new(2, Duration::from_secs(10));
        assert!(bucket.try_take());
        assert!(bucket.try_take());
        assert!(!bucket.try_take());
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(!bucket.try_take());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(bucket.try_take());
        assert!(!bucket.try_take());
        // A long quiet time refills to the burst, not beyond.
        tokio::time::advance(Duration::from_secs(1000)).await;
        assert!(bucket.try_take());
        assert!(bucket.try_take());
        assert!(!bucket.try_take());
    }
}
