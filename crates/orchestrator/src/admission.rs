//! Admission control for the store's writes: at most `slots` write
//! operations run at once, a bounded queue waits for a slot, and past the
//! queue a request is answered `429 RATE_LIMITED` at once, with a
//! `Retry-After` that books it a place in the future.
//!
//! Why: when a fleet comes back at once, thousands of writes arrive within
//! a second. Without a bound they all wait for one of the pool's few
//! connections, and those that wait longer than the pool's acquire timeout
//! die there as `503`, after holding a connection's worth of memory and
//! the client's patience for seconds. A client told "come back in n
//! seconds" early costs nothing meanwhile; and telling each rejected
//! client a later second than the last (at the rate the store is measured
//! to complete writes) spreads their return instead of sending the herd
//! back all at once.
//!
//! The queue is bounded in time, not in count: a request queues only if
//! the writes ahead of it will be done within [`MAX_QUEUE_WAIT`] at the
//! store's capacity (and never fewer than [`MIN_QUEUE`] may queue, so that
//! a cold server, which has measured nothing yet, does not turn work away).
//!
//! Capacity is the rate at which writes complete while others wait for a
//! slot: measured over windows in which the queue never emptied, so that a
//! quiet moment (refused clients waiting out their `Retry-After`) does not
//! read as a slow store. Measured from every completion, the rate fell
//! while clients waited, booked the next ones further out still, and
//! starved the store (a 10,000-agent herd went from 338 to 77 agents/s);
//! measured as `slots` over the time a write holds its slot, it fell when
//! the CPU, not the store, was saturated (58 agents/s).
//!
//! Bookings reach no further than [`BOOKING_SLACK`] past the queue's length
//! in time (`max_wait`): a short horizon. A client booked later than that
//! is booked at the horizon, and if it comes back before the queue has room
//! it is refused again and booked afresh, at the rate measured then. Why:
//! a herd is refused in its first seconds, when 10,000 connections, reads
//! and challenges take the CPU from the writes, so the rate measured then
//! is a fraction of what the store does once that storm has passed. Booked
//! one slot apart at that rate, the last agents of a 10,000-agent herd
//! were told to come back 10 to 50 s later, and the server idled (65 to
//! 93 % of the machine) while they kept their appointments. A booking that
//! cannot be wrong by more than the horizon costs instead one refused
//! request per agent per horizon it waits, and keeps the queue fed. A
//! better estimate alone (the best recent window) would not do: the herd
//! is booked before any window outside the storm exists.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

/// Longest a request should wait in the queue. Waiting for a slot is not
/// waiting for a connection (a slot holder gets one at once), so this need
/// not stay under the pool's acquire timeout; it is long enough that a
/// herd mostly queues (measured: with a 1 s queue, 10,000 agents at once
/// were mostly refused, and their backoff, which grows with every refusal,
/// then cost more than the queue).
pub const MAX_QUEUE_WAIT: Duration = Duration::from_secs(3);

/// Requests that may always queue, whatever the measured rate.
pub const MIN_QUEUE: usize = 1024;

/// A capacity assumed before any is measured (writes per second).
const INITIAL_RATE: f64 = 500.0;

/// Length of a window over which the completion rate is measured.
const RATE_WINDOW: Duration = Duration::from_millis(500);

/// How far past the queue's length in time (`max_wait`) a refused client
/// may be booked; see the module documentation. One second: `Retry-After`
/// counts whole seconds (rounded up) and the agent adds up to a second of
/// jitter, so the clients booked at the horizon come back spread over about
/// two seconds, while the queue still holds up to `max_wait` of writes.
pub const BOOKING_SLACK: Duration = Duration::from_secs(1);

/// The longest `Retry-After` given whatever `max_wait` is configured: past
/// it, a client is better off trying again than trusting an estimate that
/// far ahead.
const MAX_RETRY_AFTER: Duration = Duration::from_mins(1);

/// Turned away: come back after `retry_after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the orchestrator is busy; retry after the time given")]
pub struct Busy {
    pub retry_after: Duration,
}

