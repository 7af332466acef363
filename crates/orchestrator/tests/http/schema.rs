//! schemathesis (PyPI), a fuzzer we did not write, against the served
//! OpenAPI document: every response must be documented (status, headers,
//! content type, body schema), no input may produce a 5xx, schema-valid
//! input must not be refused as invalid and schema-invalid input must be
//! refused, and with auth on nothing under `/api/` but the documented
//! exceptions answers without a key. The number of examples is bounded so
//! that the suite's time is; a failure prints schemathesis's report with a
//! `curl` line that reproduces it.

use std::process::Stdio;
use std::time::Duration;

use crate::support::TestServer;

/// Examples per operation and phase: enough to cover every documented
/// status of every operation in a few seconds.
const MAX_EXAMPLES: &str = "25";

async fn schemathesis(python: &std::path::Path, s: &TestServer, api_key: Option<&str>) {
    let mut command = tokio::process::Command::new(python);
    command
        .args(["-m", "schemathesis.cli", "run"])
        .arg(s.url("/api/v1/openapi.json"))
        .args([
            "--checks",
            "all",
            "--max-examples",
            MAX_EXAMPLES,
            "--no-color",
            // The event stream never ends by design (tested in replicas.rs
            // and audit.rs); a fuzzer would wait on it for ever.
            "--exclude-path",
            "/api/v1/events",
        ])
        // Its example database and reports go to the test's directory.
        .current_dir(s.dir.path())
        .env("HOME", s.dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(key) = api_key {
        command.args(["-H", &format!("x-api-key: {key}")]);
    }
    let out = tokio::time::timeout(Duration::from_secs(300), command.output())
        .await
        .expect("schemathesis finishes within 5 minutes")
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("passed"), "{report}");
}

#[tokio::test]
async fn schemathesis_finds_the_document_and_the_server_in_agreement() {
    let test = "schemathesis_finds_the_document_and_the_server_in_agreement";
    let Some(python) = peaqos_testkit::python_with(test, &["schemathesis"]) else {
        return;
    };
    // Auth on: the key is checked everywhere it is documented, and only
    // there.
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "schema-test-key-0123456789\n").unwrap();
    let s = TestServer::start(|c| {
        c.require_api_auth = true;
        c.api_keys_file = Some(keys.clone());
    })
    .await;
    schemathesis(&python, &s, Some("schema-test-key-0123456789")).await;
    // Auth off: the document asks for no key.
    let s = TestServer::start(|_| {}).await;
    schemathesis(&python, &s, None).await;
}
