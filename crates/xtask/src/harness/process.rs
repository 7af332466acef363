//! The tasks' child processes: each in a process group of its own, so that
//! Ctrl-C in the terminal reaches only xtask (which stops them in order:
//! the agent first, so that it can still say `offline` on the broker) and so
//! that a signal to the group also reaches anything a child started.
//!
//! They are stopped with SIGTERM, then SIGKILL after a bound, explicitly or
//! when dropped (an error or a panic in xtask). A SIGKILL of xtask itself
//! cannot be caught: its children live on. Without `unsafe` there is no
//! `PR_SET_PDEATHSIG`, so instead every child is recorded (pid and start
//! time, which together name one process) in `pids` in the task's
//! directory, and the next run in that directory stops those still running.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

use super::error::HarnessError;

/// Environment the children must not inherit: settings of the orchestrator
/// and agent that would override the task's, and systemd's hand-overs.
const STRIPPED_ENV: [&str; 7] = [
    "DATABASE_URL",
    "STATE_DIRECTORY",
    "CREDENTIALS_DIRECTORY",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "JOURNAL_STREAM",
];

/// `program`, without the environment that would change what the task
/// configures (`PEAQOS_*`, `DATABASE_URL`, systemd's variables).
pub(crate) fn child_command(program: &Path) -> Command {
    let mut command = Command::new(program);
    for (name, _) in std::env::vars_os() {
        let strip = name
            .to_str()
            .is_some_and(|n| n.starts_with("PEAQOS_") || STRIPPED_ENV.contains(&n));
        if strip {
            command.env_remove(name);
        }
    }
    command
}

/// How long a child may take to stop after SIGTERM before it gets SIGKILL.
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(20);

/// A running child, stopped (with its process group) when dropped.
#[derive(Debug)]
pub(crate) struct Managed {
    pub(crate) name: &'static str,
    pub(crate) log: PathBuf,
    child: Child,
    exit: Option<ExitStatus>,
}

