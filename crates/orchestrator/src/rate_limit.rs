//! Per-client-address token buckets for challenge requests.
//!
//! A challenge costs a database row until it expires, so a flood from one
//! address is refused early with `429 RATE_LIMITED` and `Retry-After`; the
//! store's bound on pending challenges caps the total whatever the number of
//! addresses. IPv6 clients are keyed by their /64, the block one host
//! usually gets.
//!
//! Hand-written rather than `governor` (weighed for issue #14, measured on
//! 2026-12-02): governor's keyed GCRA is the same algorithm, but reading
//! time from our [`Clock`] (which the tests move) takes a `Reference` and
//! `Clock` adapter as long as the bucket below; it adds 5 crates to
//! Cargo.lock even with `default-features = false, features = ["std"]`
//! (governor, futures-timer, nonzero_ext, spinning_top, web-time); and it
//! is not faster: governor/this = 1.06 per check spread over 10,000
//! addresses and 1.21 for one refused address (medians of 5 rounds, both
//! in one release-build run of a scratch benchmark holding a copy of this
//! file and a governor 0.10.4 version of it behind the same clock).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use crate::clock::{self, Clock};

/// Past this many tracked addresses, full buckets are forgotten.
const MAX_TRACKED: usize = 50_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: SystemTime,
}

/// See the module documentation.
#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    clock: Arc<dyn Clock>,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let mut seg = v6.segments();
            seg[4..].fill(0);
            IpAddr::V6(seg.into())
        }
    }
}

impl RateLimiter {
    pub fn new(per_minute: u32, burst: u32, clock: Arc<dyn Clock>) -> Self {
        Self {
            per_second: f64::from(per_minute.max(1)) / 60.0,
            burst: f64::from(burst.max(1)),
            clock,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `ip`, or says how long until one is available.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        let now = self.clock.now();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() >= MAX_TRACKED {
            let (per_second, burst) = (self.per_second, self.burst);
            buckets.retain(|_, b| refill(b, now, per_second, burst) < burst);
        }
        let bucket = buckets.entry(key(ip)).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let tokens = refill(bucket, now, self.per_second, self.burst);
        if tokens >= 1.0 {
            *bucket = Bucket {
                tokens: tokens - 1.0,
                at: now,
            };
            Ok(())
        } else {
            *bucket = Bucket { tokens, at: now };
            Err(Duration::from_secs_f64((1.0 - tokens) / self.per_second))
        }
    }
}

fn refill(bucket: &Bucket, now: SystemTime, per_second: f64, burst: f64) -> f64 {
    // A clock that went backwards refills nothing.
    let elapsed = clock::elapsed(now, bucket.at).unwrap_or_default();
    (bucket.tokens + elapsed.as_secs_f64() * per_second).min(burst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    #[test]
    fn burst_then_rate_per_address() {
        let clock = Arc::new(ManualClock::default());
        let limiter = RateLimiter::new(60, 3, clock.clone());
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..3 {
            assert!(limiter.check(a).is_ok());
        }
        let wait = limiter.check(a).unwrap_err();
        assert!(
            wait <= Duration::from_secs(1) && wait > Duration::ZERO,
            "{wait:?}"
        );
        assert!(limiter.check(b).is_ok(), "other addresses are not affected");
        clock.advance(Duration::from_secs(1));
        assert!(limiter.check(a).is_ok());
        assert!(limiter.check(a).is_err());
    }

    #[test]
    fn ipv6_hosts_share_their_64() {
        let clock = Arc::new(ManualClock::default());
        let limiter = RateLimiter::new(1, 1, clock);
        assert!(limiter.check("2001:db8::1".parse().unwrap()).is_ok());
        assert!(limiter.check("2001:db8::2".parse().unwrap()).is_err());
        assert!(limiter.check("2001:db8:0:1::1".parse().unwrap()).is_ok());
    }
}
