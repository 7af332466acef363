//! Group commit for the SQLite store: one task owns the writes, and the
//! machine writes that arrive together run in one transaction and one
//! commit.
//!
//! Why: SQLite writes one transaction at a time, and every write went
//! through the store's one writer connection as its own transaction: a
//! `BEGIN IMMEDIATE`, its statements and a `COMMIT`, each a round trip to
//! sqlx's connection thread, and each commit appending every page it
//! touched (the machine, its index, the redemption, the audit event) to the
//! WAL again. A herd's writes queue for that connection anyway; here they
//! share one transaction and one copy of those pages instead. The task has
//! a thread of its own, and each write is one query ([`Writer::spawn`],
//! [`INSERT_SQL`]): the round trips, not SQLite, were what it waited on.
//!
//! How each guarantee holds:
//! - **A write that is refused writes nothing**, so it needs no savepoint:
//!   every statement that can refuse (a redeemed or expired challenge, a
//!   machine gone or archived, an identity already live) is the write's
//!   first, and decides with a condition or a constraint, so that a refusal
//!   changes no row (SQLite undoes a statement that breaks a constraint,
//!   not its transaction, and runs none of the query's statements after
//!   it). The statements after it are guarded by `changes() = 1` and cannot
//!   be refused; if
//!   one fails all the same (a full disk, an I/O error, which may have
//!   rolled back the whole transaction), the batch is rolled back and each
//!   of its writes runs again alone, so that each is answered with its own
//!   outcome.
//! - **Single use of a challenge and one machine per identity**: decided
//!   in the database by the same statements as before (the redemption's
//!   primary key, the unique index on live identities), in one serial
//!   writer; a later write in a batch sees the earlier ones' rows.
//! - **No client hears of a write before it is committed**: every answer of
//!   a batch (refusals too, since a refusal may rest on an earlier write of
//!   the batch) waits for its commit, and the row cache learns of each
//!   write, in commit order, before its answer is sent.
//! - **Audit events are numbered in commit order with no gap**: this task
//!   is the only writer of the log, so it numbers them itself, in the order
//!   the writes run, and stores the last number once per batch; a rolled
//!   back batch forgets its numbers.
//!
//! The batch is bounded ([`MAX_BATCH`]); the queue too, and the admission
//! (`crate::admission`) bounds what waits in it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use peaqos_protocol::Timestamp;
use sqlx::Connection;
use sqlx::sqlite::{SqliteConnection, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use super::row_cache::RowCache;
use super::rows::{proof_json, to_json};
use super::sqlite_audit;
use super::{MachineRecord, StoreError, StoredStatus};
use crate::audit::{self, EventType, NewEvent};

/// Writes committed together at most. A batch's answers wait for its
/// commit, so the batch is kept short enough that the first write of a full
/// one is not kept long (a write costs tens of microseconds here).
pub(super) const MAX_BATCH: usize = 64;

/// Writes that may wait for the writer; a sender past that waits for room.
const QUEUE: usize = 1024;

/// A challenge to redeem with a write, owned (it crosses to the writer).
#[derive(Debug, Clone)]
pub(super) struct Redeem {
    pub challenge_id: String,
    pub expires_at: Timestamp,
    pub now: Timestamp,
}

/// A machine write, as the store's methods describe it.
#[derive(Debug)]
pub(super) enum Write {
    Insert {
        machine: MachineRecord,
        redeem: Option<Redeem>,
        event: Option<NewEvent>,
    },
    Update {
        machine: MachineRecord,
        redeem: Option<Redeem>,
        event: Option<NewEvent>,
    },
    Archive {
        id: String,
        now: Timestamp,
        actor: Option<String>,
    },
}

/// What a committed write did (the store methods' answers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Done {
    Inserted,
    /// `false`: the machine was gone or archived; nothing was written.
    Updated(bool),
    /// As [`super::Store::archive_machine`] answers.
    Archived(Option<bool>),
}