impl Managed {
    /// Starts `command` in a new process group, stdin from /dev/null,
    /// stdout and stderr to `log`, and records it in `pids`.
    pub(crate) fn spawn(
        name: &'static str,
        mut command: Command,
        log: &Path,
        pids: &PidFile,
    ) -> Result<Self, HarnessError> {
        use std::os::unix::process::CommandExt as _;
        let io = |action, source| HarnessError::Io {
            action,
            path: log.to_owned(),
            source,
        };
        let out = File::create(log).map_err(|e| io("create", e))?;
        let err = out.try_clone().map_err(|e| io("open", e))?;
        command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = command.spawn().map_err(|source| HarnessError::Spawn {
            program: command.get_program().to_string_lossy().into_owned(),
            source,
        })?;
        let managed = Self {
            name,
            log: log.to_owned(),
            child,
            exit: None,
        };
        pids.add(name, managed.child.id())?;
        Ok(managed)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some` once the child has exited.
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// SIGTERM to the child's process group, then SIGKILL if it has not
    /// exited after `grace` (or as soon as `hurry()` says so).
    pub(crate) fn stop(&mut self, grace: Duration, hurry: &dyn Fn() -> bool) -> StopOutcome {
        let group = Pid::from_child(&self.child);
        if let Some(status) = self.exited() {
            // The group may outlive its leader; make sure nothing is left.
            let _ = rustix::process::kill_process_group(group, Signal::KILL);
            return StopOutcome::AlreadyExited(status);
        }
        let _ = rustix::process::kill_process_group(group, Signal::TERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && !hurry() {
            if let Some(status) = self.exited() {
                let _ = rustix::process::kill_process_group(group, Signal::KILL);
                return StopOutcome::Stopped(status);
            }
            std::thread::sleep(POLL);
        }
        let _ = rustix::process::kill_process_group(group, Signal::KILL);
        let status = self.child.wait().ok();
        self.exit = status;
        StopOutcome::Killed
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        if self.exit.is_none() {
            self.stop(STOP_GRACE, &|| false);
        }
    }
}

/// How a child ended when it was stopped.
#[derive(Debug, Clone, Copy)]
pub(crate) enum StopOutcome {
    Stopped(ExitStatus),
    AlreadyExited(ExitStatus),
    Killed,
}

impl std::fmt::Display for StopOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stopped(status) => write!(f, "stopped ({status})"),
            Self::AlreadyExited(status) => write!(f, "had already exited ({status})"),
            Self::Killed => write!(f, "killed: it did not stop within {STOP_GRACE:?}"),
        }
    }
}

/// `pids` in the task's directory: one line per child, `pid start-time name`.
#[derive(Debug)]
pub(crate) struct PidFile {
    path: PathBuf,
}

impl PidFile {
    pub(crate) fn new(path: PathBuf) -> Self {
        Self { path }
    }

    fn add(&self, name: &str, pid: u32) -> Result<(), HarnessError> {
        // Read right after the fork: the start time does not change at exec.
        let Some(started) = start_time(pid) else {
            return Ok(());
        };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|source| HarnessError::Io {
                action: "write",
                path: self.path.clone(),
                source,
            })?;
        writeln!(file, "{pid} {started} {name}").map_err(|source| HarnessError::Io {
            action: "write",
            path: self.path.clone(),
            source,
        })
    }

    /// Stops the processes recorded here that still run (the same pid with
    /// the same start time), each with its process group, and returns what
    /// it stopped as `(name, pid)`.
    pub(crate) fn stop_leftovers(&self) -> Vec<(String, u32)> {
        let Ok(text) = std::fs::read_to_string(&self.path) else {
            return Vec::new();
        };
        let mut stopped = Vec::new();
        for line in text.lines() {
            let mut fields = line.split_whitespace();
            let (Some(pid), Some(started), Some(name)) = (
                fields.next().and_then(|p| p.parse::<u32>().ok()),
                fields.next().and_then(|s| s.parse::<u64>().ok()),
                fields.next(),
            ) else {
                continue;
            };
            if start_time(pid) != Some(started) {
                continue;
            }
            let Some(group) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
                continue;
            };
            let _ = rustix::process::kill_process_group(group, Signal::TERM);
            let deadline = Instant::now() + STOP_GRACE;
            while start_time(pid) == Some(started) && Instant::now() < deadline {
                std::thread::sleep(POLL);
            }
            let _ = rustix::process::kill_process_group(group, Signal::KILL);
            stopped.push((name.to_owned(), pid));
        }
        stopped
    }
}

/// The start time of a running (not zombie) process, from
/// `/proc/<pid>/stat` (field 22, in clock ticks since boot).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces
    // and parentheses; the fields after the last `)` start with field 3.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    fields.nth(22 - 4)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_names_one_process() {
        let me = std::process::id();
        let started = start_time(me).expect("our own start time");
        assert_eq!(start_time(me), Some(started));
        let mut child = Command::new("sleep").arg("5").spawn().unwrap();
        let theirs = start_time(child.id()).expect("the child's start time");
        assert!(theirs >= started);
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(start_time(child.id()), None, "a reaped child has no entry");
    }

    #[test]
    fn leftovers_are_stopped_and_only_they() {
        let dir = tempfile::tempdir().unwrap();
        let pids = PidFile::new(dir.path().join("pids"));
        let mut command = Command::new("sleep");
        command.arg("30");
        let mut leftover = Managed::spawn("sleeper", command, &dir.path().join("log"), &pids)
            .expect("spawn sleep");
        // A line for a process that no longer runs (or runs with another
        // start time) must be left alone.
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("pids"))
            .unwrap();
        writeln!(file, "{} 1 init-impostor", std::process::id()).unwrap();
        drop(file);

        let stopped = pids.stop_leftovers();
        assert_eq!(stopped, vec![("sleeper".to_owned(), leftover.pid())]);
        let status = leftover.exited().expect("stopped by SIGTERM");
        assert!(!status.success());
    }
}
