//! The local MQTT interface (its contract: docs/mqtt.md).
//!
//! The agent connects to the site broker as one client, whatever the number
//! of machines it keeps, and keeps there for each machine, under its
//! `<prefix>` (default `peaqos/<machine topic level>`): `availability`
//! (retained `online`/`offline`), `status` (retained JSON snapshot), answers
//! to `status/get` queries, and, when enabled, remote commands and Home
//! Assistant discovery. The gateway's own `availability` (its prefix is
//! `[mqtt] topic_prefix` or `peaqos/<gateway topic level>`) is the last
//! will; a robot's one machine shares it. Registration never waits for any
//! of it.

mod broker_url;
mod client;
mod commands;
mod config;
mod discovery;
mod driver;
mod member;
mod poison;
mod probe;
mod random;
mod rate;
mod request;
mod service;
mod topics;

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[cfg(feature = "tls")]
pub use crate::tls::TlsError;
pub use client::ConnectionError;
pub use config::{
    CommandName, CommandsConfig, HomeAssistantConfig, MqttConfig, MqttConfigError, Protocol,
};
pub use topics::topic_level;

use crate::secrets::SecretError;
use crate::status::{Command, StatusSnapshot};
use crate::systemd::Heartbeat;

use broker_url::BrokerUrl;
use client::ConnectSettings;
use discovery::Discovery;
use topics::Topics;