struct Job {
    write: Write,
    reply: oneshot::Sender<Result<Done, StoreError>>,
}

/// The handle requests send their writes through.
#[derive(Debug)]
pub(super) struct Writer {
    jobs: mpsc::Sender<Job>,
    #[cfg_attr(not(test), expect(dead_code, reason = "read by tests"))]
    commits: Arc<AtomicU64>,
    #[cfg(test)]
    sent: AtomicU64,
}

impl Writer {
    /// Starts the writing task on a thread of its own. It ends when every
    /// handle is dropped.
    ///
    /// Why not a task of the server's runtime: the task waits on sqlx's
    /// connection thread once per statement, three statements a write, and
    /// under a herd every one of those wake-ups queued behind thousands of
    /// ready request tasks, so the writer was busy 92 to 99 % of the time
    /// while the SQLite thread worked a quarter of it (docs/performance.md,
    /// "The SQLite herd's writer"). On its own single-threaded runtime it is
    /// woken by the kernel's scheduler as soon as its answer is there.
    pub(super) fn spawn(pool: SqlitePool, rows: Arc<RowCache>) -> Result<Self, StoreError> {
        let (jobs, queue) = mpsc::channel(QUEUE);
        let commits = Arc::new(AtomicU64::new(0));
        let task = Task {
            pool,
            rows,
            commits: Arc::clone(&commits),
            last_event: None,
            stats: Stats::new(),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(StoreError::WriterThread)?;
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || runtime.block_on(task.serve(queue)))
            .map_err(StoreError::WriterThread)?;
        Ok(Self {
            jobs,
            commits,
            #[cfg(test)]
            sent: AtomicU64::new(0),
        })
    }

    /// Runs `write` in the next batch; answers once that batch committed.
    pub(super) async fn run(&self, write: Write) -> Result<Done, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job { write, reply })
            .await
            .map_err(|_| StoreError::Unavailable(sqlx::Error::PoolClosed))?;
        #[cfg(test)]
        self.sent.fetch_add(1, Ordering::Relaxed);
        answer
            .await
            .map_err(|_| StoreError::Unavailable(sqlx::Error::PoolClosed))?
    }

    /// Transactions committed so far (tests: did writes share one?).
    #[cfg(test)]
    pub(super) fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Writes sent to the writer so far.
    #[cfg(test)]
    pub(super) fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

struct Task {
    pool: SqlitePool,
    rows: Arc<RowCache>,
    commits: Arc<AtomicU64>,
    /// The last event id committed, once read: this task is the log's only
    /// writer. `None` after a failed batch, so that it is read again.
    last_event: Option<i64>,
    stats: Stats,
}

/// What the writer did lately, for the debug log: how full its batches are
/// and how much of the time it writes says whether a herd is held by the
/// writer or by what feeds it.
struct Stats {
    since: std::time::Instant,
    batches: u64,
    writes: u64,
    writing: std::time::Duration,
}

impl Stats {
    const EVERY: std::time::Duration = std::time::Duration::from_millis(500);

    fn new() -> Self {
        Self {
            since: std::time::Instant::now(),
            batches: 0,
            writes: 0,
            writing: std::time::Duration::ZERO,
        }
    }

    fn batch(&mut self, writes: usize, began: std::time::Instant) {
        let now = std::time::Instant::now();
        self.batches += 1;
        self.writes += writes as u64;
        self.writing += now.duration_since(began);
        let elapsed = now.duration_since(self.since);
        if elapsed >= Self::EVERY {
            tracing::debug!(
                batches = self.batches,
                writes = self.writes,
                writing_pct = (100 * self.writing.as_micros() / elapsed.as_micros().max(1)),
                elapsed_ms = elapsed.as_millis(),
                "sqlite writer"
            );
            *self = Self::new();
        }
    }
}

/// Why a batch stopped: a statement failed that may have left a write half
/// done (or the whole transaction rolled back).
struct Abort(StoreError);

