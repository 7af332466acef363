//! The fleet store: PostgreSQL, shared by any number of orchestrator
//! replicas, with migrations compiled into the binary.
//!
//! Nothing is cached here: another replica may write any row at any time
//! (`pg_cached` keeps machine records in front of this store, told of other
//! replicas' changes by the audit log). Every rule that spans requests is
//! decided by the database in one statement: a challenge is redeemed by an
//! `INSERT` of its id into `redeemed_challenges` inside the statement that
//! writes the machine (if the write fails, the statement and with it the
//! redemption is undone; a second redemption conflicts on the key), one live
//! machine per identity is a unique
//! partial index. Single statements also keep round trips down: a
//! registration's write is one round trip, not a `BEGIN`/`COMMIT` dance.
//!
//! Connections carry `statement_timeout`; the pool bounds their number and
//! how long a request waits for one. A database that goes away makes
//! operations fail with [`StoreError::Unavailable`] (a 503 for clients) and
//! the pool reconnects by itself when it is back.

use std::str::FromStr;
use std::time::Duration;

use peaqos_protocol::{IdentityRef, Timestamp};
use sqlx::postgres::{PgArguments, PgConnectOptions, PgConnection, PgPoolOptions};
use sqlx::{Connection as _, Postgres, Row};

use super::pg_audit;
/// How readers number the audit events that committed without an id (the
/// plan test in `tests/store/explain.rs` runs it).
pub use super::pg_audit::NUMBER_SQL as AUDIT_NUMBER_SQL;
/// How pruning deletes the oldest events (its plan is tested too).
pub use super::pg_audit::PRUNE_SQL as AUDIT_PRUNE_SQL;
use super::pg_pool::PgPool;
use super::rows::{
    audit_columns, audit_event_from_row, machine_columns, machine_from_row, proof_json, to_json,
};
use super::{
    Backend, CloseFuture, Consume, MachineRecord, PageKey, PoolSettings, Store, StoreError,
    StoreFuture,
};
use crate::audit::{AuditEvent, AuditQuery, EventType, NewEvent};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// The unique index that holds one live machine per identity.
const LIVE_IDENTITY_INDEX: &str = "machines_live_identity";

/// A page of the audit log after the cursor `$1`: all events, one
/// machine's (`$2`), one resource type's (`$2`), both (`$2`, `$3`); the
/// limit last. `id > $1` keeps them to numbered events (the plan test in
/// `tests/store/explain.rs` runs each).
pub const AUDIT_PAGE_SQL: [&str; 4] = [
    concat!(
        "SELECT ",
        audit_columns!(),
        " FROM audit_events WHERE id > $1 ORDER BY id LIMIT $2"
    ),
    concat!(
        "SELECT ",
        audit_columns!(),
        " FROM audit_events WHERE id > $1 AND resource_id = $2 ORDER BY id LIMIT $3"
    ),
    concat!(
        "SELECT ",
        audit_columns!(),
        " FROM audit_events WHERE id > $1 AND resource_type = $2 ORDER BY id LIMIT $3"
    ),
    concat!(
        "SELECT ",
        audit_columns!(),
        " FROM audit_events WHERE id > $1 AND resource_id = $2 AND resource_type = $3 \
         ORDER BY id LIMIT $4"
    ),
];

/// A list page: one range scan of `machines_live_page` from the cursor.
pub const LIST_PAGE_SQL: &str = concat!(
    "SELECT ",
    machine_columns!(),
    " FROM machines WHERE status <> 'archived' AND (created_at, id) > ($1, $2) \
     ORDER BY created_at, id LIMIT $3"
);

const INSERT_MACHINE_SQL: &str = concat!(
    "INSERT INTO machines (",
    machine_columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
);

/// The insert, only if the challenge (`$15` id, `$16` expiry, `$17` now)
/// could be redeemed. A unique violation aborts the whole statement, so
/// the challenge stays unredeemed after a refused write.
const INSERT_MACHINE_CONSUMING_SQL: &str = concat!(
    "WITH consumed AS (\
        INSERT INTO redeemed_challenges (id, expires_at) SELECT $15, $16 WHERE $16 > $17 \
        ON CONFLICT DO NOTHING RETURNING id) \
     INSERT INTO machines (",
    machine_columns!(),
    ") SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14 FROM consumed"
);

const UPDATE_MACHINE_SQL: &str = "UPDATE machines SET status = $1, display_name = $2, \
     owner_id = $3, machine_type = $4, runtime_profile = $5, capabilities = $6, labels = $7, \
     policy_ids = $8, skill_keys = $9, proof = $10, updated_at = $11 \
     WHERE id = $12 AND status <> 'archived'";

