//! `peaqos-agent`: the on-device daemon that holds a machine's controller key
//! and keeps its peaqOS identity registered and active, unattended.

pub mod mqtt;
pub mod secrets;
pub mod status;
pub mod systemd;