impl Task {
    async fn serve(mut self, mut queue: mpsc::Receiver<Job>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
            let began = std::time::Instant::now();
            let conn = self.pool.acquire().await;
            // What arrived while the connection was being acquired joins.
            while batch.len() < MAX_BATCH
                && let Ok(job) = queue.try_recv()
            {
                batch.push(job);
            }
            // A request that went away (its client hung up) is not written.
            batch.retain(|job| !job.reply.is_closed());
            let writes = batch.len();
            match conn {
                Ok(mut conn) => self.commit_batch(&mut conn, &mut batch).await,
                Err(e) => {
                    let e = StoreError::from(e);
                    for job in batch.drain(..) {
                        let _ = job.reply.send(Err(copy_error(&e)));
                    }
                }
            }
            self.stats.batch(writes, began);
        }
    }

    /// Runs `batch` in one transaction and answers each job; drains `batch`.
    async fn commit_batch(&mut self, conn: &mut SqliteConnection, batch: &mut Vec<Job>) {
        if batch.is_empty() {
            return;
        }
        let writes: Vec<&Write> = batch.iter().map(|j| &j.write).collect();
        match self.transaction(conn, &writes).await {
            Ok(outcomes) => {
                for (job, outcome) in batch.drain(..).zip(outcomes) {
                    if let Ok(done) = &outcome {
                        self.cache(&job.write, *done);
                    }
                    let _ = job.reply.send(outcome);
                }
            }
            Err(Abort(e)) if batch.len() == 1 => {
                let _ = batch.remove(0).reply.send(Err(e));
            }
            Err(Abort(_)) => {
                // Each alone: a write that fails then fails by itself, and
                // the others are answered with their own outcomes.
                for job in batch.drain(..) {
                    let outcome = match self.transaction(conn, &[&job.write]).await {
                        Ok(mut outcomes) => outcomes.remove(0),
                        Err(Abort(e)) => Err(e),
                    };
                    if let Ok(done) = &outcome {
                        self.cache(&job.write, *done);
                    }
                    let _ = job.reply.send(outcome);
                }
            }
        }
    }

    /// One transaction: every write, then the log's last number, then the
    /// commit. A write's refusal is its outcome; any other failure aborts.
    async fn transaction(
        &mut self,
        conn: &mut SqliteConnection,
        writes: &[&Write],
    ) -> Result<Vec<Result<Done, StoreError>>, Abort> {
        let mut tx = conn
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| Abort(e.into()))?;
        let known = self.last_event;
        let result = async {
            let mut last = match known {
                Some(id) => id,
                None => sqlite_audit::last_id(&mut tx).await?,
            };
            let first = last;
            let mut outcomes = Vec::with_capacity(writes.len());
            for write in writes {
                outcomes.push(apply(&mut tx, write, &mut last).await?);
            }
            if last != first {
                sqlite_audit::set_last_id(&mut tx, last).await?;
            }
            Ok::<_, Abort>((outcomes, last))
        }
        .await;
        match result {
            Ok((outcomes, last)) => match tx.commit().await {
                Ok(()) => {
                    self.last_event = Some(last);
                    self.commits.fetch_add(1, Ordering::Relaxed);
                    Ok(outcomes)
                }
                Err(e) => {
                    self.last_event = None;
                    Err(Abort(e.into()))
                }
            },
            Err(Abort(e)) => {
                self.last_event = None;
                // The transaction may be gone already (SQLite rolls back on
                // some errors); the rollback's own error then says nothing.
                let _ = tx.rollback().await;
                Err(Abort(e))
            }
        }
    }

    /// Tells the row cache of a committed write, before its client hears.
    fn cache(&self, write: &Write, done: Done) {
        match (write, done) {
            (Write::Insert { machine, .. }, Done::Inserted)
            | (Write::Update { machine, .. }, Done::Updated(true)) => self.rows.written(machine),
            (Write::Archive { id, .. }, Done::Archived(Some(true))) => self.rows.invalidate(id),
            _ => {}
        }
    }
}

