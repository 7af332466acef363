//! The agent against an orchestrator that we did not shape: "FleetHub", a
//! test double written from the published wire contract alone
//! (`double.rs`), with its own challenge text and every liberty the
//! contract allows. The real `peaqos-agent` binary (`agent.rs`) is driven
//! through the loop a fleet lives through (`scenarios.rs`): registration,
//! degradation, proof expiry without `expiresAt`, a lost record, a lost
//! state file, an outage, a removed and restored controller; and over TLS
//! with a private CA and client certificates (`tls.rs`), and which
//! rustls-webpki verifies the orchestrator and the broker (`webpki.rs`);
//! and a gateway of many machines, reloaded file by file (`gateway.rs`).
//!
//! The agent is watched the way an operator watches it: its log lines on
//! stderr, its state file, and what the server holds. Every wait is
//! bounded; every scenario counts the challenges it cost.

mod agent;
#[cfg(feature = "tls")]
mod clock;
mod double;
mod gateway;
mod rotation;
mod scenarios;
#[cfg(feature = "tls")]
mod tls;
#[cfg(feature = "tls")]
mod webpki;
