//! One machine of the agent: its configuration ([`MachineSpec`]), its
//! controller key, its state file, its registration loop, its status and
//! its command queue. A robot is the agent's one machine; a gateway holds
//! many, each started, stopped and restarted on its own (see
//! [`crate::run`]). Every log entry of a machine's loop carries its name
//! (`MACHINE_NAME=` in the journal) and, once known, its record's id
//! (`MACHINE_ID=`).
//!
//! What goes wrong with a machine stays with it: a file that cannot be
//! used shows `config_error`, a key that cannot be opened `key_unavailable`
//! or `config_error`, retried as the loop retries, with the file named.

use std::path::PathBuf;
use std::time::Duration;

use peaqos_protocol::Timestamp;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::config::{MachineEntry, MachineSpec};
use crate::registration::Registrar;
use crate::shared::Shared;
use crate::signer::{OpenError, Signer};
use crate::state::StateStore;
use crate::status::{AgentState, Command, LastError, StatusSnapshot};
use crate::systemd::Heartbeat;

/// `lastError.code` of a machine whose file or key file cannot be used.
pub const CONFIG_CODE: &str = "CONFIG";
/// `lastError.code` of a machine whose token does not answer.
const KEY_CODE: &str = "KEY_UNAVAILABLE";
/// Commands queue this deep; more are refused by the sender (MQTT), never
/// buffered without bound.
const COMMAND_QUEUE: usize = 8;

/// Whether a machine gets a command queue: only when something can send to
/// it. A queue with its first block is about 900 bytes, which a gateway of
/// a thousand machines without MQTT commands would keep for nothing
/// (docs/performance.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commands {
    /// MQTT commands are on, or the library's caller asks for the queue
    /// (`Agent::commands`, the first machine's).
    Queue,
    /// Nothing sends commands to this machine.
    None,
}
/// How long stopping one machine waits for its loop.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// A machine ready to start: its channels exist (so that the MQTT side and
/// tests can watch it before it runs), its key may already be open.
#[derive(Debug)]
pub struct Prepared {
    name: String,
    topic_prefix: Option<String>,
    text: Option<String>,
    source: PathBuf,
    what: What,
    status_tx: watch::Sender<StatusSnapshot>,
    status: watch::Receiver<StatusSnapshot>,
    commands_tx: Option<mpsc::Sender<Command>>,
    commands_rx: Option<mpsc::Receiver<Command>>,
}

#[derive(Debug)]
enum What {
    /// A usable configuration, its key opened (the own machine) or to be
    /// opened by its task.
    Run {
        spec: Box<MachineSpec>,
        key: Option<Signer>,
    },
    /// A file that describes no usable machine: why, with the file named.
    Invalid(String),
}

/// A started machine.
#[derive(Debug)]
pub struct Machine {
    pub name: String,
    pub topic_prefix: Option<String>,
    /// Its file's text when it was started: what a reload compares.
    pub text: Option<String>,
    pub source: PathBuf,
    pub status: watch::Receiver<StatusSnapshot>,
    /// Its command queue, when it has one (see [`Commands`]).
    pub commands: Option<mpsc::Sender<Command>>,
    /// Whether it runs a loop (a bad file's machine does not).
    pub runs: bool,
    stop: CancellationToken,
    task: JoinHandle<()>,
    heartbeat: Option<Heartbeat>,
}

impl Prepared {
    /// The agent's own machine, from `agent.toml`, with its key opened
    /// already (a key that cannot be opened stops the agent, as it always
    /// did for a robot). It always has a command queue.
    pub fn own(spec: MachineSpec, key: Signer, boot_id: &str) -> Self {
        let snapshot = StatusSnapshot::new(
            spec.identity.identity_ref.canonical(),
            key.address().checksummed(),
            boot_id.to_owned(),
        );
        Self::new(
            spec.name.clone(),
            spec.topic_prefix.clone(),
            None,
            spec.source.clone(),
            snapshot,
            What::Run {
                spec: Box::new(spec),
                key: Some(key),
            },
            Commands::Queue,
        )
    }

