//! The agent as the operating system runs and installs it, one binary:
//! `sd_notify` and the watchdog (`notify`, `watchdog`), the shipped units
//! (`units`), the Debian package (`deb`) and the licenses its copyright
//! file declares, the same as deny.toml allows (`licenses`), and a key
//! sealed at rest under a booted systemd in a container (`sealed_boot`).

mod deb;
mod licenses;
mod notify;
mod sealed_boot;
mod units;
mod watchdog;
