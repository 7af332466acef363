//! The host's side of the MQTT interface: which machines are on it. The
//! host sends a [`Membership`] for every machine it starts or stops; the
//! MQTT side publishes each machine's status and availability, answers its
//! queries and passes its commands on.
//!
//! Until the MQTT interface serves many machines over one connection
//! (`mqtt::spawn_host`, on its own branch), this link gives each member the
//! connection `mqtt::spawn` makes for one machine: a robot's is the one it
//! always had; a gateway's machines get one each, under client ids of
//! their own.

use std::collections::BTreeMap;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::mqtt::{self, MqttConfig, MqttError};
use crate::status::{Command, StatusSnapshot};
use crate::systemd::{self, Heartbeat};

/// One machine on the MQTT interface.
#[derive(Debug)]
pub struct MachinePort {
    /// The file's stem, or the own machine's name (`config.machine_name()`).
    pub name: String,
    pub topic_prefix: Option<String>,
    pub status: watch::Receiver<StatusSnapshot>,
    pub commands: mpsc::Sender<Command>,
}

/// A change of the machines on the interface. A changed machine is a
/// `Remove` and then an `Add`.
#[derive(Debug)]
pub enum Membership {
    Add(MachinePort),
    Remove { name: String },
}

/// Starts the MQTT side. The members already queued are connected before
/// this returns (so that a configuration the broker side cannot use stops
/// the agent at start, as it always did); later ones as they come.
pub fn spawn_host(
    config: &MqttConfig,
    gateway_name: &str,
    mut members: mpsc::UnboundedReceiver<Membership>,
    heartbeat: Heartbeat,
    shutdown: CancellationToken,
) -> Result<JoinHandle<()>, MqttError> {
    let mut links = Links {
        config: config.clone(),
        gateway_name: gateway_name.to_owned(),
        running: BTreeMap::new(),
        shutdown: shutdown.clone(),
    };
    while let Ok(change) = members.try_recv() {
        links.apply(change)?;
    }
    Ok(tokio::spawn(async move {
        let beat_every = systemd::beat_interval().unwrap_or(std::time::Duration::MAX);
        loop {
            heartbeat.beat();
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(beat_every) => {}
                change = members.recv() => match change {
                    Some(change) => {
                        if let Err(e) = links.apply(change) {
                            tracing::error!("MQTT: {}", peaqos_logging::error_chain(&e));
                        }
                    }
                    None => shutdown.cancelled().await,
                },
            }
        }
        for (_, (_, handle)) in std::mem::take(&mut links.running) {
            let _ = handle.await;
        }
    }))
}

struct Links {
    config: MqttConfig,
    gateway_name: String,
    running: BTreeMap<String, (CancellationToken, JoinHandle<()>)>,
    shutdown: CancellationToken,
}

impl Links {
    fn apply(&mut self, change: Membership) -> Result<(), MqttError> {
        match change {
            Membership::Add(port) => {
                let mut config = self.config.clone();
                config.topic_prefix.clone_from(&port.topic_prefix);
                if port.name != self.gateway_name {
                    // A connection per machine: ids must not collide.
                    config.client_id = config.client_id.map(|id| format!("{id}-{}", port.name));
                    config.home_assistant.node_id = None;
                }
                let stop = self.shutdown.child_token();
                let handle = mqtt::spawn(
                    &config,
                    &port.name,
                    port.status,
                    port.commands,
                    Heartbeat::new(format!("mqtt:{}", port.name)),
                    stop.clone(),
                )?;
                if let Some((old, _)) = self.running.insert(port.name, (stop, handle)) {
                    old.cancel();
                }
            }
            Membership::Remove { name } => {
                if let Some((stop, _)) = self.running.remove(&name) {
                    stop.cancel();
                }
            }
        }
        Ok(())
    }
}
