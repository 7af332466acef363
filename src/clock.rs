//! The orchestrator's clock as seen from here.
//!
//! Robots often boot without a real-time clock, so the local wall clock may
//! be hours or years off. Expiry is therefore never decided from it: each
//! response anchors "server time T happened at monotonic instant M", and a
//! server timestamp becomes a monotonic deadline as `M + (t - T)`. The local
//! wall clock is only used to report the skew.
//!
//! Anchors come from two kinds of evidence. The HTTP `Date` header is on
//! every response but has one-second resolution. Millisecond timestamps that
//! the server set to its own "now" while answering (a challenge's issue time,
//! a fresh proof's `verifiedAt`) are precise. A precise anchor is kept until a
//! `Date` header disagrees with it by more than the header's resolution, which
//! means the server's clock moved (or another server answered).
//!
//! The local wall clock is never trusted below a floor: the agent's build
//! time, or the latest server time a saved state records (a confirmed
//! proof's `verifiedAt`), whichever is later. A board that boots in 1970
//! checks TLS certificates at the floor instead ([`trusted_now`],
//! `tls.rs`), and plans without a server clock from it. The state's own
//! `savedAt` is local time, possibly wrong ahead, so it is not a floor.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use peaqos_protocol::Timestamp;
use tokio::time::Instant;

/// A server clock further than this from the local one means the local
/// clock is wrong (or the server's): logged with the code `CLOCK`.
pub const CLOCK_SKEW_BOUND: Duration = Duration::from_secs(300);

/// Slack added to the `Date` header's one-second truncation before a header
/// is taken to contradict a precise anchor (covers request latency).
const DATE_TOLERANCE: Duration = Duration::from_millis(1500);

#[derive(Debug, Clone, Copy)]
struct Anchor {
    server_ms: i64,
    at: Instant,
    /// Server minus local wall clock when the anchor was taken.
    skew_ms: i64,
    precise: bool,
}

/// Server time estimated on the monotonic clock.
#[derive(Debug, Clone, Default)]
pub struct ServerClock {
    anchor: Option<Anchor>,
}

fn system_ms(t: SystemTime) -> i64 {
    Timestamp::from_system_time(t).unix_millis()
}

impl ServerClock {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records an HTTP `Date` header received at `at` (local wall `local`).
    pub fn observe_date(&mut self, date: SystemTime, at: Instant, local: SystemTime) {
        // The header truncates to the second: the true time is in [date, date + 1 s).
        let low = system_ms(date);
        if let Some(a) = self.anchor {
            let estimate = a.server_ms + millis(at.saturating_duration_since(a.at));
            let tolerance = millis(DATE_TOLERANCE);
            if a.precise && estimate >= low - tolerance && estimate <= low + 1000 + tolerance {
                return;
            }
        }
        let server_ms = low + 500;
        self.set_anchor(Anchor {
            server_ms,
            at,
            skew_ms: server_ms - system_ms(local),
            precise: false,
        });
    }

    /// Takes a new anchor, and says so in the journal (`ERROR_CODE=CLOCK`)
    /// when the local clock newly disagrees with the server's by more than
    /// [`CLOCK_SKEW_BOUND`]: renewals follow the server's clock and go on,
    /// but TLS certificate checks use the local one.
    fn set_anchor(&mut self, anchor: Anchor) {
        let off = |a: &Anchor| u128::from(a.skew_ms.unsigned_abs()) > CLOCK_SKEW_BOUND.as_millis();
        if off(&anchor) && !self.anchor.as_ref().is_some_and(off) {
            tracing::warn!(
                error_code = "CLOCK",
                skew_ms = anchor.skew_ms,
                "this machine's clock differs from the orchestrator's by {} s: it is probably \
                 wrong (no real-time clock, NTP not synced: see `timedatectl timesync-status`); \
                 renewals follow the orchestrator's clock, TLS checks use this one",
                anchor.skew_ms / 1000
            );
        }
        self.anchor = Some(anchor);
    }

    /// Records a millisecond timestamp that the server took as "now" while
    /// producing a response received at `at`.
    pub fn observe_precise(&mut self, server: Timestamp, at: Instant, local: SystemTime) {
        self.set_anchor(Anchor {
            server_ms: server.unix_millis(),
            at,
            skew_ms: server.unix_millis() - system_ms(local),
            precise: true,
        });
    }

    /// Server time now, if any response was seen.
    pub fn server_now(&self) -> Option<Timestamp> {
        self.server_at(Instant::now())
    }

    fn server_at(&self, at: Instant) -> Option<Timestamp> {
        let a = self.anchor?;
        Timestamp::from_unix_millis(a.server_ms + millis(at.saturating_duration_since(a.at)))
    }

    /// Server minus local wall clock, in milliseconds, as last measured.
    pub fn skew_ms(&self) -> Option<i64> {
        self.anchor.map(|a| a.skew_ms)
    }

    /// The monotonic instant at which the server's clock reads `t`; `None`
    /// before any response. A time already past gives an instant in the past.
    pub fn deadline(&self, t: Timestamp) -> Option<Instant> {
        let a = self.anchor?;
        let delta = t.unix_millis() - a.server_ms;
        Some(if delta >= 0 {
            a.at + Duration::from_millis(delta.unsigned_abs())
        } else {
            a.at.checked_sub(Duration::from_millis(delta.unsigned_abs()))
                .unwrap_or(a.at)
        })
    }

    /// How long until the server's clock reads `t` (zero if it already has).
    pub fn until(&self, t: Timestamp) -> Option<Duration> {
        self.deadline(t)
            .map(|d| d.saturating_duration_since(Instant::now()))
    }
}

