//! A fresh PostgreSQL schema for one test: created empty, named in the
//! connection URL's `search_path` (so the orchestrator's migrations build
//! their tables there), dropped with everything in it when the guard goes
//! out of scope, also when the test panics.
//!
//! Shared by the test binaries that need PostgreSQL (`#[path]` module).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::{AssertSqlSafe, Connection as _, Executor as _, PgConnection};

/// Schemas of runs that were killed before they could clean up are dropped
/// by a later run once they are this old.
const STALE_AFTER: Duration = Duration::from_hours(6);
const PREFIX: &str = "test_";

#[derive(Debug)]
pub(crate) struct PgSchema {
    /// The database URL with this schema as `search_path`.
    pub(crate) url: String,
    pub(crate) name: String,
    base: String,
}

impl PgSchema {
    /// `None`, with one skip line, when no PostgreSQL is reachable (a
    /// failure instead when `PEAQOS_TEST_REQUIRE` includes `postgres`).
    pub(crate) async fn create(test: &str) -> Option<Self> {
        let base = peaqos_testkit::postgres_url(test)?;
        let mut conn = PgConnection::connect(&base)
            .await
            .unwrap_or_else(|e| panic!("{test}: cannot connect to PostgreSQL at {base}: {e}"));
        sweep_stale(&mut conn).await;
        let mut random = [0u8; 6];
        getrandom::fill(&mut random).unwrap();
        let name = format!("{PREFIX}{}_{}", unix_secs(), hex::encode(random));
        conn.execute(AssertSqlSafe(format!("CREATE SCHEMA {name}")))
            .await
            .unwrap();
        let _ = conn.close().await;
        let separator = if base.contains('?') { '&' } else { '?' };
        Some(Self {
            url: format!("{base}{separator}options[search_path]={name}"),
            name,
            base,
        })
    }

    /// Where the server listens.
    #[allow(dead_code, reason = "used by some test binaries only")]
    pub(crate) fn addr(&self) -> std::net::SocketAddr {
        let url = reqwest::Url::parse(&self.url).unwrap();
        let host = url.host_str().unwrap_or("127.0.0.1");
        let port = url.port().unwrap_or(5432);
        std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
            .unwrap()
            .next()
            .unwrap()
    }

    /// A URL like [`PgSchema::url`] through another address (a proxy).
    #[allow(dead_code, reason = "used by some test binaries only")]
    pub(crate) fn url_via(&self, addr: std::net::SocketAddr) -> String {
        let mut url = reqwest::Url::parse(&self.url).unwrap();
        url.set_ip_host(addr.ip()).unwrap();
        url.set_port(Some(addr.port())).unwrap();
        url.to_string()
    }

    /// A plain connection to the schema.
    #[allow(dead_code, reason = "used by some test binaries only")]
    pub(crate) async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url).await.unwrap()
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let (base, name) = (self.base.clone(), self.name.clone());
        // Drop may run inside a test's runtime, or while it unwinds: a
        // thread and a runtime of its own, waited for.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let mut conn = PgConnection::connect(&base).await?;
                conn.execute(AssertSqlSafe(format!(
                    "DROP SCHEMA IF EXISTS {name} CASCADE"
                )))
                .await?;
                conn.close().await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test schema {}: {dropped:?}", self.name);
        }
    }
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Drops `test_<unix seconds>_<hex>` schemas older than [`STALE_AFTER`].
async fn sweep_stale(conn: &mut PgConnection) {
    let names: Vec<String> =
        sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'test\\_%'")
            .fetch_all(&mut *conn)
            .await
            .unwrap_or_default();
    let now = unix_secs();
    for name in names {
        let created = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split_once('_'))
            .filter(|(_, random)| {
                random.len() == 12 && random.bytes().all(|b| b.is_ascii_hexdigit())
            })
            .and_then(|(secs, _)| secs.parse::<u64>().ok());
        if created.is_some_and(|t| now.saturating_sub(t) > STALE_AFTER.as_secs()) {
            let _ = conn
                .execute(AssertSqlSafe(format!(
                    "DROP SCHEMA IF EXISTS {name} CASCADE"
                )))
                .await;
        }
    }
}
