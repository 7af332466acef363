//! `[mqtt]` section of the agent configuration.
//!
//! Serde only reads values; [`MqttConfig::check`] validates them across
//! fields, so that a bad value is refused at start (and by `peaqos-agent
//! check`) with the key named, never discovered later on a reconnect.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::broker_url::BrokerUrl;
use super::topics;

/// Broker connection and topic settings. MQTT is optional: without a
/// `[mqtt]` section (or with `enabled = false`) the agent runs without it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    pub enabled: bool,
    /// `mqtt://host[:port]` (default port 1883) or `mqtts://host[:port]`
    /// (default 8883; needs `ca_file` and a build with the `tls` feature).
    pub url: String,
    /// MQTT protocol version: `"5"` (default) or `"3.1.1"`.
    pub protocol: Protocol,
    /// Default: `peaqos-agent-<machine topic level>`. Must be unique on the
    /// broker: a second client with the same id disconnects the first.
    pub client_id: Option<String>,
    pub username: Option<String>,
    /// File holding the broker password, or `credential:NAME` for a systemd
    /// credential. Never the password itself.
    pub password_file: Option<String>,
    /// PEM file of the CA certificate(s) that signed the broker's
    /// certificate (`mqtts://` only). For a broker with a public
    /// certificate, point it at the system bundle
    /// (`/etc/ssl/certs/ca-certificates.crt`).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain for brokers that require one.
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of `client_cert_file` (a path or `credential:NAME`).
    pub client_key_file: Option<String>,
    /// Default: `peaqos/<machine topic level>`.
    pub topic_prefix: Option<String>,
    #[serde(deserialize_with = "crate::duration::deserialize")]
    pub keep_alive: Duration,
    /// How long one connection attempt (TCP, TLS, CONNECT/CONNACK) may take.
    #[serde(deserialize_with = "crate::duration::deserialize")]
    pub connect_timeout: Duration,
    /// First delay before reconnecting after the broker went away; doubled
    /// per failed attempt up to `reconnect_max`, with jitter.
    #[serde(deserialize_with = "crate::duration::deserialize")]
    pub reconnect_min: Duration,
    #[serde(deserialize_with = "crate::duration::deserialize")]
    pub reconnect_max: Duration,
    /// The retained status is also republished this often (`0` = only on
    /// changes and reconnects).
    #[serde(deserialize_with = "crate::duration::deserialize")]
    pub status_interval: Duration,
    /// Largest MQTT packet the agent sends or accepts, in bytes.
    pub max_packet_size: u32,
    /// Status queries answered at once before the rate applies.
    pub query_burst: u32,
    /// Status queries answered per second after a burst; more are dropped
    /// (counted in the status payload's `queries.rateLimited`).
    pub query_rate: u32,
    pub commands: CommandsConfig,
    pub home_assistant: HomeAssistantConfig,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            url: "mqtt://127.0.0.1:1883".to_owned(),
            protocol: Protocol::V5,
            client_id: None,
            username: None,
            password_file: None,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            topic_prefix: None,
            keep_alive: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            reconnect_min: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(60),
            status_interval: Duration::from_secs(300),
            max_packet_size: 64 * 1024,
            query_burst: 20,
            query_rate: 10,
            commands: CommandsConfig::default(),
            home_assistant: HomeAssistantConfig::default(),
        }
    }
}

/// MQTT protocol version spoken to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// MQTT 5: queries with a Response Topic are answered there.
    V5,
    /// MQTT 3.1.1: only the JSON `replyTo` form of queries can be answered.
    V311,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V5 => "5",
            Self::V311 => "3.1.1",
        })
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Protocol;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#""5" or "3.1.1""#)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Protocol, E> {
                match v {
                    "5" | "5.0" => Ok(Protocol::V5),
                    "3.1.1" => Ok(Protocol::V311),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Protocol, E> {
                if v == 5 {
                    Ok(Protocol::V5)
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Signed(v), &self))
                }
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Protocol, E> {
                if v == 5 {
                    Ok(Protocol::V5)
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// `[mqtt.commands]`: remote commands. Off by default; when off the agent
/// does not even subscribe to a command topic.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandsConfig {
    pub enabled: bool,
    /// The commands accepted (`"reregister"`, `"rotate_key"`). The agent
    /// subscribes to exactly these command topics. Who may publish to them
    /// is the broker ACL's job: MQTT tells a subscriber nothing trustworthy
    /// about the sender, so the agent does not pretend to authenticate it.
    pub allow: Vec<CommandName>,
    /// Token bucket: at most `burst` commands at once, then one more per
    /// `refill`.
    pub burst: u32,
    #[serde(deserialize_with = "crate::duration::deserialize")]
    pub refill: Duration,
    /// How long to wait for the registration loop's answer before reporting
    /// `timeout` on the result topic.
    #[serde(deserialize_with = "crate::duration::deserialize")]
    pub result_timeout: Duration,
}

impl Default for CommandsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            allow: Vec::new(),
            burst: 2,
            refill: Duration::from_secs(600),
            result_timeout: Duration::from_secs(120),
        }
    }
}

