//! Two `peaqos-orchestrator` processes on one PostgreSQL database, as
//! behind a load balancer: whatever one replica issues, the other honours,
//! and the rules that span requests (single-use challenges, one machine per
//! identity) hold across them.

use std::process::Stdio;
use std::sync::Arc;

use peaqos_protocol::{Challenge, ListResponse, Machine};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout};

use crate::pg::PgSchema;
use crate::support::{
    Key, TIMEOUT, expect_error, expect_item, key, machine_body, registry_toml, sign,
};

const BIN: &str = env!("CARGO_BIN_EXE_peaqos-orchestrator");
/// Identities `did:peaq:1..=IDENTITIES` are controlled by fixture key 0.
const IDENTITIES: usize = 40;

/// One orchestrator process on a port it chose itself.
pub(crate) struct Replica {
    pub(crate) base: String,
    pub(crate) client: reqwest::Client,
    pid: u32,
    _child: Child,
    _stdout: BufReader<ChildStdout>,
}

impl Replica {
    pub(crate) async fn start(database_url: &str, registry: &std::path::Path) -> Self {
        let mut child = tokio::process::Command::new(BIN)
            .env_clear()
            .env("PEAQOS_LISTEN_ADDR", "127.0.0.1:0")
            .env("DATABASE_URL", database_url)
            .env("PEAQOS_MCR_REGISTRY_FILE", registry)
            .env("PEAQOS_CHALLENGE_RATE_PER_MINUTE", "100000")
            .env("PEAQOS_CHALLENGE_BURST", "100000")
            .env("PEAQOS_DB_MAX_CONNECTIONS", "8")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        // The binary prints where it listens once it is ready.
        let base = tokio::time::timeout(TIMEOUT, async {
            let mut line = String::new();
            loop {
                line.clear();
                let n = stdout.read_line(&mut line).await.unwrap();
                assert!(n > 0, "the replica exited before listening");
                if let Some(url) = line.trim().strip_prefix("listening on ") {
                    return url.to_owned();
                }
            }
        })
        .await
        .expect("the replica says where it listens");
        peaqos_orchestrator::install_crypto_provider();
        Self {
            base,
            client: reqwest::Client::builder().timeout(TIMEOUT).build().unwrap(),
            pid,
            _child: child,
            _stdout: stdout,
        }
    }

    /// SIGKILL: no shutdown, no flush; the kernel cuts its connections,
    /// to clients and to the database, wherever they were.
    pub(crate) fn kill9(&self) {
        let pid = rustix::process::Pid::from_raw(i32::try_from(self.pid).unwrap()).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> reqwest::Response {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.json(body);
        }
        request.send().await.unwrap()
    }

    pub(crate) async fn get(&self, path: &str) -> reqwest::Response {
        self.send(reqwest::Method::GET, path, None).await
    }

    pub(crate) async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }

    pub(crate) async fn patch(&self, path: &str, body: &Value) -> reqwest::Response {
        self.send(reqwest::Method::PATCH, path, Some(body)).await
    }

    async fn challenge(&self, identity: &str) -> Challenge {
        let r = self
            .post(
                "/api/v1/machine-identity/challenges",
                &json!({ "identityRef": identity }),
            )
            .await;
        expect_item(r, 201).await
    }

    pub(crate) async fn proof(&self, identity: &str, key: &Key) -> Value {
        let c = self.challenge(identity).await;
        json!({ "challengeId": c.challenge_id, "signature": sign(key, &c.message) })
    }
}

/// Two replicas started at the same moment on a fresh schema (so that both
/// run the migrations at once).
async fn replicas(test: &str) -> Option<(PgSchema, tempfile::TempDir, [Arc<Replica>; 2])> {
    let schema = PgSchema::create(test).await?;
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("registry.toml");
    let k = key(0);
    let controllers = [&k];
    let names: Vec<String> = (1..=IDENTITIES).map(|i| format!("did:peaq:{i}")).collect();
    let entries: Vec<(&str, &[&Key])> = names
        .iter()
        .map(|n| (n.as_str(), &controllers[..]))
        .collect();
    std::fs::write(&registry, registry_toml(&entries)).unwrap();
    let (a, b) = tokio::join!(
        Replica::start(&schema.url, &registry),
        Replica::start(&schema.url, &registry)
    );
    Some((schema, dir, [Arc::new(a), Arc::new(b)]))
}

