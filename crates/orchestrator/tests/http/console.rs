//! The fleet console's authentication and the keys' roles, over real HTTP:
//! without a session no data and no action, a wrong key opens nothing, an
//! action needs the session's CSRF token, and a role that does not allow a
//! change answers `403 FORBIDDEN` and writes nothing.

use reqwest::header::{CONTENT_TYPE, COOKIE, SET_COOKIE};
use serde_json::{Value, json};

use crate::support::{TestServer, expect_error, key};

const OPS_KEY: &str = "ops-key-0123456789abcdef";
const VIEW_KEY: &str = "view-key-0123456789abcdef";
const ROBOT_KEY: &str = "robot-key-0123456789abcdef";
const OLD_KEY: &str = "old-key-0123456789abcdef";

async fn start() -> TestServer {
    let keys = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        keys.path(),
        format!(
            "ops {OPS_KEY} operator\nviewer {VIEW_KEY} read\nrobot {ROBOT_KEY} agent\n{OLD_KEY}\n"
        ),
    )
    .unwrap();
    let path = keys.into_temp_path().keep().unwrap();
    TestServer::start(|c| {
        c.require_api_auth = true;
        c.api_keys_file = Some(path);
    })
    .await
}

/// Logs in; the cookie to send back, and the session's view.
async fn login(s: &TestServer, api_key: &str) -> (String, Value) {
    let r = s
        .client
        .post(s.url("/console/login"))
        .json(&json!({ "apiKey": api_key }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let set = r.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attribute), "{set}");
    }
    assert!(!set.contains(api_key), "{set}");
    let cookie = set.split(';').next().unwrap().to_owned();
    (cookie, r.json().await.unwrap())
}

fn with_key(k: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("x-api-key", k.parse().unwrap());
    reqwest::Client::builder()
        .default_headers(headers)
        .timeout(crate::support::TIMEOUT)
        .build()
        .unwrap()
}

async fn events(s: &TestServer, machine: &str) -> usize {
    let r = s
        .client
        .get(s.url(&format!("/api/v1/audit-events?machineId={machine}")))
        .header("x-api-key", OPS_KEY)
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    v["items"].as_array().unwrap().len()
}