/// A batch-wide failure, for each of the batch's clients. `sqlx::Error` is
/// not `Clone`; what a client is told depends only on the class.
fn copy_error(e: &StoreError) -> StoreError {
    if e.is_unavailable() {
        StoreError::Unavailable(sqlx::Error::PoolTimedOut)
    } else {
        StoreError::Database(sqlx::Error::Protocol(e.to_string()))
    }
}

impl From<sqlx::Error> for Abort {
    fn from(e: sqlx::Error) -> Self {
        Self(e.into())
    }
}

impl From<StoreError> for Abort {
    fn from(e: StoreError) -> Self {
        Self(e)
    }
}

/// One write inside the batch's transaction. `Ok(Err(_))`: refused, and
/// nothing written; `Err(_)`: the batch must be rolled back.
async fn apply(
    conn: &mut SqliteConnection,
    write: &Write,
    last_event: &mut i64,
) -> Result<Result<Done, StoreError>, Abort> {
    match write {
        Write::Insert {
            machine,
            redeem,
            event,
        } => {
            let event = event.as_ref().map(|e| (*last_event + 1, e));
            if let Err(refused) = insert(conn, machine, redeem.as_ref(), event).await? {
                return Ok(Err(refused));
            }
            if let Some((id, _)) = event {
                *last_event = id;
            }
            Ok(Ok(Done::Inserted))
        }
        Write::Update {
            machine,
            redeem,
            event,
        } => {
            let event = event.as_ref().map(|e| (*last_event + 1, e));
            match update(conn, machine, redeem.as_ref(), event).await? {
                Ok(true) => {}
                Ok(false) => return Ok(Ok(Done::Updated(false))),
                Err(refused) => return Ok(Err(refused)),
            }
            if let Some((id, _)) = event {
                *last_event = id;
            }
            Ok(Ok(Done::Updated(true)))
        }
        Write::Archive { id, now, actor } => archive(conn, id, *now, actor.as_deref(), last_event)
            .await
            .map(Ok),
    }
}

type Query<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>;

/// Binds a machine's mutable fields, status to proof, in that order.
fn bind_fields<'q>(query: Query<'q>, m: &'q MachineRecord) -> Query<'q> {
    query
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
}

/// A write is one round trip to sqlx's connection thread, not three: the
/// machine statement, then the redemption and the event, sent as one query
/// (sqlx runs a query's statements in turn on that thread, and hands each
/// its `?` parameters in order from the one list of arguments, hence `?`
/// and never `?NNN` here). The statements after the first run only if it
/// wrote its row (`changes()` is the count of the statement completed just
/// before), so a refused write still writes nothing, and the rows a query
/// wrote are none or all. Why: under a herd the writer is the bottleneck,
/// and it spent most of its time waiting for these round trips
/// (docs/performance.md, "The SQLite herd's writer").
///
/// The insert's arguments: the 14 columns, the challenge's expiry and now,
/// its id (`condition`).
macro_rules! insert_machine_sql {
    () => {
        "INSERT INTO machines (id, identity_ref, status, display_name, owner_id, \
         machine_type, runtime_profile, capabilities, labels, policy_ids, skill_keys, \
         proof, created_at, updated_at) \
         SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ? \
         WHERE ? > ? AND NOT EXISTS (SELECT 1 FROM redeemed_challenges WHERE id = ?)"
    };
}

/// The update's: the 10 fields, `updated_at`, the machine's id, the
/// challenge's expiry and now, its id.
macro_rules! update_machine_sql {
    () => {
        "UPDATE machines SET status = ?, display_name = ?, owner_id = ?, \
         machine_type = ?, runtime_profile = ?, capabilities = ?, labels = ?, \
         policy_ids = ?, skill_keys = ?, proof = ?, updated_at = ? \
         WHERE id = ? AND status <> 'archived' AND ? > ? \
         AND NOT EXISTS (SELECT 1 FROM redeemed_challenges WHERE id = ?)"
    };
}

