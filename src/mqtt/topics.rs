//! The topic contract: every topic the agent publishes or subscribes to is
//! derived here from one prefix (default `peaqos/<machine topic level>`).

use super::config::{CommandName, MqttConfig};

/// Longest topic level made from a machine name.
const MAX_LEVEL_LEN: usize = 64;
/// Longest reply topic the agent publishes to.
pub(crate) const MAX_REPLY_TOPIC_LEN: usize = 512;

/// Turns a machine's display name into one safe topic level: ASCII letters,
/// digits, `-`, `_` and `.` are kept; every other run of characters
/// (spaces, `/`, `+`, `#`, non-ASCII) becomes one `_`; leading and trailing
/// `_` are dropped, and the result is cut to 64 bytes.
/// `"Robot Arm #7"` becomes `"Robot_Arm_7"`. `None` if nothing is left.
pub fn topic_level(name: &str) -> Option<String> {
    let mut level = String::with_capacity(name.len().min(MAX_LEVEL_LEN));
    let mut gap = false;
    for c in name.chars() {
        if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
            if gap && !level.is_empty() {
                level.push('_');
            }
            gap = false;
            level.push(c);
        } else {
            gap = true;
        }
        if level.len() >= MAX_LEVEL_LEN {
            break;
        }
    }
    level.truncate(MAX_LEVEL_LEN);
    let level = level.trim_matches('_');
    // A level of dots alone would read as a relative path to some tools.
    (!level.is_empty() && !level.bytes().all(|b| b == b'.')).then(|| level.to_owned())
}

/// Checks a configured topic prefix: non-empty levels, no wildcards, no
/// leading `$` (reserved for the broker) or `/`, no trailing `/`.
pub(crate) fn check_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if prefix.len() > 256 {
        return Err("must be at most 256 bytes".to_owned());
    }
    if prefix.contains(['+', '#', '\0']) {
        return Err(format!("{prefix:?} contains a wildcard (+ or #) or NUL"));
    }
    if prefix.starts_with('$') {
        return Err(format!(
            "{prefix:?} starts with $, which is reserved for broker topics"
        ));
    }
    if prefix.split('/').any(str::is_empty) {
        return Err(format!(
            "{prefix:?} has an empty level (a leading, trailing or double /)"
        ));
    }
    Ok(())
}

/// All topics of one agent.
#[derive(Debug, Clone)]
pub(crate) struct Topics {
    pub(crate) prefix: String,
    pub(crate) availability: String,
    pub(crate) status: String,
    pub(crate) status_get: String,
    /// `<prefix>/reply/`: the only place replies go.
    pub(crate) reply_prefix: String,
    pub(crate) command_result: String,
}