/// See the module documentation.
#[derive(Debug)]
pub struct Admission {
    slots: Semaphore,
    waiting: AtomicUsize,
    max_wait: Duration,
    state: Mutex<RateState>,
}

#[derive(Debug)]
struct RateState {
    /// Writes completed per second while the queue was not empty, smoothed.
    rate: f64,
    window_start: Instant,
    window_done: u64,
    /// Whether the queue held a request at every completion of the window.
    window_busy: bool,
    /// The last moment a rejected client was told to come back at.
    booked_until: Instant,
}

/// A running write; dropping it frees the slot and counts a completion.
#[derive(Debug)]
pub struct Admitted<'a> {
    admission: &'a Admission,
    _permit: SemaphorePermit<'a>,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.admission.completed();
    }
}

impl Admission {
    /// `slots` writes at once; a queue of at most `max_wait`'s worth.
    pub fn new(slots: usize, max_wait: Duration) -> Self {
        let now = Instant::now();
        Self {
            slots: Semaphore::new(slots.max(1)),
            waiting: AtomicUsize::new(0),
            max_wait,
            state: Mutex::new(RateState {
                rate: INITIAL_RATE,
                window_start: now,
                window_done: 0,
                window_busy: true,
                booked_until: now,
            }),
        }
    }

    /// Waits for a slot, or refuses at once if the queue is full, or once
    /// the wait has lasted twice the queue's target (a store that stalled).
    pub async fn enter(&self) -> Result<Admitted<'_>, Busy> {
        if let Ok(permit) = self.slots.try_acquire() {
            return Ok(self.admitted(permit));
        }
        let queued = self.waiting.fetch_add(1, Ordering::AcqRel);
        let _leave = Leave(&self.waiting);
        if queued >= self.queue_bound() {
            return Err(self.book());
        }
        match tokio::time::timeout(self.max_wait * 2, self.slots.acquire()).await {
            Ok(Ok(permit)) => Ok(self.admitted(permit)),
            // Never closed; a timeout is a store that stopped completing.
            Ok(Err(_)) | Err(_) => Err(self.book()),
        }
    }

    /// Refuses now, with a booking as [`enter`](Self::enter) would give,
    /// when a write arriving now would be refused (the queue is full);
    /// takes no slot and queues nothing. For the step before a write (a
    /// challenge): refused there, a client has not yet signed, sent its
    /// write or had its signature recovered, work that a refusal of the
    /// write itself throws away.
    pub fn room(&self) -> Result<(), Busy> {
        if self.waiting.load(Ordering::Acquire) >= self.queue_bound() {
            return Err(self.book());
        }
        Ok(())
    }

    /// Requests queued now (for metrics and tests).
    pub fn queued(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    fn admitted<'a>(&'a self, permit: SemaphorePermit<'a>) -> Admitted<'a> {
        Admitted {
            admission: self,
            _permit: permit,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RateState> {
        // A panic elsewhere cannot leave the figures inconsistent enough
        // to matter: they are estimates.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes per second the store sustains, as measured.
    fn rate(&self) -> f64 {
        self.lock().rate
    }

    fn queue_bound(&self) -> usize {
        let rate = self.rate();
        // Truncation is intended: a count of requests.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let by_time = (rate * self.max_wait.as_secs_f64()) as usize;
        by_time.max(MIN_QUEUE)
    }

    fn completed(&self) {
        let now = Instant::now();
        let queued = self.waiting.load(Ordering::Acquire) > 0;
        let mut s = self.lock();
        s.window_done += 1;
        s.window_busy &= queued;
        let elapsed = now.duration_since(s.window_start);
        if elapsed >= RATE_WINDOW {
            if s.window_busy {
                #[allow(clippy::cast_precision_loss)]
                let measured = s.window_done as f64 / elapsed.as_secs_f64();
                s.rate = 0.5 * s.rate + 0.5 * measured;
            }
            s.window_start = now;
            s.window_done = 0;
            s.window_busy = true;
        }
    }

    /// Books the refused request a place after the queue and after every
    /// request refused before it, one per 1/rate; answers how long from now.
    fn book(&self) -> Busy {
        let now = Instant::now();
        let queued = self.waiting.load(Ordering::Acquire);
        let rate = self.rate().max(1.0);
        let mut s = self.lock();
        #[allow(clippy::cast_precision_loss)]
        let queue_done = now + Duration::from_secs_f64(queued as f64 / rate);
        let at = next_booking(
            s.booked_until,
            queue_done,
            Duration::from_secs_f64(1.0 / rate),
            now + (self.max_wait + BOOKING_SLACK).min(MAX_RETRY_AFTER),
        );
        s.booked_until = at;
        Busy {
            retry_after: at.duration_since(now),
        }
    }
}

/// The place a refused client is booked: one `gap` (1/rate) after the later
/// of the last booking and the queue's end, but never past `horizon`.
fn next_booking(
    booked_until: Instant,
    queue_done: Instant,
    gap: Duration,
    horizon: Instant,
) -> Instant {
    (booked_until.max(queue_done) + gap).min(horizon)
}

/// Leaves the queue however `enter` ends (a dropped request included).
struct Leave<'a>(&'a AtomicUsize);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn past_the_queue_requests_are_refused_with_later_and_later_retry_times() {
        let a = std::sync::Arc::new(Admission::new(1, Duration::from_secs(4)));
        let held = a.enter().await.unwrap();
        // The initial rate (500/s) allows 2,000 in four seconds, more than
        // MIN_QUEUE: so the bound is the rate's.
        let bound = a.queue_bound();
        assert_eq!(bound, 2000);
        let mut queued = Vec::new();
        for _ in 0..bound {
            let a = std::sync::Arc::clone(&a);
            queued.push(tokio::spawn(async move { a.enter().await.map(|_| ()) }));
        }
        tokio::task::yield_now().await;
        while a.queued() < bound {
            tokio::task::yield_now().await;
        }
        let first = a.enter().await.unwrap_err();
        let second = a.enter().await.unwrap_err();
        // After the queue (2,000 at 500/s: four seconds), then one more slot each.
        assert!(first.retry_after >= Duration::from_secs(4), "{first:?}");
        assert!(second.retry_after > first.retry_after, "{second:?}");
        assert_eq!(
            second.retry_after.checked_sub(first.retry_after).unwrap(),
            Duration::from_secs_f64(1.0 / 500.0)
        );
        drop(held);
        for q in queued {
            q.await.unwrap().unwrap();
        }
        assert_eq!(a.queued(), 0);
    }

    #[test]
    fn a_booking_follows_the_last_and_the_queue_and_stops_at_the_horizon() {
        let now = Instant::now();
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        let horizon = now + s(4);
        // After the queue when it ends later than the last booking.
        assert_eq!(
            next_booking(now, now + s(3), ms(2), horizon),
            now + s(3) + ms(2)
        );
        // After the last booking when that is later.
        assert_eq!(
            next_booking(now + s(3) + ms(500), now + s(3), ms(2), horizon),
            now + s(3) + ms(502)
        );
        // Never past the horizon, however slow the rate measured.
        assert_eq!(next_booking(now + s(3), now + s(3), s(2), horizon), horizon);
        assert_eq!(next_booking(now + s(30), now, ms(1), horizon), horizon);
    }

    #[tokio::test(start_paused = true)]
    async fn a_herd_refused_at_a_slow_rate_is_booked_within_the_horizon_and_booked_again_on_return()
    {
        // One slot held, a full queue (the initial 500/s: 1,500 in three
        // seconds): the rest of a herd is refused.
        let max_wait = Duration::from_secs(3);
        let a = std::sync::Arc::new(Admission::new(1, max_wait));
        let held = a.enter().await.unwrap();
        let bound = a.queue_bound();
        assert_eq!(bound, 1500);
        let mut queued = Vec::new();
        for _ in 0..bound {
            let a = std::sync::Arc::clone(&a);
            queued.push(tokio::spawn(async move { a.enter().await.map(|_| ()) }));
        }
        while a.queued() < bound {
            tokio::task::yield_now().await;
        }
        // 5,000 refused: at 500/s, one slot apart after the queue, the last
        // would be booked 3 + 5,000/500 = 13 s out. The first are booked
        // after the queue; none past the horizon, a second after it.
        let horizon = max_wait + BOOKING_SLACK;
        let refused: Vec<Duration> = (0..5_000).map(|_| a.book().retry_after).collect();
        assert!(refused.windows(2).all(|w| w[0] <= w[1]), "in order");
        assert_eq!(refused[0], Duration::from_millis(3002));
        assert_eq!(refused[499], horizon);
        assert_eq!(*refused.last().unwrap(), horizon);
        // One comes back at the horizon while the queue is still full: it is
        // refused again and booked afresh from that moment, right after the
        // queue (the 1,501st in it at 500/s), not after the 5,000 before it.
        tokio::time::advance(horizon).await;
        let again = a.enter().await.unwrap_err();
        assert_eq!(again.retry_after, Duration::from_millis(3004));
        drop(held);
        for q in queued {
            q.await.unwrap().unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn room_is_refused_exactly_when_a_write_would_be_and_shares_its_bookings() {
        let a = std::sync::Arc::new(Admission::new(1, Duration::from_secs(3)));
        let held = a.enter().await.unwrap();
        assert_eq!(a.room(), Ok(()), "the slot is taken, the queue empty");
        // The initial 500/s: 1,500 may queue in three seconds.
        let bound = a.queue_bound();
        let mut queued = Vec::new();
        let mut queue = |n: usize| {
            for _ in 0..n {
                let a = std::sync::Arc::clone(&a);
                queued.push(tokio::spawn(async move { a.enter().await.map(|_| ()) }));
            }
        };
        queue(bound - 1);
        while a.queued() < bound - 1 {
            tokio::task::yield_now().await;
        }
        assert_eq!(a.room(), Ok(()), "one place left");
        queue(1);
        while a.queued() < bound {
            tokio::task::yield_now().await;
        }
        // Full: refused with the booking a write gets (after the queue, one
        // slot at 500/s), and the next write is booked after it.
        let refused = a.room().unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_millis(3002));
        assert_eq!(a.queued(), bound, "room() queues nothing");
        let write = a.enter().await.unwrap_err();
        assert_eq!(write.retry_after, Duration::from_millis(3004));
        drop(held);
        for q in queued {
            q.await.unwrap().unwrap();
        }
        assert_eq!(a.room(), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_that_is_never_freed_turns_the_queue_away_in_bounded_time() {
        let a = Admission::new(1, Duration::from_millis(100));
        let _held = a.enter().await.unwrap();
        let began = Instant::now();
        let refused = a.enter().await.unwrap_err();
        assert_eq!(began.elapsed(), Duration::from_millis(200));
        assert!(refused.retry_after > Duration::ZERO);
        assert_eq!(a.queued(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn capacity_is_measured_while_writes_queue_and_quiet_times_do_not_lower_it() {
        // A queue of 10 s of writes, so that the waiter below stays.
        let a = std::sync::Arc::new(Admission::new(1, Duration::from_secs(10)));
        // Busy: one slot, a queue behind it, a write every 0.5 ms: 2,000/s.
        let held = a.enter().await.unwrap();
        let waiter = {
            let a = std::sync::Arc::clone(&a);
            tokio::spawn(async move { a.enter().await.map(|_| ()) })
        };
        while a.queued() == 0 {
            tokio::task::yield_now().await;
        }
        for _ in 0..20_000 {
            tokio::time::advance(Duration::from_micros(500)).await;
            a.completed();
        }
        let busy = a.queue_bound();
        assert!((19_000..=21_000).contains(&busy), "{busy}");
        drop(held);
        waiter.await.unwrap().unwrap();
        // Quiet: a write now and then, nobody waiting. The capacity stays.
        for _ in 0..100 {
            tokio::time::advance(Duration::from_millis(100)).await;
            drop(a.enter().await.unwrap());
        }
        assert_eq!(a.queue_bound(), busy);
    }
}
