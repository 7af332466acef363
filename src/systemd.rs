//! systemd integration: readiness, status text and the watchdog.
//!
//! Everything here is a no-op outside systemd: `sd_notify` does nothing
//! when `$NOTIFY_SOCKET` is unset, and [`spawn_watchdog`] starts nothing
//! when `$WATCHDOG_USEC` is unset (no `WatchdogSec=` in the unit).
//!
//! The watchdog proves more than "the process exists": it is fed only
//! while every long-running task (registration loop, MQTT) has shown a
//! sign of life within the watchdog period. A task that hangs (a deadlock,
//! an await that never returns) stops beating; systemd then kills and
//! restarts the agent (`Restart=on-failure` treats a watchdog timeout as a
//! failure).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::status::{StatusSnapshot, status_line};

/// How often tasks beat when no watchdog is configured: only
/// [`Heartbeat::sleep`] uses it, to wake up rarely.
const IDLE_BEAT_INTERVAL: Duration = Duration::from_secs(3600);

/// Tells systemd the agent is ready (config and key loaded, loops running).
/// Does not wait for the network: the agent reports while offline.
pub fn notify_ready() {
    send(&[NotifyState::Ready]);
}

/// Sets the one-line status `systemctl status` shows, e.g. the agent's
/// state. Line breaks would end the STATUS= field early, so they become
/// spaces.
pub fn notify_status(status: &str) {
    let line = one_line(status);
    send(&[NotifyState::Status(&line)]);
}

/// Keeps `STATUS=` in step with the agent's status: sends the status line
/// whenever it changes, from the watch channel the registration loop
/// publishes to, so that the loop itself never talks to systemd. Ends
/// once the loop is gone, after sending its last state (`stopping`).
pub fn spawn_status_notifier(mut status: watch::Receiver<StatusSnapshot>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = String::new();
        loop {
            let line = status_line(&status.borrow_and_update());
            if line != last {
                notify_status(&line);
                last = line;
            }
            if status.changed().await.is_err() {
                break;
            }
        }
    })
}

/// The machines whose statuses `STATUS=` sums up, as the host last set
/// them.
#[derive(Debug, Clone, Default)]
pub struct Roster {
    pub machines: Vec<(String, watch::Receiver<StatusSnapshot>)>,
    /// The agent's own machine and nothing else (a robot): `STATUS=` is
    /// its status line, as it always was.
    pub robot: bool,
}

impl Roster {
    fn line(&self) -> String {
        match (&self.machines[..], self.robot) {
            ([(_, one)], true) => status_line(&one.borrow()),
            // Only the states: a gateway's line is made every few hundred
            // milliseconds while its machines start, and copying a
            // thousand snapshots each time churned the heap.
            (machines, _) => crate::status::summary_line(
                machines
                    .iter()
                    .map(|(name, status)| (name.as_str(), status.borrow().state)),
            ),
        }
    }
}

/// How long a gateway's `STATUS=` waits for more changes before it is
/// sent: 1,000 machines starting do not make 1,000 notifications.
const SUMMARY_SETTLE: Duration = Duration::from_millis(250);

/// Keeps `STATUS=` in step with the statuses of a set of machines that
/// comes and goes: a robot's status line, or a gateway's summary. Ends
/// once `roster`'s sender is dropped, after sending the last line.
pub fn spawn_roster_notifier(mut roster: watch::Receiver<Roster>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let changed = Arc::new(tokio::sync::Notify::new());
        let mut forwarders: Vec<JoinHandle<()>> = Vec::new();
        let mut last = String::new();
        let mut send = |line: String| {
            if line != last {
                notify_status(&line);
                last = line;
            }
        };
        loop {
            let current = roster.borrow_and_update().clone();
            for forwarder in forwarders.drain(..) {
                forwarder.abort();
            }
            for (_, status) in &current.machines {
                let (mut status, changed) = (status.clone(), changed.clone());
                forwarders.push(tokio::spawn(async move {
                    while status.changed().await.is_ok() {
                        changed.notify_one();
                    }
                    changed.notify_one();
                }));
            }
            let ended = loop {
                send(current.line());
                tokio::select! {
                    r = roster.changed() => break r.is_err(),
                    () = changed.notified() => {
                        if !current.robot {
                            tokio::time::sleep(SUMMARY_SETTLE).await;
                        }
                    }
                }
            };
            if ended {
                send(current.line());
                for forwarder in forwarders.drain(..) {
                    forwarder.abort();
                }
                break;
            }
        }
    })
}

/// Tells systemd the agent is stopping (on SIGTERM), so that `systemctl
/// status` says so while in-flight work finishes.
pub fn notify_stopping() {
    send(&[NotifyState::Stopping]);
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "cannot notify systemd ($NOTIFY_SOCKET)");
    }
}

fn one_line(text: &str) -> String {
    text.split(['\n', '\r'])
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The watchdog period systemd asked for (`WatchdogSec=`), if any.
pub fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|period| !period.is_zero())
}

/// How often a task must call [`Heartbeat::beat`] at least: a quarter of
/// the watchdog period, so that a beat delayed by a busy moment does not
/// count as a hang. Without a watchdog, beating is free but pointless.
pub fn beat_interval() -> Option<Duration> {
    watchdog_period().map(|period| period / 4)
}

