//! The embedded store: one SQLite file (WAL) with migrations compiled into
//! the binary.
//!
//! Writes go through a single connection, so SQLite never has to arbitrate
//! between writers of this process (no `SQLITE_BUSY` under load); the
//! machine writes go through one task on it, which commits those that
//! arrive together in one transaction (`sqlite_writer`: group commit). Reads
//! use a small pool of their own, which WAL lets run beside the writer. An
//! in-memory database (`sqlite::memory:`, for tests) lives as long as its one
//! connection, so it gets exactly one, never closed.
//!
//! The store is the only writer of its file: an exclusive advisory lock on
//! `<file>.lock` keeps a second orchestrator process away. That is what lets
//! it keep recently read machines in memory ([`RowCache`]), so that a read
//! of a machine costs no database round trip.

use std::str::FromStr;
use std::sync::Arc;

use peaqos_protocol::{IdentityRef, Timestamp};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use super::row_cache::RowCache;
use super::rows::{machine_columns, machine_from_row};
use super::sqlite_audit;
use super::sqlite_writer::{Done, Redeem, Write, Writer};
use super::{
    Backend, CloseFuture, Consume, MachineRecord, PageKey, PoolSettings, Store, StoreError,
    StoreFuture, StoredStatus,
};
use crate::audit::{AuditEvent, AuditQuery, NewEvent};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

/// Read connections beside the one writer.
const READERS: u32 = 4;

/// SQLite-backed [`Store`].
#[derive(Debug, Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    rows: Arc<RowCache>,
    /// Machine writes, committed in batches (`sqlite_writer`).
    writes: Arc<Writer>,
    /// Held open (and locked) for as long as the store lives.
    _lock: Option<Arc<std::fs::File>>,
}

/// The keys of a list page, from the index alone: `(created_at, id)` after
/// the cursor.
pub const LIST_KEYS_SQL: &str = "SELECT id FROM machines \
     WHERE status <> 'archived' AND (created_at, id) > (?, ?) \
     ORDER BY created_at, id LIMIT ?";

/// A list page as whole rows.
pub const LIST_ROWS_SQL: &str = concat!(
    "SELECT ",
    machine_columns!(),
    " FROM machines WHERE status <> 'archived' AND (created_at, id) > (?, ?) \
     ORDER BY created_at, id LIMIT ?"
);

/// Pool settings common to all pools. An in-process SQLite connection
/// cannot go stale like a network one, so no ping precedes each use (it
/// would double the round trips to the connection's thread).
fn pool_options(settings: &PoolSettings) -> SqlitePoolOptions {
    SqlitePoolOptions::new()
        .test_before_acquire(false)
        .acquire_timeout(settings.acquire_timeout)
}

