//! One test suite for every store: SQLite in memory, SQLite in a file, and
//! PostgreSQL (a fresh schema per test) when one is reachable. Then what
//! only one of them has: index use of list pages, and PostgreSQL's
//! migrations under concurrent start-up, timeouts and pool limits.

#[path = "../common/pg.rs"]
mod pg;

mod audit;
mod explain;
mod postgres;
mod suite;

use std::collections::BTreeMap;
use std::sync::Arc;

use peaqos_orchestrator::store::{
    Consume, MachineRecord, PoolSettings, PostgresStore, SqliteStore, Store, StoredStatus,
};
use peaqos_protocol::{IdentityRef, Timestamp};

use crate::pg::PgSchema;

/// A store under test, and what keeps its database alive.
pub(crate) struct Db {
    pub(crate) name: &'static str,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) kind: Kind,
}

pub(crate) enum Kind {
    SqliteMemory,
    SqliteFile {
        url: String,
        _dir: tempfile::TempDir,
    },
    Postgres {
        store: PostgresStore,
        schema: PgSchema,
    },
}

/// Every database this machine has, each fresh.
pub(crate) async fn databases(test: &str) -> Vec<Db> {
    let mut out = vec![sqlite_memory().await, sqlite_file().await];
    if let Some(db) = postgres(test, &PoolSettings::default()).await {
        out.push(db);
    }
    out
}

pub(crate) async fn sqlite_memory() -> Db {
    Db {
        name: "sqlite memory",
        store: Arc::new(SqliteStore::open("sqlite::memory:").await.unwrap()),
        kind: Kind::SqliteMemory,
    }
}

pub(crate) async fn sqlite_file() -> Db {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/state/o.db", dir.path().display());
    Db {
        name: "sqlite file",
        store: Arc::new(SqliteStore::open(&url).await.unwrap()),
        kind: Kind::SqliteFile { url, _dir: dir },
    }
}

pub(crate) async fn postgres(test: &str, settings: &PoolSettings) -> Option<Db> {
    let schema = PgSchema::create(test).await?;
    let store = PostgresStore::open(&schema.url, settings).await.unwrap();
    Some(Db {
        name: "postgres",
        store: Arc::new(store.clone()),
        kind: Kind::Postgres { store, schema },
    })
}

pub(crate) fn ts(ms: i64) -> Timestamp {
    Timestamp::from_unix_millis(ms).unwrap()
}

pub(crate) fn identity(text: &str) -> IdentityRef {
    IdentityRef::parse(text).unwrap()
}

/// What a write that carries a proof redeems: challenge `id`, expiring at
/// `expires_ms`, at `now_ms`.
#[allow(clippy::unnecessary_wraps, reason = "the store methods take an Option")]
pub(crate) fn consume(id: &str, expires_ms: i64, now_ms: i64) -> Option<Consume<'_>> {
    Some(Consume {
        challenge_id: id,
        expires_at: ts(expires_ms),
        now: ts(now_ms),
    })
}

pub(crate) fn machine(id: &str, identity: &str, created_ms: i64) -> MachineRecord {
    MachineRecord {
        id: id.into(),
        identity: crate::identity(identity),
        status: StoredStatus::Draft,
        display_name: "Robot".into(),
        owner_id: "owner".into(),
        machine_type: "amr".into(),
        runtime_profile: "ros2".into(),
        capabilities: vec!["lidar".into()],
        labels: BTreeMap::from([("site".into(), "berlin".into())]),
        policy_ids: vec![],
        skill_keys: vec!["nav".into()],
        proof: None,
        created_at: ts(created_ms),
        updated_at: ts(created_ms),
    }
}