/// A remote command's name: the last level of its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandName {
    /// Renew the identity proof now.
    Reregister,
    /// Make a successor key (key rotation); the result names its address.
    RotateKey,
}

impl CommandName {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reregister => "reregister",
            Self::RotateKey => "rotate_key",
        }
    }
}

/// `[mqtt.home_assistant]`: MQTT discovery of the agent's state as a sensor.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HomeAssistantConfig {
    pub enabled: bool,
    pub discovery_prefix: String,
    /// Default: the machine topic level, with `.` turned into `_`.
    pub node_id: Option<String>,
}

impl Default for HomeAssistantConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            discovery_prefix: "homeassistant".to_owned(),
            node_id: None,
        }
    }
}

/// A bad `[mqtt]` value, naming the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("[mqtt] {key}: {problem}")]
pub struct MqttConfigError {
    pub key: &'static str,
    pub problem: String,
}

fn invalid(key: &'static str, problem: impl Into<String>) -> MqttConfigError {
    MqttConfigError {
        key,
        problem: problem.into(),
    }
}

/// Bounds that keep a reconnect loop or a ping schedule sane.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(3600);
const MIN_PACKET_SIZE: u32 = 4 * 1024;
const MAX_PACKET_SIZE: u32 = 16 * 1024 * 1024;
const MAX_ID_LEN: usize = 256;
/// Beyond these a query flood costs real CPU and broker traffic; the limit
/// exists to bound that.
const MAX_QUERY_BURST: u32 = 10_000;
const MAX_QUERY_RATE: u32 = 1_000;

impl MqttConfig {
    /// Validates values across fields. Values are checked even when MQTT is
    /// disabled, so that enabling it later does not reveal old mistakes.
    pub fn check(&self) -> Result<(), MqttConfigError> {
        let url = BrokerUrl::parse(&self.url).map_err(|problem| invalid("url", problem))?;
        self.check_tls(&url)?;
        self.check_identity()?;
        self.check_times()?;
        if !(MIN_PACKET_SIZE..=MAX_PACKET_SIZE).contains(&self.max_packet_size) {
            return Err(invalid(
                "max_packet_size",
                format!("must be between {MIN_PACKET_SIZE} and {MAX_PACKET_SIZE} bytes"),
            ));
        }
        if !(1..=MAX_QUERY_BURST).contains(&self.query_burst) {
            return Err(invalid(
                "query_burst",
                format!("must be between 1 and {MAX_QUERY_BURST} queries"),
            ));
        }
        if !(1..=MAX_QUERY_RATE).contains(&self.query_rate) {
            return Err(invalid(
                "query_rate",
                format!("must be between 1 and {MAX_QUERY_RATE} queries per second"),
            ));
        }
        if let Some(prefix) = &self.topic_prefix {
            topics::check_prefix(prefix).map_err(|p| invalid("topic_prefix", p))?;
        }
        self.check_commands()?;
        self.check_home_assistant()
    }