/// Takes the exclusive lock beside the database file.
fn lock_file(db: &std::path::Path) -> Result<std::fs::File, StoreError> {
    let mut name = db.as_os_str().to_owned();
    name.push(".lock");
    let path = std::path::PathBuf::from(name);
    let shown = path.display().to_string();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| StoreError::Lock {
            path: shown.clone(),
            source,
        })?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(StoreError::InUse {
            path: db.display().to_string(),
        }),
        Err(e) => Err(StoreError::Lock {
            path: shown,
            source: e.into(),
        }),
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `url` and applies the
    /// embedded migrations, with the default pool settings.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_with(url, &PoolSettings::default()).await
    }

    /// Like [`SqliteStore::open`], with pool settings.
    pub async fn open_with(url: &str, settings: &PoolSettings) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(StoreError::Database)?
            .create_if_missing(true)
            .foreign_keys(true)
            .busy_timeout(settings.statement_timeout);
        if url == "sqlite::memory:" || url.contains("mode=memory") {
            let pool = pool_options(settings)
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
                .connect_with(options)
                .await?;
            MIGRATOR.run(&pool).await.map_err(StoreError::Migrate)?;
            let rows = Arc::default();
            return Ok(Self {
                writes: Arc::new(Writer::spawn(pool.clone(), Arc::clone(&rows))?),
                writer: pool.clone(),
                reader: pool,
                rows,
                _lock: None,
            });
        }
        if let Some(dir) = options.get_filename().parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                path: dir.display().to_string(),
                source,
            })?;
        }
        let lock = lock_file(options.get_filename())?;
        let options = options
            .journal_mode(SqliteJournalMode::Wal)
            // With WAL, NORMAL loses at most the last transactions on power
            // loss, never consistency; FULL would fsync every write.
            .synchronous(SqliteSynchronous::Normal);
        let writer = pool_options(settings)
            .max_connections(1)
            .min_connections(1)
            .connect_with(options.clone())
            .await?;
        MIGRATOR.run(&writer).await.map_err(StoreError::Migrate)?;
        let reader = pool_options(settings)
            .max_connections(READERS)
            .connect_with(options)
            .await?;
        let rows = Arc::default();
        Ok(Self {
            writes: Arc::new(Writer::spawn(writer.clone(), Arc::clone(&rows))?),
            writer,
            reader,
            rows,
            _lock: Some(Arc::new(lock)),
        })
    }

    /// Closes both pools, waiting for checked-out connections.
    pub async fn close(&self) {
        self.reader.close().await;
        self.writer.close().await;
    }
}

fn redeem(c: Consume<'_>) -> Redeem {
    Redeem {
        challenge_id: c.challenge_id.to_owned(),
        expires_at: c.expires_at,
        now: c.now,
    }
}

/// The writer answered a write with another kind's outcome: a bug here.
fn unexpected(done: Done) -> StoreError {
    StoreError::Database(sqlx::Error::Protocol(format!(
        "the writer answered {done:?} to another kind of write"
    )))
}