/// The redemption (the challenge's id and expiry), after the statement
/// that checked it wrote its row.
macro_rules! then_redeem_sql {
    () => {
        "; INSERT INTO redeemed_challenges (id, expires_at) SELECT ?, ? WHERE changes() = 1"
    };
}

/// The event (its seven columns), after the statement before it wrote its
/// row.
macro_rules! then_event_sql {
    () => {
        concat!(
            "; INSERT INTO audit_events (",
            super::rows::audit_columns!(),
            ") SELECT ?, ?, ?, ?, ?, ?, ? WHERE changes() = 1"
        )
    };
}

/// An insert's query, by `[redeems][records an event]`.
const INSERT_SQL: [[&str; 2]; 2] = [
    [
        insert_machine_sql!(),
        concat!(insert_machine_sql!(), then_event_sql!()),
    ],
    [
        concat!(insert_machine_sql!(), then_redeem_sql!()),
        concat!(insert_machine_sql!(), then_redeem_sql!(), then_event_sql!()),
    ],
];

/// An update's query, by `[redeems][records an event]`.
const UPDATE_SQL: [[&str; 2]; 2] = [
    [
        update_machine_sql!(),
        concat!(update_machine_sql!(), then_event_sql!()),
    ],
    [
        concat!(update_machine_sql!(), then_redeem_sql!()),
        concat!(update_machine_sql!(), then_redeem_sql!(), then_event_sql!()),
    ],
];

/// An archive's query (`updated_at`, the machine's id), by `[records an
/// event]`.
const ARCHIVE_SQL: [&str; 2] = [
    "UPDATE machines SET status = 'archived', updated_at = ? WHERE id = ?",
    concat!(
        "UPDATE machines SET status = 'archived', updated_at = ? WHERE id = ?",
        then_event_sql!()
    ),
];

/// Binds the arguments of the statements after the machine's: the
/// redemption's, then the event's.
fn bind_after<'q>(
    query: Query<'q>,
    redeem: Option<&'q Redeem>,
    event: Option<(i64, &'q NewEvent)>,
) -> Query<'q> {
    let query = match redeem {
        Some(r) => query
            .bind(r.challenge_id.as_str())
            .bind(r.expires_at.unix_millis()),
        None => query,
    };
    bind_event(query, event)
}

/// Binds event `id`'s columns, if the write records one.
fn bind_event<'q>(query: Query<'q>, event: Option<(i64, &'q NewEvent)>) -> Query<'q> {
    let Some((id, e)) = event else { return query };
    query
        .bind(id)
        .bind(&e.actor)
        .bind(e.kind.as_str())
        .bind(crate::audit::RESOURCE_MACHINE)
        .bind(&e.resource_id)
        .bind(e.payload.to_string())
        .bind(e.created_at.unix_millis())
}

/// The challenge's id, expiry and now, as a write's condition binds them:
/// without a challenge it holds (expiry 1 > now 0, and no id is NULL).
fn condition(redeem: Option<&Redeem>) -> (Option<&str>, i64, i64) {
    redeem.map_or((None, 1, 0), |r| {
        (
            Some(r.challenge_id.as_str()),
            r.expires_at.unix_millis(),
            r.now.unix_millis(),
        )
    })
}

/// The machine's row, inserted only if the challenge (if any) is still
/// redeemable, with its redemption and event. Refused: the challenge is
/// gone, or the identity is live.
async fn insert(
    conn: &mut SqliteConnection,
    m: &MachineRecord,
    redeem: Option<&Redeem>,
    event: Option<(i64, &NewEvent)>,
) -> Result<Result<(), StoreError>, Abort> {
    let (challenge, expires, now) = condition(redeem);
    let query =
        sqlx::query(INSERT_SQL[usize::from(redeem.is_some())][usize::from(event.is_some())])
            .bind(&m.id)
            .bind(m.identity.canonical());
    let query = bind_fields(query, m)
        .bind(m.created_at.unix_millis())
        .bind(m.updated_at.unix_millis())
        .bind(expires)
        .bind(now)
        .bind(challenge);
    match bind_after(query, redeem, event).execute(&mut *conn).await {
        Ok(done) if done.rows_affected() > 0 => Ok(Ok(())),
        Ok(_) => Ok(Err(StoreError::ChallengeGone)),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            let existing: Option<String> = sqlx::query_scalar(
                "SELECT id FROM machines WHERE identity_ref = ? AND status <> 'archived'",
            )
            .bind(m.identity.canonical())
            .fetch_optional(&mut *conn)
            .await?;
            // The machine went in and a statement after it failed: a fault,
            // and this transaction holds half a write.
            if existing.as_deref() == Some(m.id.as_str()) {
                return Err(Abort(sqlx::Error::Database(e).into()));
            }
            // SQLite undid the machine's statement alone (the ones after it
            // did not run): the batch goes on.
            Ok(Err(StoreError::IdentityTaken {
                machine_id: existing.unwrap_or_default(),
            }))
        }
        Err(e) => Err(e.into()),
    }
}