    fn check_tls(&self, url: &BrokerUrl) -> Result<(), MqttConfigError> {
        if url.tls {
            if !cfg!(feature = "tls") {
                return Err(invalid(
                    "url",
                    "mqtts:// needs TLS, but this build of peaqos-agent has no TLS support \
                     (built without the `tls` feature)",
                ));
            }
            if self.ca_file.is_none() {
                return Err(invalid(
                    "ca_file",
                    "mqtts:// needs ca_file (the PEM CA certificate(s) of the broker; for a public \
                     certificate use /etc/ssl/certs/ca-certificates.crt)",
                ));
            }
        } else {
            for (key, set) in [
                ("ca_file", self.ca_file.is_some()),
                ("client_cert_file", self.client_cert_file.is_some()),
                ("client_key_file", self.client_key_file.is_some()),
            ] {
                if set {
                    return Err(invalid(
                        key,
                        "only used with an mqtts:// url (this url is plain mqtt://)",
                    ));
                }
            }
        }
        match (&self.client_cert_file, &self.client_key_file) {
            (Some(_), None) => Err(invalid(
                "client_key_file",
                "client_cert_file is set, so client_key_file is needed too",
            )),
            (None, Some(_)) => Err(invalid(
                "client_cert_file",
                "client_key_file is set, so client_cert_file is needed too",
            )),
            _ => Ok(()),
        }
    }

    fn check_identity(&self) -> Result<(), MqttConfigError> {
        if let Some(id) = &self.client_id
            && (id.is_empty() || id.len() > MAX_ID_LEN)
        {
            return Err(invalid(
                "client_id",
                format!("must be 1 to {MAX_ID_LEN} bytes"),
            ));
        }
        if let Some(user) = &self.username
            && (user.is_empty() || user.len() > MAX_ID_LEN)
        {
            return Err(invalid(
                "username",
                format!("must be 1 to {MAX_ID_LEN} bytes"),
            ));
        }
        if let Some(file) = &self.password_file {
            if file.is_empty() {
                return Err(invalid("password_file", "must not be empty"));
            }
            if self.username.is_none() {
                return Err(invalid(
                    "password_file",
                    "a password needs a username (MQTT sends no password without one)",
                ));
            }
        }
        Ok(())
    }

    fn check_times(&self) -> Result<(), MqttConfigError> {
        // rumqttc counts keep-alive in whole seconds and the protocol field is
        // 16 bits; zero would switch keep-alive (and so the broker's detection
        // of a dead agent, which fires the last will) off.
        if self.keep_alive < Duration::from_secs(1) || self.keep_alive.as_secs() > 65_535 {
            return Err(invalid("keep_alive", "must be between 1s and 65535s"));
        }
        if self.connect_timeout < Duration::from_secs(1)
            || self.connect_timeout > Duration::from_secs(300)
        {
            return Err(invalid("connect_timeout", "must be between 1s and 300s"));
        }
        if self.reconnect_min.is_zero() {
            return Err(invalid("reconnect_min", "must be more than zero"));
        }
        if self.reconnect_max < self.reconnect_min || self.reconnect_max > MAX_RECONNECT_DELAY {
            return Err(invalid(
                "reconnect_max",
                "must be at least reconnect_min and at most 1h",
            ));
        }
        if !self.status_interval.is_zero() && self.status_interval < Duration::from_secs(1) {
            return Err(invalid("status_interval", "must be 0 (off) or at least 1s"));
        }
        Ok(())
    }

    fn check_commands(&self) -> Result<(), MqttConfigError> {
        let c = &self.commands;
        if c.enabled && c.allow.is_empty() {
            return Err(invalid(
                "commands.allow",
                r#"commands are enabled but none is allowed; list them, e.g. allow = ["reregister"]"#,
            ));
        }
        if c.burst == 0 || c.burst > 100 {
            return Err(invalid("commands.burst", "must be between 1 and 100"));
        }
        if c.refill < Duration::from_secs(1) {
            return Err(invalid("commands.refill", "must be at least 1s"));
        }
        if c.result_timeout < Duration::from_secs(1) {
            return Err(invalid("commands.result_timeout", "must be at least 1s"));
        }
        Ok(())
    }

