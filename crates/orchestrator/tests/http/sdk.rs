//! The published peaqOS Python SDK (`peaq_os_sdk`), unchanged, against this
//! server: it validates every response itself, so a passing run means its
//! wire expectations hold.

use serde_json::Value;

use crate::pg::PgSchema;
use crate::support::{TestServer, keys, registry_toml, run_python_peer};

async fn run_sdk_flow(
    s: &TestServer,
    python: &std::path::Path,
    key: &crate::support::Key,
    api_key: &str,
) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/http/sdk_flow.py");
    let mut command = tokio::process::Command::new(python);
    command
        .args([
            script,
            &s.base,
            &key.private_key,
            api_key,
            "peaqos:machine:21",
        ])
        .env("HOME", s.dir.path());
    let out = run_python_peer(command, "the SDK flow").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "SDK flow failed:\n{stderr}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"))
}

#[tokio::test]
async fn python_sdk_full_machine_lifecycle() {
    let test = "python_sdk_full_machine_lifecycle";
    let Some(python) = peaqos_testkit::python_with(test, &["peaq_os_sdk", "eth_account"]) else {
        return;
    };
    sdk_lifecycle(&python, None).await;
    // The same on PostgreSQL, when one is reachable.
    if let Some(schema) = PgSchema::create(test).await {
        sdk_lifecycle(&python, Some(&schema.url)).await;
    }
}

async fn sdk_lifecycle(python: &std::path::Path, database_url: Option<&str>) {
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let api_keys = dir.path().join("keys");
    std::fs::write(&api_keys, "sdk-platform sdk-test-key-0123456789\n").unwrap();
    let s = TestServer::start_with_registry(&registry_toml(&[("did:peaq:21", &[&k[3]])]), |c| {
        c.require_api_auth = true;
        c.api_keys_file = Some(api_keys.clone());
        c.proof_max_age = Some(std::time::Duration::from_hours(24));
        if let Some(url) = database_url {
            url.clone_into(&mut c.database_url);
        }
    })
    .await;
    let out = run_sdk_flow(&s, python, &k[3], "sdk-test-key-0123456789").await;

    assert_eq!(out["health"], true);
    assert_eq!(
        out["readiness"],
        serde_json::json!(["ready", [["store", "pass"], ["controller_source", "pass"]]])
    );
    assert_eq!(out["challenge_identity"], "did:peaq:21");
    assert_eq!(out["controllers"], serde_json::json!([k[3].address]));
    let id = out["created"][0].as_str().unwrap();
    assert!(id.starts_with("mach_"));
    assert_eq!(out["created"][1], "draft");
    assert_eq!(out["created"][2], "did:peaq:21");
    assert_eq!(out["proof_signer"], k[3].address.as_str());
    assert_eq!(out["activated"], "active");
    assert_eq!(out["got"], serde_json::json!([id, "active", true]));
    assert_eq!(out["renewed_challenge_changed"], true);
    assert_eq!(out["listed"], serde_json::json!([id]));
    assert_eq!(out["archived"], "archived");
    assert_eq!(
        out["errors"]["duplicate"],
        serde_json::json!(["MACHINE_IDENTITY_EXISTS", 409])
    );
    assert_eq!(
        out["errors"]["immutable"],
        serde_json::json!(["MACHINE_IDENTITY_IMMUTABLE", 409])
    );
    assert_eq!(
        out["errors"]["missing"],
        serde_json::json!(["NOT_FOUND", 404])
    );
    // Every change, once, by the key's name; the refused ones not at all.
    let kinds = ["created", "activated", "proof_renewed", "archived"];
    let expected: Vec<Value> = kinds
        .iter()
        .map(|k| serde_json::json!([format!("machine.{k}"), "sdk-platform", "machine", id]))
        .collect();
    assert_eq!(out["audit"], serde_json::json!(expected));
    assert_eq!(out["audit_next"], Value::Null);
    let payloads = &out["audit_payloads"];
    assert_eq!(payloads[0]["signer"], k[3].address.as_str());
    assert_eq!(payloads[1]["new_status"], "active");
    assert_eq!(payloads[3]["old_status"], "active");
    assert_eq!(out["audit_ids"], serde_json::json!(["1", "2"]));
    assert_eq!(out["audit_first_next"], "2");
}