    /// A machine file as read: a machine whose key its task opens, or one
    /// that shows why its file cannot be used.
    pub fn from_entry(entry: MachineEntry, boot_id: &str, commands: Commands) -> Self {
        let MachineEntry {
            name,
            path,
            text,
            spec,
        } = entry;
        match spec {
            Ok(spec) => {
                let snapshot = StatusSnapshot::new(
                    spec.identity.identity_ref.canonical(),
                    String::new(),
                    boot_id.to_owned(),
                );
                Self::new(
                    name,
                    spec.topic_prefix.clone(),
                    text,
                    path,
                    snapshot,
                    What::Run {
                        spec: Box::new(spec),
                        key: None,
                    },
                    commands,
                )
            }
            Err(e) => {
                let message = peaqos_logging::error_chain(&e);
                let mut snapshot =
                    StatusSnapshot::new(String::new(), String::new(), boot_id.to_owned());
                snapshot.state = AgentState::ConfigError;
                snapshot.last_error = Some(LastError {
                    code: CONFIG_CODE.to_owned(),
                    message: message.clone(),
                    at: Timestamp::now(),
                });
                Self::new(
                    name,
                    None,
                    text,
                    path,
                    snapshot,
                    What::Invalid(message),
                    commands,
                )
            }
        }
    }

