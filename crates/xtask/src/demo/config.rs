//! The demo's files: its identity, the controller registry naming the
//! fresh key, and the agent's configuration.

use std::path::Path;

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
    let path = |p: &Path| toml_string(&p.to_string_lossy());
    format!(
        r#"# Written by `cargo xtask demo`. Every key: config/agent.example.toml.

[identity]
ref = {identity}
key_file = {key_file}

[orchestrator]
url = {orchestrator}
connect_timeout = "2s"
request_timeout = "5s"

[machine]
display_name = {name}
owner_id = "demo"
machine_type = "amr"
runtime_profile = "demo"

[state]
dir = {state_dir}

[renewal]
check_interval = "30s"
backoff_initial = "200ms"
backoff_max = "5s"
slow_retry = "5s"

[mqtt]
enabled = true
url = {broker}
topic_prefix = {prefix}
reconnect_min = "200ms"
reconnect_max = "5s"
"#,
        identity = toml_string(IDENTITY),
        key_file = path(s.key_file),
        orchestrator = toml_string(s.orchestrator_url),
        name = toml_string(MACHINE_NAME),
        state_dir = path(s.state_dir),
        broker = toml_string(s.broker_url),
        prefix = toml_string(TOPIC_PREFIX),
    )
}
