//! Connections and requests at the edge, over raw TCP where a real client
//! would not misbehave enough: slow or silent clients, the connection cap,
//! oversized heads and bodies, forged request ids (issue #15, items 1-3).

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

use crate::support::{TIMEOUT, TestServer, expect_error};

fn addr(s: &TestServer) -> String {
    s.base.trim_start_matches("http://").to_owned()
}

/// Reads until the server closes the connection; what it sent, if anything.
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return String::from_utf8_lossy(&out).into_owned(),
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn a_client_that_does_not_finish_its_headers_is_disconnected() {
    let s = TestServer::start(|c| c.header_timeout = Duration::from_secs(1)).await;
    let mut partial = TcpStream::connect(addr(&s)).await.unwrap();
    partial
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let mut silent = TcpStream::connect(addr(&s)).await.unwrap();
    // Bounded: before the header timeout existed, both stayed open for ever.
    timeout(TIMEOUT, read_to_close(&mut partial))
        .await
        .expect("a connection stuck in its headers is closed");
    timeout(TIMEOUT, read_to_close(&mut silent))
        .await
        .expect("a connection that sends nothing is closed");

    // A keep-alive connection idle between requests is closed the same way,
    // after its answered request.
    let mut idle = TcpStream::connect(addr(&s)).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let answered = timeout(TIMEOUT, read_to_close(&mut idle))
        .await
        .expect("an idle keep-alive connection is closed");
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
}

/// Beyond `max_connections`, newcomers wait in the kernel's backlog instead
/// of taking descriptors; they are served once a slot frees, here when the
/// header timeout closes the silent connections that hold the slots.
#[tokio::test]
async fn connections_beyond_the_cap_wait_for_a_free_slot() {
    let s = TestServer::start(|c| {
        c.header_timeout = Duration::from_secs(2);
        c.max_connections = Some(2);
    })
    .await;
    // The test client's pooled connection holds one slot; these fill the
    // other (and the backlog).
    let mut closed = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let mut silent = TcpStream::connect(addr(&s)).await.unwrap();
        closed.spawn(async move {
            read_to_close(&mut silent).await;
            Instant::now()
        });
    }
    let fresh = reqwest::Client::builder()
        .timeout(TIMEOUT * 2)
        .build()
        .unwrap();
    let r = fresh.get(s.url("/health")).send().await.unwrap();
    let answered = Instant::now();
    assert_eq!(r.status(), 200);
    let first_closed = timeout(TIMEOUT, closed.join_next())
        .await
        .expect("the silent connections are closed by the header timeout")
        .unwrap()
        .unwrap();
    assert!(
        first_closed <= answered,
        "the request past the cap was answered before any slot was freed"
    );
}

#[tokio::test]
async fn a_declared_body_over_the_limit_is_refused_before_it_is_sent() {
    let s = TestServer::start(|c| c.body_limit_bytes = 4096).await;
    let mut conn = TcpStream::connect(addr(&s)).await.unwrap();
    conn.write_all(
        b"POST /api/v1/machine-identity/challenges HTTP/1.1\r\nHost: x\r\n\
          Content-Type: application/json\r\nContent-Length: 10000000\r\n\
          Expect: 100-continue\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let answer = timeout(TIMEOUT, read_to_close(&mut conn))
        .await
        .expect("answered without the body");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(!answer.contains("100 Continue"), "{answer}");
    assert!(answer.contains(r#""code":"VALIDATION_ERROR""#), "{answer}");
}

#[tokio::test]
async fn oversized_uris_and_heads_are_answered_in_the_envelope() {
    let s = TestServer::start(|_| {}).await;
    let long = format!("/api/v1/machines?cursor={}", "a".repeat(9000));
    let e = expect_error(s.get(&long).await, 414, "VALIDATION_ERROR").await;
    assert!(e.error.message.contains("URI"), "{}", e.error.message);

    let mut many = s.client.get(s.url("/health"));
    for i in 0..150 {
        many = many.header(format!("x-pad-{i}"), "1");
    }
    expect_error(many.send().await.unwrap(), 431, "VALIDATION_ERROR").await;
    let big = s
        .client
        .get(s.url("/health"))
        .header("x-pad", "b".repeat(40 * 1024))
        .send()
        .await
        .unwrap();
    expect_error(big, 431, "VALIDATION_ERROR").await;
}

#[tokio::test]
async fn request_ids_are_echoed_only_when_short_and_plain() {
    let s = TestServer::start(|_| {}).await;
    let echoed = |r: &reqwest::Response| r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let r = s
        .client
        .get(s.url("/health"))
        .header("x-request-id", "trace-42_a.b:c")
        .send()
        .await
        .unwrap();
    assert_eq!(echoed(&r), "trace-42_a.b:c");
    for forged in [
        "x".repeat(20_000),
        "abc ERROR peaqos_orchestrator: forged line".to_owned(),
        "a\"b".to_owned(),
    ] {
        let r = s
            .client
            .get(s.url("/health"))
            .header("x-request-id", &forged)
            .send()
            .await
            .unwrap();
        let id = echoed(&r);
        assert_ne!(id, forged);
        assert!(id.len() <= 128 && !id.contains(' '), "{id}");
    }
}

#[tokio::test]
async fn a_json_array_is_not_an_object() {
    let s = TestServer::start(|_| {}).await;
    let r = s
        .client
        .post(s.url("/api/v1/machine-identity/challenges"))
        .header("content-type", "application/json")
        .body(r#"["did:peaq:3"]"#)
        .send()
        .await
        .unwrap();
    let e = expect_error(r, 400, "VALIDATION_ERROR").await;
    assert!(
        e.error.message.contains("JSON object"),
        "{}",
        e.error.message
    );
    let r = s
        .client
        .post(s.url("/api/v1/machines"))
        .header("content-type", "application/json")
        .body(r#"{"displayName":"x","ownerId":"o","machineType":"t","runtimeProfile":"p","identityRef":"did:peaq:1","identityProof":"nope"}"#)
        .send()
        .await
        .unwrap();
    let e = expect_error(r, 400, "VALIDATION_ERROR").await;
    let text = Value::String(e.error.message).to_string();
    assert!(!text.contains("struct"), "{text}");
}