/// The update with a challenge consumed, in one statement. The machine row
/// is locked first, so that it cannot be archived between the consumption
/// and the update; the challenge is redeemed only if the machine is live,
/// and the machine updated only if the challenge was deleted. `live` and
/// `updated` tell the three outcomes apart: no live machine (nothing
/// consumed), challenge gone (nothing updated), done.
const UPDATE_MACHINE_CONSUMING_SQL: &str = "WITH target AS (\
        SELECT id FROM machines WHERE id = $12 AND status <> 'archived' FOR UPDATE), \
     consumed AS (\
        INSERT INTO redeemed_challenges (id, expires_at) SELECT $13, $14 \
        WHERE $14 > $15 AND EXISTS (SELECT 1 FROM target) \
        ON CONFLICT DO NOTHING RETURNING id), \
     updated AS (\
        UPDATE machines SET status = $1, display_name = $2, owner_id = $3, machine_type = $4, \
          runtime_profile = $5, capabilities = $6, labels = $7, policy_ids = $8, \
          skill_keys = $9, proof = $10, updated_at = $11 \
        WHERE id = (SELECT id FROM target) AND EXISTS (SELECT 1 FROM consumed) \
        RETURNING id) \
     SELECT EXISTS (SELECT 1 FROM target) AS live, EXISTS (SELECT 1 FROM updated) AS updated";

type PgQuery = sqlx::query::Query<'static, Postgres, PgArguments>;

/// PostgreSQL-backed [`Store`].
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Connects to `url`, applies the embedded migrations (under sqlx's
    /// advisory lock, so replicas starting together take turns), and opens a
    /// pool that connects on demand.
    pub async fn open(url: &str, settings: &PoolSettings) -> Result<Self, StoreError> {
        let base = PgConnectOptions::from_str(url).map_err(StoreError::Database)?;
        let base = if base.get_application_name().is_none() {
            base.application_name("peaqos-orchestrator")
        } else {
            base
        };
        // Appended after any `options` of the URL, so these win.
        let options = base.clone().options([(
            "statement_timeout",
            settings.statement_timeout.as_millis().to_string(),
        )]);
        first_connection(&options, settings.acquire_timeout).await?;
        migrate(&base, settings).await?;
        Ok(Self {
            pool: PgPool::new(options, settings),
        })
    }

    /// The connection pool (to hold a connection, or to look at the
    /// database directly).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// Connects once, so that a start-up failure names its cause (the pool
/// would only say that it timed out). A refused connection is retried (the
/// database may be starting) until `timeout`.
async fn first_connection(options: &PgConnectOptions, timeout: Duration) -> Result<(), StoreError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut wait = Duration::from_millis(20);
    loop {
        let attempt = tokio::time::timeout_at(deadline, PgConnection::connect_with(options)).await;
        match attempt {
            Ok(Ok(conn)) => {
                let _ = conn.close().await;
                return Ok(());
            }
            Ok(Err(sqlx::Error::Io(e)))
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && tokio::time::Instant::now() + wait < deadline =>
            {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(1));
            }
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {
                return Err(StoreError::Unavailable(sqlx::Error::Io(
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "connecting took longer than the acquire timeout",
                    ),
                )));
            }
        }
    }
}

/// Runs the migrations on a connection of their own (a pool of one, which
/// keeps the future `Send`). sqlx holds a session-level advisory lock while
/// it migrates, and a failed migration returns without unlocking: closing
/// the session releases the lock whatever happened. No statement timeout: a
/// long migration (an index build) must finish, and another replica waits
/// for the lock meanwhile. A database that refuses connections (it may be
/// starting) is retried for the acquire timeout.
async fn migrate(base: &PgConnectOptions, settings: &PoolSettings) -> Result<(), StoreError> {
    let options = base.clone().options([("statement_timeout", "0")]);
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(settings.acquire_timeout)
        .connect_with(options)
        .await?;
    let migrated = MIGRATOR.run(&pool).await;
    pool.close().await;
    migrated.map_err(StoreError::Migrate)
}

/// Binds the 14 columns of `machines` as `$1..$14`, in `machine_columns!` order.
fn bind_machine(query: PgQuery, m: &MachineRecord) -> PgQuery {
    query
        .bind(m.id.clone())
        .bind(m.identity.canonical())
        .bind(m.status.as_str())
        .bind(m.display_name.clone())
        .bind(m.owner_id.clone())
        .bind(m.machine_type.clone())
        .bind(m.runtime_profile.clone())
        .bind(to_json(&m.capabilities))
        .bind(to_json(&m.labels))
        .bind(to_json(&m.policy_ids))
        .bind(to_json(&m.skill_keys))
        .bind(m.proof.as_ref().map(proof_json))
        .bind(m.created_at.unix_millis())
        .bind(m.updated_at.unix_millis())
}

