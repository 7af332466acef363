//! The published peaqOS CLI (`peaq-os-cli`, command `peaqos`), unchanged,
//! against the real `peaqos-orchestrator` binary: `scale machine onboard`,
//! `status` and `list` with `--json`, the way an operator runs them (the
//! platform key in `PEAQOS_ORCH_API_KEY`, the controller key in a file, and
//! some `PEAQOS_PRIVATE_KEY`, which the CLI wants even for these calls).

use std::path::Path;
use std::process::Stdio;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::{TIMEOUT, key, registry_toml, run_python_peer};

const BIN: &str = env!("CARGO_BIN_EXE_peaqos-orchestrator");
const PLATFORM_KEY: &str = "cli-test-key-0123456789abcdef";

/// The CLI's exit code, stdout and stderr.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        assert_eq!(self.code, 0, "peaqos failed:\n{}", self.stderr);
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}\n{}", self.stdout, self.stderr))
    }
}

async fn peaqos(python: &Path, home: &Path, base: &str, args: &[&str]) -> Run {
    let mut command = tokio::process::Command::new(python);
    command
        // The console script `peaqos` is this function; calling it through
        // the interpreter works wherever the package is installed.
        .args([
            "-c",
            "from peaq_os_cli.main import cli; cli(prog_name='peaqos')",
        ])
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        // The CLI reads a .env from its working directory.
        .current_dir(home)
        .env("PEAQOS_ORCHESTRATION_URL", base)
        .env("PEAQOS_ORCH_API_KEY", PLATFORM_KEY)
        // Not the controller: any key satisfies the CLI's start-up.
        .env("PEAQOS_PRIVATE_KEY", &key(3).private_key)
        // Never contacted by these commands.
        .env("PEAQOS_RPC_URL", "http://127.0.0.1:9");
    let out = run_python_peer(command, "peaqos").await;
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test]
#[allow(
    clippy::too_many_lines,
    reason = "one operator session, command by command"
)]
async fn peaqos_cli_onboards_shows_and_lists_a_machine() {
    let test = "peaqos_cli_onboards_shows_and_lists_a_machine";
    let Some(python) = peaqos_testkit::python_with(test, &["peaq_os_cli"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let controller = key(0);
    let registry = dir.path().join("registry.toml");
    std::fs::write(&registry, registry_toml(&[("did:peaq:31", &[&controller])])).unwrap();
    let keys = dir.path().join("api-keys");
    std::fs::write(&keys, format!("cli-ops {PLATFORM_KEY}\n")).unwrap();
    let key_file = dir.path().join("controller.key");
    std::fs::write(&key_file, format!("{}\n", controller.private_key)).unwrap();
    let mut server = tokio::process::Command::new(BIN)
        .env_clear()
        .env("PEAQOS_LISTEN_ADDR", "127.0.0.1:0")
        .env(
            "DATABASE_URL",
            format!("sqlite://{}/orchestrator.db", dir.path().display()),
        )
        .env("PEAQOS_MCR_REGISTRY_FILE", &registry)
        .env("PEAQOS_REQUIRE_API_AUTH", "true")
        .env("PEAQOS_API_KEYS_FILE", &keys)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let base = tokio::time::timeout(TIMEOUT, async {
        loop {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("the server listens");
            if let Some(url) = line.strip_prefix("listening on ") {
                return url.to_owned();
            }
        }
    })
    .await
    .expect("the server says where it listens");
    let home = dir.path();

    let onboarded = peaqos(
        &python,
        home,
        &base,
        &[
            "scale",
            "machine",
            "onboard",
            "--identity-ref",
            "did:peaq:31",
            "--display-name",
            "CLI robot",
            "--owner-id",
            "ops",
            "--machine-type",
            "amr",
            "--runtime-profile",
            "ros2",
            "--capabilities",
            "lidar,camera",
            "--labels",
            "site=berlin",
            "--identity-key-file",
            key_file.to_str().unwrap(),
            "--json",
        ],
    )
    .await
    .json();
    let id = onboarded["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("mach_"), "{onboarded}");
    assert_eq!(onboarded["status"], "active");
    assert_eq!(onboarded["identity_ref"], "did:peaq:31");
    assert_eq!(
        onboarded["capabilities"],
        serde_json::json!(["lidar", "camera"])
    );
    assert_eq!(
        onboarded["identity_proof"]["signer_address"],
        controller.address.as_str()
    );

    let status = peaqos(
        &python,
        home,
        &base,
        &["scale", "machine", "status", &id, "--json"],
    )
    .await
    .json();
    assert_eq!(status["id"], id.as_str());
    assert_eq!(status["status"], "active");
    assert_eq!(status["display_name"], "CLI robot");

    let listed = peaqos(
        &python,
        home,
        &base,
        &["scale", "machine", "list", "--json"],
    )
    .await
    .json();
    let ids: Vec<&str> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id.as_str()]);
    assert_eq!(listed["next_cursor"], Value::Null);

    // An unknown machine: the CLI's API-error exit, with our message.
    let missing = peaqos(
        &python,
        home,
        &base,
        &[
            "scale",
            "machine",
            "status",
            "mach_aaaaaaaaaaaaaaaaaaaaaaaaaa",
            "--json",
        ],
    )
    .await;
    assert_eq!(missing.code, 2, "{}", missing.stderr);
    assert!(
        missing.stderr.contains("machine not found"),
        "{}",
        missing.stderr
    );

    // The trail names the CLI's key: registration and activation.
    peaqos_orchestrator::install_crypto_provider();
    let trail: Value = reqwest::Client::new()
        .get(format!("{base}/api/v1/audit-events?machineId={id}"))
        .header("x-api-key", PLATFORM_KEY)
        .timeout(TIMEOUT)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let seen: Vec<(&str, &str)> = trail["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["type"].as_str().unwrap(), e["actor"].as_str().unwrap()))
        .collect();
    assert_eq!(
        seen,
        [
            ("machine.created", "cli-ops"),
            ("machine.activated", "cli-ops")
        ]
    );
    let _ = server.kill().await;
}
