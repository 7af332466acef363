//! The agent as the operating system runs and installs it, one binary:
//! `sd_notify` and the watchdog (`notify`, `watchdog`), the shipped units
//! (`units`) and the Debian package (`deb`).

mod deb;
mod notify;
mod units;
mod watchdog;
