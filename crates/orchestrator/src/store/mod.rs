//! Persistence of challenges and machines behind one trait, with two
//! implementations: an embedded SQLite file (one process) and PostgreSQL
//! (any number of replicas sharing one database).
//!
//! The trait is written for several replicas sharing one database: every
//! rule that must hold across processes is a single statement or a
//! transaction in the database, never a check in this process's memory.
//! Challenges are not stored when issued (`crate::challenge_key`): redeeming
//! one inserts its id into `redeemed_challenges` in the same transaction as
//! the machine write it authorises, and the primary key refuses a second
//! redemption; the unique index on live identities decides "one machine per
//! identity".
//!
//! Every machine write can carry its audit event (`crate::audit`), which
//! the store inserts in the same transaction; `None` writes none (the
//! trail switched off, or a test of the machine write alone).

pub mod error;
mod pg_audit;
pub mod pg_cached;
pub mod pg_changes;
pub mod pg_pool;
pub mod postgres;
pub mod row_cache;
mod rows;
pub mod sqlite;
mod sqlite_audit;
mod sqlite_writer;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use peaqos_protocol::{IdentityRef, MachineIdentityProof, MachineStatus, Timestamp};

use crate::audit::{AuditEvent, AuditQuery, NewEvent};

pub use error::StoreError;
pub use pg_cached::CachedPostgresStore;
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// The database a `DATABASE_URL` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// `sqlite:...` or `postgres://...` (`postgresql://`); `None` otherwise.
    pub fn of(url: &str) -> Option<Self> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Self::Postgres)
        } else if url == "sqlite::memory:"
            || url
                .strip_prefix("sqlite://")
                .or_else(|| url.strip_prefix("sqlite:"))
                .is_some_and(|rest| !rest.is_empty())
        {
            Some(Self::Sqlite)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

/// Connection pool limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    /// PostgreSQL: connections this process opens at most. (SQLite has one
    /// writer and a few readers, whatever this says.)
    pub max_connections: u32,
    /// Longest a request waits for a connection (including connecting)
    /// before it is answered `503`.
    pub acquire_timeout: Duration,
    /// PostgreSQL: `statement_timeout` of every connection. SQLite: how long
    /// a statement waits for a lock (`busy_timeout`).
    pub statement_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(5),
        }
    }
}

/// Opens the database `url` names, applying the embedded migrations.
pub async fn open(url: &str, settings: &PoolSettings) -> Result<Arc<dyn Store>, StoreError> {
    open_cached(url, settings, 0).await
}

/// Like [`open`], and on PostgreSQL keeps up to `pg_rows` machine records
/// in memory ([`CachedPostgresStore`]; 0: none). Only for servers whose
/// every replica writes the audit trail: the cache learns of other
/// replicas' changes from it. (SQLite always keeps its own.)
pub async fn open_cached(
    url: &str,
    settings: &PoolSettings,
    pg_rows: usize,
) -> Result<Arc<dyn Store>, StoreError> {
    match Backend::of(url) {
        Some(Backend::Postgres) => {
            let store = PostgresStore::open(url, settings).await?;
            if pg_rows == 0 {
                return Ok(Arc::new(store));
            }
            // The feed reads the log on a connection of its own, so that
            // requests holding every pooled connection cannot delay it.
            let feed = PoolSettings {
                max_connections: 1,
                ..*settings
            };
            let feed = PostgresStore::open(url, &feed).await?;
            Ok(Arc::new(CachedPostgresStore::new(store, feed, pg_rows)))
        }
        Some(Backend::Sqlite) => Ok(Arc::new(SqliteStore::open_with(url, settings).await?)),
        None => Err(StoreError::UnsupportedUrl),
    }
}

/// What a store method returns: boxed, so that `Arc<dyn Store>` works.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A future that cannot fail.
pub type CloseFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// A challenge: what its id carries, and the message that was signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChallengeRecord {
    pub id: String,
    pub identity: IdentityRef,
    pub message: String,
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
}

/// Status as stored. `degraded` is never stored: it is what `active` reads
/// as once the proof is older than the deployment's maximum age.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredStatus {
    Draft,
    Active,
    Blocked,
    Archived,
}

impl StoredStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Draft => "draft",
            Self::Active => "active",
            Self::Blocked => "blocked",
            Self::Archived => "archived",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "draft" => Some(Self::Draft),
            "active" => Some(Self::Active),
            "blocked" => Some(Self::Blocked),
            "archived" => Some(Self::Archived),
            _ => None,
        }
    }

    /// The wire status a client may ask for; `degraded` has no stored form.
    pub fn from_wire(status: MachineStatus) -> Option<Self> {
        match status {
            MachineStatus::Draft => Some(Self::Draft),
            MachineStatus::Active => Some(Self::Active),
            MachineStatus::Blocked => Some(Self::Blocked),
            MachineStatus::Archived => Some(Self::Archived),
            MachineStatus::Degraded => None,
        }
    }
}

