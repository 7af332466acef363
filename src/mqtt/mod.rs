//! The local MQTT interface (its contract: docs/mqtt.md).
//!
//! The agent connects to the site broker as a client and keeps there, under
//! `<prefix>` (default `peaqos/<machine topic level>`):
//! `availability` (retained `online`/`offline`, `offline` also the last
//! will), `status` (retained JSON snapshot), answers to `status/get`
//! queries, and, when enabled, remote commands and Home Assistant
//! discovery. Registration never waits for any of it.

mod broker_url;
mod client;
mod commands;
mod config;
mod discovery;
mod driver;
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

/// Starts the MQTT interface in the background. Returns at once: the broker
/// may be down, and registration never waits for MQTT. The task ends when
/// `shutdown` is cancelled, after publishing `offline`.
pub fn spawn(
    config: &MqttConfig,
    machine_name: &str,
    status: watch::Receiver<StatusSnapshot>,
    commands: mpsc::Sender<Command>,
    heartbeat: Heartbeat,
    shutdown: CancellationToken,
) -> Result<JoinHandle<()>, MqttError> {
    let prepared = prepare(config, Some(machine_name), Role::Agent)?;
    let topics = prepared
        .topics
        .ok_or_else(|| MqttError::NoTopicLevel(machine_name.to_owned()))?;
    let discovery = if config.home_assistant.enabled {
        Some(
            Discovery::new(&config.home_assistant, &topics, machine_name)
                .ok_or_else(|| MqttError::NoTopicLevel(machine_name.to_owned()))?,
        )
    } else {
        None
    };
    let url = prepared.settings.url.to_string();
    let connection = client::new(&prepared.settings);
    Ok(service::start(
        config,
        service::Parts {
            url,
            topics,
            discovery,
            connection,
            status,
            commands,
            heartbeat,
        },
        shutdown,
    ))
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
