//! The orchestrator as a child process, on port 0 of the loopback
//! interface: the kernel picks a free port as it binds, and the
//! orchestrator says which in the one line it prints on stdout once it
//! listens (`listening on http://127.0.0.1:<port>`, crates/orchestrator's
//! main.rs). No probing for a free port, no race for it, no retries.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::error::HarnessError;
use super::log::Tail;
use super::process::{Managed, PidFile};

/// How long the orchestrator may take to listen: it opens (and migrates)
/// its database first.
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(10);

/// A listening orchestrator, stopped when dropped.
#[derive(Debug)]
pub(crate) struct Orchestrator {
    pub(crate) child: Managed,
    pub(crate) addr: SocketAddr,
}

impl Orchestrator {
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Starts `command` (the orchestrator with its settings in the
/// environment) on 127.0.0.1:0, stdout and stderr to `log`, and waits for
/// its `listening on` line; fails as soon as it exits, on a signal
/// (`interrupted`), or after [`START_TIMEOUT`].
pub(crate) fn start(
    mut command: Command,
    log: &Path,
    pids: &PidFile,
    interrupted: &dyn Fn() -> Option<&'static str>,
) -> Result<Orchestrator, HarnessError> {
    command.env("PEAQOS_LISTEN_ADDR", "127.0.0.1:0");
    let mut child = Managed::spawn("orchestrator", command, log, pids)?;
    let mut tail = Tail::new(log);
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let lines = tail.lines().map_err(|source| HarnessError::Io {
            action: "read",
            path: log.to_owned(),
            source,
        })?;
        if let Some(addr) = lines.iter().find_map(|line| listening_on(line)) {
            return Ok(Orchestrator { child, addr });
        }
        if let Some(signal) = interrupted() {
            return Err(HarnessError::Interrupted(signal));
        }
        if let Some(status) = child.exited() {
            return Err(HarnessError::Exited {
                what: child.name,
                status,
                log: child.log.clone(),
            });
        }
        if Instant::now() > deadline {
            return Err(HarnessError::NoListeningLine {
                what: child.name,
                timeout: START_TIMEOUT,
                log: child.log.clone(),
            });
        }
        std::thread::sleep(POLL);
    }
}

/// The address in the orchestrator's `listening on http://<address>` line.
fn listening_on(line: &str) -> Option<SocketAddr> {
    line.trim()
        .strip_prefix("listening on http://")?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_comes_from_the_listening_line() {
        assert_eq!(
            listening_on("listening on http://127.0.0.1:40123\n"),
            Some(SocketAddr::from(([127, 0, 0, 1], 40123)))
        );
        assert_eq!(
            listening_on("listening on http://[::1]:8080"),
            "[::1]:8080".parse().ok()
        );
        // Its log lines on stderr share the file; none of them is the line.
        assert_eq!(
            listening_on(
                "2026-12-02T06:00:00Z  INFO peaqos_orchestrator: listening on 127.0.0.1:0"
            ),
            None
        );
        assert_eq!(listening_on("listening on http://127.0.0.1:0x"), None);
    }

    #[test]
    fn an_orchestrator_that_exits_is_an_error_naming_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("orchestrator.log");
        let pids = PidFile::new(dir.path().join("pids"));
        let mut command = Command::new("sh");
        command.args(["-c", "echo cannot open the database >&2; exit 3"]);
        let err = start(command, &log, &pids, &|| None).unwrap_err();
        assert!(matches!(err, HarnessError::Exited { .. }), "{err}");
        assert!(err.to_string().contains("orchestrator.log"), "{err}");
    }

    #[test]
    fn the_port_is_read_from_what_it_prints() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("orchestrator.log");
        let pids = PidFile::new(dir.path().join("pids"));
        let mut command = Command::new("sh");
        // As the orchestrator does: logs first, the line once it listens,
        // and the listen address asked for is port 0.
        command.args([
            "-c",
            r#"echo "migrating" >&2; echo "listening on http://127.0.0.1:4${PEAQOS_LISTEN_ADDR#127.0.0.1:}01"; exec sleep 30"#,
        ]);
        let orchestrator = start(command, &log, &pids, &|| None).unwrap();
        assert_eq!(orchestrator.url(), "http://127.0.0.1:4001");
    }
}