    fn check_home_assistant(&self) -> Result<(), MqttConfigError> {
        let ha = &self.home_assistant;
        topics::check_prefix(&ha.discovery_prefix)
            .map_err(|p| invalid("home_assistant.discovery_prefix", p))?;
        if let Some(node) = &ha.node_id
            && (node.is_empty()
                || node.len() > 64
                || !node
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
        {
            return Err(invalid(
                "home_assistant.node_id",
                "must be 1 to 64 characters of A-Z, a-z, 0-9, _ and -",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<MqttConfig, toml::de::Error> {
        toml::from_str(toml_text)
    }

    #[test]
    fn defaults_are_valid_and_disabled() {
        let config = parse("").unwrap();
        assert!(!config.enabled);
        assert!(!config.commands.enabled);
        assert!(!config.home_assistant.enabled);
        assert_eq!(config.protocol, Protocol::V5);
        config.check().unwrap();
    }

    #[test]
    fn durations_accept_seconds_and_units() {
        let config = parse(
            r#"
            keep_alive = 15
            reconnect_min = "250ms"
            reconnect_max = "2m"
            status_interval = "1h"
            "#,
        )
        .unwrap();
        assert_eq!(config.keep_alive, Duration::from_secs(15));
        assert_eq!(config.reconnect_min, Duration::from_millis(250));
        assert_eq!(config.reconnect_max, Duration::from_secs(120));
        assert_eq!(config.status_interval, Duration::from_secs(3600));
        let err = parse(r#"keep_alive = "soon""#).unwrap_err().to_string();
        assert!(err.contains("keep_alive") && err.contains("soon"), "{err}");
    }

    #[test]
    fn protocol_accepts_both_versions_and_refuses_others() {
        assert_eq!(
            parse(r#"protocol = "3.1.1""#).unwrap().protocol,
            Protocol::V311
        );
        assert_eq!(parse("protocol = 5").unwrap().protocol, Protocol::V5);
        let err = parse(r#"protocol = "3.1""#).unwrap_err().to_string();
        assert!(err.contains(r#""5" or "3.1.1""#), "{err}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = parse("urll = \"mqtt://x\"").unwrap_err().to_string();
        assert!(err.contains("urll"), "{err}");
        let err = parse("[commands]\nenable = true").unwrap_err().to_string();
        assert!(err.contains("enable"), "{err}");
    }

    fn check_err(toml_text: &str) -> MqttConfigError {
        parse(toml_text).unwrap().check().unwrap_err()
    }

    #[test]
    fn check_names_the_bad_key() {
        assert_eq!(check_err(r#"url = "http://x""#).key, "url");
        assert_eq!(
            check_err(r#"url = "mqtt://x""#.replace('x', "").as_str()).key,
            "url"
        );
        assert_eq!(check_err("keep_alive = 0").key, "keep_alive");
        assert_eq!(check_err(r#"keep_alive = "500ms""#).key, "keep_alive");
        assert_eq!(
            check_err("reconnect_min = 10\nreconnect_max = 5").key,
            "reconnect_max"
        );
        assert_eq!(check_err(r#"topic_prefix = "a/+/b""#).key, "topic_prefix");
        assert_eq!(check_err(r#"password_file = "/p""#).key, "password_file");
        assert_eq!(check_err(r#"ca_file = "/ca.pem""#).key, "ca_file");
        assert_eq!(check_err("max_packet_size = 10").key, "max_packet_size");
        assert_eq!(check_err("query_burst = 0").key, "query_burst");
        assert_eq!(check_err("query_rate = 0").key, "query_rate");
        assert_eq!(check_err("query_rate = 1001").key, "query_rate");
        assert_eq!(
            check_err("[commands]\nenabled = true").key,
            "commands.allow"
        );
        assert_eq!(
            check_err("[home_assistant]\nnode_id = \"a b\"").key,
            "home_assistant.node_id"
        );
        let err = check_err("[commands]\nenabled = true").to_string();
        assert!(err.starts_with("[mqtt] commands.allow: "), "{err}");
    }

    #[test]
    fn unknown_command_names_are_refused_by_the_parser() {
        let err = parse("[commands]\nallow = [\"reboot\"]")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("reboot") && err.contains("reregister"),
            "{err}"
        );
    }

    #[cfg(feature = "tls")]
    #[test]
    fn mqtts_needs_a_ca_file() {
        assert_eq!(check_err(r#"url = "mqtts://broker.local""#).key, "ca_file");
        parse("url = \"mqtts://broker.local\"\nca_file = \"/ca.pem\"")
            .unwrap()
            .check()
            .unwrap();
        assert_eq!(
            check_err("url = \"mqtts://b\"\nca_file = \"/ca.pem\"\nclient_cert_file = \"/c.pem\"")
                .key,
            "client_key_file"
        );
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn mqtts_is_refused_without_tls_support() {
        let err = check_err("url = \"mqtts://b\"\nca_file = \"/ca.pem\"");
        assert_eq!(err.key, "url");
        assert!(err.problem.contains("tls"), "{err}");
    }
}