impl ServerClock {
    /// As [`ServerClock::until`], but before any evidence of the server's
    /// clock (a server that sends no `Date` header) on the local wall
    /// clock, which is all there is then.
    pub fn until_or_local(&self, t: Timestamp) -> Duration {
        self.until(t).unwrap_or_else(|| {
            t.to_system_time()
                .duration_since(trusted_now())
                .unwrap_or(Duration::ZERO)
        })
    }
}

/// The floor raised by saved state, in seconds since the epoch.
static FLOOR_SECS: AtomicU64 = AtomicU64::new(0);

/// The build time in seconds since the epoch (build.rs).
fn build_time_secs() -> u64 {
    env!("PEAQOS_BUILD_TIME").parse().unwrap_or(0)
}

/// The agent's build time.
pub fn build_time() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(build_time_secs())
}

/// The earliest the wall clock can truly read now.
pub fn floor() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(build_time_secs().max(FLOOR_SECS.load(Ordering::Relaxed)))
}

/// Raises the floor to `t`, a server time the agent saved (never lowers it).
pub fn raise_floor(t: SystemTime) {
    if let Ok(d) = t.duration_since(UNIX_EPOCH) {
        FLOOR_SECS.fetch_max(d.as_secs(), Ordering::Relaxed);
    }
}

/// The local wall clock, or the floor when the clock reads earlier.
pub fn trusted_now() -> SystemTime {
    SystemTime::now().max(floor())
}

/// Whether the local wall clock reads at or after the floor: a clock
/// before it is known wrong (a board without a real-time clock before NTP).
pub fn local_is_sane() -> bool {
    SystemTime::now() >= floor()
}

/// `check`'s verdict on the local clock: `Err` when it reads before the
/// floor (raised first by the server time saved in `state_dir`).
pub fn check_line(state_dir: &std::path::Path) -> Result<String, String> {
    if let Some(saved) = crate::state::saved_server_time(state_dir) {
        raise_floor(saved.to_system_time());
    }
    let now = Timestamp::from_system_time(SystemTime::now());
    let floor = Timestamp::from_system_time(floor());
    if local_is_sane() {
        Ok(format!(
            "{now}: not before the floor {floor} (build time, or the last server time saved)"
        ))
    } else {
        Err(format!(
            "{now} is before {floor} (the agent's build time, or the last server time it \
             saved): this clock is wrong. A board without a real-time clock reads 1970 or its \
             last shutdown until NTP syncs (`timedatectl timesync-status`); the agent checks \
             TLS certificates at {floor} meanwhile"
        ))
    }
}

/// The local wall clock when it is sane, for rules that must not trust a
/// clock known to be wrong.
pub fn sane_now() -> Option<Timestamp> {
    local_is_sane().then(Timestamp::now)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(ms: i64) -> Timestamp {
        Timestamp::from_unix_millis(ms).unwrap()
    }

    fn sys(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
    }

    #[tokio::test(start_paused = true)]
    async fn a_wrong_local_clock_does_not_move_deadlines() {
        // Local clock stuck in 1970 (no RTC), server in 2026.
        let server = 1_780_000_000_000;
        let mut clock = ServerClock::new();
        clock.observe_precise(ts(server), Instant::now(), sys(5_000));
        assert_eq!(clock.skew_ms(), Some(server - 5_000));
        let expires = ts(server + 60_000);
        assert_eq!(clock.until(expires), Some(Duration::from_secs(60)));
        tokio::time::advance(Duration::from_secs(45)).await;
        assert_eq!(clock.until(expires), Some(Duration::from_secs(15)));
        assert_eq!(clock.server_now(), Some(ts(server + 45_000)));
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(clock.until(expires), Some(Duration::ZERO));
    }

    #[tokio::test(start_paused = true)]
    async fn date_header_refines_only_when_it_disagrees() {
        let mut clock = ServerClock::new();
        let now = Instant::now();
        clock.observe_precise(ts(10_250), now, sys(10_000));
        // A Date header consistent with the anchor (10 s truncation) is ignored.
        clock.observe_date(sys(10_000), now, sys(10_000));
        assert_eq!(clock.server_now(), Some(ts(10_250)));
        // The server clock jumped an hour: the header wins.
        clock.observe_date(sys(3_610_000), now, sys(10_000));
        assert_eq!(clock.server_now(), Some(ts(3_610_500)));
        assert_eq!(clock.skew_ms(), Some(3_600_500));
    }

    #[test]
    fn the_clock_is_never_trusted_below_the_build_time_or_a_saved_server_time() {
        let build = build_time();
        assert!(build > sys(1_700_000_000_000), "built after 2023");
        assert!(floor() >= build);
        assert!(trusted_now() >= floor());
        // A proof the server confirmed a moment ago raises it (to the
        // second); an older time does not lower it. (Other tests share the
        // floor, so it stays below now.)
        let recent = SystemTime::now() - Duration::from_secs(10);
        raise_floor(recent);
        raise_floor(sys(1_000));
        let secs = recent.duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(floor(), build.max(UNIX_EPOCH + Duration::from_secs(secs)));
        assert!(local_is_sane());
        assert!(trusted_now() >= floor());
    }

    #[tokio::test(start_paused = true)]
    async fn past_times_give_past_deadlines_and_no_anchor_gives_none() {
        let mut clock = ServerClock::new();
        assert_eq!(clock.until(ts(0)), None);
        tokio::time::advance(Duration::from_secs(100)).await;
        let now = Instant::now();
        clock.observe_precise(ts(50_000), now, sys(50_000));
        assert_eq!(
            clock.deadline(ts(40_000)),
            Some(now - Duration::from_secs(10))
        );
        assert_eq!(clock.until(ts(40_000)), Some(Duration::ZERO));
    }
}
