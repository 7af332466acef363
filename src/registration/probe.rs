//! Noticing that the orchestrator is back, cheaply.
//!
//! After a transient failure the loop waits out an exponential backoff with
//! full jitter (up to `backoff_max`, 5 minutes by default), which keeps a
//! fleet from coming back all at once but also kept a machine away for up
//! to 5 minutes after a short outage ended. While it waits for an
//! orchestrator it could not reach, it now asks `GET /api/v1/readiness`
//! every `probe_interval` (jittered: uniformly between half and one and a
//! half times it). A probe is one small GET, no signature, no challenge, no
//! write; the expensive cycle (challenge, signature, PATCH) still runs only
//! when the backoff ends or a probe says the orchestrator answers again.
//!
//! Herd protection:
//! - a fleet's probes are spread over a whole `probe_interval`, so its
//!   cycles after an outage are spread over that time as well;
//! - only failures that say nothing about load are probed: unreachable,
//!   timed out, or a 5xx without `Retry-After`; a `429` or any
//!   `Retry-After` is obeyed in full;
//! - a probe ends at most one wait in two: if the cycle it let through
//!   fails as well, the next wait runs to its end, so an orchestrator that
//!   is up but overloaded still sees the plain exponential pacing.
//!
//! - a gateway's loops share one [`Readiness`]: each loop asks at its own
//!   jittered time, and an answer is reused for half a `probe_interval`
//!   (one request in flight at a time), so 1,000 machines waiting for the
//!   orchestrator cost it about two probes per interval, not 1,000.
//!
//! The contract promises the route (the SDK calls it), but an orchestrator
//! without it must still work: any answer that is not a failure of the
//! server (a `404`, say) shows it is reachable, and the cycle decides.

use std::time::Duration;

use tokio::time::Instant;

use super::failure::{Failure, FailureKind};
use crate::backoff::random_fraction;
use crate::client::{Client, ClientError};

/// What a probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Probe {
    /// Worth a cycle now.
    Up,
    /// Still down (or not ready): keep waiting.
    Down,
}

/// Reads the answer to `GET /api/v1/readiness`.
pub(super) fn read(answer: Result<&serde_json::Value, &ClientError>) -> Probe {
    match answer {
        Ok(value) if value.get("status").and_then(|s| s.as_str()) == Some("not_ready") => {
            Probe::Down
        }
        // Readiness without the SDK's shape, or a client-side refusal of a
        // machine id (never for this route): reachable.
        Ok(_) | Err(ClientError::InvalidMachineId { .. }) => Probe::Up,
        Err(
            ClientError::Network { .. } | ClientError::Tls { .. } | ClientError::Timeout { .. },
        ) => Probe::Down,
        Err(ClientError::Api { status, .. } | ClientError::BadResponse { status, .. }) => {
            if *status == 408 || *status == 429 || *status >= 500 {
                Probe::Down
            } else {
                Probe::Up
            }
        }
    }
}

/// The readiness probe every loop of one agent shares: one request at a
/// time, its answer reused for half the probe interval.
#[derive(Debug)]
pub struct Readiness {
    reuse_for: Duration,
    last: tokio::sync::Mutex<Option<(Instant, Probe)>>,
}

