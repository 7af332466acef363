//! The audit trail over HTTP: every machine change leaves one event, with
//! its actor (the API key's name, or the proof's signer without auth) and
//! what changed; refused changes leave none; `GET /api/v1/audit-events`
//! pages and filters it, behind the API key.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::{Value, json};

use crate::support::{TestServer, expect_error, key, machine_body, sign};

const FLEET_KEY: &str = "fleet-key-0123456789abcdef";
const UNNAMED_KEY: &str = "other-key-0123456789abcdef";

async fn events(s: &TestServer, query: &str) -> Value {
    let r = s.get(&format!("/api/v1/audit-events{query}")).await;
    let status = r.status();
    let body: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

fn kinds(page: &Value) -> Vec<&str> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect()
}

fn client_with_key(k: &str) -> reqwest::Client {
    let mut headers = HeaderMap::new();
    headers.insert("x-api-key", HeaderValue::from_str(k).unwrap());
    reqwest::Client::builder()
        .default_headers(headers)
        .timeout(crate::support::TIMEOUT)
        .build()
        .unwrap()
}

#[tokio::test]
#[allow(
    clippy::too_many_lines,
    reason = "one story: each change and refusal, then the log"
)]
async fn every_machine_change_is_one_event_naming_the_key_that_made_it() {
    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("api-keys");
    std::fs::write(
        &keys_file,
        format!("# fleet A\nfleet-a {FLEET_KEY}\n{UNNAMED_KEY}\n"),
    )
    .unwrap();
    let mut s = TestServer::start(|c| {
        c.require_api_auth = true;
        c.api_keys_file = Some(keys_file.clone());
    })
    .await;
    // Behind the key, like the rest of the API.
    expect_error(s.get("/api/v1/audit-events").await, 401, "AUTH_REQUIRED").await;
    expect_error(s.get("/api/v1/events").await, 401, "AUTH_REQUIRED").await;
    s.client = client_with_key(FLEET_KEY);
    let k = key(0);

    let m = s.create("did:peaq:1", &k).await;
    let path = format!("/api/v1/machines/{}", m.id);
    let created_challenge = m.identity_proof.as_ref().unwrap().challenge_id.clone();
    assert_eq!(
        s.patch(&path, &json!({"status": "active"})).await.status(),
        200
    );
    let renewal = s.proof("did:peaq:1", &k).await;
    let renewal_id = renewal["challengeId"].as_str().unwrap().to_owned();
    let r = s.patch(&path, &json!({"identityProof": renewal})).await;
    assert_eq!(r.status(), 200);
    // Refused: a proof signed by a key that is not a controller. No event
    // (it is counted in the metrics instead), and the challenge survives.
    let c = s.challenge("did:peaq:1").await;
    let bad = json!({"challengeId": c.challenge_id, "signature": sign(&key(1), &c.message)});
    let r = s
        .patch(&path, &json!({"identityProof": bad, "displayName": "x"}))
        .await;
    expect_error(r, 403, "MACHINE_IDENTITY_PROOF_INVALID").await;
    // Refused: a status that cannot be set.
    let r = s.patch(&path, &json!({"status": "degraded"})).await;
    expect_error(r, 400, "VALIDATION_ERROR").await;
    let r = s
        .patch(
            &path,
            &json!({"displayName": "Robot 2", "labels": {"site": "paris"}}),
        )
        .await;
    assert_eq!(r.status(), 200);
    s.client = client_with_key(UNNAMED_KEY);
    assert_eq!(
        s.patch(&path, &json!({"status": "blocked"})).await.status(),
        200
    );
    s.client = client_with_key(FLEET_KEY);
    assert_eq!(s.delete(&path).await.status(), 204);
    assert_eq!(
        s.delete(&path).await.status(),
        204,
        "archived already: no change"
    );
    // Another machine's events are not this one's.
    s.create("did:peaq:2", &key(1)).await;

    let page = events(&s, &format!("?machineId={}", m.id)).await;
    assert_eq!(
        kinds(&page),
        [
            "machine.created",
            "machine.activated",
            "machine.proof_renewed",
            "machine.updated",
            "machine.blocked",
            "machine.archived"
        ],
        "{page:#}"
    );
    assert_eq!(page["next_cursor"], Value::Null);
    let items = page["items"].as_array().unwrap();
    for e in items {
        let fields: Vec<&str> = e.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            fields,
            [
                "actor",
                "created_at",
                "id",
                "payload",
                "resource_id",
                "resource_type",
                "type"
            ],
            "snake_case, exactly the SDK's fields"
        );
        assert_eq!(e["resource_type"], "machine");
        assert_eq!(e["resource_id"], m.id.as_str());
        assert!(e["id"].is_string());
        let at = e["created_at"].as_str().unwrap();
        assert!(at.ends_with('Z') && at.len() == 24, "{at}");
        assert!(!e.to_string().contains("0123456789abcdef"), "no key in {e}");
    }
    let ids: Vec<u64> = items
        .iter()
        .map(|e| e["id"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(ids, [1, 2, 3, 4, 5, 6]);
    let actors: Vec<&str> = items.iter().map(|e| e["actor"].as_str().unwrap()).collect();
    assert_eq!(actors[..4], ["fleet-a"; 4]);
    assert!(
        actors[4].starts_with("key-") && actors[4].len() == 12,
        "{actors:?}"
    );
    assert_eq!(actors[5], "fleet-a");

    let signer = k.address.as_str();
    assert_eq!(items[0]["payload"]["signer"], signer);
    assert_eq!(
        items[0]["payload"]["challenge_id"],
        created_challenge.as_str()
    );
    assert_eq!(items[0]["payload"]["new_status"], "draft");
    assert_eq!(items[0]["payload"]["identity_ref"], "did:peaq:1");
    assert_eq!(
        items[1]["payload"],
        json!({"fields": [], "old_status": "draft", "new_status": "active"})
    );
    assert_eq!(
        items[2]["payload"],
        json!({"fields": [], "signer": signer, "challenge_id": renewal_id})
    );
    assert_eq!(
        items[3]["payload"],
        json!({"fields": ["displayName", "labels"]})
    );
    assert_eq!(
        items[4]["payload"],
        json!({"fields": [], "old_status": "active", "new_status": "blocked"})
    );
    assert_eq!(
        items[5]["payload"],
        json!({"old_status": "blocked", "new_status": "archived"})
    );

    // Paging: a full page has a cursor, which resumes right after it.
    let first = events(&s, "?limit=4").await;
    assert_eq!(first["items"].as_array().unwrap().len(), 4);
    assert_eq!(first["next_cursor"], "4");
    let rest = events(&s, "?limit=4&cursor=4").await;
    assert_eq!(
        kinds(&rest),
        ["machine.blocked", "machine.archived", "machine.created"]
    );
    assert_eq!(rest["next_cursor"], Value::Null);
    let filtered = events(
        &s,
        &format!("?machine_id={}&resource_type=machine&limit=2", m.id),
    )
    .await;
    assert_eq!(kinds(&filtered), ["machine.created", "machine.activated"]);

    for (query, field) in [
        ("?cursor=abc", "cursor"),
        ("?cursor=-1", "cursor"),
        ("?limit=0", "limit"),
        ("?limit=501", "limit"),
        ("?machineId=robot-1", "machine_id"),
        ("?resource_type=machines", "resource_type"),
    ] {
        let r = s.get(&format!("/api/v1/audit-events{query}")).await;
        let e = expect_error(r, 400, "VALIDATION_ERROR").await;
        assert_eq!(e.error.details.unwrap()["field"], field, "{query}");
    }
    let metrics = s.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(r#"proof_verifications_total{outcome="not_controller"} 1"#),
        "refused proofs stay metrics: {metrics}"
    );
}

#[tokio::test]
async fn without_auth_the_actor_is_the_signer_or_anonymous() {
    let s = TestServer::start(|_| {}).await;
    let k = key(0);
    let m = s.create_active("did:peaq:1", &k).await;
    let path = format!("/api/v1/machines/{}", m.id);
    let renewal = s.proof("did:peaq:1", &k).await;
    assert_eq!(
        s.patch(&path, &json!({"identityProof": renewal}))
            .await
            .status(),
        200
    );
    assert_eq!(s.delete(&path).await.status(), 204);
    let page = events(&s, "").await;
    let actors: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["actor"].as_str().unwrap())
        .collect();
    assert_eq!(
        actors,
        [
            k.address.as_str(),
            "anonymous",
            k.address.as_str(),
            "anonymous"
        ]
    );
}