/// Why the MQTT interface could not start or answer.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("invalid MQTT configuration")]
    Config(#[from] MqttConfigError),
    #[error("MQTT is disabled in the configuration ([mqtt] enabled = false)")]
    Disabled,
    #[error(
        "machine name {0:?} gives no usable MQTT topic level; set [mqtt] topic_prefix \
         (and [mqtt.home_assistant] node_id when discovery is on)"
    )]
    NoTopicLevel(String),
    #[error("cannot read the MQTT broker password")]
    Password(#[source] SecretError),
    #[cfg(feature = "tls")]
    #[error("cannot set up TLS to the MQTT broker")]
    Tls(#[from] TlsError),
    #[error("cannot reach the MQTT broker at {url}")]
    Connect {
        url: String,
        #[source]
        source: Box<ConnectionError>,
    },
    #[error("the MQTT broker at {url} did not accept a connection within {timeout:?}")]
    ConnectTimeout { url: String, timeout: Duration },
    #[error("the MQTT broker at {url} refused the connection ({reason})")]
    Refused { url: String, reason: String },
    #[error("the MQTT broker did not allow subscribing to {topic} (check its ACL)")]
    SubscribeRefused { topic: String },
    #[error("no answer from the agent within {timeout:?} (is it running and connected to {url}?)")]
    Timeout { url: String, timeout: Duration },
    #[error("the agent is offline: {topic} says so (it is stopped or lost its broker connection)")]
    AgentOffline { topic: String },
    #[error("the agent's answer on {topic} is not a JSON object")]
    BadReply {
        topic: String,
        #[source]
        source: Option<serde_json::Error>,
    },
}

/// One machine as the MQTT interface sees it: its name (the file stem, or
/// a robot's machine name), its prefix when its file sets one, its status
/// and its registration loop's commands.
#[derive(Debug)]
pub struct MachinePort {
    pub name: String,
    /// `[mqtt] topic_prefix` of the machine's file; default
    /// `peaqos/<topic_level(name)>`, or the gateway's prefix for a machine
    /// named as the gateway.
    pub topic_prefix: Option<String>,
    pub status: watch::Receiver<StatusSnapshot>,
    /// Its registration loop's command queue; `None` when it has none (MQTT
    /// commands off), and a command is then refused as unavailable.
    pub commands: Option<mpsc::Sender<Command>>,
}

/// A change in the machines the interface serves. A changed machine file
/// is `Remove` then `Add`.
#[derive(Debug)]
pub enum Membership {
    Add(MachinePort),
    /// Stops serving the machine and clears its retained topics (status,
    /// availability, discovery); its record is not touched.
    Remove {
        name: String,
    },
}

/// Starts the MQTT interface of a host of machines in the background: one
/// broker connection (client id and last will from `config` and
/// `gateway_name`), machines coming and going on `members`. Returns at
/// once: the broker may be down, and registration never waits for MQTT.
/// The task ends when `shutdown` is cancelled, after publishing every
/// machine's final status and `offline`; a closed `members` only means no
/// more changes.
pub fn spawn_host(
    config: &MqttConfig,
    gateway_name: &str,
    members: mpsc::UnboundedReceiver<Membership>,
    heartbeat: Heartbeat,
    shutdown: CancellationToken,
) -> Result<JoinHandle<()>, MqttError> {
    let prepared = prepare(config, Some(gateway_name), Role::Agent)?;
    let topics = prepared
        .topics
        .ok_or_else(|| MqttError::NoTopicLevel(gateway_name.to_owned()))?;
    let url = prepared.settings.url.to_string();
    let connection = client::new(&prepared.settings);
    Ok(service::start(
        config,
        service::Parts {
            url,
            gateway: service::Gateway::new(config, gateway_name, topics),
            connection,
            members,
            heartbeat,
        },
        shutdown,
    ))
}

/// Starts the MQTT interface of one machine (a robot): the host of one.
pub fn spawn(
    config: &MqttConfig,
    machine_name: &str,
    status: watch::Receiver<StatusSnapshot>,
    commands: mpsc::Sender<Command>,
    heartbeat: Heartbeat,
    shutdown: CancellationToken,
) -> Result<JoinHandle<()>, MqttError> {
    config.check()?;
    if !config.enabled {
        return Err(MqttError::Disabled);
    }
    // Refused here as before: without a topic level there is nothing to
    // publish under (the host would log it and carry on).
    let topics = Topics::for_config(config, machine_name)
        .ok_or_else(|| MqttError::NoTopicLevel(machine_name.to_owned()))?;
    if config.home_assistant.enabled
        && Discovery::new(&config.home_assistant, &topics, machine_name).is_none()
    {
        return Err(MqttError::NoTopicLevel(machine_name.to_owned()));
    }
    let (members_tx, members) = mpsc::unbounded_channel();
    let handle = spawn_host(config, machine_name, members, heartbeat, shutdown)?;
    let _ = members_tx.send(Membership::Add(MachinePort {
        name: machine_name.to_owned(),
        topic_prefix: config.topic_prefix.clone(),
        status,
        commands: Some(commands),
    }));
    Ok(handle)
}

/// `peaqos-agent status`: asks a running agent for its status over MQTT
/// (a `status/get` query from a short-lived client of its own).
pub async fn query_status(
    config: &MqttConfig,
    machine_name: &str,
    timeout: Duration,
) -> Result<serde_json::Value, MqttError> {
    let prepared = prepare(config, Some(machine_name), Role::Query)?;
    let topics = prepared
        .topics
        .ok_or_else(|| MqttError::NoTopicLevel(machine_name.to_owned()))?;
    probe::query_status(&prepared.settings, &topics, timeout).await
}

/// A machine to look up: its name and its file's `[mqtt] topic_prefix`.
#[derive(Debug, Clone)]
pub struct MachineRef {
    pub name: String,
    pub topic_prefix: Option<String>,
}

/// A machine as its retained topics show it.
#[derive(Debug, Clone)]
pub struct MachineView {
    pub name: String,
    pub prefix: String,
    /// The machine's own `availability` (`online`, `offline`), if any.
    pub availability: Option<String>,
    /// Its retained status JSON, if any.
    pub status: Option<serde_json::Value>,
}

/// What a reader sees of a gateway: its own availability (the last will)
/// and each machine's retained topics.
#[derive(Debug, Clone)]
pub struct GatewayView {
    pub name: String,
    pub availability: Option<String>,
    pub machines: Vec<MachineView>,
}

impl MachineView {
    /// Online as a dashboard must read it: the gateway and the machine both
    /// say `online` (a dead gateway's will covers its machines too).
    pub fn online(&self, gateway: &GatewayView) -> bool {
        gateway.availability.as_deref() == Some("online")
            && self.availability.as_deref() == Some("online")
    }
}

/// `peaqos-agent status` on a gateway: every machine's retained status and
/// availability, and the gateway's, read with one short-lived client.
pub async fn read_machines(
    config: &MqttConfig,
    gateway_name: &str,
    machines: &[MachineRef],
    timeout: Duration,
) -> Result<GatewayView, MqttError> {
    let prepared = prepare(config, Some(gateway_name), Role::Query)?;
    let gateway = prepared
        .topics
        .ok_or_else(|| MqttError::NoTopicLevel(gateway_name.to_owned()))?;
    let mut wanted = vec![gateway.availability.clone()];
    let mut views = Vec::with_capacity(machines.len());
    for m in machines {
        let topics =
            Topics::for_machine(m.topic_prefix.as_deref(), &m.name, gateway_name, &gateway)
                .ok_or_else(|| MqttError::NoTopicLevel(m.name.clone()))?;
        wanted.push(topics.status.clone());
        wanted.push(topics.availability.clone());
        views.push((m.name.clone(), topics));
    }
    let marker = format!("{}list-{}", gateway.reply_prefix, random::nonce());
    let mut seen = probe::read_retained(&prepared.settings, &wanted, &marker, timeout).await?;
    let text = |payload: Vec<u8>| String::from_utf8_lossy(&payload).into_owned();
    Ok(GatewayView {
        name: gateway_name.to_owned(),
        availability: seen.get(&gateway.availability).cloned().map(text),
        machines: views
            .into_iter()
            .map(|(name, topics)| MachineView {
                name,
                availability: seen.get(&topics.availability).cloned().map(text),
                status: seen
                    .remove(&topics.status)
                    .and_then(|p| serde_json::from_slice(&p).ok()),
                prefix: topics.prefix,
            })
            .collect(),
    })
}

/// `peaqos-agent status NAME` on a gateway: asks that machine, as
/// [`query_status`] asks a robot.
pub async fn query_machine(
    config: &MqttConfig,
    gateway_name: &str,
    machine: &MachineRef,
    timeout: Duration,
) -> Result<serde_json::Value, MqttError> {
    let prepared = prepare(config, Some(gateway_name), Role::Query)?;
    let gateway = prepared
        .topics
        .ok_or_else(|| MqttError::NoTopicLevel(gateway_name.to_owned()))?;
    let topics = Topics::for_machine(
        machine.topic_prefix.as_deref(),
        &machine.name,
        gateway_name,
        &gateway,
    )
    .ok_or_else(|| MqttError::NoTopicLevel(machine.name.clone()))?;
    probe::query_status(&prepared.settings, &topics, timeout).await
}

/// `peaqos-agent check`: connects to the broker (with the agent's
/// credentials and TLS settings, under a client id of its own so that a
/// running agent is not disturbed) and reports what it found.
pub async fn check_broker(config: &MqttConfig, timeout: Duration) -> Result<String, MqttError> {
    let prepared = prepare(config, None, Role::Check)?;
    probe::check_broker(&prepared.settings, timeout).await
}

/// Who is connecting: the agent itself, or a short-lived helper client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Agent,
    Query,
    Check,
}