/// A long-running task's sign of life for the watchdog. Cheap to clone;
/// the task keeps one clone and calls [`beat`](Self::beat) from its loop,
/// [`spawn_watchdog`] gets another.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    task: String,
    last: Mutex<Instant>,
}

impl Heartbeat {
    /// A heartbeat for the task named `task` (named in the log when it
    /// stops beating). It counts as having beaten now.
    pub fn new(task: impl Into<String>) -> Self {
        Self {
            inner: Arc::new(Inner {
                task: task.into(),
                last: Mutex::new(Instant::now()),
            }),
        }
    }

    /// Records that the task is alive now.
    pub fn beat(&self) {
        *self.lock() = Instant::now();
    }

    pub fn task(&self) -> &str {
        &self.inner.task
    }

    /// Sleeps for `duration`, beating at the [`beat_interval`] meanwhile: a
    /// task that waits on purpose (hours until the next renewal, a backoff)
    /// is alive. Only sleeping keeps the heartbeat going; a hung await does
    /// not.
    pub async fn sleep(&self, duration: Duration) {
        let interval = beat_interval().unwrap_or(IDLE_BEAT_INTERVAL);
        let deadline = Instant::now() + duration;
        self.beat();
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            tokio::time::sleep_until(deadline.min(now + interval)).await;
            self.beat();
        }
    }

    fn since_last_beat(&self, now: Instant) -> Duration {
        now.saturating_duration_since(*self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Instant> {
        // The guarded value is a plain Instant: a panic while holding the
        // lock cannot leave it half-written, so poisoning is ignored.
        self.inner
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Starts feeding the systemd watchdog (`WATCHDOG=1` every half period)
/// for as long as every one of `heartbeats` has beaten within the last
/// watchdog period; stops feeding while one has not (and logs which), and
/// stops for good when `shutdown` is cancelled.
///
/// Returns `None`, starting nothing, when systemd configured no watchdog.
/// Call inside the tokio runtime.
pub fn spawn_watchdog(
    heartbeats: &[Heartbeat],
    shutdown: CancellationToken,
) -> Option<JoinHandle<()>> {
    let set = Heartbeats::default();
    for heartbeat in heartbeats {
        set.insert(heartbeat.clone());
    }
    spawn_watchdog_for(&set, shutdown)
}

/// As [`spawn_watchdog`], for a set whose members come and go (a gateway's
/// machines, added and removed by a reload).
pub fn spawn_watchdog_for(
    heartbeats: &Heartbeats,
    shutdown: CancellationToken,
) -> Option<JoinHandle<()>> {
    let period = watchdog_period()?;
    tracing::debug!(
        period_ms = u64::try_from(period.as_millis()).unwrap_or(u64::MAX),
        tasks = heartbeats.len(),
        "feeding the systemd watchdog"
    );
    Some(tokio::spawn(feed(period, heartbeats.clone(), shutdown)))
}

/// The heartbeats the watchdog requires, shared between the watchdog and
/// whoever starts and stops tasks. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Heartbeats {
    members: Arc<Mutex<Vec<Heartbeat>>>,
}

impl Heartbeats {
    /// Requires `heartbeat` from now on.
    pub fn insert(&self, heartbeat: Heartbeat) {
        self.lock().push(heartbeat);
    }

    /// No longer requires `heartbeat` (its task ended on purpose).
    pub fn remove(&self, heartbeat: &Heartbeat) {
        self.lock()
            .retain(|h| !Arc::ptr_eq(&h.inner, &heartbeat.inner));
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// The tasks that have not beaten within `period` before `now`.
    fn stalled(&self, now: Instant, period: Duration) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|heartbeat| heartbeat.since_last_beat(now) > period)
            .map(|heartbeat| heartbeat.task().to_owned())
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Heartbeat>> {
        // Pushes and retains cannot leave the list half-changed.
        self.members
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

async fn feed(period: Duration, heartbeats: Heartbeats, shutdown: CancellationToken) {
    let mut reported_stall = false;
    loop {
        let now = Instant::now();
        let stalled = heartbeats.stalled(now, period);
        if stalled.is_empty() {
            send(&[NotifyState::Watchdog]);
            if reported_stall {
                tracing::info!("all tasks alive again; feeding the systemd watchdog");
                reported_stall = false;
            }
        } else if !reported_stall {
            tracing::error!(
                tasks = %stalled.join(","),
                "task stopped making progress; not feeding the systemd watchdog, which will restart the agent"
            );
            reported_stall = true;
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(period / 2) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_one_line() {
        assert_eq!(
            one_line("backoff\nretry in 30 s\r\n"),
            "backoff retry in 30 s"
        );
        assert_eq!(one_line("active"), "active");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_beat_resets_the_time_since_the_last_one() {
        let heartbeat = Heartbeat::new("registration");
        let clone = heartbeat.clone();
        let later = Instant::now() + Duration::from_secs(90);
        assert!(heartbeat.since_last_beat(later) >= Duration::from_secs(90));
        clone.beat();
        assert!(heartbeat.since_last_beat(Instant::now()) < Duration::from_secs(90));
        assert_eq!(clone.task(), "registration");
    }
}