impl Store for SqliteStore {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            sqlx::query("SELECT 1").execute(&self.reader).await?;
            Ok(())
        })
    }

    fn close(&self) -> CloseFuture<'_> {
        Box::pin(SqliteStore::close(self))
    }

    fn challenge_key(&self, offered: [u8; 32]) -> StoreFuture<'_, [u8; 32]> {
        Box::pin(async move {
            let key: Vec<u8> = sqlx::query_scalar(
                "INSERT INTO challenge_key (only_row, key) VALUES (1, ?) \
                 ON CONFLICT DO UPDATE SET key = key RETURNING key",
            )
            .bind(offered.to_vec())
            .fetch_one(&self.writer)
            .await?;
            key.try_into().map_err(|_| StoreError::Corrupt {
                id: "challenge_key".to_owned(),
                what: "key".to_owned(),
            })
        })
    }

    fn delete_expired_redemptions(&self, before: Timestamp) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            let done = sqlx::query("DELETE FROM redeemed_challenges WHERE expires_at <= ?")
                .bind(before.unix_millis())
                .execute(&self.writer)
                .await?;
            Ok(done.rows_affected())
        })
    }

    fn insert_machine<'a>(
        &'a self,
        m: &'a MachineRecord,
        consume_challenge: Option<Consume<'a>>,
        event: Option<&'a NewEvent>,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let write = Write::Insert {
                machine: m.clone(),
                redeem: consume_challenge.map(redeem),
                event: event.cloned(),
            };
            match self.writes.run(write).await? {
                Done::Inserted => Ok(()),
                other => Err(unexpected(other)),
            }
        })
    }

    fn get_machine<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<MachineRecord>> {
        Box::pin(async move {
            let ticket = match self.rows.get(id) {
                Ok(cached) => return Ok(Some(cached)),
                Err(ticket) => ticket,
            };
            let row = sqlx::query(concat!(
                "SELECT ",
                machine_columns!(),
                " FROM machines WHERE id = ?"
            ))
            .bind(id)
            .fetch_optional(&self.reader)
            .await?;
            let record = row.as_ref().map(machine_from_row).transpose()?;
            if let Some(r) = &record {
                self.rows.fill(ticket, r);
            }
            Ok(record)
        })
    }

    fn live_machine_for<'a>(
        &'a self,
        identity: &'a IdentityRef,
    ) -> StoreFuture<'a, Option<String>> {
        Box::pin(async move {
            Ok(sqlx::query_scalar(
                "SELECT id FROM machines WHERE identity_ref = ? AND status <> 'archived'",
            )
            .bind(identity.canonical())
            .fetch_optional(&self.reader)
            .await?)
        })
    }

    fn update_machine<'a>(
        &'a self,
        m: &'a MachineRecord,
        consume_challenge: Option<Consume<'a>>,
        event: Option<&'a NewEvent>,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let write = Write::Update {
                machine: m.clone(),
                redeem: consume_challenge.map(redeem),
                event: event.cloned(),
            };
            match self.writes.run(write).await? {
                Done::Updated(written) => Ok(written),
                other => Err(unexpected(other)),
            }
        })
    }

    fn archive_machine<'a>(
        &'a self,
        id: &'a str,
        now: Timestamp,
        actor: Option<&'a str>,
    ) -> StoreFuture<'a, Option<bool>> {
        Box::pin(async move {
            let write = Write::Archive {
                id: id.to_owned(),
                now,
                actor: actor.map(str::to_owned),
            };
            match self.writes.run(write).await? {
                Done::Archived(archived) => Ok(archived),
                other => Err(unexpected(other)),
            }
        })
    }

    fn list_audit_events<'a>(&'a self, q: &'a AuditQuery) -> StoreFuture<'a, Vec<AuditEvent>> {
        Box::pin(sqlite_audit::list(&self.reader, q))
    }

    fn audit_head(&self) -> StoreFuture<'_, i64> {
        Box::pin(sqlite_audit::head(&self.reader))
    }

    fn prune_audit_events(&self, before: Timestamp, batch: u32) -> StoreFuture<'_, u64> {
        Box::pin(sqlite_audit::prune(&self.writer, before, batch))
    }

    fn count_by_status(&self) -> StoreFuture<'_, Vec<(String, i64)>> {
        Box::pin(async move {
            Ok(sqlx::query_as(super::COUNT_BY_STATUS_SQL)
                .fetch_all(&self.reader)
                .await?)
        })
    }

    fn list_machines<'a>(
        &'a self,
        after: Option<&'a PageKey>,
        limit: u32,
    ) -> StoreFuture<'a, Vec<MachineRecord>> {
        Box::pin(async move {
            let (created, id) = after.map_or((i64::MIN, ""), |k| (k.created_at_ms, &k.id));
            // The page's keys come from the index alone; the records, from
            // the row cache where it has them.
            let keys: Vec<String> = sqlx::query_scalar(LIST_KEYS_SQL)
                .bind(created)
                .bind(id)
                .bind(i64::from(limit))
                .fetch_all(&self.reader)
                .await?;
            let mut records = Vec::with_capacity(keys.len());
            let mut missing = Vec::new();
            for (i, key) in keys.iter().enumerate() {
                let cached = self.rows.get(key).ok();
                if cached.is_none() {
                    missing.push(i);
                }
                records.push(cached);
            }
            if missing.len() > LIST_SINGLE_READS {
                return self.list_rows(created, id, limit).await;
            }
            for i in missing {
                records[i] = self.get_machine(&keys[i]).await?;
            }
            // Archived since the keys were read: no longer listed.
            Ok(records
                .into_iter()
                .flatten()
                .filter(|r| r.status != StoredStatus::Archived)
                .collect())
        })
    }
}

/// A list page with more uncached records than this reads whole rows in
/// one query instead of one query per record.
const LIST_SINGLE_READS: usize = 16;

