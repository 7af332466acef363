//! The embedded store: one SQLite file (WAL) with migrations compiled into
//! the binary.
//!
//! Writes go through a single connection, so SQLite never has to arbitrate
//! between writers of this process (no `SQLITE_BUSY` under load); reads use a
//! small pool of their own, which WAL lets run beside the writer. An
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
use sqlx::{Sqlite, Transaction};

use super::row_cache::RowCache;
use super::rows::{machine_columns, machine_from_row, proof_json, to_json};
use super::sqlite_audit;
use super::{
    Backend, CloseFuture, Consume, MachineRecord, PageKey, PoolSettings, Store, StoreError,
    StoreFuture, StoredStatus,
};
use crate::audit::{self, AuditEvent, AuditQuery, EventType, NewEvent};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

/// Read connections beside the one writer.
const READERS: u32 = 4;

/// SQLite-backed [`Store`].
#[derive(Debug, Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    rows: Arc<RowCache>,
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
            return Ok(Self {
                writer: pool.clone(),
                reader: pool,
                rows: Arc::default(),
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
        Ok(Self {
            writer,
            reader,
            rows: Arc::default(),
            _lock: Some(Arc::new(lock)),
        })
    }

    /// Closes both pools, waiting for checked-out connections.
    pub async fn close(&self) {
        self.reader.close().await;
        self.writer.close().await;
    }
}

async fn consume(
    tx: &mut Transaction<'static, Sqlite>,
    consume: Option<Consume<'_>>,
) -> Result<(), StoreError> {
    let Some(c) = consume else { return Ok(()) };
    let done = sqlx::query(
        "INSERT INTO redeemed_challenges (id, expires_at) SELECT ?1, ?2 WHERE ?2 > ?3 \
         ON CONFLICT DO NOTHING",
    )
    .bind(c.challenge_id)
    .bind(c.expires_at.unix_millis())
    .bind(c.now.unix_millis())
    .execute(&mut **tx)
    .await?;
    if done.rows_affected() == 1 {
        Ok(())
    } else {
        Err(StoreError::ChallengeGone)
    }
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
            let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
            consume(&mut tx, consume_challenge).await?;
            let inserted = sqlx::query(
                "INSERT INTO machines (id, identity_ref, status, display_name, owner_id, \
                 machine_type, runtime_profile, capabilities, labels, policy_ids, skill_keys, \
                 proof, created_at, updated_at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&m.id)
            .bind(m.identity.canonical())
            .bind(m.status.as_str())
            .bind(&m.display_name)
            .bind(&m.owner_id)
            .bind(&m.machine_type)
            .bind(&m.runtime_profile)
            .bind(to_json(&m.capabilities))
            .bind(to_json(&m.labels))
            .bind(to_json(&m.policy_ids))
            .bind(to_json(&m.skill_keys))
            .bind(m.proof.as_ref().map(proof_json))
            .bind(m.created_at.unix_millis())
            .bind(m.updated_at.unix_millis())
            .execute(&mut *tx)
            .await;
            match inserted {
                Ok(_) => {}
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                    let existing: Option<String> = sqlx::query_scalar(
                        "SELECT id FROM machines WHERE identity_ref = ? AND status <> 'archived'",
                    )
                    .bind(m.identity.canonical())
                    .fetch_optional(&mut *tx)
                    .await?;
                    return Err(StoreError::IdentityTaken {
                        machine_id: existing.unwrap_or_default(),
                    });
                }
                Err(e) => return Err(e.into()),
            }
            if let Some(e) = event {
                sqlite_audit::record(&mut tx, e).await?;
            }
            tx.commit().await?;
            self.rows.written(m);
            Ok(())
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
            let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
            consume(&mut tx, consume_challenge).await?;
            let done = sqlx::query(
                "UPDATE machines SET status = ?, display_name = ?, owner_id = ?, \
                 machine_type = ?, runtime_profile = ?, capabilities = ?, labels = ?, \
                 policy_ids = ?, skill_keys = ?, proof = ?, updated_at = ? \
                 WHERE id = ? AND status <> 'archived'",
            )
            .bind(m.status.as_str())
            .bind(&m.display_name)
            .bind(&m.owner_id)
            .bind(&m.machine_type)
            .bind(&m.runtime_profile)
            .bind(to_json(&m.capabilities))
            .bind(to_json(&m.labels))
            .bind(to_json(&m.policy_ids))
            .bind(to_json(&m.skill_keys))
            .bind(m.proof.as_ref().map(proof_json))
            .bind(m.updated_at.unix_millis())
            .bind(&m.id)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() == 0 {
                // Dropping the transaction rolls back the redemption.
                return Ok(false);
            }
            if let Some(e) = event {
                sqlite_audit::record(&mut tx, e).await?;
            }
            tx.commit().await?;
            self.rows.written(m);
            Ok(true)
        })
    }

    fn archive_machine<'a>(
        &'a self,
        id: &'a str,
        now: Timestamp,
        actor: Option<&'a str>,
    ) -> StoreFuture<'a, Option<bool>> {
        Box::pin(async move {
            let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
            let old: Option<String> =
                sqlx::query_scalar("SELECT status FROM machines WHERE id = ?")
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?;
            let Some(old) = old else { return Ok(None) };
            let old = StoredStatus::parse(&old).ok_or_else(|| StoreError::Corrupt {
                id: id.to_owned(),
                what: "status".to_owned(),
            })?;
            if old == StoredStatus::Archived {
                return Ok(Some(false));
            }
            sqlx::query("UPDATE machines SET status = 'archived', updated_at = ? WHERE id = ?")
                .bind(now.unix_millis())
                .bind(id)
                .execute(&mut *tx)
                .await?;
            if let Some(actor) = actor {
                let payload = audit::archived_payload(old).to_string();
                sqlite_audit::insert_event(&mut tx, actor, EventType::Archived, id, &payload, now)
                    .await?;
            }
            tx.commit().await?;
            self.rows.invalidate(id);
            Ok(Some(true))
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
}