impl Readiness {
    pub fn new(probe_interval: Duration) -> Self {
        Self {
            reuse_for: probe_interval / 2,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// Whether the orchestrator answers: a recent answer, or a new probe.
    /// Callers that arrive while a probe is in flight wait for its answer.
    pub(super) async fn ask(&self, client: &Client) -> Probe {
        let mut last = self.last.lock().await;
        if let Some((at, probe)) = *last
            && at.elapsed() < self.reuse_for
        {
            return probe;
        }
        let probe = read(client.readiness().await.as_ref().map(|r| &r.value));
        *last = Some((Instant::now(), probe));
        probe
    }
}

/// When to probe during the waits of the registration loop.
#[derive(Debug)]
pub(super) struct Prober {
    interval: Duration,
    /// A probe ended the last wait early.
    cut_short: bool,
}

impl Prober {
    /// `interval` zero: never probe.
    pub(super) fn new(interval: Duration) -> Self {
        Self {
            interval,
            cut_short: false,
        }
    }

    /// Whether to probe during the wait that follows `failure` (`None`: a
    /// good cycle). Call once per wait.
    pub(super) fn arm(&mut self, failure: Option<&Failure>) -> bool {
        let cut_short = std::mem::take(&mut self.cut_short);
        let Some(failure) = failure else {
            return false;
        };
        !self.interval.is_zero()
            && !cut_short
            && failure.kind == FailureKind::Transient
            && failure.retry_after.is_none()
            && failure.load_neutral
    }

    /// The next probe after `now`, if it comes before `deadline`.
    pub(super) fn next(&self, now: Instant, deadline: Instant) -> Option<Instant> {
        self.next_with(now, deadline, random_fraction())
    }

    fn next_with(&self, now: Instant, deadline: Instant, fraction: f64) -> Option<Instant> {
        let at = now + self.interval / 2 + self.interval.mul_f64(fraction.clamp(0.0, 1.0));
        (at < deadline).then_some(at)
    }

    /// A probe found the orchestrator up and ended the wait.
    pub(super) fn cut_short(&mut self) {
        self.cut_short = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peaqos_protocol::ErrorCode;

    fn ok(body: &serde_json::Value) -> Probe {
        read(Ok(body))
    }

    fn api(status: u16) -> Probe {
        read(Err(&ClientError::Api {
            status,
            code: ErrorCode::from_wire("X"),
            message: String::new(),
            details: None,
            retry_after: None,
        }))
    }

    #[test]
    fn readiness_answers_are_read_and_a_missing_route_counts_as_reachable() {
        assert_eq!(ok(&serde_json::json!({"status": "ready"})), Probe::Up);
        assert_eq!(ok(&serde_json::json!({"status": "not_ready"})), Probe::Down);
        assert_eq!(ok(&serde_json::json!({"ok": true})), Probe::Up);
        assert_eq!(api(404), Probe::Up);
        assert_eq!(api(401), Probe::Up);
        for down in [408, 429, 500, 502, 503, 504] {
            assert_eq!(api(down), Probe::Down, "{down}");
        }
        let timeout = ClientError::Timeout { url: "u".into() };
        assert_eq!(read(Err(&timeout)), Probe::Down);
    }

    fn transient(retry_after: Option<Duration>, load_neutral: bool) -> Failure {
        let mut f = Failure::new(
            FailureKind::Transient,
            crate::local_code::LocalCode::Network,
            "m",
        );
        f.retry_after = retry_after;
        f.load_neutral = load_neutral;
        f
    }

    #[test]
    fn only_load_neutral_failures_are_probed_and_never_two_waits_in_a_row() {
        let mut p = Prober::new(Duration::from_secs(10));
        assert!(!p.arm(None));
        assert!(p.arm(Some(&transient(None, true))));
        // Told to wait, or a sign of load: the wait is obeyed.
        assert!(!p.arm(Some(&transient(Some(Duration::from_secs(5)), true))));
        assert!(!p.arm(Some(&transient(None, false))));
        // A probe cut the last wait short and the cycle failed again.
        p.cut_short();
        assert!(!p.arm(Some(&transient(None, true))));
        assert!(p.arm(Some(&transient(None, true))));
        let not_transient = Failure::new(
            FailureKind::NotController,
            crate::local_code::LocalCode::Network,
            "m",
        );
        assert!(!p.arm(Some(&not_transient)));
        assert!(!Prober::new(Duration::ZERO).arm(Some(&transient(None, true))));
    }

    #[test]
    fn probes_are_jittered_around_the_interval_and_stay_inside_the_wait() {
        let p = Prober::new(Duration::from_secs(10));
        let now = Instant::now();
        let far = now + Duration::from_secs(300);
        assert_eq!(
            p.next_with(now, far, 0.0),
            Some(now + Duration::from_secs(5))
        );
        assert_eq!(
            p.next_with(now, far, 1.0),
            Some(now + Duration::from_secs(15))
        );
        assert_eq!(p.next_with(now, now + Duration::from_secs(6), 0.5), None);
    }
}
