//! `peaqos-agent run`: assembles the agent from its configuration and runs
//! the registration loop (and the MQTT interface beside it) until shutdown.

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::client::{Client, ClientBuildError};
use crate::config::Config;
use crate::mqtt::{self, MqttError};
use crate::registration::Registrar;
use crate::signer::{OpenError, Signer};
use crate::state::StateStore;
use crate::status::{Command, StatusSnapshot};
use crate::systemd::{self, Heartbeat};

/// How long shutdown waits for the MQTT interface to say `offline`.
const MQTT_STOP_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long shutdown waits for the last `STATUS=` line.
const NOTIFIER_STOP_TIMEOUT: Duration = Duration::from_millis(200);
/// Commands queue this deep; more are refused by the sender (MQTT), never
/// buffered without bound.
const COMMAND_QUEUE: usize = 8;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot open the controller key")]
    Key(#[source] OpenError),
    #[error("cannot set up the orchestrator client")]
    Client(#[source] ClientBuildError),
    #[error("cannot start the MQTT interface")]
    Mqtt(#[source] MqttError),
}

/// A started agent: its status can be watched and commands sent before and
/// while it runs.
#[derive(Debug)]
pub struct Agent {
    config: Config,
    registrar: Registrar,
    heartbeat: Heartbeat,
    status: watch::Receiver<StatusSnapshot>,
    commands_tx: mpsc::Sender<Command>,
    commands_rx: mpsc::Receiver<Command>,
}

/// `/proc/sys/kernel/random/boot_id`, which changes on every boot.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

impl Agent {
    /// Opens the key (refusing loose permissions; finding it in its token),
    /// the API key and the state file. No network yet.
    pub fn new(config: Config) -> Result<Self, RunError> {
        for (configured, path) in &config.credentials_outside_systemd {
            tracing::info!(
                credential = configured,
                file = %path.display(),
                "not running under systemd: reading the unit's LoadCredential= source"
            );
        }
        if config.identity.key.is_some()
            && let Some(file) = &config.identity.key_file
        {
            tracing::warn!(
                key_file = %file,
                "[identity] key names a PKCS#11 token, so key_file is not used (and never \
                 used as a fallback)"
            );
        }
        let key = Signer::open(&config.identity, Some(&config.state.dir)).map_err(RunError::Key)?;
        Self::with_key(config, key)
    }

    /// As [`Agent::new`], with the key already opened.
    pub fn with_key(config: Config, key: impl Into<Signer>) -> Result<Self, RunError> {
        let key = key.into();
        let client = Client::new(&config.orchestrator).map_err(RunError::Client)?;
        let identity = config.identity.identity_ref.clone();
        let snapshot =
            StatusSnapshot::new(identity.canonical(), key.address().checksummed(), boot_id());
        let (status_tx, status) = watch::channel(snapshot);
        let store = StateStore::new(&config.state.dir);
        for stale in store.remove_stale_temps() {
            tracing::info!(file = %stale.display(), "removed an unfinished state write");
        }
        let loaded = store.load(&identity.canonical(), client.base());
        tracing::info!(
            identity = %identity,
            controller = %key.address().checksummed(),
            key = key.kind(),
            orchestrator = client.base(),
            state_file = %store.path().display(),
            "starting"
        );
        let heartbeat = Heartbeat::new("registration");
        let registrar = Registrar::new(
            identity,
            config.machine.clone(),
            config.renewal.clone(),
            config.orchestrator.effective_policy(),
            key,
            client,
            store,
            loaded,
            status_tx,
            heartbeat.clone(),
        );
        let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE);
        Ok(Self {
            config,
            registrar,
            heartbeat,
            status,
            commands_tx,
            commands_rx,
        })
    }

    /// Watches the agent's status.
    pub fn status(&self) -> watch::Receiver<StatusSnapshot> {
        self.status.clone()
    }

    /// Sends commands (such as `Reregister`) to the loop.
    pub fn commands(&self) -> mpsc::Sender<Command> {
        self.commands_tx.clone()
    }

    /// Runs until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RunError> {
        let Self {
            config,
            registrar,
            heartbeat,
            status,
            commands_tx,
            commands_rx,
        } = self;
        let notifier = systemd::spawn_status_notifier(status.clone());
        let mut heartbeats = vec![heartbeat];
        let mqtt_task = if config.mqtt.enabled {
            let mqtt_heartbeat = Heartbeat::new("mqtt");
            heartbeats.push(mqtt_heartbeat.clone());
            let handle = mqtt::spawn(
                &config.mqtt,
                config.machine_name(),
                status,
                commands_tx,
                mqtt_heartbeat,
                shutdown.child_token(),
            )
            .map_err(RunError::Mqtt)?;
            Some(handle)
        } else {
            drop((status, commands_tx));
            None
        };
        // WATCHDOG=1 only while the registration loop and (when enabled) the
        // MQTT service loop keep beating.
        let watchdog = systemd::spawn_watchdog(&heartbeats, shutdown.child_token());
        systemd::notify_ready();
        registrar.run(commands_rx, shutdown.clone()).await;
        // The loop is gone: the notifier sends `stopping` and ends.
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
        if let Some(mut handle) = mqtt_task {
            if tokio::time::timeout(MQTT_STOP_TIMEOUT, &mut handle)
                .await
                .is_err()
            {
                tracing::warn!("MQTT interface did not stop in time");
                handle.abort();
            }
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Runs the agent with `config` until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    Agent::new(config)?.run(shutdown).await
}