#[tokio::test]
async fn two_replicas_share_challenges_identities_and_cursors() {
    let Some((_schema, _dir, [a, b])) =
        replicas("two_replicas_share_challenges_identities_and_cursors").await
    else {
        return;
    };
    let path = redeemed_at_the_other(&a, &b).await;
    one_redemption_across_replicas(&a, &b, &path).await;
    one_machine_per_identity_across_replicas(&a, &b).await;
    cursors_page_on_at_the_other(&a, &b).await;
    for r in [&a, &b] {
        let ready: Value = r.get("/ready").await.json().await.unwrap();
        assert_eq!(ready["store"], "ok");
    }
}

/// A challenge issued by one replica is redeemed at the other, and the
/// record reads the same at both. Returns the machine's path.
async fn redeemed_at_the_other(a: &Replica, b: &Replica) -> String {
    let proof = a.proof("did:peaq:1", &key(0)).await;
    let body = machine_body("did:peaq:1", proof);
    let m: Machine = expect_item(b.post("/api/v1/machines", &body).await, 201).await;
    let path = format!("/api/v1/machines/{}", m.id);
    let seen_at_a: Machine = expect_item(a.get(&path).await, 200).await;
    assert_eq!(seen_at_a, m);
    // The identity is taken at both.
    for r in [a, b] {
        let again = r.post("/api/v1/machines", &body).await;
        let e = expect_error(again, 409, "MACHINE_IDENTITY_EXISTS").await;
        assert_eq!(e.error.details.unwrap()["machineId"], m.id.as_str());
    }
    path
}

/// N concurrent redemptions of one challenge, spread over both replicas:
/// exactly one succeeds.
async fn one_redemption_across_replicas(a: &Arc<Replica>, b: &Arc<Replica>, path: &str) {
    let proof = b.proof("did:peaq:1", &key(0)).await;
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let replica = Arc::clone(if i % 2 == 0 { a } else { b });
            let (path, proof) = (path.to_owned(), proof.clone());
            tokio::spawn(async move {
                let r = replica
                    .patch(&path, &json!({"identityProof": proof, "status": "active"}))
                    .await;
                let status = r.status().as_u16();
                (status, r.json::<Value>().await.unwrap())
            })
        })
        .collect();
    let mut wins = 0;
    for t in tasks {
        match t.await.unwrap() {
            (200, _) => wins += 1,
            (403, body) => assert_eq!(body["error"]["code"], "MACHINE_IDENTITY_PROOF_INVALID"),
            (status, body) => panic!("{status}: {body}"),
        }
    }
    assert_eq!(wins, 1, "one challenge, one redemption");
}

/// Two concurrent registrations of one identity, one at each replica: one
/// machine, and one MACHINE_IDENTITY_EXISTS naming it. Several rounds, so
/// that the two requests meet in different orders.
async fn one_machine_per_identity_across_replicas(a: &Replica, b: &Replica) {
    let k = key(0);
    for i in 2..=9 {
        let identity = format!("did:peaq:{i}");
        let (pa, pb) = tokio::join!(a.proof(&identity, &k), b.proof(&identity, &k));
        let (body_a, body_b) = (machine_body(&identity, pa), machine_body(&identity, pb));
        let (ra, rb) = tokio::join!(
            a.post("/api/v1/machines", &body_a),
            b.post("/api/v1/machines", &body_b)
        );
        let (sa, sb) = (ra.status().as_u16(), rb.status().as_u16());
        let (va, vb): (Value, Value) = (ra.json().await.unwrap(), rb.json().await.unwrap());
        let (created, refused) = match (sa, sb) {
            (201, 409) => (va, vb),
            (409, 201) => (vb, va),
            other => panic!("{identity}: {other:?}: {va} {vb}"),
        };
        assert_eq!(refused["error"]["code"], "MACHINE_IDENTITY_EXISTS");
        assert_eq!(
            refused["error"]["details"]["machineId"],
            created["item"]["id"]
        );
    }
}

/// Cursors issued by one replica page on at the other.
async fn cursors_page_on_at_the_other(a: &Replica, b: &Replica) {
    let all: ListResponse<Machine> = a
        .get("/api/v1/machines?limit=100")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(all.items.len(), 9);
    let mut paged = Vec::new();
    let mut cursor: Option<String> = None;
    for page in 0.. {
        let replica = if page % 2 == 0 { a } else { b };
        let query = cursor
            .as_ref()
            .map_or_else(String::new, |c| format!("&cursor={c}"));
        let r = replica
            .get(&format!("/api/v1/machines?limit=2{query}"))
            .await;
        assert_eq!(r.status(), 200);
        let body: ListResponse<Machine> = r.json().await.unwrap();
        paged.extend(body.items.into_iter().map(|m| m.id));
        match body.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
        assert!(page < 10, "cursors loop");
    }
    let expected: Vec<String> = all.items.into_iter().map(|m| m.id).collect();
    assert_eq!(paged, expected);
}

