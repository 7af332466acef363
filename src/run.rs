//! `peaqos-agent run`: the host of the agent's machines. It assembles what
//! they share ([`crate::shared`]), starts one [`crate::machine`] per
//! machine (the agent's own, from `agent.toml`, and one per file of the
//! machines directory), tells the MQTT interface (one connection for all of them) and systemd about them, and
//! applies reloads ([`crate::reload`]) until shutdown. A robot is the case
//! of one machine.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::client::ClientBuildError;
use crate::config::{Config, ConfigError, MachineEntry, MachineSpec, machines};
use crate::machine::{Commands, Machine, Prepared, log_key_choice};
use crate::mqtt::{self, MachinePort, Membership, MqttError};
use crate::reload;
use crate::shared::{Shared, start_delay};
use crate::signer::{OpenError, Signer};
use crate::status::{Command, StatusSnapshot};
use crate::systemd::{self, Heartbeat, Roster};

pub use crate::shared::boot_id;

/// How long shutdown waits for the MQTT interface to say `offline`.
const MQTT_STOP_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long shutdown waits for the last `STATUS=` line.
const NOTIFIER_STOP_TIMEOUT: Duration = Duration::from_millis(200);

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot open the controller key")]
    Key(#[source] OpenError),
    #[error("cannot set up the orchestrator client")]
    Client(#[source] ClientBuildError),
    #[error("cannot start the MQTT interface")]
    Mqtt(#[source] MqttError),
    #[error("cannot read the machines of the gateway")]
    Machines(#[source] ConfigError),
}

/// A started agent: its machines' statuses can be watched and commands
/// sent before and while it runs.
#[derive(Debug)]
pub struct Agent {
    config: Config,
    shared: Shared,
    machines: Vec<Prepared>,
    reload_tx: mpsc::UnboundedSender<()>,
    reload_rx: mpsc::UnboundedReceiver<()>,
}

/// Asks a running agent to read its machines directory again.
#[derive(Debug, Clone)]
pub struct Reloader(mpsc::UnboundedSender<()>);

impl Reloader {
    pub fn reload(&self) {
        let _ = self.0.send(());
    }
}

impl Agent {
    /// Opens the own machine's key (refusing loose permissions; finding it
    /// in its token), reads the machines directory, loads state files. No
    /// network yet.
    pub fn new(config: Config) -> Result<Self, RunError> {
        let own = match MachineSpec::own(&config) {
            Some(spec) => {
                log_key_choice(&spec);
                let key = crate::rotation::open_effective(
                    &spec.identity,
                    &spec.state_dir,
                    &config.state.dir,
                )
                .map_err(RunError::Key)?;
                Some((spec, key))
            }
            None => None,
        };
        Self::assemble(config, own)
    }

    /// As [`Agent::new`], with the own machine's key already opened.
    pub fn with_key(config: Config, key: impl Into<Signer>) -> Result<Self, RunError> {
        let own = MachineSpec::own(&config).map(|spec| (spec, key.into()));
        Self::assemble(config, own)
    }

    fn assemble(config: Config, own: Option<(MachineSpec, Signer)>) -> Result<Self, RunError> {
        let shared = Shared::new(&config).map_err(RunError::Client)?;
        let mut prepared = Vec::new();
        if let Some((spec, key)) = own {
            prepared.push(Prepared::own(spec, key, &shared.boot_id));
        }
        for entry in machines::read_all(&config).map_err(RunError::Machines)? {
            // The first machine has a queue whatever the configuration:
            // `Agent::commands` hands it out.
            let commands = if prepared.is_empty() {
                Commands::Queue
            } else {
                commands_of(&config)
            };
            prepared.push(Prepared::from_entry(entry, &shared.boot_id, commands));
        }
        let (reload_tx, reload_rx) = mpsc::unbounded_channel();
        Ok(Self {
            config,
            shared,
            machines: prepared,
            reload_tx,
            reload_rx,
        })
    }

    /// Watches the status of the first machine: the robot's (or the
    /// gateway's own machine's).
    pub fn status(&self) -> watch::Receiver<StatusSnapshot> {
        self.machines[0].status()
    }

    /// Sends commands (such as `Reregister`) to the first machine's loop.
    pub fn commands(&self) -> mpsc::Sender<Command> {
        self.machines[0]
            .commands()
            .expect("the first machine always has a command queue")
    }

    /// Watches the status of the machine named `name` (a file's stem, or
    /// the own machine's name), as started.
    pub fn machine_status(&self, name: &str) -> Option<watch::Receiver<StatusSnapshot>> {
        self.machines
            .iter()
            .find(|m| m.name() == name)
            .map(Prepared::status)
    }

    /// The handle that makes the running agent reload (SIGHUP).
    pub fn reloader(&self) -> Reloader {
        Reloader(self.reload_tx.clone())
    }

    /// Runs until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RunError> {
        let Self {
            config,
            shared,
            machines: prepared,
            reload_tx,
            mut reload_rx,
        } = self;
        drop(reload_tx);
        let (members, members_rx) = mpsc::unbounded_channel();
        for machine in &prepared {
            let _ = members.send(Membership::Add(port(machine)));
        }
        let mqtt_task = if config.mqtt.enabled {
            let heartbeat = Heartbeat::new("mqtt");
            shared.heartbeats.insert(heartbeat.clone());
            let handle = mqtt::spawn_host(
                &config.mqtt,
                config.machine_name(),
                members_rx,
                heartbeat,
                shutdown.child_token(),
            )
            .map_err(RunError::Mqtt)?;
            Some(handle)
        } else {
            drop(members_rx);
            None
        };
        let mut host = Host {
            config,
            shared,
            members,
            machines: BTreeMap::new(),
            own: None,
            stop_all: shutdown.child_token(),
            roster: watch::channel(Roster::default()).0,
        };
        let count = prepared.len();
        for machine in prepared {
            host.start(machine, start_delay(count));
        }
        host.publish_roster();
        let notifier = systemd::spawn_roster_notifier(host.roster.subscribe());
        // WATCHDOG=1 only while every machine's loop and (when enabled) the
        // MQTT service keep beating.
        let watchdog = systemd::spawn_watchdog_for(&host.shared.heartbeats, shutdown.child_token());
        systemd::notify_ready();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(()) = reload_rx.recv() => host.reload().await,
            }
        }
        host.stop_all().await;
        // The loops are gone: the notifier sends the last line and ends.
        drop(host.roster);
        if tokio::time::timeout(NOTIFIER_STOP_TIMEOUT, notifier)
            .await
            .is_err()
        {
            tracing::debug!("STATUS= notifier did not end in time");
        }
        systemd::notify_stopping();
        if let Some(w) = watchdog {
            w.abort();
        }
        drop(host.members);
        if let Some(mut handle) = mqtt_task
            && tokio::time::timeout(MQTT_STOP_TIMEOUT, &mut handle)
                .await
                .is_err()
        {
            tracing::warn!("MQTT interface did not stop in time");
            handle.abort();
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Runs the agent with `config` until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    Agent::new(config)?.run(shutdown).await
}

/// Whether the machines of a gateway's directory get a command queue: only
/// MQTT commands send to them.
fn commands_of(config: &Config) -> Commands {
    if config.mqtt.enabled && config.mqtt.commands.enabled {
        Commands::Queue
    } else {
        Commands::None
    }
}

fn port(machine: &Prepared) -> MachinePort {
    MachinePort {
        name: machine.name().to_owned(),
        topic_prefix: machine.topic_prefix().map(str::to_owned),
        status: machine.status(),
        commands: machine.commands(),
    }
}

/// The running machines and what they share.
struct Host {
    config: Config,
    shared: Shared,
    members: mpsc::UnboundedSender<Membership>,
    /// The machines of the machines directory, by name.
    machines: BTreeMap<String, Machine>,
    /// The agent's own machine, which a reload never touches.
    own: Option<Machine>,
    stop_all: CancellationToken,
    roster: watch::Sender<Roster>,
}

impl Host {
    fn start(&mut self, machine: Prepared, delay: Duration) {
        let own = machine.is_own();
        let machine = machine.start(&self.shared, delay, self.stop_all.child_token());
        if own {
            self.own = Some(machine);
        } else {
            self.machines.insert(machine.name.clone(), machine);
        }
    }

    fn publish_roster(&self) {
        let machines = self
            .own
            .iter()
            .chain(self.machines.values())
            .map(|m| (m.name.clone(), m.status.clone()))
            .collect();
        let robot = self.own.is_some() && self.machines.is_empty();
        self.roster.send_replace(Roster { machines, robot });
    }

    /// Reads the machines directory again and applies the difference.
    async fn reload(&mut self) {
        let entries = match machines::read_all(&self.config) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::error!(
                    "reload: {}; the running machines carry on",
                    peaqos_logging::error_chain(&e)
                );
                return;
            }
        };
        let running: BTreeMap<String, reload::Running> = self
            .machines
            .iter()
            .map(|(name, m)| {
                (
                    name.clone(),
                    reload::Running {
                        text: m.text.clone(),
                        runs: m.runs,
                    },
                )
            })
            .collect();
        let plan = reload::plan(&running, entries);
        for entry in &plan.refused {
            if let Err(e) = &entry.spec {
                tracing::error!(
                    machine_name = %entry.name,
                    "reload: {}; the machine carries on as it was",
                    peaqos_logging::error_chain(e)
                );
            }
        }
        let (started, stopped, restarted) = (plan.start.len(), plan.stop.len(), plan.restart.len());
        for name in plan.stop {
            self.remove(&name).await;
        }
        for entry in &plan.restart {
            self.remove(&entry.name).await;
        }
        let count = plan.start.len() + plan.restart.len();
        for entry in plan.restart.into_iter().chain(plan.start) {
            self.add(entry, start_delay(count));
        }
        self.publish_roster();
        tracing::info!(
            started,
            stopped,
            restarted,
            refused = plan.refused.len(),
            unchanged = plan.unchanged,
            "reload: {started} started, {stopped} stopped, {restarted} restarted, {} \
             refused, {} unchanged",
            plan.refused.len(),
            plan.unchanged
        );
    }

    fn add(&mut self, entry: MachineEntry, delay: Duration) {
        if let Err(e) = &entry.spec {
            tracing::error!(
                machine_name = %entry.name,
                "{}",
                peaqos_logging::error_chain(e)
            );
        }
        let machine = Prepared::from_entry(entry, &self.shared.boot_id, commands_of(&self.config));
        let _ = self.members.send(Membership::Add(port(&machine)));
        self.start(machine, delay);
    }

    /// Stops a file's machine and takes it off the MQTT interface (which
    /// clears its retained topics). Its record is left alone.
    async fn remove(&mut self, name: &str) {
        let Some(machine) = self.machines.remove(name) else {
            return;
        };
        machine.stop(&self.shared).await;
        let _ = self.members.send(Membership::Remove {
            name: name.to_owned(),
        });
        tracing::info!(machine_name = %name, "machine stopped; its record is left as it is");
    }

    async fn stop_all(&mut self) {
        self.stop_all.cancel();
        let all: Vec<Machine> = self
            .own
            .take()
            .into_iter()
            .chain(std::mem::take(&mut self.machines).into_values())
            .collect();
        for machine in all {
            machine.join(&self.shared).await;
        }
    }
}
