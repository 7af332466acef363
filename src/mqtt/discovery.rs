//! Home Assistant MQTT discovery: the agent's state as one sensor, with the
//! status JSON as its attributes and the availability topic as its
//! availability. Published retained on every connect, and again whenever
//! Home Assistant announces `online` on its status topic (it forgets
//! non-retained discovery when it restarts).

use serde_json::json;

use super::config::HomeAssistantConfig;
use super::topics::{Topics, topic_level};

/// Discovery topics and payload for one machine.
#[derive(Debug, Clone)]
pub(crate) struct Discovery {
    /// `<discovery_prefix>/sensor/<node_id>/state/config`
    pub(crate) config_topic: String,
    /// `<discovery_prefix>/status`: Home Assistant's birth and will.
    pub(crate) ha_status_topic: String,
    pub(crate) payload: Vec<u8>,
}

/// What ties a machine behind a gateway to it in Home Assistant: the
/// gateway's availability topic (its last will) and its device.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Link<'a> {
    pub(crate) availability: &'a str,
    pub(crate) device: &'a str,
}

/// The node id a machine's entities are published under: the configured
/// one, or its topic level with `.` turned into `_`.
pub(crate) fn node_id(config: &HomeAssistantConfig, name: &str) -> Option<String> {
    match &config.node_id {
        Some(id) => Some(id.clone()),
        None => Some(topic_level(name)?.replace('.', "_")),
    }
}

/// A device's identifier in Home Assistant.
pub(crate) fn device_id(node_id: &str) -> String {
    format!("peaqos_{node_id}")
}

impl Discovery {
    /// The agent's own machine (a robot, or a gateway's own identity).
    /// `None` if no node id is configured and none can be made from the
    /// machine name.
    pub(crate) fn new(
        config: &HomeAssistantConfig,
        topics: &Topics,
        machine_name: &str,
    ) -> Option<Self> {
        let node_id = node_id(config, machine_name)?;
        Some(Self::own(config, &node_id, topics, machine_name))
    }

    /// The agent's own machine under a given node id.
    pub(crate) fn own(
        config: &HomeAssistantConfig,
        node_id: &str,
        topics: &Topics,
        machine_name: &str,
    ) -> Self {
        Self::build(config, node_id, topics, machine_name, None)
    }

    /// A machine behind a gateway: its own device, linked to the gateway's
    /// (`via_device`), and available only while both the gateway and the
    /// machine say `online` (the gateway's availability is its last will:
    /// when the gateway dies, every machine behind it reads unavailable).
    pub(crate) fn behind(
        config: &HomeAssistantConfig,
        node_id: &str,
        topics: &Topics,
        machine_name: &str,
        gateway: Link<'_>,
    ) -> Self {
        Self::build(config, node_id, topics, machine_name, Some(gateway))
    }

    fn build(
        config: &HomeAssistantConfig,
        node_id: &str,
        topics: &Topics,
        machine_name: &str,
        gateway: Option<Link<'_>>,
    ) -> Self {
        let prefix = &config.discovery_prefix;
        let device_name = if machine_name.trim().is_empty() {
            node_id
        } else {
            machine_name.trim()
        };
        let mut payload = json!({
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
                "identifiers": [device_id(node_id)],
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
        if let (Some(link), Some(object)) = (gateway, payload.as_object_mut()) {
            object.remove("availability_topic");
            object.insert(
                "availability".to_owned(),
                json!([{"topic": link.availability}, {"topic": topics.availability}]),
            );
            object.insert("availability_mode".to_owned(), json!("all"));
            object["device"]["via_device"] = json!(link.device);
            object["device"]["model"] = json!("peaqos-agent (gateway)");
        }
        Self {
            config_topic: format!("{prefix}/sensor/{node_id}/state/config"),
            ha_status_topic: format!("{prefix}/status"),
            payload: serde_json::to_vec(&payload).unwrap_or_default(),
        }
    }

    /// The gateway's own device, which the machines behind it name as
    /// `via_device`: one connectivity sensor whose state is the gateway's
    /// availability (`online`, or `offline` from its last will).
    pub(crate) fn gateway(
        config: &HomeAssistantConfig,
        node_id: &str,
        availability: &str,
        gateway_name: &str,
    ) -> Self {
        let prefix = &config.discovery_prefix;
        let payload = json!({
            "name": "peaqOS gateway",
            "unique_id": format!("peaqos_{node_id}_gateway"),
            "state_topic": availability,
            "payload_on": "online",
            "payload_off": "offline",
            "device_class": "connectivity",
            "device": {
                "identifiers": [device_id(node_id)],
                "name": gateway_name,
                "manufacturer": "peaqOS",
                "model": "peaqos-agent",
                "sw_version": env!("CARGO_PKG_VERSION"),
            },
            "origin": {
                "name": "peaqos-agent",
                "sw_version": env!("CARGO_PKG_VERSION"),
            },
        });
        Self {
            config_topic: format!("{prefix}/binary_sensor/{node_id}/gateway/config"),
            ha_status_topic: format!("{prefix}/status"),
            payload: serde_json::to_vec(&payload).unwrap_or_default(),
        }
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

    #[test]
    fn a_machine_behind_a_gateway_is_its_own_device_unavailable_with_the_gateway() {
        let topics = Topics::new("peaqos/dock-7");
        let link = Link {
            availability: "peaqos/site-gw/availability",
            device: "peaqos_site-gw",
        };
        let d = Discovery::behind(
            &HomeAssistantConfig::default(),
            "dock-7",
            &topics,
            "dock-7",
            link,
        );
        assert_eq!(d.config_topic, "homeassistant/sensor/dock-7/state/config");
        let p: serde_json::Value = serde_json::from_slice(&d.payload).unwrap();
        assert_eq!(p["device"]["identifiers"][0], "peaqos_dock-7");
        assert_eq!(p["device"]["via_device"], "peaqos_site-gw");
        assert_eq!(p["availability_mode"], "all");
        assert_eq!(
            p["availability"],
            serde_json::json!([
                {"topic": "peaqos/site-gw/availability"},
                {"topic": "peaqos/dock-7/availability"}
            ])
        );
        assert!(p.get("availability_topic").is_none());
        let g = Discovery::gateway(
            &HomeAssistantConfig::default(),
            "site-gw",
            link.availability,
            "site gw",
        );
        assert_eq!(
            g.config_topic,
            "homeassistant/binary_sensor/site-gw/gateway/config"
        );
        let p: serde_json::Value = serde_json::from_slice(&g.payload).unwrap();
        assert_eq!(p["device"]["identifiers"][0], link.device);
        assert_eq!(p["state_topic"], link.availability);
    }
}