#[derive(Debug)]
struct Prepared {
    settings: ConnectSettings,
    topics: Option<Topics>,
}

/// Validates the config and turns it into connection settings: reads the
/// password and TLS files once, derives topics and the client id.
fn prepare(
    config: &MqttConfig,
    machine_name: Option<&str>,
    role: Role,
) -> Result<Prepared, MqttError> {
    config.check()?;
    if !config.enabled {
        return Err(MqttError::Disabled);
    }
    let url = BrokerUrl::parse(&config.url).map_err(|problem| MqttConfigError {
        key: "url",
        problem,
    })?;
    let topics = machine_name.and_then(|name| Topics::for_config(config, name));
    let base_id = match (
        &config.client_id,
        machine_name.and_then(topics::topic_level),
    ) {
        (Some(id), _) => id.clone(),
        (None, Some(level)) => format!("peaqos-agent-{level}"),
        (None, None) => match &topics {
            Some(t) => format!("peaqos-agent-{}", t.prefix.replace('/', "_")),
            None => "peaqos-agent".to_owned(),
        },
    };
    // Helpers must never reuse the agent's client id: the broker would
    // disconnect the running agent, and its last will would report it
    // offline.
    let client_id = match role {
        Role::Agent => base_id,
        Role::Query => format!("{base_id}-status-{}", random::nonce()),
        Role::Check => format!("{base_id}-check-{}", random::nonce()),
    };
    let password = match &config.password_file {
        Some(location) => {
            let path = crate::secrets::resolve(location).map_err(MqttError::Password)?;
            Some(crate::secrets::read(&path).map_err(MqttError::Password)?)
        }
        None => None,
    };
    let will = match (&topics, role) {
        (Some(t), Role::Agent) => Some((t.availability.clone(), "offline")),
        _ => None,
    };
    #[cfg(feature = "tls")]
    let tls = match (&config.ca_file, url.tls) {
        (Some(ca), true) => Some(std::sync::Arc::new(crate::tls::client_config(
            ca,
            config
                .client_cert_file
                .as_deref()
                .zip(config.client_key_file.as_deref()),
        )?)),
        _ => None,
    };
    Ok(Prepared {
        settings: ConnectSettings {
            url,
            protocol: config.protocol,
            client_id,
            username: config.username.clone(),
            password,
            keep_alive: config.keep_alive,
            connect_timeout: config.connect_timeout,
            max_packet_size: config.max_packet_size,
            will,
            #[cfg(feature = "tls")]
            tls,
        },
        topics,
    })
}
