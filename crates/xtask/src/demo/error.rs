//! Why the demo could not run. Each message names the program, file or
//! port concerned; the cause (if any) is in `source()`, printed by main.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub(crate) enum DemoError {
    #[error("cannot run {program}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status})")]
    Failed { command: String, status: ExitStatus },
    #[error("`cargo build` did not name the {0} executable in its output")]
    NoExecutable(&'static str),
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not empty and was not made by `cargo xtask demo`; choose another --dir")]
    ForeignDir(PathBuf),
    #[error("another `cargo xtask demo` is running in {0}")]
    Busy(PathBuf),
    #[error("the demo directory {0} is not valid UTF-8 (it goes into TOML files)")]
    NonUtf8Path(PathBuf),
    #[error("`peaqos-agent keygen` printed {0:?}, not an address")]
    BadAddress(String),
    #[error(
        "{what} did not accept connections on 127.0.0.1:{port} within {timeout:?} (log: {log})"
    )]
    NotListening {
        what: String,
        port: u16,
        timeout: Duration,
        log: String,
    },
    #[error("{what} exited ({status}); its log: {log}")]
    Exited {
        what: &'static str,
        status: ExitStatus,
        log: PathBuf,
    },
    #[error("the agent did not report `active` within {timeout:?} (last state: {last}); see {log}")]
    NotActive {
        timeout: Duration,
        last: String,
        log: PathBuf,
    },
    #[error("the agent's status answer over MQTT is not the expected one: {0}")]
    UnexpectedStatus(String),
    #[cfg(not(feature = "embedded-broker"))]
    #[error(
        "this xtask was built without the embedded MQTT broker, which it needs ({0}); run it as `cargo xtask`, which builds it"
    )]
    NoEmbeddedBroker(&'static str),
    #[error("stopped by {0} before the demo was up")]
    Interrupted(&'static str),
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot install a handler for {signal}")]
    Signal {
        signal: &'static str,
        source: std::io::Error,
    },
}
