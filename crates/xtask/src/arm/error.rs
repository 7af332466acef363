//! Why `cargo xtask arm` failed. Each message names the board, program or
//! file concerned; the cause (if any) is in `source()`, printed by main.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::HarnessError;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ArmError {
    #[error(transparent)]
    Harness(HarnessError),
    #[error("stopped by {0}")]
    Interrupted(&'static str),
    #[error(
        "unknown target {0:?}: the boards are aarch64-unknown-linux-gnu and armv7-unknown-linux-gnueabihf"
    )]
    UnknownTarget(String),
    #[error("missing on this machine: {}; .ci/install-tools installs all of it", .0.join(", "))]
    Missing(Vec<String>),
    #[error("the {board} agent printed address {printed} but `keygen` said {generated}")]
    AddressMismatch {
        board: &'static str,
        generated: String,
        printed: String,
    },
    #[error(
        "the {board} agent did not report `active` within {timeout:?} (last state: {last}); its log: {log}"
    )]
    NotActive {
        board: &'static str,
        timeout: Duration,
        last: String,
        log: PathBuf,
    },
    #[error("the {board} agent did not exit cleanly on SIGTERM: {outcome}; its log: {log}")]
    BadStop {
        board: &'static str,
        outcome: String,
        log: PathBuf,
    },
    #[error("`cargo deb` made no package in {0}")]
    NoPackages(PathBuf),
    #[error(
        "lintian found problems in the packages (above); fix them, or override a tag in packaging/debian/<package>/lintian-overrides with a comment saying why"
    )]
    Lintian,
    #[error(
        "{0}: its executable has no dependency list (no .dep-v0 section): build it with `cargo auditable build` (.ci/install-tools installs cargo-auditable)"
    )]
    NoDependencyList(PathBuf),
    #[error(
        "`cargo audit bin` found advisories for the executable of {0} (above): update the crate, or add a reasoned exception to deny.toml"
    )]
    Audit(PathBuf),
    #[error("cannot read the advisory exceptions in {path}")]
    DenyToml {
        path: PathBuf,
        source: toml::de::Error,
    },
}

impl From<HarnessError> for ArmError {
    fn from(e: HarnessError) -> Self {
        match e {
            HarnessError::Interrupted(signal) => Self::Interrupted(signal),
            other => Self::Harness(other),
        }
    }
}

impl ArmError {
    /// The log of the process the error is about, if there is one.
    pub(crate) fn log(&self) -> Option<&Path> {
        match self {
            Self::NotActive { log, .. } | Self::BadStop { log, .. } => Some(log),
            Self::Harness(e) => e.log(),
            _ => None,
        }
    }
}
