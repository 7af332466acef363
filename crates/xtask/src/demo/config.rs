//! The demo's files: its identity, the controller registry naming the
//! fresh key, and the agent's configuration.

use std::path::Path;

use crate::harness::agent_config::AgentConfig;
use crate::harness::workdir::toml_string;

/// The demo identity: a plain `did:peaq:<decimal>`, so that its controller
/// must come from the registry file (an address-form identity controls
/// itself and would need none).
pub(crate) const IDENTITY: &str = "did:peaq:4242";
/// The machine's display name; its MQTT topics are below [`TOPIC_PREFIX`].
pub(crate) const MACHINE_NAME: &str = "demo-robot";
pub(crate) const TOPIC_PREFIX: &str = "peaqos/demo-robot";

/// The controller registry: the demo identity, controlled by `address`.
pub(crate) fn registry_toml(address: &str) -> String {
    format!(
        "# Written by `cargo xtask demo`: which addresses control which identity\n\
         # (the orchestrator's PEAQOS_MCR_REGISTRY_FILE; re-read when it changes).\n\
         [identities]\n\
         {} = [{}]\n",
        toml_string(IDENTITY),
        toml_string(address)
    )
}

/// Where the agent finds its key, orchestrator, broker and state.
#[derive(Debug)]
pub(crate) struct AgentSettings<'a> {
    pub(crate) key_file: &'a Path,
    pub(crate) state_dir: &'a Path,
    pub(crate) orchestrator_url: &'a str,
    pub(crate) broker_url: &'a str,
}

/// The agent's configuration: the example's keys, with intervals short
/// enough that a person watching sees every step.
pub(crate) fn agent_toml(s: &AgentSettings<'_>) -> String {
    AgentConfig {
        written_by: "cargo xtask demo",
        identity: IDENTITY,
        key_file: s.key_file,
        orchestrator_url: s.orchestrator_url,
        timeouts: Some(("2s", "5s")),
        display_name: MACHINE_NAME,
        owner_id: "demo",
        runtime_profile: "demo",
        state_dir: s.state_dir,
        renewal: "check_interval = \"30s\"\nbackoff_initial = \"200ms\"\nbackoff_max = \"5s\"\nslow_retry = \"5s\"",
        mqtt: Some((s.broker_url, TOPIC_PREFIX)),
        fast_reconnect: true,
        log_level: None,
    }
    .render()
}