/// Event ids of one page of the audit trail, and where the next starts.
async fn audit_page(replica: &Replica, after: u64) -> Vec<u64> {
    let r = replica
        .get(&format!("/api/v1/audit-events?limit=5&cursor={after}"))
        .await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().parse().unwrap())
        .collect()
}

/// Machines written concurrently, and the updates of each.
const MACHINES: usize = 16;
const UPDATES: usize = 10;

/// Writers at both replicas while a reader follows the audit trail by
/// cursor, alternating replicas: an event committed after one with a
/// larger id would be skipped for good. The reader must see every change
/// once, in one order that both replicas agree on.
#[tokio::test]
async fn concurrent_writers_on_two_replicas_leave_one_log_without_gaps() {
    let Some((_schema, _dir, [a, b])) =
        replicas("concurrent_writers_on_two_replicas_leave_one_log_without_gaps").await
    else {
        return;
    };
    let k = key(0);
    let mut paths = Vec::new();
    for i in 0..MACHINES {
        let replica = if i % 2 == 0 { &a } else { &b };
        let identity = format!("did:peaq:{}", 10 + i);
        let body = machine_body(&identity, replica.proof(&identity, &k).await);
        let m: Machine = expect_item(replica.post("/api/v1/machines", &body).await, 201).await;
        paths.push(format!("/api/v1/machines/{}", m.id));
    }
    let writers: Vec<_> = paths
        .iter()
        .enumerate()
        .map(|(i, path)| {
            let (a, b, path) = (Arc::clone(&a), Arc::clone(&b), path.clone());
            tokio::spawn(async move {
                for n in 0..UPDATES {
                    let replica = if (i + n) % 2 == 0 { &a } else { &b };
                    let r = replica
                        .patch(&path, &json!({"displayName": format!("write {n}")}))
                        .await;
                    assert_eq!(r.status(), 200);
                }
            })
        })
        .collect();
    let total = (MACHINES * (1 + UPDATES)) as u64;
    let reader = {
        let (a, b) = (Arc::clone(&a), Arc::clone(&b));
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut after = 0;
            for turn in 0usize.. {
                let page = audit_page(if turn % 2 == 0 { &a } else { &b }, after).await;
                if let Some(last) = page.last() {
                    after = *last;
                }
                seen.extend(page);
                if after >= total {
                    return seen;
                }
            }
            unreachable!()
        })
    };
    for w in writers {
        w.await.unwrap();
    }
    let seen = tokio::time::timeout(TIMEOUT, reader)
        .await
        .expect("the reader reaches the end")
        .unwrap();
    assert_eq!(
        seen,
        (1..=total).collect::<Vec<_>>(),
        "no gap, no duplicate"
    );
    let mut whole = [Vec::new(), Vec::new()];
    for (i, r) in [&a, &b].into_iter().enumerate() {
        let body: Value = r
            .get("/api/v1/audit-events?limit=500")
            .await
            .json()
            .await
            .unwrap();
        whole[i] = body["items"].as_array().unwrap().clone();
    }
    assert_eq!(whole[0], whole[1], "both replicas show one log");
    assert_eq!(whole[0].len() as u64, total);
}

/// One Server-Sent Events stream, read frame by frame.
struct Sse {
    response: reqwest::Response,
    buffer: String,
}

/// An event of the stream: id, type, data.
#[derive(Debug)]
struct SseEvent {
    id: Option<u64>,
    kind: String,
    data: Value,
}

