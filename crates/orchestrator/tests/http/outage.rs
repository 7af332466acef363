//! The database goes away and comes back: requests fail fast with a clean
//! `503 SERVICE_UNAVAILABLE` and `Retry-After`, readiness says so, and the
//! server recovers by itself. The orchestrator reaches PostgreSQL through a
//! TCP proxy this test cuts and restores (the machine's PostgreSQL server
//! keeps running).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use peaqos_protocol::Machine;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use peaqos_orchestrator::store::pg_changes::FRESH_FOR;

use crate::pg::PgSchema;
use crate::support::{TIMEOUT, TestServer, expect_error, expect_item, key, machine_body};

/// A TCP forwarder on 127.0.0.1 that can be cut (its port refuses
/// connections and every forwarded connection is closed) and restored on
/// the same port.
struct Proxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    running: Mutex<Option<(JoinHandle<()>, CancellationToken)>>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Arc<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Arc::new(Self {
            addr: listener.local_addr().unwrap(),
            upstream,
            running: Mutex::new(None),
        });
        proxy.serve(listener);
        proxy
    }

    fn serve(&self, listener: TcpListener) {
        let upstream = self.upstream;
        let connections = CancellationToken::new();
        let token = connections.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let token = token.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        () = token.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
        *self.running.lock().unwrap() = Some((accept, connections));
    }

    /// The database "goes away": new connections are refused, open ones
    /// are closed.
    fn cut(&self) {
        if let Some((accept, connections)) = self.running.lock().unwrap().take() {
            accept.abort();
            connections.cancel();
        }
    }

    /// The database is back, on the same address.
    async fn restore(&self) {
        let deadline = Instant::now() + TIMEOUT;
        let listener = loop {
            // The aborted accept task drops its listener asynchronously.
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "cannot rebind {}: {e}",
                        self.addr
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        self.serve(listener);
    }
}

/// A 503 from the database path: code, `Retry-After`, and a message that
/// says nothing about the database's address, driver or error.
async fn expect_database_unavailable(r: reqwest::Response, proxy: &Proxy) {
    assert!(r.headers().contains_key("retry-after"), "{:?}", r.headers());
    let body = expect_error(r, 503, "SERVICE_UNAVAILABLE").await;
    let message = body.error.message.to_lowercase();
    for internal in [
        "sqlx",
        "pool",
        "postgres",
        "refused",
        "127.0.0.1",
        &proxy.addr.port().to_string(),
    ] {
        assert!(!message.contains(internal), "{message}");
    }
    assert!(body.error.details.is_none(), "{:?}", body.error.details);
}

