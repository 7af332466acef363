//! When the agent and the baseline reached their milestones, from their
//! own logs.
//!
//! The agent stamps each log line when the event happens (RFC 3339, UTC,
//! microseconds; tracing-subscriber's default); the baseline stamps its one
//! line itself (`answered_at=<seconds since the epoch>`). So the times come
//! from the lines, not from when xtask happened to read them: polling the
//! file only decides when to stop waiting. The reference is the wall clock
//! just before the exec; the monotonic clock read with it bounds the
//! result, so that a clock step during the run is an error, not a figure.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The milestones, as the registration loop logs them (src/registration/):
/// the audit record `signed identity challenge` at info level (from
/// `registration::cycle`), then the state line of `active` at info level,
/// which carries the field `state=active`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Milestone {
    FirstSignature,
    Active,
}

/// The log filter under which the agent logs both milestones (both are at
/// info level; the loop's working states, at debug, help read a slow run).
pub(crate) const LOG_LEVEL: &str = "info,peaqos_agent::registration=debug";

const REGISTRATION: &str = " peaqos_agent::registration";

/// The milestone `line` reports, if any.
pub(crate) fn milestone(line: &str) -> Option<Milestone> {
    let (_, rest) = line.split_once(REGISTRATION)?;
    // The loop's own modules log as `registration: ` or `registration::cycle: `.
    let (module, event) = rest.split_once(": ")?;
    if !(module.is_empty() || module.starts_with("::")) {
        return None;
    }
    if event.starts_with("signed identity challenge") {
        Some(Milestone::FirstSignature)
    } else if event.split_whitespace().any(|word| word == "state=active") {
        Some(Milestone::Active)
    } else {
        None
    }
}

/// The baseline's stamp: when `/health` had answered, as time of day.
pub(crate) fn answered_at(line: &str) -> Option<Duration> {
    let value = line
        .split_whitespace()
        .find_map(|word| word.strip_prefix("answered_at="))?
        .trim_end_matches([')', ';', ',']);
    let (secs, nanos) = value.split_once('.')?;
    if nanos.len() != 9 || !nanos.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let since_epoch = Duration::new(secs.parse().ok()?, nanos.parse().ok()?);
    Some(day_time(since_epoch))
}

const DAY: Duration = Duration::from_secs(24 * 3600);

/// The time of day (UTC) of a line's leading timestamp, such as
/// `2026-11-25T18:00:03.155987Z`.
pub(crate) fn time_of_day(line: &str) -> Option<Duration> {
    let stamp = line.split_whitespace().next()?;
    let (date, time) = stamp.split_once('T')?;
    let time = time.strip_suffix('Z')?;
    let date_ok = date.len() == 10
        && date.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
    if !date_ok {
        return None;
    }
    let (hms, fraction) = time.split_once('.').unwrap_or((time, ""));
    let mut parts = hms.split(':').map(two_digits);
    let (hours, minutes, seconds) = (parts.next()??, parts.next()??, parts.next()??);
    // 60: a leap second.
    if parts.next().is_some() || hours > 23 || minutes > 59 || seconds > 60 {
        return None;
    }
    if fraction.len() > 9 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let nanos = format!("{fraction:0<9}").parse().ok()?;
    Some(Duration::new(
        u64::from(hours * 3600 + minutes * 60 + seconds),
        nanos,
    ))
}

fn two_digits(text: &str) -> Option<u32> {
    (text.len() == 2 && text.bytes().all(|b| b.is_ascii_digit()))
        .then(|| text.parse().ok())
        .flatten()
}

/// The moment just before an exec, on both clocks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reference {
    wall: SystemTime,
    monotonic: Instant,
}

/// How far the wall clock may run ahead of the monotonic one over a run
/// (NTP slews by at most 500 ppm; the rest is timestamp rounding).
const SLACK: Duration = Duration::from_millis(50);

impl Reference {
    pub(crate) fn now() -> Self {
        Self {
            wall: SystemTime::now(),
            monotonic: Instant::now(),
        }
    }

    /// How long after the reference a line stamped `stamped` (time of
    /// day) was logged, given that xtask read it at `seen`. `None` if that
    /// cannot be: the wall clock was stepped.
    pub(crate) fn elapsed(&self, stamped: Duration, seen: Instant) -> Option<Duration> {
        let since_epoch = self.wall.duration_since(UNIX_EPOCH).ok()?;
        let elapsed = since_midnight_delta(day_time(since_epoch), stamped);
        (elapsed <= seen.saturating_duration_since(self.monotonic) + SLACK).then_some(elapsed)
    }
}

