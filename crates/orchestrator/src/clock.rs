//! Wall-clock time, behind a trait so that tests can move it: challenge and
//! proof expiry, cache TTLs and rate-limit refills all read it.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use peaqos_protocol::Timestamp;

/// A source of the current time.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    fn now(&self) -> SystemTime;

    /// Now at the wire's millisecond precision.
    fn timestamp(&self) -> Timestamp {
        Timestamp::from_system_time(self.now())
    }
}

/// The operating system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to (tests and benchmarks).
#[derive(Debug)]
pub struct ManualClock(Mutex<SystemTime>);

impl ManualClock {
    pub fn new(start: SystemTime) -> Self {
        Self(Mutex::new(start))
    }

    pub fn advance(&self, by: Duration) {
        let mut now = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *now += by;
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new(SystemTime::now())
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Elapsed time from `then` to `now`; `None` when the clock went backwards,
/// which callers treat as "expired" rather than "fresh for ever".
pub(crate) fn elapsed(now: SystemTime, then: SystemTime) -> Option<Duration> {
    now.duration_since(then).ok()
}
