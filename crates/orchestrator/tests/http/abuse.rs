//! Bad input, abuse and limits: bodies, content types, odd identity
//! references, signatures and ids, challenge floods, API keys.

use std::time::Duration;

use peaqos_protocol::Machine;
use serde_json::json;

use crate::support::{TestServer, expect_error, expect_item, key, machine_body, sign};

#[tokio::test]
async fn bodies_must_be_small_json() {
    let s = TestServer::start(|c| c.body_limit_bytes = 4096).await;
    let path = "/api/v1/machine-identity/challenges";

    let huge = json!({"identityRef": "did:peaq:1", "pad": "x".repeat(100_000)});
    let r = s.post(path, &huge).await;
    expect_error(r, 413, "VALIDATION_ERROR").await;

    let r = s
        .client
        .post(s.url(path))
        .header("content-type", "text/plain")
        .body(r#"{"identityRef":"did:peaq:1"}"#)
        .send()
        .await
        .unwrap();
    expect_error(r, 415, "VALIDATION_ERROR").await;
    let r = s
        .client
        .post(s.url(path))
        .body(r#"{"identityRef":"did:peaq:1"}"#)
        .send()
        .await
        .unwrap();
    expect_error(r, 415, "VALIDATION_ERROR").await;

    // JSON declared with parameters or a +json type is JSON.
    for ct in [
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/merge-patch+json",
    ] {
        let r = s
            .client
            .post(s.url(path))
            .header("content-type", ct)
            .body(r#"{"identityRef":"did:peaq:1"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{ct}");
    }

    for body in [
        "{",
        "{\"identityRef\": \"did:peaq:1\"} trailing",
        "[]",
        "\"did:peaq:1\"",
        "nul",
    ] {
        let r = s
            .client
            .post(s.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        expect_error(r, 400, "VALIDATION_ERROR").await;
    }
    // A bodyless POST that declares JSON is understood: the field is missing.
    let r = s
        .client
        .post(s.url(path))
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    let e = expect_error(r, 400, "VALIDATION_ERROR").await;
    assert_eq!(e.error.details.unwrap()["field"], "identityRef");
}

/// `s' = n - s` on 32-byte big-endian integers: the malleable twin.
fn high_s(signature: &str) -> String {
    const N: [u8; 32] = [
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xfe, 0xba, 0xae, 0xdc, 0xe6, 0xaf, 0x48, 0xa0, 0x3b, 0xbf, 0xd2, 0x5e, 0x8c, 0xd0, 0x36,
        0x41, 0x41,
    ];
    let bytes = hex::decode(&signature[2..]).unwrap();
    let s = &bytes[32..64];
    let mut out = [0u8; 32];
    let mut borrow = false;
    for i in (0..32).rev() {
        let (d, b1) = N[i].overflowing_sub(s[i]);
        let (d, b2) = d.overflowing_sub(u8::from(borrow));
        borrow = b1 || b2;
        out[i] = d;
    }
    let v = if bytes[64] == 27 { 28 } else { 27 };
    format!("0x{}{}{v:02x}", hex::encode(&bytes[..32]), hex::encode(out))
}

#[tokio::test]
async fn odd_signatures_are_invalid_proofs_and_burn_nothing() {
    let s = TestServer::start(|_| {}).await;
    let k = key(0);
    let c = s.challenge("did:peaq:1").await;
    let good = sign(&k, &c.message);
    let odd = [
        String::new(),
        "0x".to_owned(),
        good[2..].to_owned(),
        format!("{good}00"),
        good[..131].to_owned(),
        good.replace(&good[10..12], "zz"),
        format!("{}1d", &good[..130]),
        format!("0x{}", "0".repeat(130)),
        format!("0x{}", "f".repeat(130)),
        high_s(&good),
        format!("0x{}", "ab".repeat(30_000)),
        "0x\u{1F916}".to_owned(),
    ];
    for sig in &odd {
        let p = json!({"challengeId": c.challenge_id, "signature": sig});
        let e = expect_error(
            s.post("/api/v1/machines", &machine_body("did:peaq:1", p))
                .await,
            403,
            "MACHINE_IDENTITY_PROOF_INVALID",
        )
        .await;
        assert!(e.error.message.len() < 300, "{}", e.error.message);
    }
    let p = json!({"challengeId": c.challenge_id, "signature": 5});
    let e = expect_error(
        s.post("/api/v1/machines", &machine_body("did:peaq:1", p))
            .await,
        400,
        "VALIDATION_ERROR",
    )
    .await;
    assert_eq!(e.error.details.unwrap()["field"], "identityProof.signature");
    let p = json!({"challengeId": c.challenge_id});
    let e = expect_error(
        s.post("/api/v1/machines", &machine_body("did:peaq:1", p))
            .await,
        400,
        "VALIDATION_ERROR",
    )
    .await;
    assert_eq!(e.error.details.unwrap()["field"], "identityProof.signature");

    let p = json!({"challengeId": c.challenge_id, "signature": good});
    expect_item::<Machine>(
        s.post("/api/v1/machines", &machine_body("did:peaq:1", p))
            .await,
        201,
    )
    .await;
}

#[tokio::test]
async fn odd_machine_ids_are_not_found() {
    let s = TestServer::start(|_| {}).await;
    let long = format!("/api/v1/machines/mach_{}", "a".repeat(5000));
    for path in [
        "/api/v1/machines/x",
        "/api/v1/machines/mach_",
        "/api/v1/machines/..%2F..%2Fetc%2Fpasswd",
        "/api/v1/machines/mach_%F0%9F%A4%96",
        "/api/v1/machines/%FF%FE",
        "/api/v1/machines/mach_aaaaaaaaaaaaaaaaaaaaaaaaaa%00",
        long.as_str(),
    ] {
        expect_error(s.get(path).await, 404, "NOT_FOUND").await;
        expect_error(s.patch(path, &json!({})).await, 404, "NOT_FOUND").await;
        expect_error(s.delete(path).await, 404, "NOT_FOUND").await;
    }
}

#[tokio::test]
async fn challenge_floods_are_rate_limited_per_address() {
    let s = TestServer::start(|c| {
        c.challenge_burst = 5;
        c.challenge_rate_per_minute = 6;
    })
    .await;
    let path = "/api/v1/machine-identity/challenges";
    let body = json!({"identityRef": "did:peaq:1"});
    for _ in 0..5 {
        assert_eq!(s.post(path, &body).await.status(), 201);
    }
    let mut limited = 0;
    for _ in 0..50 {
        let r = s.post(path, &body).await;
        let retry: u64 = r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=11).contains(&retry), "{retry}");
        expect_error(r, 429, "RATE_LIMITED").await;
        limited += 1;
    }
    assert_eq!(limited, 50);
    // One token every ten seconds.
    s.clock.advance(Duration::from_secs(10));
    assert_eq!(s.post(path, &body).await.status(), 201);
    assert_eq!(s.post(path, &body).await.status(), 429);
}

#[tokio::test]
async fn outstanding_challenges_are_not_stored_so_none_is_turned_away() {
    // The old bound on pending challenges (3 here) no longer applies: they
    // cost no storage. Every one of them stays good until used or expired.
    let s = TestServer::start(|c| c.max_pending_challenges = 3).await;
    let mut issued = Vec::new();
    for _ in 0..6 {
        issued.push(s.challenge("did:peaq:1").await);
    }
    let proof = |c: &peaqos_protocol::Challenge| json!({"challengeId": c.challenge_id, "signature": sign(&key(0), &c.message)});
    let created: Machine = expect_item(
        s.post(
            "/api/v1/machines",
            &machine_body("did:peaq:1", proof(&issued[5])),
        )
        .await,
        201,
    )
    .await;
    let path = format!("/api/v1/machines/{}", created.id);
    for c in &issued[..5] {
        let body = json!({"identityProof": proof(c), "status": "active"});
        assert_eq!(s.patch(&path, &body).await.status(), 200);
    }
}

#[tokio::test]
async fn expired_challenges_stay_expired_after_their_redemptions_are_collected() {
    let s = TestServer::start(|c| c.challenge_ttl = Duration::from_secs(1)).await;
    let c = s.challenge("did:peaq:1").await;
    let p = json!({"challengeId": c.challenge_id, "signature": sign(&key(0), &c.message)});
    let created: Machine = expect_item(
        s.post("/api/v1/machines", &machine_body("did:peaq:1", p.clone()))
            .await,
        201,
    )
    .await;
    let path = format!("/api/v1/machines/{}", created.id);
    let again = json!({"identityProof": p, "status": "active"});
    // Past its expiry a late proof learns it must re-challenge (410).
    s.clock.advance(Duration::from_millis(1500));
    expect_error(
        s.patch(&path, &again).await,
        410,
        "MACHINE_IDENTITY_PROOF_EXPIRED",
    )
    .await;
    // The redemption is kept one more TTL, then collected (the collector
    // runs every TTL, here one second of real time).
    s.clock.advance(Duration::from_secs(2));
    let deadline = tokio::time::Instant::now() + crate::support::TIMEOUT;
    loop {
        let text = s.get("/metrics").await.text().await.unwrap();
        if text.contains("peaqos_orchestrator_challenges_collected_total 1") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never collected:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Forgotten by the store, still refused: its expiry is in its id.
    expect_error(
        s.patch(&path, &again).await,
        410,
        "MACHINE_IDENTITY_PROOF_EXPIRED",
    )
    .await;
}

#[tokio::test]
async fn api_keys_guard_the_api_but_not_health() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("api-keys");
    std::fs::write(
        &keys,
        "# ops\nfleet-key-0123456789abcdef\nsecond-key-0123456789abcdef\n",
    )
    .unwrap();
    let s = TestServer::start(|c| {
        c.require_api_auth = true;
        c.api_keys_file = Some(keys.clone());
    })
    .await;
    let body = json!({"identityRef": "did:peaq:1"});
    let path = "/api/v1/machine-identity/challenges";

    expect_error(s.post(path, &body).await, 401, "AUTH_REQUIRED").await;
    expect_error(s.get("/api/v1/machines").await, 401, "AUTH_REQUIRED").await;
    expect_error(s.get("/metrics").await, 401, "AUTH_REQUIRED").await;
    for wrong in [
        "fleet-key-0123456789abcdeF",
        "x",
        "fleet-key-0123456789abcde",
        "fleet-key-0123456789abcdef0",
    ] {
        let r = s
            .client
            .post(s.url(path))
            .header("x-api-key", wrong)
            .json(&body)
            .send()
            .await
            .unwrap();
        expect_error(r, 401, "AUTH_INVALID").await;
    }
    for right in ["fleet-key-0123456789abcdef", "second-key-0123456789abcdef"] {
        let r = s
            .client
            .post(s.url(path))
            .header("x-api-key", right)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    for open in [
        "/health",
        "/ready",
        "/api/v1/health",
        "/api/v1/readiness",
        "/api/v1/openapi.json",
    ] {
        assert_eq!(s.get(open).await.status(), 200, "{open}");
    }

    // Unknown routes and wrong methods under /api/ need the key as well, so
    // that probing without one learns nothing; with it they are 404 and 405.
    expect_error(s.get("/api/v1/nope").await, 401, "AUTH_REQUIRED").await;
    expect_error(s.get("/api/v2/machines").await, 401, "AUTH_REQUIRED").await;
    expect_error(s.delete(path).await, 401, "AUTH_REQUIRED").await;
    let with_key = |r: reqwest::RequestBuilder| r.header("x-api-key", "fleet-key-0123456789abcdef");
    let r = with_key(s.client.get(s.url("/api/v1/nope")))
        .send()
        .await
        .unwrap();
    expect_error(r, 404, "NOT_FOUND").await;
    let r = with_key(s.client.delete(s.url(path))).send().await.unwrap();
    expect_error(r, 405, "METHOD_NOT_ALLOWED").await;

    // The document declares the key, as the server asks for it.
    let doc: serde_json::Value = s.get("/api/v1/openapi.json").await.json().await.unwrap();
    assert_eq!(
        doc["components"]["securitySchemes"]["apiKey"],
        json!({"type": "apiKey", "in": "header", "name": "x-api-key"})
    );
    assert_eq!(
        doc["paths"]["/api/v1/machines"]["get"]["security"],
        json!([{"apiKey": []}])
    );
    assert!(doc["paths"]["/api/v1/readiness"]["get"]["security"].is_null());
}

#[tokio::test]
async fn a_bad_api_keys_file_stops_start_up_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("api-keys");
    std::fs::write(&keys, "tiny-k3y\n").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = peaqos_orchestrator::Config {
        database_url: "sqlite::memory:".into(),
        require_api_auth: true,
        api_keys_file: Some(keys),
        ..peaqos_orchestrator::Config::default()
    };
    let err = peaqos_orchestrator::run(listener, config, std::future::pending())
        .await
        .unwrap_err();
    let chain = peaqos_orchestrator::http::error_chain(&err);
    assert!(
        chain.contains("PEAQOS_API_KEYS_FILE") && chain.contains("line 1"),
        "{chain}"
    );
    assert!(!chain.contains("tiny-k3y"), "the key is not shown: {chain}");
}
