//! The real `peaqos-agent` binary with MQTT on: `peaqos-agent status` asks
//! it over the broker, and when the process is killed with SIGKILL (no
//! chance to say goodbye) the broker publishes its last will, `offline`.
//!
//! No orchestrator runs here: the agent keeps retrying registration, and
//! MQTT must work regardless.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{Tools, broker, wait_retained};
use peaqos_testkit::Mosquitto;

const AGENT: &str = env!("CARGO_BIN_EXE_peaqos-agent");
/// A well-known test key (never used for anything real).
const KEY: &str = "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318";

fn write_config(dir: &Path, broker: &Mosquitto) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let key = dir.join("controller.key");
    std::fs::write(&key, KEY).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let state = dir.join("state");
    std::fs::create_dir(&state).unwrap();
    let orchestrator = format!("http://127.0.0.1:{}", peaqos_testkit::free_port());
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[identity]
ref = "did:peaq:4242"
key_file = "{key}"

[orchestrator]
url = "{orchestrator}"

[machine]
display_name = "robot-7"
owner_id = "fleet-operations"
machine_type = "amr"
runtime_profile = "ros2-humble"

[state]
dir = "{state}"

[mqtt]
enabled = true
url = "{url}"
reconnect_min = "100ms"
reconnect_max = "1s"
"#,
            key = key.display(),
            state = state.display(),
            url = broker.url(),
        ),
    )
    .unwrap();
    config
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn status_cli(config: &Path, json: bool) -> std::process::Output {
    let mut cmd = Command::new(AGENT);
    cmd.args(["status", "--config"]).arg(config);
    if json {
        cmd.arg("--json");
    }
    cmd.stdin(Stdio::null()).output().unwrap()
}

#[test]
fn status_cli_asks_the_running_agent_and_a_killed_agent_is_reported_offline() {
    let Some((broker, tools)) = broker("agent_binary_will", "") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &broker);
    let mut agent = Running(
        Command::new(AGENT)
            .args(["run", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let tools: &Tools = &tools;
    wait_retained(&broker, tools, "peaqos/robot-7/availability", |p| {
        p == "online"
    });
    let status = wait_retained(&broker, tools, "peaqos/robot-7/status", |p| !p.is_empty());
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["identity"], "did:peaq:4242");

    // The operator's command, through the broker.
    let out = status_cli(&config, true);
    assert!(
        out.status.success(),
        "peaqos-agent status --json failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["identity"], "did:peaq:4242");
    assert_eq!(answer["bootId"], status["bootId"]);
    let out = status_cli(&config, false);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("did:peaq:4242"));

    // SIGKILL: no `offline` from the agent, so the broker's copy of the
    // last will must say it.
    agent.0.kill().unwrap();
    agent.0.wait().unwrap();
    wait_retained(&broker, tools, "peaqos/robot-7/availability", |p| {
        p == "offline"
    });

    let started = Instant::now();
    let out = status_cli(&config, true);
    assert!(
        !out.status.success(),
        "status succeeded with the agent dead"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("offline"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(8));
}
