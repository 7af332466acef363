//! Logging set-up shared by `peaqos-agent` and `peaqos-orchestrator`.
//!
//! (First version: human-readable stderr only. The journald path with
//! structured fields is issue 6.)

use std::str::FromStr;

use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("invalid log filter {filter:?} (expected e.g. `info` or `warn,peaqos_agent=debug`)")]
    Filter { filter: String },
    #[error("a global logger is already installed")]
    AlreadyInstalled,
}

/// Installs the global subscriber. `RUST_LOG` wins over `level` (from the
/// config file), which wins over `info`.
pub fn init(level: Option<&str>) -> Result<(), LogError> {
    let filter_text = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .or_else(|| level.map(str::to_owned))
        .unwrap_or_else(|| "info".to_owned());
    let filter = Targets::from_str(&filter_text).map_err(|_| LogError::Filter {
        filter: filter_text,
    })?;
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(filter),
        )
        .try_init()
        .map_err(|_| LogError::AlreadyInstalled)
}
