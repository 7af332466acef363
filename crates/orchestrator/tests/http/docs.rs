//! The OpenAPI document and the Prometheus metrics, checked against what
//! the server really does.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{TestServer, key};

fn keys_of(v: &Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

fn schema_props(doc: &Value, name: &str) -> BTreeSet<String> {
    keys_of(&doc["components"]["schemas"][name]["properties"])
}

fn schema_required(doc: &Value, name: &str) -> BTreeSet<String> {
    doc["components"]["schemas"][name]["required"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

#[tokio::test]
#[allow(
    clippy::too_many_lines,
    reason = "every documented route and schema, one by one"
)]
async fn openapi_document_matches_the_served_api() {
    let s = TestServer::start(|c| c.proof_max_age = Some(Duration::from_hours(1))).await;
    let r = s.get("/api/v1/openapi.json").await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let doc: Value = r.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));

    let served = [
        ("/health", "get"),
        ("/ready", "get"),
        ("/api/v1/health", "get"),
        ("/api/v1/readiness", "get"),
        ("/api/v1/machine-identity/challenges", "post"),
        ("/api/v1/machines", "get"),
        ("/api/v1/machines", "post"),
        ("/api/v1/machines/{machineId}", "get"),
        ("/api/v1/machines/{machineId}", "patch"),
        ("/api/v1/machines/{machineId}", "delete"),
        ("/api/v1/audit-events", "get"),
        ("/api/v1/events", "get"),
    ];
    for (path, method) in served {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} documented"
        );
    }
    // Auth is off on this server: the document asks for no key (with auth
    // on it does: abuse::api_keys_guard_the_api_but_not_health).
    assert!(
        doc["components"]["securitySchemes"].is_null(),
        "{}",
        doc["components"]["securitySchemes"]
    );
    assert!(!doc.to_string().contains(r#""security""#));
    // Real responses have exactly the documented fields.
    let health: Value = s.get("/api/v1/health").await.json().await.unwrap();
    assert_eq!(health, json!({"ok": true}));
    let readiness: Value = s.get("/api/v1/readiness").await.json().await.unwrap();
    assert_eq!(keys_of(&readiness), schema_props(&doc, "Readiness"));
    assert_eq!(readiness["status"], "ready");
    for check in readiness["checks"].as_array().unwrap() {
        assert_eq!(keys_of(check), schema_props(&doc, "ReadinessCheck"));
        assert_eq!(check["status"], "pass");
    }
    let k = key(0);
    let challenge: Value = s
        .post(
            "/api/v1/machine-identity/challenges",
            &json!({"identityRef": "did:peaq:1"}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(keys_of(&challenge["item"]), schema_props(&doc, "Challenge"));
    let m = s.create_active("did:peaq:1", &k).await;
    let machine: Value = s
        .get(&format!("/api/v1/machines/{}", m.id))
        .await
        .json()
        .await
        .unwrap();
    let item = &machine["item"];
    assert_eq!(keys_of(item), schema_props(&doc, "Machine"));
    assert!(schema_required(&doc, "Machine").is_subset(&keys_of(item)));
    assert_eq!(
        keys_of(&item["identityProof"]),
        schema_props(&doc, "MachineIdentityProof")
    );
    let trail: Value = s
        .get("/api/v1/audit-events?limit=1")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(keys_of(&trail), schema_props(&doc, "AuditEventList"));
    assert_eq!(
        keys_of(&trail["items"][0]),
        schema_props(&doc, "AuditEvent")
    );
    let error: Value = s
        .get("/api/v1/machines/mach_aaaaaaaaaaaaaaaaaaaaaaaaaa")
        .await
        .json()
        .await
        .unwrap();
    assert!(keys_of(&error["error"]).is_subset(&schema_props(&doc, "ErrorBody")));

    let codes: BTreeSet<&str> = doc["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for code in peaqos_protocol::ErrorCode::KNOWN {
        assert!(codes.contains(code), "{code} documented");
    }
    let statuses: BTreeSet<&str> = doc["components"]["schemas"]["MachineStatus"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["active", "archived", "blocked", "degraded", "draft"].into()
    );
}

/// The request schemas give the bounds the server enforces, so that a
/// client generated from them (or a fuzzer) is not refused for input the
/// document calls valid.
#[tokio::test]
async fn openapi_request_schemas_say_what_the_server_enforces() {
    let s = TestServer::start(|_| {}).await;
    let doc: Value = s.get("/api/v1/openapi.json").await.json().await.unwrap();
    // PATCH offers only the statuses a client may set.
    assert_eq!(
        doc["components"]["schemas"]["SettableStatus"]["enum"],
        json!(["draft", "active", "blocked"])
    );
    let update = &doc["components"]["schemas"]["UpdateMachineRequest"]["properties"];
    assert!(
        update["status"].to_string().contains("SettableStatus"),
        "{}",
        update["status"]
    );
    assert!(
        update["displayName"].to_string().contains("maxLength"),
        "{}",
        update["displayName"]
    );
    assert_eq!(
        update["labels"]["maxProperties"], 100,
        "{}",
        update["labels"]
    );
    assert!(
        update["labels"]["propertyNames"].is_object(),
        "{}",
        update["labels"]
    );

    let create = &doc["components"]["schemas"]["CreateMachineRequest"];
    assert!(
        create["required"]
            .as_array()
            .unwrap()
            .contains(&json!("identityProof")),
        "verification is required on this server: {create}"
    );
}

fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn metrics_count_requests_verifications_and_the_cache() {
    let s = TestServer::start(|_| {}).await;
    let m = s.create("did:peaq:1", &key(0)).await;
    for _ in 0..3 {
        assert_eq!(
            s.get(&format!("/api/v1/machines/{}", m.id)).await.status(),
            200
        );
    }
    let c = s.challenge("did:peaq:1").await;
    let bad = json!({"challengeId": c.challenge_id, "signature": crate::support::sign(&key(1), &c.message)});
    let r = s
        .patch(
            &format!("/api/v1/machines/{}", m.id),
            &json!({"identityProof": bad}),
        )
        .await;
    assert_eq!(r.status(), 403);

    let r = s.get("/metrics").await;
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .contains("openmetrics")
    );
    let text = r.text().await.unwrap();
    let get = r#"peaqos_orchestrator_http_requests_total{method="GET",route="/api/v1/machines/{machineId}",status="200"}"#;
    assert_eq!(sample(&text, get), Some(3.0), "{text}");
    assert_eq!(
        sample(
            &text,
            r#"peaqos_orchestrator_proof_verifications_total{outcome="verified"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"peaqos_orchestrator_proof_verifications_total{outcome="not_controller"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"peaqos_orchestrator_proof_reverifications_total{outcome="valid"}"#
        ),
        Some(3.0)
    );
    assert!(sample(&text, "peaqos_orchestrator_controller_cache_hits_total").unwrap() >= 3.0);
    assert!(sample(&text, "peaqos_orchestrator_controller_cache_misses_total").unwrap() >= 1.0);
    assert_eq!(
        sample(&text, "peaqos_orchestrator_challenges_issued_total"),
        Some(2.0)
    );
    assert!(
        text.contains("peaqos_orchestrator_http_request_duration_seconds_bucket"),
        "{text}"
    );
}
