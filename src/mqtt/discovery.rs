//! Home Assistant MQTT discovery: the agent's state as one sensor, with the
//! status JSON as its attributes and the availability topic as its
//! availability. Published retained on every connect, and again whenever
//! Home Assistant announces `online` on its status topic (it forgets
//! non-retained discovery when it restarts).

use serde_json::json;

use super::config::HomeAssistantConfig;
use super::topics::{Topics, topic_level};

/// Discovery topics and payload for one agent.
#[derive(Debug, Clone)]
pub(crate) struct Discovery {
    /// `<discovery_prefix>/sensor/<node_id>/state/config`
    pub(crate) config_topic: String,
    /// `<discovery_prefix>/status`: Home Assistant's birth and will.
    pub(crate) ha_status_topic: String,
    pub(crate) payload: Vec<u8>,
}

impl Discovery {
    /// `None` if no node id is configured and none can be made from the
    /// machine name.
    pub(crate) fn new(
        config: &HomeAssistantConfig,
        topics: &Topics,
        machine_name: &str,
    ) -> Option<Self> {
        let node_id = match &config.node_id {
            Some(id) => id.clone(),
            None => topic_level(machine_name)?.replace('.', "_"),
        };
        let prefix = &config.discovery_prefix;
        let device_name = if machine_name.trim().is_empty() {
            node_id.as_str()
        } else {
            machine_name.trim()
        };
        let payload = json!({
            "name": "peaqOS identity",
            "unique_id": format!("peaqos_{node_id}_state"),
            "state_topic": topics.status,
            "value_template": "{{ value_json.state }}",
            "json_attributes_topic": topics.status,
            "availability_topic": topics.availability,
            "payload_available": "online",
            "payload_not_available": "offline",
            "icon": "mdi:shield-account",
            "device": {
                "identifiers": [format!("peaqos_{node_id}")],
                "name": device_name,
                "manufacturer": "peaqOS",
                "model": "peaqos-agent",
                "sw_version": env!("CARGO_PKG_VERSION"),
            },
            "origin": {
                "name": "peaqos-agent",
                "sw_version": env!("CARGO_PKG_VERSION"),
            },
        });
        Some(Self {
            config_topic: format!("{prefix}/sensor/{node_id}/state/config"),
            ha_status_topic: format!("{prefix}/status"),
            payload: serde_json::to_vec(&payload).unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_a_sensor_on_our_topics() {
        let topics = Topics::new("peaqos/Robot_7");
        let d = Discovery::new(&HomeAssistantConfig::default(), &topics, "Robot 7").unwrap();
        assert_eq!(d.config_topic, "homeassistant/sensor/Robot_7/state/config");
        assert_eq!(d.ha_status_topic, "homeassistant/status");
        let p: serde_json::Value = serde_json::from_slice(&d.payload).unwrap();
        assert_eq!(p["state_topic"], "peaqos/Robot_7/status");
        assert_eq!(p["json_attributes_topic"], "peaqos/Robot_7/status");
        assert_eq!(p["availability_topic"], "peaqos/Robot_7/availability");
        assert_eq!(p["value_template"], "{{ value_json.state }}");
        assert_eq!(p["device"]["name"], "Robot 7");
        assert_eq!(p["unique_id"], "peaqos_Robot_7_state");
    }

    #[test]
    fn node_ids_are_valid_for_home_assistant() {
        let topics = Topics::new("x/y");
        let d = Discovery::new(&HomeAssistantConfig::default(), &topics, "v1.2 bot").unwrap();
        assert_eq!(d.config_topic, "homeassistant/sensor/v1_2_bot/state/config");
        assert!(Discovery::new(&HomeAssistantConfig::default(), &topics, "###").is_none());
    }
}