#[tokio::test]
async fn with_the_trail_off_changes_leave_no_event() {
    let s = TestServer::start(|c| c.audit_trail = false).await;
    let m = s.create_active("did:peaq:1", &key(0)).await;
    assert_eq!(
        s.delete(&format!("/api/v1/machines/{}", m.id))
            .await
            .status(),
        204
    );
    assert_eq!(events(&s, "").await["items"], json!([]));
}

#[tokio::test]
async fn retention_prunes_old_events_in_the_background() {
    let s = TestServer::start(|c| c.audit_retention = Some(Duration::from_secs(10))).await;
    let k = key(0);
    let m = s.create("did:peaq:1", &k).await;
    s.clock.advance(Duration::from_secs(20));
    let body = machine_body("did:peaq:2", s.proof("did:peaq:2", &key(1)).await);
    assert_eq!(s.post("/api/v1/machines", &body).await.status(), 201);
    // The pruner looks every second (a tenth of the retention, at least 1 s).
    let deadline = tokio::time::Instant::now() + crate::support::TIMEOUT;
    loop {
        let page = events(&s, "").await;
        let ids: Vec<&str> = page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["resource_id"].as_str().unwrap())
            .collect();
        if !ids.contains(&m.id.as_str()) {
            assert_eq!(ids.len(), 1, "the young event stays: {page}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not pruned: {page}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = s.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("peaqos_orchestrator_audit_events_pruned_total 1"),
        "{metrics}"
    );
}

/// An event stream never ends by itself; shutdown ends it, so that the
/// server stops in time instead of waiting for its subscribers.
#[tokio::test]
async fn open_streams_end_when_the_server_stops() {
    let s = TestServer::start(|_| {}).await;
    let mut stream = s
        .client
        .get(s.url("/api/v1/events"))
        .timeout(Duration::from_mins(10))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    s.stop().await.unwrap();
    let drained = tokio::time::timeout(crate::support::TIMEOUT, async {
        while let Ok(Some(_)) = stream.chunk().await {}
    })
    .await;
    assert!(drained.is_ok(), "the stream ended");
}

/// A cursor past the last event would skip the events written up to it:
/// `/audit-events` and the stream refuse it with a `400` that names the
/// field and gives the head; the head itself is a valid cursor.
#[tokio::test]
async fn a_cursor_past_the_head_is_refused_naming_it() {
    let s = TestServer::start(|_| {}).await;
    let m = s.create_active("did:peaq:1", &key(0)).await;
    let page = events(&s, "").await;
    let head: u64 = page["items"].as_array().unwrap().last().unwrap()["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        events(&s, &format!("?cursor={head}")).await["items"],
        json!([])
    );
    let ahead = head + 5;
    for query in [
        format!("?cursor={ahead}"),
        format!("?cursor={ahead}&machineId={}", m.id),
        format!("?cursor={ahead}&limit=1"),
    ] {
        let r = s.get(&format!("/api/v1/audit-events{query}")).await;
        let e = expect_error(r, 400, "VALIDATION_ERROR").await;
        let details = e.error.details.unwrap();
        assert_eq!(details["field"], "cursor", "{query}");
        assert_eq!(details["head"], head.to_string(), "{query}");
        assert!(
            e.error.message.contains(&ahead.to_string()),
            "{}",
            e.error.message
        );
    }
    let stream = |query: String, last_event_id: Option<u64>| {
        let mut request = s
            .client
            .get(s.url(&format!("/api/v1/events{query}")))
            .timeout(Duration::from_mins(10));
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        request.send()
    };
    let e = expect_error(
        stream(String::new(), Some(ahead)).await.unwrap(),
        400,
        "VALIDATION_ERROR",
    )
    .await;
    assert_eq!(e.error.details.unwrap()["field"], "Last-Event-ID");
    let e = expect_error(
        stream(format!("?cursor={ahead}"), None).await.unwrap(),
        400,
        "VALIDATION_ERROR",
    )
    .await;
    assert_eq!(e.error.details.unwrap()["field"], "cursor");
    // A malformed cursor is refused even where Last-Event-ID wins (found
    // by schemathesis once the stream was fuzzed).
    let r = stream("?cursor=".to_owned(), Some(head)).await.unwrap();
    let e = expect_error(r, 400, "VALIDATION_ERROR").await;
    assert_eq!(e.error.details.unwrap()["field"], "cursor");
    // Last-Event-ID wins over the cursor, both ways.
    let r = stream(format!("?cursor={ahead}"), Some(head))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = stream(format!("?cursor={head}"), None).await.unwrap();
    assert_eq!(r.status(), 200);
}