impl SqliteStore {
    /// A list page read as whole rows, filling the row cache.
    async fn list_rows(
        &self,
        created: i64,
        id: &str,
        limit: u32,
    ) -> Result<Vec<MachineRecord>, StoreError> {
        let ticket = self.rows.ticket();
        let rows = sqlx::query(LIST_ROWS_SQL)
            .bind(created)
            .bind(id)
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?;
        let records = rows
            .iter()
            .map(machine_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        for r in &records {
            self.rows.fill(ticket, r);
        }
        Ok(records)
    }
}

/// What only the SQLite store has: the lock file and the row cache. The
/// behaviour every store shares is tested on every database by
/// `tests/store`.
#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::audit::EventType;

    fn ts(ms: i64) -> Timestamp {
        Timestamp::from_unix_millis(ms).unwrap()
    }

    fn machine(id: &str, identity: &str, created_ms: i64) -> MachineRecord {
        MachineRecord {
            id: id.into(),
            identity: IdentityRef::parse(identity).unwrap(),
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

    #[tokio::test]
    async fn one_process_per_database_file() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/o.db", dir.path().display());
        let first = SqliteStore::open(&url).await.unwrap();
        assert!(matches!(
            SqliteStore::open(&url).await,
            Err(StoreError::InUse { .. })
        ));
        first.close().await;
        drop(first);
        SqliteStore::open(&url).await.unwrap();
    }

    #[tokio::test]
    async fn data_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/o.db", dir.path().display());
        let store = SqliteStore::open(&url).await.unwrap();
        let all: Vec<MachineRecord> = (0..40)
            .map(|i| machine(&format!("mach_{i:02}"), &format!("did:peaq:{i}"), 1))
            .collect();
        for m in &all {
            store.insert_machine(m, None, None).await.unwrap();
        }
        store.close().await;
        drop(store);
        let store = SqliteStore::open(&url).await.unwrap();
        assert_eq!(
            store.get_machine("mach_00").await.unwrap().as_ref(),
            Some(&all[0])
        );
        // Cold (whole rows), then warm (keys plus cached rows): the same page.
        assert_eq!(store.list_machines(None, 100).await.unwrap(), all);
        assert_eq!(store.list_machines(None, 100).await.unwrap(), all);
        store.archive_machine("mach_05", ts(2), None).await.unwrap();
        assert_eq!(store.list_machines(None, 100).await.unwrap().len(), 39);
    }

    fn event(kind: EventType, machine: &str) -> NewEvent {
        NewEvent {
            actor: "fleet-a".into(),
            kind,
            resource_id: machine.into(),
            payload: serde_json::json!({"n": 1}),
            created_at: ts(5),
        }
    }

