//! An incoming message over `max_packet_size` breaks the connection: the
//! MQTT client refuses it from its header (without reading it), and the
//! stream cannot be resynchronised, so the connection must go. With MQTT 5
//! the broker knows our limit and never sends such a message. An MQTT 3.1.1
//! broker does not, and a *retained* oversized message on a request topic
//! is sent again after every resubscription: without a defence, one
//! message from any reader kept the agent reconnecting for as long as it
//! stayed there.
//!
//! The defence, in order:
//! 1. after an oversized drop, the next session clears the retained message
//!    of each request topic (an empty retained publish, which the shipped
//!    ACL allows on `status/get`) *before* subscribing, so that the broker
//!    has nothing to replay (a retained request is refused anyway);
//! 2. if the drops go on (the clear was not allowed, or someone keeps
//!    publishing), the request topics are left unsubscribed for a
//!    quarantine that doubles from [`QUARANTINE_MIN`] to [`QUARANTINE_MAX`],
//!    while availability and status stay published on a steady connection.
//!
//! So the same message is read at most a handful of times, never in a
//! loop. A *live* oversized message still costs one reconnection each with
//! 3.1.1: only the broker can stop those (docs/mqtt.md, "Limits").

use std::time::Duration;

use tokio::time::Instant;

/// First quarantine of the request subscriptions.
pub(crate) const QUARANTINE_MIN: Duration = Duration::from_secs(60);
/// Longest quarantine.
pub(crate) const QUARANTINE_MAX: Duration = Duration::from_secs(3600);
/// What the service does about oversized messages.
#[derive(Debug, Default)]
pub(crate) struct Poison {
    /// Oversized drops since the last healthy session.
    drops: u32,
    /// Request topics stay unsubscribed until then.
    suspended_until: Option<Instant>,
}

/// What a lost connection means for the next session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Not an oversized message, or the first: carry on (clearing first).
    Carry,
    /// Drops go on: request topics are suspended for this long.
    Quarantine(Duration),
}

impl Poison {
    /// A connection ended. `oversized`: an incoming packet over the limit
    /// ended it; `replay_passed`: the session read something after its last
    /// SUBACK, so the broker's replay of retained messages was over (an
    /// oversized message then was a new, live one).
    pub(crate) fn on_lost(&mut self, oversized: bool, replay_passed: bool) -> Verdict {
        match (oversized, replay_passed) {
            (false, false) => return Verdict::Carry,
            (false, true) => {
                self.drops = 0;
                return Verdict::Carry;
            }
            // A new message: clear it and subscribe again, as after a first
            // replay.
            (true, true) => {
                self.drops = 1;
                return Verdict::Carry;
            }
            (true, false) => self.drops = self.drops.saturating_add(1),
        }
        if self.drops < 2 {
            return Verdict::Carry;
        }
        // The replay broke the connection again after a clear: the clear
        // was not allowed (ACL) or someone republishes at once.
        let doublings = (self.drops - 2).min(16);
        let pause = QUARANTINE_MIN
            .saturating_mul(1 << doublings)
            .min(QUARANTINE_MAX);
        self.suspended_until = Some(Instant::now() + pause);
        Verdict::Quarantine(pause)
    }

    /// Whether to clear retained requests before subscribing.
    pub(crate) fn clear_first(&self) -> bool {
        self.drops > 0
    }

    /// When request subscriptions may resume, while suspended.
    pub(crate) fn suspended_until(&self) -> Option<Instant> {
        self.suspended_until.filter(|at| *at > Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn clears_after_one_drop_then_quarantines_with_doubling() {
        let mut p = Poison::default();
        assert!(!p.clear_first());
        assert_eq!(p.on_lost(false, false), Verdict::Carry);
        assert!(!p.clear_first());
        // The replay broke the first session: clear, then subscribe.
        assert_eq!(p.on_lost(true, false), Verdict::Carry);
        assert!(p.clear_first());
        assert!(p.suspended_until().is_none());
        // It broke the next one too: the clear did not work.
        assert_eq!(p.on_lost(true, false), Verdict::Quarantine(QUARANTINE_MIN));
        assert!(p.suspended_until().is_some());
        assert_eq!(
            p.on_lost(true, false),
            Verdict::Quarantine(QUARANTINE_MIN * 2)
        );
        for _ in 0..20 {
            p.on_lost(true, false);
        }
        assert_eq!(p.on_lost(true, false), Verdict::Quarantine(QUARANTINE_MAX));
        tokio::time::advance(QUARANTINE_MAX).await;
        assert!(p.suspended_until().is_none());
        // A session that got past its replay forgets the past.
        assert_eq!(p.on_lost(false, true), Verdict::Carry);
        assert!(!p.clear_first());
    }

    #[test]
    fn a_live_oversized_message_is_cleared_not_quarantined() {
        let mut p = Poison::default();
        assert_eq!(p.on_lost(true, false), Verdict::Carry);
        for _ in 0..5 {
            assert_eq!(p.on_lost(true, true), Verdict::Carry);
            assert!(p.clear_first());
        }
    }
}
