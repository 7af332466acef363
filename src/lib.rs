//! `peaqos-agent`: the on-device daemon that holds a machine's controller key
//! and keeps its peaqOS identity registered and active, unattended.
//!
//! One process keeps one machine (a robot) or many (a gateway, one file
//! per machine in `machines.d/`): see [`run`] and [`machine`].
//!
//! The binary is a thin shell over this library; tests run the real loop
//! in-process through [`run::Agent`].

pub mod backoff;
pub mod check;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod duration;
pub mod key;
pub mod keystore;
pub mod local_code;
pub mod machine;
pub mod mqtt;
pub mod pkcs11;
pub mod registration;
pub mod reload;
pub mod rotation;
pub mod run;
pub mod sealed;
pub mod secrets;
pub mod shared;
pub mod signer;
pub mod state;
pub mod status;
pub mod systemd;
#[cfg(feature = "tls")]
pub mod tls;
pub mod tls_failure;

pub use run::{Agent, RunError, run};
