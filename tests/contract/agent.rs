//! The real `peaqos-agent` binary as a fleet runs it: a config file in a
//! temp dir, `peaqos-agent run`, its log lines read from stderr, its state
//! file read from disk.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use peaqos_protocol::{Address, SecretKey};
use peaqos_testkit::ChildLog;

const BIN: &str = env!("CARGO_BIN_EXE_peaqos-agent");

/// Short enough that every scenario runs in seconds. `slow_retry` is well
/// above the backoff, so a test can tell "retried slowly" from "hammered".
pub(crate) const RENEWAL: &str = r#"
[renewal]
check_interval = "300ms"
backoff_initial = "50ms"
backoff_max = "300ms"
slow_retry = "1s"
"#;

/// One device: its controller key, config and state directory.
#[derive(Debug)]
pub(crate) struct Device {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) key: SecretKey,
    pub(crate) key_path: PathBuf,
    pub(crate) identity: String,
}

impl Device {
    pub(crate) fn new(identity: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate().unwrap();
        let key_path = dir.path().join("controller.key");
        std::fs::write(&key_path, format!("{}\n", key.to_hex().as_str())).unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        Self {
            dir,
            key,
            key_path,
            identity: identity.to_owned(),
        }
    }

    pub(crate) fn address(&self) -> Address {
        self.key.address()
    }

    pub(crate) fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub(crate) fn state_file(&self) -> PathBuf {
        self.state_dir().join("state.json")
    }

    /// Writes `agent.toml` for `url` with `extra` appended (more sections,
    /// or keys continuing `[orchestrator]` when it starts with a key).
    pub(crate) fn write_config(&self, url: &str, orchestrator_extra: &str, extra: &str) -> PathBuf {
        let text = format!(
            r#"
[identity]
ref = "{identity}"
key_file = "{key}"

[orchestrator]
url = "{url}"
connect_timeout = "1s"
request_timeout = "2s"
{orchestrator_extra}

[machine]
display_name = "contract robot"
owner_id = "fleet-1"
machine_type = "amr"
runtime_profile = "ros2"
labels = {{ site = "hall-3" }}

[state]
dir = "{state}"
{RENEWAL}
{extra}
"#,
            identity = self.identity,
            key = self.key_path.display(),
            state = self.state_dir().display(),
        );
        let path = self.dir.path().join("agent.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// The machine id in the state file.
    pub(crate) fn stored_machine_id(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.state_file()).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        v["machineId"].as_str().map(str::to_owned)
    }

    /// Starts `peaqos-agent run` with `config` (written by
    /// [`Device::write_config`]); `env` adds variables.
    pub(crate) fn run(&self, config: &Path, env: &[(&str, &Path)]) -> AgentProcess {
        assert!(config.starts_with(self.dir.path()), "this device's config");
        spawn(config, env)
    }
}

/// Starts `peaqos-agent run --config config`; `env` adds variables.
pub(crate) fn spawn(config: &Path, env: &[(&str, &Path)]) -> AgentProcess {
    let mut command = Command::new(BIN);
    command
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        // Always stderr, never the journal, whatever runs the tests.
        .env_remove("JOURNAL_STREAM")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("CREDENTIALS_DIRECTORY")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.spawn().expect("spawn peaqos-agent");
    let log = ChildLog::follow(child.stderr.take().unwrap());
    AgentProcess {
        child: Some(child),
        log,
    }
}

/// A running agent process; killed if the test ends without stopping it.
#[derive(Debug)]
pub(crate) struct AgentProcess {
    child: Option<Child>,
    log: ChildLog,
}

impl AgentProcess {
    /// How many log lines so far: a mark to search from.
    pub(crate) fn mark(&self) -> usize {
        self.log.count()
    }

    /// Every log line so far.
    pub(crate) fn log(&self) -> String {
        self.log.text()
    }

    /// The first line at or after `from` containing `needle`.
    pub(crate) fn find(&self, from: usize, needle: &str) -> Option<(usize, String)> {
        self.log.find(from, needle)
    }

    /// Waits for a line at or after `from` containing `needle`; returns its
    /// index. Panics with the log after `within`, or if the agent exits.
    pub(crate) async fn wait_line(&mut self, from: usize, needle: &str, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            if let Some((i, _)) = self.find(from, needle) {
                return i;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "agent exited ({status}) while waiting for {needle:?}; log:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no log line {needle:?} within {within:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for the process to exit by itself (a refused configuration).
    pub(crate) async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.drain();
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent still running after {within:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends `signal` (SIGHUP: reload).
    pub(crate) fn signal(&self, signal: rustix::process::Signal) {
        let child = self.child.as_ref().unwrap();
        let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
        rustix::process::kill_process(pid, signal).unwrap();
    }

    /// SIGKILL: no clean stop, as a power cut or an OOM kill.
    pub(crate) fn kill(mut self) -> String {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        self.drain();
        self.log()
    }

    /// SIGTERM, then waits (bounded) for a clean exit.
    pub(crate) async fn stop(mut self) -> String {
        let child = self.child.as_mut().unwrap();
        let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let status = self.wait_exit(Duration::from_secs(5)).await;
        assert!(status.success(), "{status}; log:\n{}", self.log());
        self.child = None;
        self.log()
    }

    fn drain(&mut self) {
        // stderr closes when the process exits: the reader then ends.
        self.log.finish();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `check` every 20 ms until it returns `Some`, for at most `within`;
/// panics naming `what` (and `context()`, e.g. the agent's log) otherwise.
pub(crate) async fn poll<T>(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> Option<T>,
    context: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {within:?}\n{}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
