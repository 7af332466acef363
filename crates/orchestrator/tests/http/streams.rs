//! Event streams against the connection limits (issue #22, items 1 and 2),
//! over raw TCP: streams up to and past their cap while probes still get
//! a connection, the cap per client address and per API key, and a
//! subscriber that stops reading while events flow.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, timeout};

use crate::support::{TIMEOUT, TestServer, key};

fn server_addr(s: &TestServer) -> SocketAddr {
    s.base.trim_start_matches("http://").parse().unwrap()
}

/// A connection from `source` (any 127.0.0.0/8 address is ours on
/// loopback).
async fn connect_from(s: &TestServer, source: Ipv4Addr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0)).unwrap();
    socket.connect(server_addr(s)).await.unwrap()
}

/// The head of an answer: status and header lines, lower-cased names.
#[derive(Debug)]
struct Head {
    status: u16,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `GET path` with `headers` and reads the answer's head (what
/// follows it stays unread), within the test timeout.
async fn request_head(conn: &mut TcpStream, path: &str, headers: &[(&str, &str)]) -> Head {
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n");
    for (name, value) in headers {
        let _ = write!(request, "{name}: {value}\r\n");
    }
    request.push_str("\r\n");
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    timeout(TIMEOUT, async {
        while !head.ends_with(b"\r\n\r\n") {
            let n = conn.read(&mut byte).await.unwrap();
            assert_eq!(
                n,
                1,
                "closed before the head: {}",
                String::from_utf8_lossy(&head)
            );
            head.push(byte[0]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no answer to GET {path} within {TIMEOUT:?}"));
    let text = String::from_utf8(head).unwrap();
    let mut lines = text.lines();
    let status = lines.next().unwrap()[9..12].parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Head { status, headers }
}

/// Opens a stream from `source`; the connection stays open with it.
async fn open_stream(
    s: &TestServer,
    source: Ipv4Addr,
    headers: &[(&str, &str)],
) -> (Head, TcpStream) {
    let mut conn = connect_from(s, source).await;
    let head = request_head(&mut conn, "/api/v1/events", headers).await;
    (head, conn)
}

/// A refused stream: the status and code, `Retry-After`, and the
/// connection closed after the answer (it keeps no slot).
async fn expect_refused(head: &Head, conn: &mut TcpStream, status: u16, code: &str) {
    assert_eq!(head.status, status, "{head:?}");
    assert_eq!(head.header("retry-after"), Some("5"), "{head:?}");
    assert_eq!(head.header("connection"), Some("close"), "{head:?}");
    let mut body = Vec::new();
    timeout(TIMEOUT, conn.read_to_end(&mut body))
        .await
        .expect("a refused stream's connection is closed")
        .unwrap();
    let body = String::from_utf8(body).unwrap();
    let body: Value = serde_json::from_str(body.trim()).unwrap_or_else(|_| panic!("{body}"));
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["details"]["limit"].is_u64(), "{body}");
}

/// A probe on a fresh connection, answered while the streams are open.
async fn probe(s: &TestServer, path: &str) -> u16 {
    let mut conn = connect_from(s, Ipv4Addr::LOCALHOST).await;
    request_head(&mut conn, path, &[("Connection", "close")])
        .await
        .status
}

const LOCAL: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// With 8 connections, streams get 6 (three quarters); the rest are
/// refused `503` with `Retry-After`, and probes and ordinary requests
/// still find a connection. Before the stream cap, streams took every
/// slot and `/health` waited for ever (here: the header timeout is long
/// enough that no slot frees by itself).
#[tokio::test]
async fn streams_past_their_cap_are_refused_and_probes_still_answer() {
    let s = TestServer::start(|c| {
        c.max_connections = Some(8);
        c.max_streams_per_client = Some(100);
        c.header_timeout = Duration::from_mins(2);
    })
    .await;
    let mut open = Vec::new();
    for _ in 0..6 {
        let (head, conn) = open_stream(&s, LOCAL, &[]).await;
        assert_eq!(head.status, 200, "{head:?}");
        assert_eq!(head.header("content-type"), Some("text/event-stream"));
        open.push(conn);
    }
    // Up to the connection cap (the test client's pooled connection holds
    // one slot) and past it.
    for _ in 0..3 {
        let (head, mut conn) = open_stream(&s, LOCAL, &[]).await;
        expect_refused(&head, &mut conn, 503, "SERVICE_UNAVAILABLE").await;
    }
    for path in [
        "/health",
        "/ready",
        "/api/v1/health",
        "/api/v1/readiness",
        "/api/v1/machines",
    ] {
        assert_eq!(probe(&s, path).await, 200, "{path}");
    }
    // A stream that ends frees its slot.
    drop(open.pop());
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let (head, mut conn) = open_stream(&s, LOCAL, &[]).await;
        if head.status == 200 {
            break;
        }
        expect_refused(&head, &mut conn, 503, "SERVICE_UNAVAILABLE").await;
        assert!(Instant::now() < deadline, "the slot was not freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One client address holds at most its share of streams (`429` past
/// it); another address still gets one. With auth on, the share is per
/// API key, whatever the address.
#[tokio::test]
async fn streams_are_capped_per_client_address_and_per_api_key() {
    let s = TestServer::start(|c| c.max_streams_per_client = Some(2)).await;
    let (one, two, other) = (
        Ipv4Addr::new(127, 0, 0, 2),
        Ipv4Addr::new(127, 0, 0, 3),
        Ipv4Addr::new(127, 0, 0, 4),
    );
    let mut kept = Vec::new();
    for source in [one, one] {
        let (head, conn) = open_stream(&s, source, &[]).await;
        assert_eq!(head.status, 200, "{head:?}");
        kept.push(conn);
    }
    let (head, mut conn) = open_stream(&s, one, &[]).await;
    expect_refused(&head, &mut conn, 429, "RATE_LIMITED").await;
    for source in [two, other] {
        let (head, conn) = open_stream(&s, source, &[]).await;
        assert_eq!(head.status, 200, "{source}: {head:?}");
        kept.push(conn);
    }

    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(
        &keys,
        "fleet-a key-a-0123456789abcdef\nfleet-b key-b-0123456789abcdef\n",
    )
    .unwrap();
    let s = TestServer::start(|c| {
        c.require_api_auth = true;
        c.api_keys_file = Some(keys.clone());
        c.max_streams_per_client = Some(2);
    })
    .await;
    let a = [("x-api-key", "key-a-0123456789abcdef")];
    let b = [("x-api-key", "key-b-0123456789abcdef")];
    let mut kept = Vec::new();
    // Key A from two addresses: one share.
    for source in [one, two] {
        let (head, conn) = open_stream(&s, source, &a).await;
        assert_eq!(head.status, 200, "{head:?}");
        kept.push(conn);
    }
    let (head, mut conn) = open_stream(&s, other, &a).await;
    expect_refused(&head, &mut conn, 429, "RATE_LIMITED").await;
    // Key B from the same address as A's: its own share.
    let (head, _b) = open_stream(&s, one, &b).await;
    assert_eq!(head.status, 200, "{head:?}");
}

/// A client socket whose receive buffer and segments are small, so that a
/// few hundred events fill what the kernel holds for it on both sides
/// (loopback otherwise grows the server's send buffer to megabytes).
fn small_window_socket() -> socket2::Socket {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.set_tcp_mss(536).unwrap();
    socket
}

/// A subscriber that never reads while events are written is reset once
/// its socket has taken nothing for the write timeout (1 s here), and its
/// stream slot is freed. Before the write deadline it stayed connected for
/// as long as it liked, holding its kernel buffers.
#[tokio::test]
async fn a_subscriber_that_stops_reading_is_disconnected() {
    let s = TestServer::start(|c| {
        c.write_timeout = Duration::from_secs(1);
        c.max_connections = Some(8);
        c.max_streams_per_client = Some(100);
    })
    .await;
    let m = s.create("did:peaq:1", &key(0)).await;
    let path = format!("/api/v1/machines/{}", m.id);
    let socket = small_window_socket();
    socket.connect(&server_addr(&s).into()).unwrap();
    socket.set_nonblocking(true).unwrap();
    let mut stalled = TcpStream::from_std(socket.into()).unwrap();
    let head = request_head(&mut stalled, "/api/v1/events", &[]).await;
    assert_eq!(head.status, 200);
    // Writes flow; the subscriber reads nothing more.
    let started = Instant::now();
    let mut writes = 0;
    let reset = loop {
        if let Some(e) = stalled.take_error().unwrap() {
            break e;
        }
        assert!(
            started.elapsed() < TIMEOUT,
            "still connected after {writes} writes and {:?}",
            started.elapsed()
        );
        let r = s
            .patch(&path, &json!({"displayName": format!("write {writes}")}))
            .await;
        assert_eq!(r.status(), 200);
        writes += 1;
    };
    eprintln!(
        "reset ({reset}) after {writes} writes, {:?}",
        started.elapsed()
    );
    assert_eq!(reset.kind(), std::io::ErrorKind::ConnectionReset);
    // Its slot is free again: the other streams of the cap (6) all open.
    let mut kept = Vec::new();
    for _ in 0..6 {
        let (head, conn) = open_stream(&s, LOCAL, &[]).await;
        assert_eq!(head.status, 200, "{head:?}");
        kept.push(conn);
    }
}

/// Bytes the kernel holds in the queues of TCP sockets on 127.0.0.1
/// whose local port is `port` (the server's send queues) and whose remote
/// port is `port` (the clients' receive queues), from /proc/net/tcp.
fn queued_bytes(port: u16) -> (u64, u64) {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let (mut server_send, mut client_receive) = (0, 0);
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let port_of = |a: &str| u16::from_str_radix(a.rsplit(':').next().unwrap(), 16).unwrap();
        let (tx, rx) = fields[4].split_once(':').unwrap();
        let (tx, rx) = (
            u64::from_str_radix(tx, 16).unwrap(),
            u64::from_str_radix(rx, 16).unwrap(),
        );
        if port_of(fields[1]) == port {
            server_send += tx;
        } else if port_of(fields[2]) == port {
            client_receive += rx;
        }
    }
    (server_send, client_receive)
}

/// The round's measurement, scaled down: 200 subscribers with 64 KiB
/// receive buffers that never read during 1,500 writes; what the kernel
/// holds for them (peak, when the writes end, and 5 s later), without a
/// deadline that matters (3,600 s) and with a 2 s one. Run
/// by hand (figures in docs/performance.md):
/// `cargo test -p peaqos-orchestrator --test http streams::kernel_memory -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: about a minute, figures for docs/performance.md"]
async fn kernel_memory_of_subscribers_that_stop_reading() {
    const SUBSCRIBERS: usize = 200;
    const WRITES: usize = 1500;
    for deadline in [3600, 2] {
        let s = TestServer::start(|c| {
            c.write_timeout = Duration::from_secs(deadline);
            c.max_connections = Some(1000);
            c.max_streams_per_client = Some(1000);
        })
        .await;
        let port = server_addr(&s).port();
        let m = s.create("did:peaq:1", &key(0)).await;
        let path = format!("/api/v1/machines/{}", m.id);
        let mut subscribers = Vec::new();
        for _ in 0..SUBSCRIBERS {
            // A receive buffer of its own, as a small device's (loopback
            // would otherwise let each client's kernel take megabytes).
            let socket = TcpSocket::new_v4().unwrap();
            socket.set_recv_buffer_size(64 * 1024).unwrap();
            let mut conn = socket.connect(server_addr(&s)).await.unwrap();
            let head = request_head(&mut conn, "/api/v1/events", &[]).await;
            assert_eq!(head.status, 200);
            subscribers.push(conn);
        }
        let started = Instant::now();
        let mut peak = (0, 0);
        for n in 0..WRITES {
            let r = s
                .patch(&path, &json!({"displayName": format!("write {n}")}))
                .await;
            assert_eq!(r.status(), 200);
            if n % 100 == 0 {
                let q = queued_bytes(port);
                if q.0 + q.1 > peak.0 + peak.1 {
                    peak = q;
                }
            }
        }
        let writing = started.elapsed();
        let ended = queued_bytes(port);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let later = queued_bytes(port);
        let connected = subscribers
            .iter()
            .filter(|c| matches!(c.take_error(), Ok(None)))
            .count();
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        println!(
            "write timeout {deadline} s: {WRITES} writes in {writing:.1?}; kernel queues (server send + client receive), MiB: \
             peak {:.1} + {:.1}, at the end {:.1} + {:.1}, 5 s later {:.1} + {:.1}; {connected} of {SUBSCRIBERS} still connected",
            mib(peak.0),
            mib(peak.1),
            mib(ended.0),
            mib(ended.1),
            mib(later.0),
            mib(later.1)
        );
    }
}