/// The machine's new fields, written only if the challenge (if any) is
/// still redeemable, with its redemption and event. `false`: the machine is
/// gone or archived. Refused if the challenge is gone (which, as before,
/// wins over a machine gone).
async fn update(
    conn: &mut SqliteConnection,
    m: &MachineRecord,
    redeem: Option<&Redeem>,
    event: Option<(i64, &NewEvent)>,
) -> Result<Result<bool, StoreError>, Abort> {
    let (challenge, expires, now) = condition(redeem);
    let query =
        sqlx::query(UPDATE_SQL[usize::from(redeem.is_some())][usize::from(event.is_some())]);
    let query = bind_fields(query, m)
        .bind(m.updated_at.unix_millis())
        .bind(&m.id)
        .bind(expires)
        .bind(now)
        .bind(challenge);
    let done = bind_after(query, redeem, event).execute(&mut *conn).await?;
    if done.rows_affected() > 0 {
        return Ok(Ok(true));
    }
    // Nothing written: say why, the challenge first.
    match redeem {
        Some(r) if r.expires_at <= r.now || is_redeemed(conn, &r.challenge_id).await? => {
            Ok(Err(StoreError::ChallengeGone))
        }
        _ => Ok(Ok(false)),
    }
}

async fn is_redeemed(conn: &mut SqliteConnection, id: &str) -> Result<bool, Abort> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM redeemed_challenges WHERE id = ?)")
            .bind(id)
            .fetch_one(&mut *conn)
            .await?,
    )
}

async fn archive(
    conn: &mut SqliteConnection,
    id: &str,
    now: Timestamp,
    actor: Option<&str>,
    last_event: &mut i64,
) -> Result<Done, Abort> {
    let old: Option<String> = sqlx::query_scalar("SELECT status FROM machines WHERE id = ?")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(old) = old else {
        return Ok(Done::Archived(None));
    };
    let old = StoredStatus::parse(&old).ok_or_else(|| {
        Abort(StoreError::Corrupt {
            id: id.to_owned(),
            what: "status".to_owned(),
        })
    })?;
    if old == StoredStatus::Archived {
        return Ok(Done::Archived(Some(false)));
    }
    let event = actor.map(|actor| NewEvent {
        actor: actor.to_owned(),
        kind: EventType::Archived,
        resource_id: id.to_owned(),
        payload: audit::archived_payload(old),
        created_at: now,
    });
    let numbered = event.as_ref().map(|e| (*last_event + 1, e));
    let query = sqlx::query(ARCHIVE_SQL[usize::from(event.is_some())])
        .bind(now.unix_millis())
        .bind(id);
    bind_event(query, numbered).execute(&mut *conn).await?;
    if let Some((number, _)) = numbered {
        *last_event = number;
    }
    Ok(Done::Archived(Some(true)))
}
