//! The agent configuration `demo`, `footprint` and `arm` write: the keys
//! every run needs (identity, key, orchestrator, machine, state), and the
//! sections that differ between them as they are.

use std::fmt::Write as _;
use std::path::Path;

use super::workdir::toml_string;

/// One run's agent configuration.
#[derive(Debug)]
pub(crate) struct AgentConfig<'a> {
    /// The command that writes it, named in the file's first line.
    pub(crate) written_by: &'a str,
    pub(crate) identity: &'a str,
    pub(crate) key_file: &'a Path,
    pub(crate) orchestrator_url: &'a str,
    /// `(connect, request)` timeouts, where the defaults do not suit.
    pub(crate) timeouts: Option<(&'a str, &'a str)>,
    pub(crate) display_name: &'a str,
    pub(crate) owner_id: &'a str,
    pub(crate) runtime_profile: &'a str,
    pub(crate) state_dir: &'a Path,
    /// `[renewal]` keys, one `key = value` per line, if any.
    pub(crate) renewal: &'a str,
    /// The broker's URL and the topic prefix, when MQTT is on.
    pub(crate) mqtt: Option<(&'a str, &'a str)>,
    /// Reconnection within seconds (runs watched by a person or a test),
    /// rather than the defaults of a deployment.
    pub(crate) fast_reconnect: bool,
    /// The `[log]` level, if not the default.
    pub(crate) log_level: Option<&'a str>,
}

impl AgentConfig<'_> {
    /// The TOML text.
    pub(crate) fn render(&self) -> String {
        let path = |p: &Path| toml_string(&p.to_string_lossy());
        let mut text = format!(
            "# Written by `{}`. Every key: config/agent.example.toml.\n\n\
             [identity]\nref = {}\nkey_file = {}\n\n\
             [orchestrator]\nurl = {}\n",
            self.written_by,
            toml_string(self.identity),
            path(self.key_file),
            toml_string(self.orchestrator_url),
        );
        if let Some((connect, request)) = self.timeouts {
            let _ = writeln!(
                text,
                "connect_timeout = {}\nrequest_timeout = {}",
                toml_string(connect),
                toml_string(request)
            );
        }
        let _ = write!(
            text,
            "\n[machine]\ndisplay_name = {}\nowner_id = {}\nmachine_type = \"amr\"\n\
             runtime_profile = {}\n\n[state]\ndir = {}\n",
            toml_string(self.display_name),
            toml_string(self.owner_id),
            toml_string(self.runtime_profile),
            path(self.state_dir),
        );
        if !self.renewal.is_empty() {
            let _ = write!(text, "\n[renewal]\n{}\n", self.renewal.trim_end());
        }
        if let Some((url, prefix)) = self.mqtt {
            let _ = write!(
                text,
                "\n[mqtt]\nenabled = true\nurl = {}\ntopic_prefix = {}\n",
                toml_string(url),
                toml_string(prefix)
            );
            if self.fast_reconnect {
                text.push_str("reconnect_min = \"200ms\"\nreconnect_max = \"5s\"\n");
            }
        }
        if let Some(level) = self.log_level {
            let _ = write!(text, "\n[log]\nlevel = {}\n", toml_string(level));
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_configuration_is_one_the_agent_reads() {
        let text = AgentConfig {
            written_by: "cargo xtask demo",
            identity: "did:peaq:4242",
            key_file: Path::new("/w/key \"1\""),
            orchestrator_url: "http://127.0.0.1:1",
            timeouts: Some(("2s", "5s")),
            display_name: "demo-robot",
            owner_id: "demo",
            runtime_profile: "demo",
            state_dir: Path::new("/w/state"),
            renewal: "check_interval = \"30s\"\nbackoff_initial = \"200ms\"\n",
            mqtt: Some(("mqtt://127.0.0.1:2", "peaqos/demo-robot")),
            fast_reconnect: true,
            log_level: Some("info"),
        }
        .render();
        let value: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(value["identity"]["key_file"].as_str(), Some("/w/key \"1\""));
        assert_eq!(
            value["orchestrator"]["request_timeout"].as_str(),
            Some("5s")
        );
        assert_eq!(value["renewal"]["check_interval"].as_str(), Some("30s"));
        assert_eq!(value["mqtt"]["reconnect_max"].as_str(), Some("5s"));
        assert_eq!(value["log"]["level"].as_str(), Some("info"));
        assert!(
            text.starts_with("# Written by `cargo xtask demo`."),
            "{text}"
        );
    }
}
