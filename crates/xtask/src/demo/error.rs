//! Why the demo could not run: what the harness reports (building,
//! starting and watching its processes), and what is the demo's own.

use std::path::PathBuf;
use std::time::Duration;

use crate::harness::HarnessError;

#[derive(Debug, thiserror::Error)]
pub(crate) enum DemoError {
    #[error(transparent)]
    Harness(#[from] HarnessError),
    #[error("the agent did not report `active` within {timeout:?} (last state: {last}); see {log}")]
    NotActive {
        timeout: Duration,
        last: String,
        log: PathBuf,
    },
}