impl Topics {
    pub(crate) fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            availability: format!("{prefix}/availability"),
            status: format!("{prefix}/status"),
            status_get: format!("{prefix}/status/get"),
            reply_prefix: format!("{prefix}/reply/"),
            command_result: format!("{prefix}/command/result"),
        }
    }

    /// A machine's topics on a gateway: its file's prefix, else the
    /// gateway's for the machine named as the gateway (a robot's), else
    /// `peaqos/<its topic level>`. `None` if the name gives no level.
    pub(crate) fn for_machine(
        topic_prefix: Option<&str>,
        name: &str,
        gateway_name: &str,
        gateway: &Topics,
    ) -> Option<Self> {
        match topic_prefix {
            Some(prefix) => Some(Self::new(prefix)),
            None if name == gateway_name => Some(gateway.clone()),
            None => topic_level(name).map(|level| Self::new(&format!("peaqos/{level}"))),
        }
    }

    /// The prefix from the config, or `peaqos/<machine topic level>`.
    pub(crate) fn for_config(config: &MqttConfig, machine_name: &str) -> Option<Self> {
        match &config.topic_prefix {
            Some(prefix) => Some(Self::new(prefix)),
            None => topic_level(machine_name).map(|level| Self::new(&format!("peaqos/{level}"))),
        }
    }

    pub(crate) fn command(&self, name: CommandName) -> String {
        format!("{}/command/{}", self.prefix, name.as_str())
    }

    /// Which command a topic names, if it is one of ours.
    pub(crate) fn command_name(&self, topic: &str) -> Option<CommandName> {
        let name = topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix("/command/")?;
        match name {
            "reregister" => Some(CommandName::Reregister),
            "rotate_key" => Some(CommandName::RotateKey),
            _ => None,
        }
    }

    /// Whether the agent may publish a reply to `topic`: a concrete topic
    /// (no wildcards) strictly below `<prefix>/reply/`.
    pub(crate) fn is_reply_topic(&self, topic: &str) -> bool {
        topic.len() <= MAX_REPLY_TOPIC_LEN
            && topic
                .strip_prefix(self.reply_prefix.as_str())
                .is_some_and(|rest| !rest.is_empty() && !rest.contains(['+', '#', '\0']))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_names_become_safe_levels() {
        assert_eq!(topic_level("robot-7").as_deref(), Some("robot-7"));
        assert_eq!(topic_level("Robot Arm #7").as_deref(), Some("Robot_Arm_7"));
        assert_eq!(topic_level("a/b+c#d").as_deref(), Some("a_b_c_d"));
        assert_eq!(topic_level("  Küche 2 ").as_deref(), Some("K_che_2"));
        assert_eq!(topic_level("$SYS").as_deref(), Some("SYS"));
        assert_eq!(topic_level("v1.2_x").as_deref(), Some("v1.2_x"));
        for empty in ["", "   ", "/+#", "ÄÖÜ", "..", "_"] {
            assert_eq!(topic_level(empty), None, "{empty:?}");
        }
        let long = "x".repeat(500);
        assert_eq!(topic_level(&long).unwrap().len(), MAX_LEVEL_LEN);
    }

    #[test]
    fn levels_never_contain_separators_or_wildcards() {
        let samples = ["a/b", "+", "#", "x\0y", "a\nb", "🤖 bot", "a//b", "$a/+/#"];
        for s in samples {
            if let Some(level) = topic_level(s) {
                assert!(
                    !level.contains(['/', '+', '#', '\0', '$', ' ']),
                    "{s:?} -> {level:?}"
                );
                assert!(!level.is_empty());
            }
        }
    }

    #[test]
    fn prefixes_are_checked() {
        assert!(check_prefix("peaqos/robot-7").is_ok());
        assert!(check_prefix("site/a/b").is_ok());
        for bad in ["", "/a", "a/", "a//b", "a/+", "a/#", "$SYS/x", "a\0b"] {
            assert!(check_prefix(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn reply_topics_must_be_below_the_reply_prefix() {
        let t = Topics::new("peaqos/r7");
        assert!(t.is_reply_topic("peaqos/r7/reply/abc"));
        assert!(t.is_reply_topic("peaqos/r7/reply/a/b"));
        for bad in [
            "peaqos/r7/reply/",
            "peaqos/r7/reply",
            "peaqos/r7/status",
            "peaqos/r7/replyx/a",
            "peaqos/r8/reply/a",
            "peaqos/r7/reply/+",
            "peaqos/r7/reply/#",
            "other/topic",
            "",
        ] {
            assert!(!t.is_reply_topic(bad), "{bad:?} accepted");
        }
        let long = format!("peaqos/r7/reply/{}", "a".repeat(MAX_REPLY_TOPIC_LEN));
        assert!(!t.is_reply_topic(&long));
    }

    #[test]
    fn a_machine_s_prefix_is_its_own_or_the_gateway_s_or_its_name_s() {
        let gateway = Topics::new("site/gw");
        let t = |prefix, name| Topics::for_machine(prefix, name, "gw", &gateway).map(|t| t.prefix);
        assert_eq!(t(Some("a/b"), "dock-7").as_deref(), Some("a/b"));
        assert_eq!(t(None, "gw").as_deref(), Some("site/gw"));
        assert_eq!(t(None, "dock 7").as_deref(), Some("peaqos/dock_7"));
        assert_eq!(t(None, "###"), None);
    }

    #[test]
    fn default_prefix_comes_from_the_machine_name() {
        let config = MqttConfig::default();
        let t = Topics::for_config(&config, "Robot Arm #7").unwrap();
        assert_eq!(t.status, "peaqos/Robot_Arm_7/status");
        assert_eq!(t.availability, "peaqos/Robot_Arm_7/availability");
        assert_eq!(t.status_get, "peaqos/Robot_Arm_7/status/get");
        assert_eq!(
            t.command(CommandName::Reregister),
            "peaqos/Robot_Arm_7/command/reregister"
        );
        assert_eq!(
            t.command_name("peaqos/Robot_Arm_7/command/reregister"),
            Some(CommandName::Reregister)
        );
        assert_eq!(t.command_name("peaqos/Robot_Arm_7/command/result"), None);
        assert!(Topics::for_config(&config, "###").is_none());
        let config = MqttConfig {
            topic_prefix: Some("site/bots/r1".into()),
            ..MqttConfig::default()
        };
        assert_eq!(
            Topics::for_config(&config, "###").unwrap().status,
            "site/bots/r1/status"
        );
    }
}