    fn new(
        name: String,
        topic_prefix: Option<String>,
        text: Option<String>,
        source: PathBuf,
        snapshot: StatusSnapshot,
        what: What,
        commands: Commands,
    ) -> Self {
        let (status_tx, status) = watch::channel(snapshot);
        let (commands_tx, commands_rx) = match commands {
            Commands::Queue => {
                let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
                (Some(tx), Some(rx))
            }
            Commands::None => (None, None),
        };
        Self {
            name,
            topic_prefix,
            text,
            source,
            what,
            status_tx,
            status,
            commands_tx,
            commands_rx,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn topic_prefix(&self) -> Option<&str> {
        self.topic_prefix.as_deref()
    }

    /// Whether it is the agent's own machine (from `agent.toml`).
    pub fn is_own(&self) -> bool {
        matches!(&self.what, What::Run { spec, .. } if spec.own)
    }

    pub fn status(&self) -> watch::Receiver<StatusSnapshot> {
        self.status.clone()
    }

    /// Its command queue's sender, when it has one.
    pub fn commands(&self) -> Option<mpsc::Sender<Command>> {
        self.commands_tx.clone()
    }

    /// Starts its task after `delay` (spreading a gateway's starts); it
    /// runs until `stop` is cancelled.
    pub fn start(self, shared: &Shared, delay: Duration, stop: CancellationToken) -> Machine {
        let Self {
            name,
            topic_prefix,
            text,
            source,
            what,
            status_tx,
            status,
            commands_tx,
            commands_rx,
        } = self;
        let span = tracing::info_span!(
            "machine",
            machine_name = %name,
            machine_id = tracing::field::Empty
        );
        let (task, heartbeat) = match what {
            What::Run { spec, key } => {
                let task_name = if spec.own {
                    "registration".to_owned()
                } else {
                    format!("registration:{name}")
                };
                let heartbeat = Heartbeat::new(task_name);
                shared.heartbeats.insert(heartbeat.clone());
                let life = Box::new(Life {
                    spec: *spec,
                    shared: shared.clone(),
                    status: status_tx,
                    heartbeat: heartbeat.clone(),
                    stop: stop.clone(),
                });
                let task = tokio::spawn(life.run(key, delay, commands_rx).instrument(span));
                (task, Some(heartbeat))
            }
            What::Invalid(message) => {
                let task = tokio::spawn(
                    refuse_commands(message, status_tx, commands_rx, stop.clone()).instrument(span),
                );
                (task, None)
            }
        };
        Machine {
            name,
            topic_prefix,
            text,
            source,
            status,
            commands: commands_tx,
            runs: heartbeat.is_some(),
            stop,
            task,
            heartbeat,
        }
    }
}

impl Machine {
    /// Stops its loop and waits for it (a loop that does not end in time is
    /// aborted); the watchdog no longer asks for its heartbeat. The record
    /// is left as it is.
    pub async fn stop(self, shared: &Shared) {
        self.stop.cancel();
        self.join(shared).await;
    }

    /// Waits for a loop already told to stop.
    pub async fn join(mut self, shared: &Shared) {
        if tokio::time::timeout(STOP_TIMEOUT, &mut self.task)
            .await
            .is_err()
        {
            tracing::warn!(machine_name = %self.name, "machine loop did not stop in time");
            self.task.abort();
        }
        if let Some(heartbeat) = &self.heartbeat {
            shared.heartbeats.remove(heartbeat);
        }
    }
}

/// A machine's task: wait its turn, open its key (until it opens), run its
/// loop.
struct Life {
    spec: MachineSpec,
    shared: Shared,
    status: watch::Sender<StatusSnapshot>,
    heartbeat: Heartbeat,
    stop: CancellationToken,
}

impl Life {
    // Boxed, `self` and the start: an async fn's arguments stay in its
    // future for its whole life, and what starting takes (the machine's
    // whole configuration, opening the key) is not needed once the loop
    // runs. The start is allocated only when the machine's turn has come:
    // a gateway that boots with a thousand machines would otherwise hold a
    // thousand of them through the spread of its starts, and the heap
    // stays as large as that peak (docs/performance.md).
    async fn run(
        self: Box<Self>,
        key: Option<Signer>,
        delay: Duration,
        mut commands: Option<mpsc::Receiver<Command>>,
    ) {
        if !self
            .wait(delay, &mut commands, "the machine is starting")
            .await
        {
            self.stopping();
            return;
        }
        let start = Box::pin(unbox(self).start(key, &mut commands));
        let Some((registrar, stop)) = start.await else {
            return;
        };
        registrar.run(commands, stop).await;
    }

    /// Opens its key (until it opens): the loop, ready to run, or `None`
    /// when the machine is stopped first.
    async fn start(
        self,
        key: Option<Signer>,
        commands: &mut Option<mpsc::Receiver<Command>>,
    ) -> Option<(Registrar, CancellationToken)> {
        let key = if let Some(key) = key {
            key
        } else if let Some(key) = self.open_key(commands).await {
            key
        } else {
            self.stopping();
            return None;
        };
        let Self {
            spec,
            shared,
            status,
            heartbeat,
            stop,
        } = self;
        Some((registrar(spec, key, &shared, status, heartbeat), stop))
    }

    /// Opens the key on a blocking thread (a keystore's scrypt, a token's
    /// login), retrying as the loop retries until it opens or the machine
    /// stops.
    async fn open_key(&self, commands: &mut Option<mpsc::Receiver<Command>>) -> Option<Signer> {
        let mut backoff = Backoff::new(
            self.shared.renewal.backoff_initial,
            self.shared.renewal.backoff_max,
        );
        log_key_choice(&self.spec);
        loop {
            let opened = {
                let _permit = self.shared.opens.acquire().await.ok();
                let identity = self.spec.identity.clone();
                let state_root = self.shared.state_root.clone();
                let state_dir = self.spec.state_dir.clone();
                tokio::task::spawn_blocking(move || {
                    crate::rotation::open_effective(&identity, &state_dir, &state_root)
                })
                .await
            };
            let error = match opened {
                Ok(Ok(key)) => return Some(key),
                Ok(Err(e)) => e,
                Err(join) => {
                    tracing::error!("opening the key failed: {join}");
                    return None;
                }
            };
            let (state, code, wait) = match &error {
                e if e.is_transient() => (
                    AgentState::KeyUnavailable,
                    KEY_CODE,
                    backoff.next_delay(None),
                ),
                OpenError::File(_) | OpenError::Rotated { .. } => (
                    AgentState::ConfigError,
                    CONFIG_CODE,
                    self.shared.renewal.slow_retry,
                ),
                #[cfg(feature = "pkcs11")]
                OpenError::Token { .. } => (
                    AgentState::KeyUnavailable,
                    KEY_CODE,
                    self.shared.renewal.slow_retry,
                ),
            };
            let message = format!(
                "{}: {}",
                self.spec.source.display(),
                peaqos_logging::error_chain(&error)
            );
            tracing::warn!(
                state = %state,
                error_code = code,
                retry_in_ms = wait.as_millis(),
                "{message}"
            );
            let next = Timestamp::now().saturating_add(wait);
            self.status.send_modify(|s| {
                s.state = state;
                s.last_error = Some(LastError {
                    code: code.to_owned(),
                    message,
                    at: Timestamp::now(),
                });
                s.next_attempt_at = Some(next);
                s.seq += 1;
                s.timestamp = Timestamp::now();
            });
            if !self
                .wait(wait, commands, "the controller key cannot be opened")
                .await
            {
                return None;
            }
        }
    }

    /// Waits `duration` (beating), refusing commands meanwhile; `false`
    /// when the machine is stopped.
    async fn wait(
        &self,
        duration: Duration,
        commands: &mut Option<mpsc::Receiver<Command>>,
        why: &str,
    ) -> bool {
        if duration.is_zero() {
            return !self.stop.is_cancelled();
        }
        let sleep = self.heartbeat.sleep(duration);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                biased;
                () = self.stop.cancelled() => return false,
                () = &mut sleep => return true,
                Some(command) = next_command(commands) => command.refuse(why.to_owned()),
            }
        }
    }