#[tokio::test]
#[allow(
    clippy::too_many_lines,
    reason = "one story: a visitor, a viewer, an operator, an agent's key"
)]
async fn the_console_needs_a_session_for_data_and_its_csrf_token_for_actions() {
    let mut s = start().await;
    // Set up with a key without a role: it may do everything, as before.
    let plain = std::mem::replace(&mut s.client, with_key(OLD_KEY));
    let m = s.create_active("did:peaq:1", &key(0)).await;
    // For later: a fresh proof an agent's key will try to lift a block with.
    let proof = s.proof("did:peaq:1", &key(0)).await;
    s.client = plain;
    let c = &s.client;
    let path = format!("/api/v1/machines/{}", m.id);

    // The page itself is public, holds no data, and forbids framing and
    // inline script.
    let r = c.get(s.url("/console")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    assert!(!r.text().await.unwrap().contains(&m.id));
    let r = c.get(s.url("/")).send().await.unwrap();
    assert_eq!(r.url().path(), "/console", "/ leads to the console");

    // Without a session: no data, no action.
    for get in [
        "/console/session",
        "/console/api/counts",
        "/api/v1/machines",
        "/api/v1/events",
    ] {
        let r = c.get(s.url(get)).send().await.unwrap();
        expect_error(r, 401, "AUTH_REQUIRED").await;
    }
    let r = c
        .patch(s.url(&path))
        .json(&json!({"status": "blocked"}))
        .send()
        .await
        .unwrap();
    expect_error(r, 401, "AUTH_REQUIRED").await;
    let r = c.post(s.url("/console/logout")).send().await.unwrap();
    expect_error(r, 401, "AUTH_REQUIRED").await;
    // A forged cookie is no session.
    let r = c
        .get(s.url("/api/v1/machines"))
        .header(COOKIE, format!("peaqos_session={}", "ab".repeat(32)))
        .send()
        .await
        .unwrap();
    expect_error(r, 401, "AUTH_INVALID").await;

    // A wrong key opens nothing; a login that is not JSON (what a
    // cross-site form would send) is refused before the key is looked at.
    let r = c
        .post(s.url("/console/login"))
        .json(&json!({"apiKey": "wrong-key-0123456789abcdef"}))
        .send()
        .await
        .unwrap();
    assert!(r.headers().get(SET_COOKIE).is_none());
    expect_error(r, 401, "AUTH_INVALID").await;
    let r = c
        .post(s.url("/console/login"))
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(format!("apiKey={OPS_KEY}"))
        .send()
        .await
        .unwrap();
    assert!(r.headers().get(SET_COOKIE).is_none());
    expect_error(r, 415, "VALIDATION_ERROR").await;

    // A viewer sees, and may not act.
    let (viewer, view) = login(&s, VIEW_KEY).await;
    assert_eq!(view["role"], "read");
    let csrf = view["csrfToken"].as_str().unwrap().to_owned();
    let r = c
        .get(s.url("/api/v1/machines"))
        .header(COOKIE, &viewer)
        .send()
        .await
        .unwrap();
    let list: Value = r.json().await.unwrap();
    assert_eq!(list["items"][0]["id"], m.id.as_str());
    let r = c
        .get(s.url("/console/api/counts"))
        .header(COOKIE, &viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"counts": {"active": 1}, "total": 1})
    );
    let r = c
        .get(s.url("/api/v1/events"))
        .header(COOKIE, &viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the stream takes the session");
    drop(r);
    let before = events(&s, &m.id).await;
    let r = c
        .patch(s.url(&path))
        .header(COOKIE, &viewer)
        .header("x-csrf-token", &csrf)
        .json(&json!({"status": "blocked"}))
        .send()
        .await
        .unwrap();
    expect_error(r, 403, "FORBIDDEN").await;
    assert_eq!(events(&s, &m.id).await, before, "a refusal writes nothing");

    // An operator acts only with the session's CSRF token.
    let (ops, view) = login(&s, OPS_KEY).await;
    assert_eq!(view["role"], "operator");
    assert_eq!(view["keyName"], "ops");
    let csrf = view["csrfToken"].as_str().unwrap().to_owned();
    for token in [
        None,
        Some("0".repeat(64)),
        Some(view_csrf_of(&viewer, &s).await),
    ] {
        let mut request = c
            .patch(s.url(&path))
            .header(COOKIE, &ops)
            .json(&json!({"status": "blocked"}));
        if let Some(token) = token {
            request = request.header("x-csrf-token", token);
        }
        expect_error(request.send().await.unwrap(), 403, "FORBIDDEN").await;
    }
    assert_eq!(events(&s, &m.id).await, before);
    let r = c
        .patch(s.url(&path))
        .header(COOKIE, &ops)
        .header("x-csrf-token", &csrf)
        .json(&json!({"status": "blocked"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(events(&s, &m.id).await, before + 1);

    // An agent's key registers and re-proves, and may neither block,
    // archive, nor lift a block with a fresh proof.
    for (method, body) in [
        (reqwest::Method::PATCH, json!({"status": "draft"})),
        (
            reqwest::Method::PATCH,
            json!({"identityProof": proof, "status": "active"}),
        ),
        (reqwest::Method::DELETE, Value::Null),
    ] {
        let mut request = c
            .request(method, s.url(&path))
            .header("x-api-key", ROBOT_KEY);
        if !body.is_null() {
            request = request.json(&body);
        }
        expect_error(request.send().await.unwrap(), 403, "FORBIDDEN").await;
    }
    assert_eq!(events(&s, &m.id).await, before + 1);

    // Logging out needs the token too, and ends the session.
    let r = c
        .post(s.url("/console/logout"))
        .header(COOKIE, &ops)
        .send()
        .await
        .unwrap();
    expect_error(r, 403, "FORBIDDEN").await;
    let r = c
        .post(s.url("/console/logout"))
        .header(COOKIE, &ops)
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = c
        .get(s.url("/api/v1/machines"))
        .header(COOKIE, &ops)
        .send()
        .await
        .unwrap();
    expect_error(r, 401, "AUTH_INVALID").await;
}

/// Another session's CSRF token (the viewer's).
async fn view_csrf_of(cookie: &str, s: &TestServer) -> String {
    let r = s
        .client
        .get(s.url("/console/session"))
        .header(COOKIE, cookie)
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    v["csrfToken"].as_str().unwrap().to_owned()
}
