//! The agent as the operating system runs and installs it, one binary:
//! `sd_notify` and the watchdog (`notify`, `watchdog`), the shipped units
//! (`units`), the Debian package (`deb`) and the licenses its copyright
//! file declares, the same as deny.toml allows (`licenses`).

mod deb;
mod licenses;
mod notify;
mod units;
mod watchdog;
