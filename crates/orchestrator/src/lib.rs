//! `peaqos-orchestrator`: the orchestrator side of the peaqOS Machine
//! Markets API for machines and identity.
//!
//! Machines are registered under a machine identity (`did:peaq:<id>`, its
//! `peaqos:machine:<id>` alias, or `did:peaq:0x<address>`), and every write
//! is bound to an EIP-191 proof that a controller of that identity signed a
//! single-use challenge. Controllers come from the peaqOS MCR API or a local
//! registry file; machines live in SQLite (one process) or PostgreSQL (any
//! number of replicas behind a load balancer).
//!
//! ```no_run
//! # async fn demo() -> Result<(), peaqos_orchestrator::Error> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! let config = peaqos_orchestrator::Config {
//!     database_url: "sqlite::memory:".into(),
//!     ..peaqos_orchestrator::Config::default()
//! };
//! peaqos_orchestrator::run(listener, config, std::future::pending()).await
//! # }
//! ```

pub mod admission;
pub mod app;
pub mod audit;
pub mod auth;
pub mod challenge_key;
pub mod cli;
pub mod clock;
pub mod config;
pub mod console;
pub mod controllers;
pub mod error_chain;
pub mod healthcheck;
pub mod http;
pub mod ids;
pub mod lifecycle;
pub mod metrics;
pub mod rate_limit;
pub mod roles;
pub mod serve;
pub mod server;
pub mod service;
pub mod store;
pub mod stream;
pub mod tls;
pub mod verify;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{Config, ConfigError, VerificationMode};
pub use error_chain::error_chain;
pub use server::{Error, ReadyHook, Server, run};
pub use tls::install_crypto_provider;