/// Binds the mutable columns as `$1..$11` and the id as `$12`.
fn bind_update(query: PgQuery, m: &MachineRecord) -> PgQuery {
    query
        .bind(m.status.as_str())
        .bind(m.display_name.clone())
        .bind(m.owner_id.clone())
        .bind(m.machine_type.clone())
        .bind(m.runtime_profile.clone())
        .bind(to_json(&m.capabilities))
        .bind(to_json(&m.labels))
        .bind(to_json(&m.policy_ids))
        .bind(to_json(&m.skill_keys))
        .bind(m.proof.as_ref().map(proof_json))
        .bind(m.updated_at.unix_millis())
        .bind(m.id.clone())
}

/// Binds an event's five columns as the next parameters.
fn bind_event(query: PgQuery, e: &NewEvent) -> PgQuery {
    query
        .bind(e.actor.clone())
        .bind(e.kind.as_str())
        .bind(e.resource_id.clone())
        .bind(e.payload.to_string())
        .bind(e.created_at.unix_millis())
}

fn violates_live_identity(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if db.is_unique_violation() && db.constraint() == Some(LIVE_IDENTITY_INDEX))
}

impl PostgresStore {
    /// Numbers the committed events that have no id yet (`pg_audit`).
    async fn number_audit_events(&self) -> Result<(), StoreError> {
        self.pool
            .run(|c| Box::pin(sqlx::raw_sql(pg_audit::NUMBER_SQL).execute(c)))
            .await?;
        Ok(())
    }

    async fn live_machine(&self, identity: &IdentityRef) -> Result<Option<String>, StoreError> {
        let query = sqlx::query_scalar(
            "SELECT id FROM machines WHERE identity_ref = $1 AND status <> 'archived'",
        )
        .bind(identity.canonical());
        self.pool.run(|c| Box::pin(query.fetch_optional(c))).await
    }
}

/// The privileges requests use, each as `(table, privilege)`, and the
/// query that names those this role lacks as `table:PRIVILEGE`. Readiness
/// asks it: a `SELECT 1` passes with every grant revoked.
/// `has_table_privilege` with a list is true when any one is held, so
/// each is asked alone.
const NEEDED_PRIVILEGES: &str = "SELECT t || ':' || p FROM (VALUES \
     ('machines', 'SELECT'), ('machines', 'INSERT'), ('machines', 'UPDATE'), \
     ('redeemed_challenges', 'SELECT'), ('redeemed_challenges', 'INSERT'), \
     ('redeemed_challenges', 'DELETE'), ('challenge_key', 'SELECT'), ('challenge_key', 'INSERT'), \
     ('audit_sequence', 'SELECT'), ('audit_sequence', 'UPDATE'), \
     ('audit_events', 'SELECT'), ('audit_events', 'INSERT'), ('audit_events', 'UPDATE'), \
     ('audit_events', 'DELETE')\
     ) AS needed (t, p) WHERE NOT has_table_privilege(t, p)";

/// Attempts at an insert whose identity conflict vanished before the
/// holder could be named (it was archived in between).
const INSERT_ATTEMPTS: usize = 3;

