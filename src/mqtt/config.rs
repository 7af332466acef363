//! `[mqtt]` section of the agent configuration.

use serde::Deserialize;

/// Broker connection and topic settings. MQTT is optional: without a
/// `[mqtt]` section (or with `enabled = false`) the agent runs without it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    #[serde(default)]
    pub enabled: bool,
}
