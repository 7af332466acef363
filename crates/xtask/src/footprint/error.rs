//! Why a footprint measurement could not be made. Each message names the
//! process, file or figure concerned; the cause (if any) is in `source()`,
//! printed by main.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use crate::harness::HarnessError;

#[derive(Debug, thiserror::Error)]
pub(crate) enum FootprintError {
    /// Building, starting and stopping processes.
    #[error(transparent)]
    Harness(HarnessError),
    #[error("stopped by {0}")]
    Interrupted(&'static str),
    #[error("`cargo xtask footprint` reads /proc: it runs on Linux only")]
    NotLinux,
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// `source`: the last answer or failure.
    #[error("{url} did not answer 200 within {timeout:?}")]
    NotReady {
        url: String,
        timeout: Duration,
        source: std::io::Error,
    },
    #[error("cannot read {path} of the {what} (pid {pid})")]
    Proc {
        what: &'static str,
        pid: u32,
        path: String,
        source: std::io::Error,
    },
    #[error("{path} of the {what} (pid {pid}) has no readable {field}")]
    ProcField {
        what: &'static str,
        pid: u32,
        path: String,
        field: &'static str,
    },
    #[error("{what} exited ({status}) {when}; its log: {log}")]
    Exited {
        what: &'static str,
        status: ExitStatus,
        when: &'static str,
        log: PathBuf,
    },
    #[error("{what} did not log {expected} within {timeout:?}; its log: {log}")]
    Timeout {
        what: &'static str,
        expected: &'static str,
        timeout: Duration,
        log: PathBuf,
    },
    #[error("{log}: a milestone line without its time stamp: {line:?}")]
    Unstamped { log: PathBuf, line: String },
    #[error(
        "{log}: the line {line:?} is stamped later than xtask read it: the system clock was \
         stepped during the run; run again"
    )]
    ClockStepped { log: PathBuf, line: String },
    #[error("{log}: the agent logged `active` before signing any challenge (not a fresh start?)")]
    ActiveUnsigned { log: PathBuf },
}

impl From<HarnessError> for FootprintError {
    fn from(e: HarnessError) -> Self {
        match e {
            HarnessError::Interrupted(signal) => Self::Interrupted(signal),
            other => Self::Harness(other),
        }
    }
}

impl FootprintError {
    /// The log of the process the error is about, if there is one.
    pub(crate) fn log(&self) -> Option<&Path> {
        match self {
            Self::Exited { log, .. }
            | Self::Timeout { log, .. }
            | Self::Unstamped { log, .. }
            | Self::ClockStepped { log, .. }
            | Self::ActiveUnsigned { log, .. } => Some(log),
            Self::Harness(e) => e.log(),
            _ => None,
        }
    }
}