impl Store for PostgresStore {
    fn backend(&self) -> Backend {
        Backend::Postgres
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            // Names resolve through search_path as the requests' own do: a
            // schema whose USAGE was revoked hides its tables, and this
            // fails as they would (undefined_table, a 503).
            let query = sqlx::query_scalar::<_, String>(NEEDED_PRIVILEGES);
            let missing = self.pool.run(|c| Box::pin(query.fetch_all(c))).await?;
            if missing.is_empty() {
                Ok(())
            } else {
                Err(StoreError::MissingPrivileges {
                    missing: missing.join(", "),
                })
            }
        })
    }

    fn close(&self) -> CloseFuture<'_> {
        Box::pin(self.pool.close())
    }

    fn challenge_key(&self, offered: [u8; 32]) -> StoreFuture<'_, [u8; 32]> {
        Box::pin(async move {
            // Replicas starting together: the loser of the insert waits for
            // the winner's commit, and its snapshot may predate it, so it
            // reads again.
            for _ in 0..INSERT_ATTEMPTS {
                let query = sqlx::query_scalar::<_, Vec<u8>>(
                    "WITH stored AS (INSERT INTO challenge_key (only_row, key) VALUES (1, $1) \
                     ON CONFLICT DO NOTHING RETURNING key) \
                     SELECT key FROM stored UNION ALL \
                     SELECT key FROM challenge_key WHERE only_row = 1",
                )
                .bind(offered.to_vec());
                let key = self.pool.run(|c| Box::pin(query.fetch_optional(c))).await?;
                if let Some(key) = key {
                    return key.try_into().map_err(|_| StoreError::Corrupt {
                        id: "challenge_key".to_owned(),
                        what: "key".to_owned(),
                    });
                }
            }
            Err(StoreError::Corrupt {
                id: "challenge_key".to_owned(),
                what: "key (none stored, and none could be)".to_owned(),
            })
        })
    }

    fn delete_expired_redemptions(&self, before: Timestamp) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            let query = sqlx::query("DELETE FROM redeemed_challenges WHERE expires_at <= $1")
                .bind(before.unix_millis());
            let done = self.pool.run(|c| Box::pin(query.execute(c))).await?;
            Ok(done.rows_affected())
        })
    }

    fn insert_machine<'a>(
        &'a self,
        m: &'a MachineRecord,
        consume: Option<Consume<'a>>,
        event: Option<&'a NewEvent>,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            for _ in 0..INSERT_ATTEMPTS {
                let query = match (&consume, event) {
                    (None, None) => bind_machine(sqlx::query(INSERT_MACHINE_SQL), m),
                    (Some(c), None) => bind_machine(sqlx::query(INSERT_MACHINE_CONSUMING_SQL), m)
                        .bind(c.challenge_id.to_owned())
                        .bind(c.expires_at.unix_millis())
                        .bind(c.now.unix_millis()),
                    (None, Some(e)) => bind_event(
                        bind_machine(sqlx::query(pg_audit::INSERT_AUDITED_SQL), m),
                        e,
                    ),
                    (Some(c), Some(e)) => bind_event(
                        bind_machine(sqlx::query(pg_audit::INSERT_CONSUMING_AUDITED_SQL), m),
                        e,
                    )
                    .bind(c.challenge_id.to_owned())
                    .bind(c.expires_at.unix_millis())
                    .bind(c.now.unix_millis()),
                };
                // Without the trail the insert's own count says whether it
                // happened; with it, the count of events written.
                let written = if event.is_some() {
                    self.pool
                        .run(|c| Box::pin(query.fetch_one(c)))
                        .await
                        .and_then(|row| Ok(row.try_get::<i64, _>("written")? == 1))
                } else {
                    self.pool
                        .run(|c| Box::pin(query.execute(c)))
                        .await
                        .map(|done| done.rows_affected() == 1)
                };
                match written {
                    Ok(true) => return Ok(()),
                    Ok(false) => return Err(StoreError::ChallengeGone),
                    Err(StoreError::Database(e)) if violates_live_identity(&e) => {
                        if let Some(machine_id) = self.live_machine(&m.identity).await? {
                            return Err(StoreError::IdentityTaken { machine_id });
                        }
                        // Archived since: the identity is free again.
                    }
                    Err(e) => return Err(e),
                }
            }
            // The identity keeps changing hands under us; report it as taken.
            Err(StoreError::IdentityTaken {
                machine_id: self.live_machine(&m.identity).await?.unwrap_or_default(),
            })
        })
    }

    fn get_machine<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<MachineRecord>> {
        Box::pin(async move {
            let query = sqlx::query(concat!(
                "SELECT ",
                machine_columns!(),
                " FROM machines WHERE id = $1"
            ))
            .bind(id.to_owned());
            let row = self.pool.run(|c| Box::pin(query.fetch_optional(c))).await?;
            row.as_ref().map(machine_from_row).transpose()
        })
    }

    fn live_machine_for<'a>(
        &'a self,
        identity: &'a IdentityRef,
    ) -> StoreFuture<'a, Option<String>> {
        Box::pin(self.live_machine(identity))
    }

    fn update_machine<'a>(
        &'a self,
        m: &'a MachineRecord,
        consume: Option<Consume<'a>>,
        event: Option<&'a NewEvent>,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let Some(c) = consume else {
                if let Some(e) = event {
                    let query =
                        bind_event(bind_update(sqlx::query(pg_audit::UPDATE_AUDITED_SQL), m), e);
                    let row = self.pool.run(|c| Box::pin(query.fetch_one(c))).await?;
                    return Ok(row.try_get::<i64, _>("written")? == 1);
                }
                let query = bind_update(sqlx::query(UPDATE_MACHINE_SQL), m);
                let done = self.pool.run(|c| Box::pin(query.execute(c))).await?;
                return Ok(done.rows_affected() == 1);
            };
            let query = match event {
                Some(e) => bind_event(
                    bind_update(sqlx::query(pg_audit::UPDATE_CONSUMING_AUDITED_SQL), m),
                    e,
                ),
                None => bind_update(sqlx::query(UPDATE_MACHINE_CONSUMING_SQL), m),
            }
            .bind(c.challenge_id.to_owned())
            .bind(c.expires_at.unix_millis())
            .bind(c.now.unix_millis());
            let row = self.pool.run(|c| Box::pin(query.fetch_one(c))).await?;
            let live: bool = row.try_get("live")?;
            let updated: bool = row.try_get("updated")?;
            match (live, updated) {
                (false, _) => Ok(false),
                (true, false) => Err(StoreError::ChallengeGone),
                (true, true) => Ok(true),
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
            let query = match actor {
                Some(actor) => sqlx::query(pg_audit::ARCHIVE_AUDITED_SQL)
                    .bind(id.to_owned())
                    .bind(now.unix_millis())
                    .bind(actor.to_owned())
                    .bind(EventType::Archived.as_str()),
                // Both parts see the same snapshot: `found` is whether the
                // machine existed when the statement began.
                None => sqlx::query(
                    "WITH archived AS (\
                        UPDATE machines SET status = 'archived', updated_at = $2 \
                        WHERE id = $1 AND status <> 'archived' RETURNING id) \
                     SELECT EXISTS (SELECT 1 FROM archived) AS archived, \
                            EXISTS (SELECT 1 FROM machines WHERE id = $1) AS found",
                )
                .bind(id.to_owned())
                .bind(now.unix_millis()),
            };
            let row = self.pool.run(|c| Box::pin(query.fetch_one(c))).await?;
            let archived: bool = row.try_get("archived")?;
            let found: bool = row.try_get("found")?;
            Ok(found.then_some(archived))
        })
    }

    fn list_audit_events<'a>(&'a self, q: &'a AuditQuery) -> StoreFuture<'a, Vec<AuditEvent>> {
        Box::pin(async move {
            self.number_audit_events().await?;
            let sql = match (q.machine_id.is_some(), q.resource_type.is_some()) {
                (false, false) => AUDIT_PAGE_SQL[0],
                (true, false) => AUDIT_PAGE_SQL[1],
                (false, true) => AUDIT_PAGE_SQL[2],
                (true, true) => AUDIT_PAGE_SQL[3],
            };
            let mut query = sqlx::query(sql).bind(q.after);
            if let Some(m) = &q.machine_id {
                query = query.bind(m.clone());
            }
            if let Some(t) = &q.resource_type {
                query = query.bind(t.clone());
            }
            let query = query.bind(i64::from(q.limit));
            let rows = self.pool.run(|c| Box::pin(query.fetch_all(c))).await?;
            rows.iter().map(audit_event_from_row).collect()
        })
    }

    fn audit_head(&self) -> StoreFuture<'_, i64> {
        Box::pin(async move {
            self.number_audit_events().await?;
            let query = sqlx::query_scalar("SELECT last_id FROM audit_sequence WHERE only_row = 1");
            self.pool.run(|c| Box::pin(query.fetch_one(c))).await
        })
    }

    fn prune_audit_events(&self, before: Timestamp, batch: u32) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            // Only numbered events are pruned, in id order.
            self.number_audit_events().await?;
            let query = sqlx::query(pg_audit::PRUNE_SQL)
                .bind(before.unix_millis())
                .bind(i64::from(batch));
            let done = self.pool.run(|c| Box::pin(query.execute(c))).await?;
            Ok(done.rows_affected())
        })
    }

    fn count_by_status(&self) -> StoreFuture<'_, Vec<(String, i64)>> {
        Box::pin(async move {
            let query = sqlx::query_as(super::COUNT_BY_STATUS_SQL);
            self.pool.run(|c| Box::pin(query.fetch_all(c))).await
        })
    }

    fn list_machines<'a>(
        &'a self,
        after: Option<&'a PageKey>,
        limit: u32,
    ) -> StoreFuture<'a, Vec<MachineRecord>> {
        Box::pin(async move {
            let (created, id) = after.map_or((i64::MIN, ""), |k| (k.created_at_ms, &k.id));
            let query = sqlx::query(LIST_PAGE_SQL)
                .bind(created)
                .bind(id.to_owned())
                .bind(i64::from(limit));
            let rows = self.pool.run(|c| Box::pin(query.fetch_all(c))).await?;
            rows.iter().map(machine_from_row).collect()
        })
    }
}
