//! Why a task's processes could not be built, started or watched. Each
//! message names the program, file or port concerned; the cause (if any)
//! is in `source()`, printed by main.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub(crate) enum HarnessError {
    #[error("cannot run {program}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status})")]
    Failed { command: String, status: ExitStatus },
    #[error("`cargo {command}` did not name the {kind} `{name}` in its output")]
    NoArtifact {
        command: String,
        name: &'static str,
        kind: &'static str,
    },
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{dir} is not empty and was not made by `cargo xtask {task}`; choose another directory"
    )]
    ForeignDir { dir: PathBuf, task: &'static str },
    #[error("another `cargo xtask {task}` is running in {dir}")]
    Busy { dir: PathBuf, task: &'static str },
    #[error("the directory {0} is not valid UTF-8 (it goes into TOML files)")]
    NonUtf8Path(PathBuf),
    #[error("`{command}` printed {output:?}, not an address")]
    BadAddress { command: String, output: String },
    #[error(
        "{what} did not accept connections on 127.0.0.1:{port} within {timeout:?} (log: {log})"
    )]
    NotListening {
        what: String,
        port: u16,
        timeout: Duration,
        log: String,
    },
    #[error("{what} did not print `listening on http://...` within {timeout:?}; its log: {log}")]
    NoListeningLine {
        what: &'static str,
        timeout: Duration,
        log: PathBuf,
    },
    #[error("{what} exited ({status}); its log: {log}")]
    Exited {
        what: &'static str,
        status: ExitStatus,
        log: PathBuf,
    },
    #[error("the agent's status answer over MQTT is not the expected one: {0}")]
    UnexpectedStatus(String),
    #[cfg(not(feature = "embedded-broker"))]
    #[error(
        "this xtask was built without the embedded MQTT broker, which it needs ({0}); run it as `cargo xtask`, which builds it"
    )]
    NoEmbeddedBroker(&'static str),
    #[error("stopped by {0}")]
    Interrupted(&'static str),
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot install a handler for {signal}")]
    Signal {
        signal: &'static str,
        source: std::io::Error,
    },
}

impl HarnessError {
    /// The log of the process the error is about, if there is one.
    pub(crate) fn log(&self) -> Option<&std::path::Path> {
        match self {
            Self::Exited { log, .. } | Self::NoListeningLine { log, .. } => Some(log),
            _ => None,
        }
    }
}