    #[allow(clippy::unnecessary_wraps, reason = "the store methods take an Option")]
    fn redeem(id: &str) -> Option<Consume<'_>> {
        Some(Consume {
            challenge_id: id,
            expires_at: ts(9_000_000),
            now: ts(1_000),
        })
    }

    type Outcome = Result<String, StoreError>;
    type Pending = std::pin::Pin<Box<dyn Future<Output = Outcome> + Send>>;

    /// `m` written with an update event, redeeming `challenge`: its id if
    /// written, `written false` if the machine was not there.
    fn update_with_event(store: &Arc<SqliteStore>, m: MachineRecord, challenge: &str) -> Pending {
        let (store, challenge) = (Arc::clone(store), challenge.to_owned());
        Box::pin(async move {
            let e = event(EventType::Updated, &m.id);
            let written = store
                .update_machine(&m, redeem(&challenge), Some(&e))
                .await?;
            Ok(if written {
                m.id
            } else {
                "written false".into()
            })
        })
    }

    /// `m` created with its event, redeeming `challenge`: its id.
    fn insert_with_event(store: &Arc<SqliteStore>, m: MachineRecord, challenge: &str) -> Pending {
        let (store, challenge) = (Arc::clone(store), challenge.to_owned());
        Box::pin(async move {
            let e = event(EventType::Created, &m.id);
            store
                .insert_machine(&m, redeem(&challenge), Some(&e))
                .await?;
            Ok(m.id)
        })
    }

    /// Runs `writes` concurrently and makes them one batch: the writer is
    /// kept from its connection until every write is queued. Asserts that
    /// they committed together, once.
    async fn in_one_batch(store: &SqliteStore, writes: Vec<Pending>) -> Vec<Outcome> {
        assert!(writes.len() <= crate::store::sqlite_writer::MAX_BATCH);
        let held = store.writer.acquire().await.unwrap();
        let before = store.writes.commits();
        let sent = store.writes.sent() + writes.len() as u64;
        let tasks: Vec<_> = writes.into_iter().map(tokio::spawn).collect();
        // The writer takes what it finds and then waits for the connection;
        // what arrives meanwhile joins that batch.
        // (None finishes before the connection is free, unless it failed.)
        while store.writes.sent() < sent && !tasks.iter().any(tokio::task::JoinHandle::is_finished)
        {
            tokio::task::yield_now().await;
        }
        drop(held);
        let mut outcomes = Vec::new();
        for t in tasks {
            outcomes.push(t.await.unwrap());
        }
        assert_eq!(store.writes.commits(), before + 1, "one commit for all");
        outcomes
    }

    async fn file_store() -> (tempfile::TempDir, String, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/o.db", dir.path().display());
        let store = SqliteStore::open(&url).await.unwrap();
        (dir, url, store)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redemptions_of_one_challenge_in_one_batch_have_one_winner() {
        let (_dir, url, store) = file_store().await;
        let store = Arc::new(store);
        let m = machine("mach_a", "did:peaq:1", 1);
        store.insert_machine(&m, None, None).await.unwrap();
        let writes = (0..32)
            .map(|i| {
                let store = Arc::clone(&store);
                let mut m = m.clone();
                m.display_name = format!("writer {i}");
                let write: Pending = Box::pin(async move {
                    let e = event(EventType::Updated, "mach_a");
                    match store.update_machine(&m, redeem("chl_one"), Some(&e)).await {
                        Ok(true) => Ok(m.display_name),
                        Ok(false) => panic!("the machine is there"),
                        Err(e) => Err(e),
                    }
                });
                write
            })
            .collect();
        let outcomes = in_one_batch(&store, writes).await;
        let winners: Vec<&String> = outcomes.iter().filter_map(|o| o.as_ref().ok()).collect();
        assert_eq!(winners.len(), 1, "{outcomes:?}");
        for o in &outcomes {
            assert!(matches!(o, Ok(_) | Err(StoreError::ChallengeGone)), "{o:?}");
        }
        // What is committed, read by another process's eyes (no cache).
        store.close().await;
        drop(store);
        let store = SqliteStore::open(&url).await.unwrap();
        let stored = store.get_machine("mach_a").await.unwrap().unwrap();
        assert_eq!(&stored.display_name, winners[0]);
        let events = store
            .list_audit_events(&AuditQuery {
                machine_id: None,
                resource_type: None,
                after: 0,
                limit: 100,
            })
            .await
            .unwrap();
        assert_eq!(events.len(), 1, "one event, the winner's");
        assert_eq!(store.audit_head().await.unwrap(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[allow(
        clippy::too_many_lines,
        reason = "one batch: each kind of refusal beside the writes that succeed"
    )]
    async fn a_refused_write_in_a_batch_leaves_the_others_and_writes_nothing() {
        let (_dir, url, store) = file_store().await;
        let store = Arc::new(store);
        for i in 0..9 {
            let m = machine(&format!("mach_{i}"), &format!("did:peaq:{i}"), 1);
            store.insert_machine(&m, None, None).await.unwrap();
        }
        store
            .update_machine(
                &machine("mach_0", "did:peaq:0", 1),
                redeem("chl_used"),
                None,
            )
            .await
            .unwrap();
        let head = store.audit_head().await.unwrap();
        let mut writes: Vec<Pending> = Vec::new();
        // Writes that succeed: updates of mach_1..mach_7, each with its own
        // challenge, a create and an archive of mach_8, all with events.
        for i in 1..8 {
            let mut m = machine(&format!("mach_{i}"), &format!("did:peaq:{i}"), 1);
            m.display_name = "renamed".into();
            writes.push(update_with_event(&store, m, &format!("chl_{i}")));
        }
        let new = machine("mach_new", "did:peaq:100", 2);
        writes.push(insert_with_event(&store, new, "chl_new"));
        let s = Arc::clone(&store);
        writes.push(Box::pin(async move {
            s.archive_machine("mach_8", ts(9), Some("fleet-a"))
                .await
                .map(|a| format!("archived {a:?}"))
        }));
        // Refusals: a redeemed challenge, a machine that is not there, an
        // identity already live (with a fresh challenge each).
        let used = machine("mach_0", "did:peaq:0", 1);
        writes.push(update_with_event(&store, used, "chl_used"));
        let gone = machine("mach_gone", "did:peaq:101", 1);
        writes.push(update_with_event(&store, gone, "chl_gone"));
        let twin = machine("mach_twin", "did:peaq:3", 1);
        writes.push(insert_with_event(&store, twin, "chl_twin"));
        let outcomes = in_one_batch(&store, writes).await;
        for (i, o) in outcomes[..7].iter().enumerate() {
            assert_eq!(o.as_ref().unwrap(), &format!("mach_{}", i + 1));
        }
        assert_eq!(outcomes[7].as_ref().unwrap(), "mach_new");
        assert_eq!(outcomes[8].as_ref().unwrap(), "archived Some(true)");
        assert!(matches!(outcomes[9], Err(StoreError::ChallengeGone)));
        assert_eq!(outcomes[10].as_ref().unwrap(), "written false");
        assert!(matches!(
            &outcomes[11],
            Err(StoreError::IdentityTaken { machine_id }) if machine_id == "mach_3"
        ));

        store.close().await;
        drop(store);
        let store = SqliteStore::open(&url).await.unwrap();
        for i in 1..8 {
            let m = store
                .get_machine(&format!("mach_{i}"))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(m.display_name, "renamed", "mach_{i}");
        }
        let archived = store.get_machine("mach_8").await.unwrap().unwrap();
        assert_eq!(archived.status, StoredStatus::Archived);
        assert!(store.get_machine("mach_new").await.unwrap().is_some());
        assert!(store.get_machine("mach_twin").await.unwrap().is_none());
        assert!(store.get_machine("mach_gone").await.unwrap().is_none());
        assert_eq!(
            store
                .get_machine("mach_0")
                .await
                .unwrap()
                .unwrap()
                .display_name,
            "Robot"
        );
        // One event per write that succeeded, numbered without a gap.
        let events = store
            .list_audit_events(&AuditQuery {
                machine_id: None,
                resource_type: None,
                after: 0,
                limit: 100,
            })
            .await
            .unwrap();
        let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
        assert_eq!(ids, ((head + 1)..=(head + 9)).collect::<Vec<_>>());
        assert_eq!(store.audit_head().await.unwrap(), head + 9);
        let mut named: Vec<&str> = events.iter().map(|e| e.resource_id.as_str()).collect();
        named.sort_unstable();
        assert_eq!(
            named,
            [
                "mach_1", "mach_2", "mach_3", "mach_4", "mach_5", "mach_6", "mach_7", "mach_8",
                "mach_new"
            ]
        );
        // The refused writes burnt none of their challenges.
        let m0 = machine("mach_0", "did:peaq:0", 1);
        for chl in ["chl_gone", "chl_twin"] {
            assert!(
                store.update_machine(&m0, redeem(chl), None).await.unwrap(),
                "{chl}"
            );
        }
        assert!(matches!(
            store.update_machine(&m0, redeem("chl_new"), None).await,
            Err(StoreError::ChallengeGone)
        ));
    }
}