impl Sse {
    async fn open(replica: &Replica, query: &str, last_event_id: Option<u64>) -> Self {
        let mut request = replica
            .client
            .get(format!("{}/api/v1/events{query}", replica.base))
            // The stream outlives the client's default timeout.
            .timeout(std::time::Duration::from_hours(1));
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next event (comments skipped), within the test timeout.
    async fn next(&mut self) -> SseEvent {
        tokio::time::timeout(TIMEOUT, async {
            loop {
                if let Some(end) = self.buffer.find("\n\n") {
                    let frame: String = self.buffer.drain(..end + 2).collect();
                    let mut event = SseEvent {
                        id: None,
                        kind: "message".into(),
                        data: Value::Null,
                    };
                    let mut data = String::new();
                    for line in frame.lines() {
                        if let Some(v) = line.strip_prefix("id:") {
                            event.id = Some(v.trim().parse().unwrap());
                        } else if let Some(v) = line.strip_prefix("event:") {
                            v.trim().clone_into(&mut event.kind);
                        } else if let Some(v) = line.strip_prefix("data:") {
                            data.push_str(v.trim_start());
                        }
                    }
                    if data.is_empty() {
                        continue; // a keep-alive comment
                    }
                    event.data = serde_json::from_str(&data).unwrap();
                    return event;
                }
                let chunk = self
                    .response
                    .chunk()
                    .await
                    .unwrap()
                    .expect("the stream stays open");
                self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
            }
        })
        .await
        .expect("an event arrives")
    }
}

/// A subscriber at one replica sees what is written at the other; after a
/// disconnect it resumes with `Last-Event-ID` at either, without a gap or
/// a duplicate; `cursor` and `machine_id` select where and what.
#[tokio::test]
async fn the_event_stream_follows_the_other_replica_and_resumes_without_loss() {
    let Some((_schema, _dir, [a, b])) =
        replicas("the_event_stream_follows_the_other_replica_and_resumes_without_loss").await
    else {
        return;
    };
    let k = key(0);
    let mut at_b = Sse::open(&b, "", None).await;
    let body = machine_body("did:peaq:30", a.proof("did:peaq:30", &k).await);
    let written = std::time::Instant::now();
    let m: Machine = expect_item(a.post("/api/v1/machines", &body).await, 201).await;
    let created = at_b.next().await;
    eprintln!("written at A, delivered at B after {:?}", written.elapsed());
    assert_eq!(created.kind, "machine.created");
    assert_eq!(created.id, Some(1));
    assert_eq!(created.data["resource_id"], m.id.as_str());
    assert_eq!(created.data["id"], "1");
    let path = format!("/api/v1/machines/{}", m.id);
    for n in 0..5 {
        let r = a
            .patch(&path, &json!({"displayName": format!("a {n}")}))
            .await;
        assert_eq!(r.status(), 200);
    }
    let mut seen = vec![1];
    for _ in 0..3 {
        seen.push(at_b.next().await.id.unwrap());
    }
    drop(at_b);
    // Written while nobody listens, at both replicas.
    for (n, replica) in [&a, &b, &a].into_iter().enumerate() {
        let r = replica
            .patch(&path, &json!({"displayName": format!("b {n}")}))
            .await;
        assert_eq!(r.status(), 200);
    }
    let last = *seen.last().unwrap();
    let mut at_a = Sse::open(&a, "", Some(last)).await;
    for _ in 0..5 {
        let e = at_a.next().await;
        assert_eq!(e.kind, "machine.updated");
        seen.push(e.id.unwrap());
    }
    assert_eq!(seen, (1..=9).collect::<Vec<u64>>(), "no gap, no duplicate");
    // And it goes on live, from a write at the other replica.
    let r = b.patch(&path, &json!({"status": "active"})).await;
    assert_eq!(r.status(), 200);
    let live = at_a.next().await;
    assert_eq!(
        (live.id, live.kind.as_str()),
        (Some(10), "machine.activated")
    );

    // `cursor` in the URL and a machine filter: only that machine's events.
    let other = machine_body("did:peaq:31", b.proof("did:peaq:31", &k).await);
    let o: Machine = expect_item(b.post("/api/v1/machines", &other).await, 201).await;
    let mut only = Sse::open(&b, &format!("?cursor=8&machineId={}", o.id), None).await;
    let e = only.next().await;
    assert_eq!((e.id, e.kind.as_str()), (Some(11), "machine.created"));
    assert_eq!(e.data["resource_id"], o.id.as_str());
    // Bad cursors are refused before the stream starts.
    let r = b.get("/api/v1/events?cursor=x").await;
    expect_error(r, 400, "VALIDATION_ERROR").await;
    // So is one past the head, which is the database's: an id just written
    // at A is a cursor at B before B's own tail has read it (within
    // `stream::POLL`), and one past it is refused at both.
    let r = a.patch(&path, &json!({"displayName": "c"})).await;
    assert_eq!(r.status(), 200);
    let _at_b = Sse::open(&b, "?cursor=12", None).await;
    let audit = b.get("/api/v1/audit-events?cursor=12").await;
    assert_eq!(audit.status(), 200);
    for replica in [&a, &b] {
        for path in ["/api/v1/events?cursor=13", "/api/v1/audit-events?cursor=13"] {
            let e = expect_error(replica.get(path).await, 400, "VALIDATION_ERROR").await;
            assert_eq!(e.error.details.unwrap()["head"], "12", "{path}");
        }
    }
}
