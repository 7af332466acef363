//! How a PostgreSQL replica learns which machines other replicas changed:
//! by reading the audit log, which every machine write already fills in its
//! own transaction.
//!
//! Every [`INTERVAL`] the replica reads the events after the last one it
//! read, through the same reader as audit clients and the live stream
//! (`Store::list_audit_events`, which never pages past an event that
//! commits later), and drops the machines they name from its row cache. A
//! read that reached the end of the log proves that every change committed
//! before it was sent has been applied: that moment is the cache's
//! [`Freshness`], and the cache answers only while it is less than
//! [`FRESH_FOR`] old. So a record served from memory misses no change
//! committed more than [`FRESH_FOR`] before, whatever happens to the
//! connection or the database: when the log cannot be read, the cache stops
//! answering within [`FRESH_FOR`] and reads go to the database, and nothing
//! is lost meanwhile, for the log keeps every event until the next read.
//!
//! Why the log and not `LISTEN`/`NOTIFY`: a `NOTIFY` in a write's
//! transaction takes a lock that every notifying transaction holds until it
//! has committed (one database-wide queue in commit order), so machine
//! writes would commit one at a time, WAL flush included; measured with
//! `pgbench` in docs/performance.md, 64 writers committed about a quarter
//! as many transactions a second with it. A `NOTIFY` after the commit is
//! cheap but is lost when the writer dies in between, and a lost
//! notification leaves a stale row for good. The log costs the writes nothing, loses nothing,
//! and this read is one index range scan per replica every [`INTERVAL`].

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::row_cache::RowCache;
use super::{PostgresStore, Store as _, StoreError};
use crate::audit::AuditQuery;
use crate::error_chain::error_chain;

/// How often the log is read.
pub const INTERVAL: Duration = Duration::from_millis(100);
/// How old the last complete read of the log may be for the cache to
/// answer: the bound on how stale a record served from memory can be.
pub const FRESH_FOR: Duration = Duration::from_secs(1);
/// After this long without a complete read, the cache is emptied: events
/// older than the audit retention may have been pruned before this replica
/// read them.
const FORGET_AFTER: Duration = Duration::from_secs(30);
/// Events read per query.
const PAGE: u32 = 1000;

/// When the log was last read to its end (the moment that read was sent).
#[derive(Debug, Default)]
pub struct Freshness(Mutex<Option<Instant>>);

impl Freshness {
    fn synced_at(&self) -> Option<Instant> {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn synced(&self, at: Instant) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(at);
    }

    /// Whether the cache may answer now.
    pub fn fresh(&self) -> bool {
        self.synced_at().is_some_and(|at| at.elapsed() < FRESH_FOR)
    }
}

/// Follows the log until `stop`, then closes `store` (the feed's own
/// connection); see the module documentation.
pub async fn follow(
    store: PostgresStore,
    rows: Arc<RowCache>,
    freshness: Arc<Freshness>,
    stop: CancellationToken,
) {
    follow_until(&store, &rows, &freshness, &stop).await;
    store.close().await;
}

async fn follow_until(
    store: &PostgresStore,
    rows: &RowCache,
    freshness: &Freshness,
    stop: &CancellationToken,
) {
    let mut after = loop {
        match store.audit_head().await {
            Ok(head) => break head,
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "row cache: cannot read the audit log's end");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    // A read that began before the head was read may hold a row older than
    // an event at or below it, which this feed will never deliver: refuse
    // its fill.
    rows.clear();
    let started = Instant::now();
    let mut failing = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(INTERVAL) => {}
        }
        match catch_up(store, rows, &mut after).await {
            Ok(sent) => {
                freshness.synced(sent);
                if failing {
                    tracing::info!("row cache: reading the audit log again");
                    failing = false;
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(
                        error = %error_chain(&e),
                        "row cache: cannot read the audit log; reading machines from the database"
                    );
                    failing = true;
                }
                let last = freshness.synced_at().unwrap_or(started);
                if last.elapsed() > FORGET_AFTER {
                    rows.clear();
                }
            }
        }
    }
}

/// Reads the log after `after` to its end, dropping the machines it names;
/// returns when the last query was sent.
async fn catch_up(
    store: &PostgresStore,
    rows: &RowCache,
    after: &mut i64,
) -> Result<Instant, StoreError> {
    loop {
        let sent = Instant::now();
        let query = AuditQuery {
            after: *after,
            limit: PAGE,
            ..AuditQuery::default()
        };
        let page = store.list_audit_events(&query).await?;
        if page.is_empty() {
            return Ok(sent);
        }
        rows.invalidate_all(page.iter().map(|e| e.resource_id.as_str()));
        if let Some(last) = page.last() {
            *after = last.id;
        }
        if page.len() < PAGE as usize {
            return Ok(sent);
        }
    }
}
