//! The PostgreSQL store with machine records kept in memory, so that a read
//! of a machine costs no database round trip while the record is cached.
//!
//! Another replica may change any row at any time, so a record is served
//! from memory only while this replica has recently read the audit log to
//! its end and dropped what it names (`pg_changes`): at most
//! [`FRESH_FOR`](super::pg_changes::FRESH_FOR) stale across replicas. On
//! one replica a client reads its own writes: every write this process
//! commits replaces or drops the record before the write returns.
//!
//! Only `get_machine` reads from memory; every other operation is the
//! PostgreSQL store's, unchanged. What a read does with the record (the
//! signer re-verified against fresh controller data, the proof's age) is
//! the service's, on every read, wherever the row came from.

use std::sync::{Arc, Mutex, PoisonError};

use peaqos_protocol::{IdentityRef, Timestamp};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::pg_changes::{self, Freshness};
use super::row_cache::RowCache;
use super::{
    Backend, CloseFuture, Consume, MachineRecord, PageKey, PostgresStore, Store, StoreFuture,
};
use crate::audit::{AuditEvent, AuditQuery, NewEvent};

/// See the module documentation.
#[derive(Debug)]
pub struct CachedPostgresStore {
    store: PostgresStore,
    rows: Arc<RowCache>,
    freshness: Arc<Freshness>,
    stop: CancellationToken,
    feed: Mutex<Option<JoinHandle<()>>>,
}

impl CachedPostgresStore {
    /// Keeps up to `capacity` records of `store`, and starts following the
    /// audit log through `feed` (the same database, on connections of its
    /// own) on the current runtime until [`Store::close`].
    pub fn new(store: PostgresStore, feed: PostgresStore, capacity: usize) -> Self {
        let rows = Arc::new(RowCache::with_capacity(capacity));
        let freshness = Arc::new(Freshness::default());
        let stop = CancellationToken::new();
        let feed = tokio::spawn(pg_changes::follow(
            feed,
            Arc::clone(&rows),
            Arc::clone(&freshness),
            stop.clone(),
        ));
        Self {
            store,
            rows,
            freshness,
            stop,
            feed: Mutex::new(Some(feed)),
        }
    }
}

impl Drop for CachedPostgresStore {
    /// A store dropped without [`Store::close`] still stops its feed.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Store for CachedPostgresStore {
    fn backend(&self) -> Backend {
        Backend::Postgres
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        self.store.ping()
    }

    fn close(&self) -> CloseFuture<'_> {
        Box::pin(async move {
            self.stop.cancel();
            let feed = self
                .feed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some(feed) = feed {
                let _ = feed.await;
            }
            self.store.close().await;
        })
    }

    fn challenge_key(&self, offered: [u8; 32]) -> StoreFuture<'_, [u8; 32]> {
        self.store.challenge_key(offered)
    }

    fn delete_expired_redemptions(&self, before: Timestamp) -> StoreFuture<'_, u64> {
        self.store.delete_expired_redemptions(before)
    }

    fn insert_machine<'a>(
        &'a self,
        machine: &'a MachineRecord,
        consume: Option<Consume<'a>>,
        event: Option<&'a NewEvent>,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let ticket = self.rows.ticket();
            let done = self.store.insert_machine(machine, consume, event).await;
            match &done {
                Ok(()) => self.rows.written_since(ticket, machine),
                // It may have committed before the error (a lost connection).
                Err(_) => self.rows.invalidate(&machine.id),
            }
            done
        })
    }

    fn get_machine<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<MachineRecord>> {
        Box::pin(async move {
            let ticket = if self.freshness.fresh() {
                match self.rows.get(id) {
                    Ok(cached) => return Ok(Some(cached)),
                    Err(ticket) => ticket,
                }
            } else {
                self.rows.ticket()
            };
            let record = self.store.get_machine(id).await?;
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
        self.store.live_machine_for(identity)
    }

    fn update_machine<'a>(
        &'a self,
        machine: &'a MachineRecord,
        consume: Option<Consume<'a>>,
        event: Option<&'a NewEvent>,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let ticket = self.rows.ticket();
            let done = self.store.update_machine(machine, consume, event).await;
            match &done {
                Ok(true) => self.rows.written_since(ticket, machine),
                Ok(false) | Err(_) => self.rows.invalidate(&machine.id),
            }
            done
        })
    }

    fn archive_machine<'a>(
        &'a self,
        id: &'a str,
        now: Timestamp,
        actor: Option<&'a str>,
    ) -> StoreFuture<'a, Option<bool>> {
        Box::pin(async move {
            let done = self.store.archive_machine(id, now, actor).await;
            self.rows.invalidate(id);
            done
        })
    }

    fn list_audit_events<'a>(&'a self, query: &'a AuditQuery) -> StoreFuture<'a, Vec<AuditEvent>> {
        self.store.list_audit_events(query)
    }

    fn audit_head(&self) -> StoreFuture<'_, i64> {
        self.store.audit_head()
    }

    fn prune_audit_events(&self, before: Timestamp, batch: u32) -> StoreFuture<'_, u64> {
        self.store.prune_audit_events(before, batch)
    }

    fn list_machines<'a>(
        &'a self,
        after: Option<&'a PageKey>,
        limit: u32,
    ) -> StoreFuture<'a, Vec<MachineRecord>> {
        self.store.list_machines(after, limit)
    }

    fn count_by_status(&self) -> StoreFuture<'_, Vec<(String, i64)>> {
        self.store.count_by_status()
    }
}
