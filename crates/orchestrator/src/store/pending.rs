//! How many challenges are pending, as the PostgreSQL store checks its
//! bound: counted in the database at most once per interval, plus what this
//! process inserted since.
//!
//! Counting on every insert (as the SQLite store does, where it is cheap)
//! made each insert on PostgreSQL a scan of the index range of every
//! challenge issued within the TTL, consumed ones included until vacuum
//! removes them: at a thousand registrations a second, hundreds of
//! thousands of entries per insert. The bound caps storage against floods;
//! with this estimate it holds to within one interval's inserts of the
//! other replicas, and errs towards refusing early (consumed challenges are
//! still counted until the next count).

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long a count is trusted.
pub(crate) const RECOUNT_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
struct State {
    counted: u64,
    /// When the count was taken (or claimed by a task that is taking it).
    at: Option<Instant>,
    inserted_since: u64,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub(crate) struct PendingEstimate(Mutex<State>);

/// What an insert should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Room {
    Yes,
    No,
    /// The estimate is too old: count, then [`PendingEstimate::counted`].
    Recount,
}

impl PendingEstimate {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether one more challenge fits under `max`. One caller at a time
    /// is told to recount; the others go by the old estimate meanwhile.
    pub(crate) fn room(&self, max: u64, now: Instant) -> Room {
        let mut s = self.lock();
        match s.at {
            Some(at) if now.saturating_duration_since(at) < RECOUNT_AFTER => {
                if s.counted + s.inserted_since < max {
                    Room::Yes
                } else {
                    Room::No
                }
            }
            _ => {
                s.at = Some(now);
                Room::Recount
            }
        }
    }

    /// A fresh count, taken at `at`.
    pub(crate) fn counted(&self, count: u64, at: Instant) {
        let mut s = self.lock();
        s.counted = count;
        s.at = Some(at);
        s.inserted_since = 0;
    }

    /// A count failed: the next insert counts again.
    pub(crate) fn forget(&self) {
        self.lock().at = None;
    }

    pub(crate) fn inserted(&self) {
        self.lock().inserted_since += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_once_per_interval_and_adds_its_own_inserts() {
        let e = PendingEstimate::default();
        let t0 = Instant::now();
        assert_eq!(e.room(3, t0), Room::Recount);
        // Meanwhile, others do not count too.
        assert_eq!(e.room(3, t0), Room::Yes);
        e.counted(1, t0);
        assert_eq!(e.room(3, t0), Room::Yes);
        e.inserted();
        assert_eq!(
            e.room(3, t0),
            Room::Yes,
            "1 counted + 1 inserted: room for one"
        );
        e.inserted();
        assert_eq!(e.room(3, t0), Room::No, "1 counted + 2 inserted: full");
        let later = t0 + RECOUNT_AFTER;
        assert_eq!(e.room(3, later), Room::Recount);
        e.counted(0, later);
        assert_eq!(e.room(3, later), Room::Yes);
        e.forget();
        assert_eq!(e.room(3, later), Room::Recount);
    }
}
