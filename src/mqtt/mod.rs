//! The local MQTT interface (see the README's "MQTT interface").

mod config;

pub use config::MqttConfig;
