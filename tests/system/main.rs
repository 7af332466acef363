//! The agent as the operating system runs and installs it, one binary:
//! `sd_notify` and the watchdog (`notify`, `watchdog`), the shipped units
//! (`units`), the Debian package (`deb`), and a key sealed at rest under a
//! booted systemd in a container (`sealed_boot`).

mod deb;
mod notify;
mod sealed_boot;
mod units;
mod watchdog;