    fn stopping(&self) {
        self.status.send_modify(|s| {
            s.state = AgentState::Stopping;
            s.next_attempt_at = None;
            s.seq += 1;
            s.timestamp = Timestamp::now();
        });
    }
}

/// Moves a machine's `Life` out of its box and frees the box now: moving
/// out of a `Box` in place frees it only when the box's variable goes out
/// of scope, which for an async fn's argument is the end of the task.
#[allow(clippy::boxed_local)]
fn unbox(life: Box<Life>) -> Life {
    *life
}

/// The machine's registration loop, over its opened key and loaded state.
fn registrar(
    spec: MachineSpec,
    key: Signer,
    shared: &Shared,
    status: watch::Sender<StatusSnapshot>,
    heartbeat: Heartbeat,
) -> Registrar {
    let identity = spec.identity.identity_ref.clone();
    let controller = key.address().checksummed();
    status.send_modify(|s| s.controller_address.clone_from(&controller));
    let store = StateStore::new(&spec.state_dir);
    for stale in store.remove_stale_temps() {
        tracing::info!(file = %stale.display(), "removed an unfinished state write");
    }
    let loaded = store.load(&identity.canonical(), shared.client.base());
    tracing::info!(
        identity = %identity,
        controller = %controller,
        key = key.kind(),
        orchestrator = shared.client.base(),
        state_file = %store.path().display(),
        "starting"
    );
    Registrar::new(
        identity,
        spec.machine,
        shared.renewal.clone(),
        shared.policy.clone(),
        key,
        shared.client.clone(),
        store,
        loaded,
        status,
        heartbeat,
        shared.pacing.clone(),
        crate::registration::Rotation::new(
            spec.identity,
            &spec.state_dir,
            shared.state_root.clone(),
        ),
    )
}

/// What the configuration says about the key, before it is opened.
pub fn log_key_choice(spec: &MachineSpec) {
    for (configured, path) in &spec.credentials_outside_systemd {
        tracing::info!(
            credential = configured,
            file = %path.display(),
            "not running under systemd: reading the unit's LoadCredential= source"
        );
    }
    if spec.identity.key.is_some()
        && let Some(file) = &spec.identity.key_file
    {
        tracing::warn!(
            key_file = %file,
            "[identity] key names a PKCS#11 token, so key_file is not used (and never \
             used as a fallback)"
        );
    }
}

/// The task of a machine whose file cannot be used: it shows why, and
/// answers commands with it, until the machine is stopped.
async fn refuse_commands(
    message: String,
    status: watch::Sender<StatusSnapshot>,
    mut commands: Option<mpsc::Receiver<Command>>,
    stop: CancellationToken,
) {
    tracing::error!(state = %AgentState::ConfigError, error_code = CONFIG_CODE, "{message}");
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            command = next_command(&mut commands) => match command {
                Some(command) => command.refuse(message.clone()),
                None => stop.cancelled().await,
            },
        }
    }
    drop(status);
}

/// The next command of a machine's queue; `None` once its senders are gone
/// or when it has no queue.
pub(crate) async fn next_command(
    commands: &mut Option<mpsc::Receiver<Command>>,
) -> Option<Command> {
    match commands {
        Some(queue) => queue.recv().await,
        None => None,
    }
}
