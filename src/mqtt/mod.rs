//! The local MQTT interface (see the README's "MQTT interface").
//!
//! (Interface frozen; implementation is issue 5.)

mod config;

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::MqttConfig;

use crate::status::{Command, StatusSnapshot};

/// Why the MQTT interface could not start or answer.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("MQTT interface is not implemented yet")]
    NotImplemented,
}

/// Starts the MQTT interface in the background. Returns at once: the broker
/// may be down, and registration never waits for MQTT. The task ends when
/// `shutdown` is cancelled, after publishing `offline`.
pub fn spawn(
    config: &MqttConfig,
    machine_name: &str,
    status: watch::Receiver<StatusSnapshot>,
    commands: mpsc::Sender<Command>,
    shutdown: CancellationToken,
) -> Result<JoinHandle<()>, MqttError> {
    let _ = (config, machine_name, status, commands);
    Ok(tokio::spawn(async move { shutdown.cancelled().await }))
}

#[allow(clippy::unused_async)] // stub until issue 5 lands
/// `peaqos-agent status`: asks a running agent for its status over MQTT.
pub async fn query_status(
    config: &MqttConfig,
    machine_name: &str,
    timeout: Duration,
) -> Result<serde_json::Value, MqttError> {
    let _ = (config, machine_name, timeout);
    Err(MqttError::NotImplemented)
}

#[allow(clippy::unused_async)] // stub until issue 5 lands
/// `peaqos-agent check`: connects to the broker and reports what it found.
pub async fn check_broker(config: &MqttConfig, timeout: Duration) -> Result<String, MqttError> {
    let _ = (config, timeout);
    Err(MqttError::NotImplemented)
}
