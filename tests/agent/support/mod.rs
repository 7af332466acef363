//! Helpers shared by the agent's integration tests: keys, configurations,
//! a running agent with its status, and bounded waits.

pub(crate) mod fake;
pub(crate) mod orchestrator;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use peaqos_agent::config::Config;
use peaqos_agent::run::{Agent, RunError};
use peaqos_agent::status::{AgentState, Command, StatusSnapshot};
use peaqos_protocol::SecretKey;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A controller key written to `<dir>/<name>.key` with mode 0600.
pub(crate) fn write_key(dir: &Path, name: &str) -> (SecretKey, PathBuf) {
    let key = SecretKey::generate().unwrap();
    let path = dir.join(format!("{name}.key"));
    std::fs::write(&path, format!("{}\n", key.to_hex().as_str())).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    (key, path)
}

/// Intervals short enough for tests, long enough not to spin.
pub(crate) const FAST_RENEWAL: &str = r#"
[renewal]
check_interval = "300ms"
backoff_initial = "50ms"
backoff_max = "400ms"
slow_retry = "300ms"
"#;

/// The text of an agent configuration.
pub(crate) fn config_text(
    url: &str,
    identity: &str,
    key: &Path,
    state_dir: &Path,
    extra: &str,
) -> String {
    format!(
        r#"
[identity]
ref = "{identity}"
key_file = "{key}"

[orchestrator]
url = "{url}"
connect_timeout = "1s"
request_timeout = "3s"

[machine]
display_name = "test robot"
owner_id = "owner-1"
machine_type = "amr"
runtime_profile = "ros2"
labels = {{ site = "lab" }}

[state]
dir = "{state}"
{extra}
"#,
        key = key.display(),
        state = state_dir.display(),
    )
}

pub(crate) fn config(
    url: &str,
    identity: &str,
    key: &Path,
    state_dir: &Path,
    extra: &str,
) -> Config {
    let text = config_text(url, identity, key, state_dir, extra);
    Config::from_texts(vec![(PathBuf::from("agent.toml"), text)]).unwrap()
}

/// An agent running in this process.
pub(crate) struct Running {
    pub(crate) status: watch::Receiver<StatusSnapshot>,
    pub(crate) commands: mpsc::Sender<Command>,
    pub(crate) shutdown: CancellationToken,
    handle: JoinHandle<Result<(), RunError>>,
}

pub(crate) fn start(config: Config) -> Running {
    let agent = Agent::new(config).unwrap();
    let status = agent.status();
    let commands = agent.commands();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(agent.run(shutdown.clone()));
    Running {
        status,
        commands,
        shutdown,
        handle,
    }
}

impl Running {
    /// Waits until the status satisfies `pred`; panics with the last status
    /// after `timeout`.
    pub(crate) async fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&StatusSnapshot) -> bool,
    ) -> StatusSnapshot {
        let result = tokio::time::timeout(timeout, self.status.wait_for(|s| pred(s)))
            .await
            .map(|r| r.map(|s| s.clone()));
        match result {
            Ok(Ok(s)) => s,
            _ => panic!(
                "timed out after {timeout:?} waiting for {what}; last status: {:#?}",
                *self.status.borrow()
            ),
        }
    }

    pub(crate) async fn wait_state(
        &mut self,
        state: AgentState,
        timeout: Duration,
    ) -> StatusSnapshot {
        self.wait_for(state.as_str(), timeout, |s| s.state == state)
            .await
    }

    /// Records every state the agent publishes from now on (a state that
    /// lasts more than a moment cannot be missed).
    pub(crate) fn record_states(&self) -> std::sync::Arc<std::sync::Mutex<Vec<AgentState>>> {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(vec![self.status.borrow().state]));
        let mut rx = self.status.clone();
        let out = seen.clone();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let state = rx.borrow_and_update().state;
                out.lock().unwrap().push(state);
            }
        });
        seen
    }

    /// Asks for a renewal and returns the loop's answer.
    pub(crate) async fn reregister(&self, timeout: Duration) -> Result<(), String> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Reregister { reply })
            .await
            .unwrap();
        tokio::time::timeout(timeout, answer)
            .await
            .expect("reregister answered in time")
            .unwrap()
    }

    /// Asks for a renewal without waiting for the answer.
    pub(crate) fn reregister_nowait(&self) {
        let (reply, _answer) = oneshot::channel();
        self.commands
            .try_send(Command::Reregister { reply })
            .unwrap();
    }

    /// Cancels and checks the agent stops within `within`.
    pub(crate) async fn stop(self, within: Duration) -> StatusSnapshot {
        self.shutdown.cancel();
        let started = std::time::Instant::now();
        tokio::time::timeout(within, self.handle)
            .await
            .unwrap_or_else(|_| panic!("agent did not stop within {within:?}"))
            .unwrap()
            .unwrap();
        assert!(started.elapsed() <= within);
        self.status.borrow().clone()
    }
}

/// The machine id in the state file, if any.
pub(crate) fn stored_machine_id(state_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(state_dir.join("state.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["machineId"].as_str().map(str::to_owned)
}