/// The time of day of a moment given as time since the epoch (UTC days
/// are 86 400 s long in Unix time).
fn day_time(since_epoch: Duration) -> Duration {
    Duration::new(
        since_epoch.as_secs() % DAY.as_secs(),
        since_epoch.subsec_nanos(),
    )
}

/// From time of day `from` to the next `to`, across midnight if need be.
fn since_midnight_delta(from: Duration, to: Duration) -> Duration {
    to.checked_sub(from)
        .unwrap_or_else(|| (DAY + to).saturating_sub(from))
}

#[cfg(test)]
mod tests {
    use super::*;

    // As the agent logs them, ANSI off (stderr is a file).
    const SIGNED: &str = "2026-11-25T18:00:03.146123Z  INFO peaqos_agent::registration::cycle: \
                          signed identity challenge orchestrator=http://127.0.0.1:1 \
                          challenge_id=ch_8yq2";
    const ACTIVE: &str = "2026-11-25T18:00:03.155987Z  INFO peaqos_agent::registration: \
                          active machine mach_zoo2aqvswhxygx64vp state=active";

    #[test]
    fn milestones_are_recognised_and_nothing_else() {
        assert_eq!(milestone(SIGNED), Some(Milestone::FirstSignature));
        assert_eq!(milestone(ACTIVE), Some(Milestone::Active));
        for other in [
            "2026-11-25T18:00:03.138008Z  INFO peaqos_agent::run: starting identity=did:peaq:4242",
            "2026-11-25T18:00:03.150000Z DEBUG peaqos_agent::registration: activating machine mach_1 state=activating",
            "2026-11-25T18:00:03.150000Z  WARN peaqos_agent::registration: record blocked state=blocked reason=\"state=active\"",
            "2026-11-25T18:00:03.150000Z  INFO peaqos_agent::mqtt: published state=active",
            "2026-11-25T18:00:03.150000Z  INFO peaqos_agent::registrations: signed identity challenge",
            "2026-11-25T18:00:03.150000Z DEBUG peaqos_agent::registration::cycle: signed challenge text text=x",
        ] {
            assert_eq!(milestone(other), None, "{other}");
        }
    }

    #[test]
    fn the_baseline_stamp_gives_the_time_of_day() {
        let line = "footprint_baseline: idle until SIGTERM (GET http://127.0.0.1:4000/health: \
                    200 OK, 15 bytes; answered_at=1764093603.155987000)";
        assert_eq!(
            answered_at(line),
            Some(Duration::new(18 * 3600 + 3, 155_987_000))
        );
        for bad in [
            "footprint_baseline: idle until SIGTERM",
            "answered_at=1764093603",
            "answered_at=1764093603.15",
            "answered_at=soon.155987000",
        ] {
            assert_eq!(answered_at(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn timestamps_give_the_time_of_day() {
        assert_eq!(
            time_of_day(ACTIVE),
            Some(Duration::new(18 * 3600 + 3, 155_987_000))
        );
        assert_eq!(time_of_day("2026-01-01T00:00:00Z x"), Some(Duration::ZERO));
        assert_eq!(
            time_of_day("2026-01-01T23:59:59.123456789Z"),
            Some(Duration::new(86_399, 123_456_789))
        );
        for bad in [
            "",
            "\u{1b}[2m2026-11-25T18:00:03.155987Z\u{1b}[0m  INFO colour codes",
            "2026-11-25 18:00:03.155987Z",
            "2026-11-25T18:00:03.155987+01:00",
            "2026-11-25T24:00:00Z",
            "2026-11-25T18:0:03Z",
            "2026-11-25T18:00:03.1234567890Z",
            "2026-11-25T18:00:03.12a4Z",
            "26-11-25T18:00:03Z",
        ] {
            assert_eq!(time_of_day(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn elapsed_time_crosses_midnight_and_rejects_clock_steps() {
        let reference = Reference::now();
        let start = day_time(reference.wall.duration_since(UNIX_EPOCH).unwrap());
        let later = |d: Duration| day_time(start + d);
        let seen = reference.monotonic + Duration::from_millis(30);
        assert_eq!(
            reference.elapsed(later(Duration::from_millis(12)), seen),
            Some(Duration::from_millis(12))
        );
        // Stamped later than it was read, or before the exec: a stepped clock.
        assert_eq!(reference.elapsed(later(Duration::from_secs(5)), seen), None);
        let before = later(DAY.saturating_sub(Duration::from_millis(1)));
        assert_eq!(reference.elapsed(before, seen), None);
        assert_eq!(
            since_midnight_delta(Duration::new(86_399, 990_000_000), Duration::from_millis(5)),
            Duration::from_millis(15)
        );
    }
}
