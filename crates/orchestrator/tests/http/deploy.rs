//! deploy/compose.yaml, read as compose reads it (YAML with its merge key,
//! parsed by Python's yaml): PostgreSQL and two orchestrator replicas, every
//! setting a name the orchestrator reads (or its `NAME_FILE`), secrets as
//! files, and the replicas' settings accepted by the orchestrator's own
//! checks. `compose up` itself is not run here (no container runtime in
//! CI: docs/orchestrator.md says what was verified where).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

use peaqos_orchestrator::config::ENV_VARS;
use peaqos_orchestrator::{Config, controllers::registry};
use peaqos_testkit::{Service, available_or_skip};
use serde_json::Value;

const TEST: &str = "deploy_compose";

fn deploy() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy"))
}

/// The compose file as JSON, merge keys resolved; `None` (one skip line)
/// without Python's yaml.
fn compose() -> Option<Value> {
    let has_yaml = Command::new("python3")
        .args(["-c", "import yaml"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    available_or_skip(
        Service::Python,
        TEST,
        has_yaml.then_some(()),
        "no python3 with yaml (.ci/install-tools installs python3-yaml)",
    )?;
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(deploy().join("compose.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "deploy/compose.yaml is not valid YAML: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

#[test]
fn compose_runs_two_replicas_on_postgres_with_known_settings_and_file_secrets() {
    let Some(compose) = compose() else {
        return;
    };
    let services = compose["services"].as_object().unwrap();
    let (postgres, replicas): (Vec<_>, Vec<_>) = services
        .iter()
        .partition(|(_, s)| s["image"].as_str().unwrap().starts_with("postgres:"));
    assert_eq!(postgres.len(), 1, "one PostgreSQL: {services:?}");
    assert_eq!(replicas.len(), 2, "two orchestrator replicas");
    let postgres = postgres[0].1;
    assert_eq!(
        postgres["environment"]["POSTGRES_PASSWORD_FILE"],
        "/run/secrets/postgres-password"
    );

    let declared = compose["secrets"].as_object().unwrap();
    let mut ports = Vec::new();
    let mut names = Vec::new();
    for (name, replica) in &replicas {
        assert!(
            replica["image"]
                .as_str()
                .unwrap()
                .contains("localhost/peaqos-orchestrator:"),
            "{name}: {}",
            replica["image"]
        );
        assert_eq!(replica["read_only"], true, "{name}: read-only root");
        assert_eq!(
            replica["depends_on"]["postgres"]["condition"],
            "service_healthy"
        );
        for secret in replica["secrets"].as_array().unwrap() {
            let secret = secret.as_str().unwrap();
            assert!(declared.contains_key(secret), "{name}: secret {secret}");
            assert!(declared[secret]["file"].is_string(), "{secret} is a file");
        }
        let env: BTreeMap<String, String> = replica["environment"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
            .collect();
        for key in env.keys() {
            let setting = key.strip_suffix("_FILE").unwrap_or(key);
            assert!(
                ENV_VARS.contains(&setting) || ENV_VARS.contains(&key.as_str()),
                "{name}: {key} is no setting of the orchestrator"
            );
        }
        // Secrets never in the environment.
        assert!(
            !env.contains_key("DATABASE_URL"),
            "{name}: DATABASE_URL_FILE"
        );
        check_settings(&env);
        names.push(env["PEAQOS_ORCHESTRATOR_NAME"].clone());
        ports.push(replica["ports"][0].as_str().unwrap().to_owned());
    }
    assert_eq!(names[0], names[1], "challenges are redeemed at any replica");
    assert_ne!(ports[0], ports[1]);

    let registry_file = deploy().join(compose["configs"]["registry"]["file"].as_str().unwrap());
    let text = std::fs::read_to_string(&registry_file).unwrap();
    registry::parse(&registry_file, &text).unwrap();
}

/// The replica's settings, with each secret file holding a value of the
/// shape the runbook says, pass the orchestrator's own checks.
fn check_settings(env: &BTreeMap<String, String>) {
    let dir = tempfile::tempdir().unwrap();
    let examples = [
        (
            "/run/secrets/database-url",
            "postgres://peaqos:example@postgres:5432/peaqos\n",
        ),
        ("/run/secrets/api-keys", "example-key-0123456789abcdef\n"),
    ];
    let mut env = env.clone();
    for value in env.values_mut() {
        // `${NAME:-default}`: compose's default.
        if let Some(inner) = value.strip_prefix("${").and_then(|v| v.strip_suffix('}')) {
            *value = inner.split_once(":-").unwrap().1.to_owned();
        }
        if let Some((_, text)) = examples.iter().find(|(path, _)| path == value) {
            let local = dir.path().join(value.rsplit('/').next().unwrap());
            std::fs::write(&local, text).unwrap();
            *value = local.display().to_string();
        }
    }
    let config = Config::from_sources(None, |k| env.get(k).cloned())
        .unwrap_or_else(|e| panic!("compose's settings are refused: {e}"));
    assert!(config.database_url.starts_with("postgres://"));
    assert!(config.require_api_auth);
}
