//! schemathesis (PyPI), a fuzzer we did not write, against the served
//! OpenAPI document: every response must be documented (status, headers,
//! content type, body schema), no input may produce a 5xx, schema-valid
//! input must not be refused as invalid and schema-invalid input must be
//! refused, and with auth on nothing under `/api/` but the documented
//! exceptions answers without a key. The number of examples is bounded so
//! that the suite's time is; a failure prints schemathesis's report with a
//! `curl` line that reproduces it. The event stream is fuzzed too: each
//! request reads it for at most a second, and every event read is checked
//! against the document.

use std::process::Stdio;
use std::time::Duration;

use crate::support::TestServer;

/// Examples per operation and phase: enough to cover every documented
/// status of every operation in a few seconds.
const MAX_EXAMPLES: &str = "25";

/// What the document cannot say, told to schemathesis per operation.
const CONFIG: &str = r#"
# The event stream never ends by itself: schemathesis reads each for at
# most this long (or 20 events) and checks every event it got against the
# document's StreamEvent.
[[operations]]
include-path = "/api/v1/events"
request-timeout = 1.0
# An event id the document allows may be past the head of the log, which
# only the server knows: 400 VALIDATION_ERROR is the documented answer to
# such a cursor (limit and machine id are bounded by the document itself).
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "429", "5xx"]

[[operations]]
include-path = "/api/v1/audit-events"
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "429", "5xx"]
"#;

async fn schemathesis(python: &std::path::Path, s: &TestServer, api_key: Option<&str>) {
    std::fs::write(s.dir.path().join("schemathesis.toml"), CONFIG).unwrap();
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
        ])
        // Its example database and reports go to the test's directory,
        // where it also finds its configuration.
        .current_dir(s.dir.path())
        .env("HOME", s.dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(key) = api_key {
        command.args(["-H", &format!("x-api-key: {key}")]);
    }
    let out = tokio::time::timeout(Duration::from_mins(5), command.output())
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

/// Reads the stream from the start of a log with events in it and has
/// schemathesis check each event against the document (the fuzzer alone
/// mostly meets an empty log). Before the stream's events were described
/// (`StreamEvent`), every event violated the document's `type: string`.
const CHECK_EVENTS_PY: &str = r#"
import sys, schemathesis
schema = schemathesis.openapi.from_url(sys.argv[1] + "/api/v1/openapi.json")
case = schema["/api/v1/events"]["GET"].Case(query={"cursor": "0"})
response = case.call(timeout=1)
events = response.content.count(b"\ndata: ")
assert response.status_code == 200 and events >= 3, (response.status_code, response.content)
case.validate_response(response)
print(f"{events} events valid")
"#;

#[tokio::test]
async fn schemathesis_finds_each_event_of_the_stream_as_documented() {
    let test = "schemathesis_finds_each_event_of_the_stream_as_documented";
    let Some(python) = peaqos_testkit::python_with(test, &["schemathesis"]) else {
        return;
    };
    let s = TestServer::start(|_| {}).await;
    let m = s.create("did:peaq:1", &crate::support::key(0)).await;
    let path = format!("/api/v1/machines/{}", m.id);
    for n in 0..2 {
        let r = s
            .patch(&path, &serde_json::json!({"displayName": format!("r {n}")}))
            .await;
        assert_eq!(r.status(), 200);
    }
    let out = tokio::time::timeout(
        Duration::from_mins(2),
        tokio::process::Command::new(&python)
            .args(["-c", CHECK_EVENTS_PY, &s.base])
            .current_dir(s.dir.path())
            .env("HOME", s.dir.path())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the check finishes")
    .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