/// A machine as stored. The proof's `expires_at` is not stored: it follows
/// from `verified_at` and the current maximum proof age.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineRecord {
    pub id: String,
    pub identity: IdentityRef,
    pub status: StoredStatus,
    pub display_name: String,
    pub owner_id: String,
    pub machine_type: String,
    pub runtime_profile: String,
    pub capabilities: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub policy_ids: Vec<String>,
    pub skill_keys: Vec<String>,
    /// The verified proof, with the signer recovered once at verification.
    pub proof: Option<MachineIdentityProof>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// Position in the keyset order of live machines: `(created_at, id)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageKey {
    pub created_at_ms: i64,
    pub id: String,
}

/// A challenge (already checked: ours, for this identity) to redeem in the
/// same transaction as a machine write. The write fails with
/// [`StoreError::ChallengeGone`] if, by then, the challenge was redeemed
/// or expired at `now`.
#[derive(Debug, Clone, Copy)]
pub struct Consume<'a> {
    pub challenge_id: &'a str,
    pub expires_at: Timestamp,
    pub now: Timestamp,
}

/// The storage operations the HTTP layer needs.
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    fn backend(&self) -> Backend;

    /// A trivial round trip, for readiness.
    fn ping(&self) -> StoreFuture<'_, ()>;

    /// Closes the connections, waiting for those in use.
    fn close(&self) -> CloseFuture<'_>;

    /// The challenge MAC key all replicas share: the one stored, or
    /// `offered` if none was (then it is stored).
    fn challenge_key(&self, offered: [u8; 32]) -> StoreFuture<'_, [u8; 32]>;

    /// Forgets redemptions of challenges that expired before `before`;
    /// returns how many.
    fn delete_expired_redemptions(&self, before: Timestamp) -> StoreFuture<'_, u64>;

    /// Inserts a new machine, consuming `consume` and inserting `event` in
    /// the same transaction.
    fn insert_machine<'a>(
        &'a self,
        machine: &'a MachineRecord,
        consume: Option<Consume<'a>>,
        event: Option<&'a NewEvent>,
    ) -> StoreFuture<'a, ()>;

    /// Any machine by id, archived ones included.
    fn get_machine<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<MachineRecord>>;

    /// The id of the live (not archived) machine of an identity.
    fn live_machine_for<'a>(&'a self, identity: &'a IdentityRef)
    -> StoreFuture<'a, Option<String>>;

    /// Replaces a live machine's mutable fields, consuming `consume` and
    /// inserting `event` in the same transaction. `false` if the machine is
    /// gone or archived (then nothing is written).
    fn update_machine<'a>(
        &'a self,
        machine: &'a MachineRecord,
        consume: Option<Consume<'a>>,
        event: Option<&'a NewEvent>,
    ) -> StoreFuture<'a, bool>;

    /// Archives a machine. `None` if there is no such machine; otherwise
    /// whether this call archived it (`false`: it already was). With an
    /// `actor`, an archive records a `machine.archived` event with the
    /// status it replaced, in the same transaction.
    fn archive_machine<'a>(
        &'a self,
        id: &'a str,
        now: Timestamp,
        actor: Option<&'a str>,
    ) -> StoreFuture<'a, Option<bool>>;

    /// Up to `query.limit` audit events with ids above `query.after`, in id
    /// (commit) order.
    fn list_audit_events<'a>(&'a self, query: &'a AuditQuery) -> StoreFuture<'a, Vec<AuditEvent>>;

    /// The id of the last committed event (0 if none ever was): every id
    /// up to it is committed.
    fn audit_head(&self) -> StoreFuture<'_, i64>;

    /// Deletes up to `batch` of the oldest events, in id order, that were
    /// written before `before`; returns how many.
    fn prune_audit_events(&self, before: Timestamp, batch: u32) -> StoreFuture<'_, u64>;

    /// Up to `limit` live machines after `after`, in keyset order.
    fn list_machines<'a>(
        &'a self,
        after: Option<&'a PageKey>,
        limit: u32,
    ) -> StoreFuture<'a, Vec<MachineRecord>>;

    /// How many live (not archived) machines have each stored status, as
    /// `(status, count)` rows (the console's counts).
    fn count_by_status(&self) -> StoreFuture<'_, Vec<(String, i64)>>;
}

/// The counts by status in one statement, the same on both stores.
pub const COUNT_BY_STATUS_SQL: &str =
    "SELECT status, COUNT(*) FROM machines WHERE status <> 'archived' GROUP BY status";
