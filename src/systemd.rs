//! systemd integration: readiness, status text and watchdog.
//!
//! (First version: no-ops. `Type=notify`, `STATUS=` and the watchdog fed
//! only while the agent's tasks are alive are issue 6.)

/// Tells systemd the agent is ready (config and key loaded, loops running).
pub fn notify_ready() {}

/// Sets the one-line status `systemctl status` shows.
pub fn notify_status(_status: &str) {}

/// Tells systemd the agent is stopping.
pub fn notify_stopping() {}