#[tokio::test]
async fn a_database_outage_answers_503_and_the_server_recovers_by_itself() {
    let test = "a_database_outage_answers_503_and_the_server_recovers_by_itself";
    let Some(schema) = PgSchema::create(test).await else {
        return;
    };
    let proxy = Proxy::start(schema.addr()).await;
    let url = schema.url_via(proxy.addr);
    let s = Arc::new(
        TestServer::start(move |c| {
            c.database_url = url;
            c.db_acquire_timeout = Duration::from_millis(200);
            c.db_statement_timeout = Duration::from_secs(2);
            c.request_timeout = Duration::from_secs(10);
        })
        .await,
    );
    let k = key(0);
    let m = s.create_active("did:peaq:1", &k).await;
    let path = format!("/api/v1/machines/{}", m.id);
    let proof = s.proof("did:peaq:2", &key(1)).await;
    // Several connections in the pool, all in use a moment ago.
    let reads: Vec<_> = (0..6)
        .map(|_| {
            let (s, path) = (Arc::clone(&s), path.clone());
            tokio::spawn(async move { s.get(&path).await.status() })
        })
        .collect();
    for r in reads {
        assert_eq!(r.await.unwrap(), 200);
    }

    proxy.cut();
    until_not_from_memory(&s, &path, "cut").await;
    // Pooled connections now fail on use, new ones are refused: either way
    // a quick 503, never a 500 or a hang.
    for _ in 0..8 {
        let started = Instant::now();
        expect_database_unavailable(s.get(&path).await, &proxy).await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }
    let r = s
        .post(
            "/api/v1/machine-identity/challenges",
            &json!({"identityRef": "did:peaq:3"}),
        )
        .await;
    assert_eq!(r.status(), 201, "issuing a challenge needs no database");
    let create = machine_body("did:peaq:2", proof.clone());
    expect_database_unavailable(s.post("/api/v1/machines", &create).await, &proxy).await;
    expect_database_unavailable(s.get("/api/v1/machines").await, &proxy).await;
    let r = s.get("/ready").await;
    let not_ready = expect_error(r, 503, "SERVICE_UNAVAILABLE").await;
    assert_eq!(not_ready.error.details.unwrap()["store"], "unavailable");
    let readiness: Value = s.get("/api/v1/readiness").await.json().await.unwrap();
    assert_eq!(readiness["status"], "not_ready");
    assert_eq!(
        readiness["checks"][0],
        json!({"name": "store", "status": "fail", "message": "unavailable"})
    );
    assert_eq!(s.get("/health").await.status(), 200, "alive all the same");

    proxy.restore().await;
    let deadline = Instant::now() + TIMEOUT;
    while s.get("/ready").await.status() != 200 {
        assert!(Instant::now() < deadline, "readiness did not come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let again: Machine = expect_item(s.get(&path).await, 200).await;
    assert_eq!(again.id, m.id);
    // The refused create wrote nothing and burnt nothing: its proof works now.
    let created: Value = expect_item(s.post("/api/v1/machines", &create).await, 201).await;
    assert_eq!(created["identityRef"], "did:peaq:2");
    let metrics = s.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(r#"route="/api/v1/machines/{machineId}",status="503""#),
        "{metrics}"
    );
}

/// Reads `path` until the record no longer comes from memory: one this
/// replica read or wrote may be served from its row cache for up to
/// `FRESH_FOR` after the database stopped answering, never longer.
async fn until_not_from_memory(s: &TestServer, path: &str, what: &str) {
    let lost = Instant::now();
    while s.get(path).await.status() == 200 {
        assert!(
            lost.elapsed() < FRESH_FOR + Duration::from_secs(1),
            "{what}: still read from memory past the bound"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Statements run as the superuser of the test database.
async fn admin(schema: &PgSchema, statements: &[String]) {
    use sqlx::Executor as _;
    let mut conn = schema.connect().await;
    for sql in statements {
        conn.execute(sqlx::AssertSqlSafe(sql.clone()))
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

/// Every request that needs the database answers `503` with the envelope
/// and `Retry-After` (never `500`), and `/ready` says not ready. (Issuing a
/// challenge needs none: `tests/http/outage.rs`'s outage test.)
async fn expect_refused_use(s: &TestServer, path: &str, what: &str) {
    until_not_from_memory(s, path, what).await;
    for _ in 0..3 {
        for r in [
            s.get(path).await,
            s.get("/api/v1/machines").await,
            s.get("/api/v1/audit-events").await,
        ] {
            assert!(r.headers().contains_key("retry-after"), "{what}: {r:?}");
            let body = expect_error(r, 503, "SERVICE_UNAVAILABLE").await;
            assert!(!body.error.message.contains("permission"), "{what}");
        }
    }
    let r = s.get("/ready").await;
    let not_ready = expect_error(r, 503, "SERVICE_UNAVAILABLE").await;
    assert_eq!(
        not_ready.error.details.unwrap()["store"],
        "unavailable",
        "{what}"
    );
    let readiness: Value = s.get("/api/v1/readiness").await.json().await.unwrap();
    assert_eq!(readiness["status"], "not_ready", "{what}");
}

async fn wait_ready(s: &TestServer, what: &str) {
    let deadline = Instant::now() + TIMEOUT;
    while s.get("/ready").await.status() != 200 {
        assert!(
            Instant::now() < deadline,
            "{what}: readiness did not come back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The database answers but refuses this role: its grants revoked, the
/// schema's USAGE revoked, or the role refused at login (`NOLOGIN`). Each
/// is `503`, never `500`, readiness checks the privileges requests need
/// (not `SELECT 1`), and the server recovers once the grant is back.
#[tokio::test]
async fn a_role_refused_its_privileges_or_its_login_answers_503_and_is_not_ready() {
    let test = "a_role_refused_its_privileges_or_its_login_answers_503_and_is_not_ready";
    let Some(schema) = PgSchema::create(test).await else {
        return;
    };
    let (name, role) = (schema.name.clone(), format!("{}_role", schema.name));
    admin(
        &schema,
        &[
            format!("CREATE ROLE {role} LOGIN"),
            format!("GRANT ALL ON SCHEMA {name} TO {role}"),
        ],
    )
    .await;
    let mut url = reqwest::Url::parse(&schema.url).unwrap();
    url.set_username(&role).unwrap();
    let url = url.to_string();
    let s = TestServer::start(move |c| {
        c.database_url = url;
        c.db_acquire_timeout = Duration::from_millis(500);
        c.request_timeout = Duration::from_secs(10);
    })
    .await;
    let m = s.create_active("did:peaq:1", &key(0)).await;
    let path = format!("/api/v1/machines/{}", m.id);
    assert_eq!(s.get("/ready").await.status(), 200);

    let cases = [
        (
            "table grants revoked",
            format!("REVOKE ALL ON ALL TABLES IN SCHEMA {name} FROM {role}"),
            format!("GRANT ALL ON ALL TABLES IN SCHEMA {name} TO {role}"),
        ),
        (
            "one write privilege revoked",
            format!("REVOKE INSERT ON audit_events FROM {role}"),
            format!("GRANT INSERT ON audit_events TO {role}"),
        ),
        (
            "schema usage revoked",
            format!("REVOKE USAGE ON SCHEMA {name} FROM {role}"),
            format!("GRANT USAGE ON SCHEMA {name} TO {role}"),
        ),
    ];
    for (what, revoke, grant) in cases {
        admin(&schema, &[format!("SET search_path = {name}"), revoke]).await;
        if what == "one write privilege revoked" {
            // Reads still work; readiness fails on what writes need.
            assert_eq!(s.get(&path).await.status(), 200, "{what}");
            let r = s.get("/ready").await;
            expect_error(r, 503, "SERVICE_UNAVAILABLE").await;
        } else {
            expect_refused_use(&s, &path, what).await;
        }
        admin(&schema, &[format!("SET search_path = {name}"), grant]).await;
        wait_ready(&s, what).await;
        assert_eq!(s.get(&path).await.status(), 200, "{what}: back");
    }

    // Refused at login: the pool's connections are cut, new ones refused.
    admin(
        &schema,
        &[
            format!("ALTER ROLE {role} NOLOGIN"),
            format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"
            ),
        ],
    )
    .await;
    expect_refused_use(&s, &path, "NOLOGIN").await;
    admin(&schema, &[format!("ALTER ROLE {role} LOGIN")]).await;
    wait_ready(&s, "LOGIN again").await;
    assert_eq!(s.get(&path).await.status(), 200);
    drop(s);
    drop(schema);
    // The schema's objects went with it; the role is ours to drop.
    if let Some(base) = peaqos_testkit::postgres_url(test) {
        use sqlx::{Connection as _, Executor as _};
        let mut conn = sqlx::PgConnection::connect(&base).await.unwrap();
        let _ = conn
            .execute(sqlx::AssertSqlSafe(format!("DROP ROLE IF EXISTS {role}")))
            .await;
    }
}
