//! Recently read machine records, kept in memory by a store that is the only
//! writer of its database (the SQLite store, which holds an exclusive lock
//! on its file).
//!
//! Every write the store commits replaces or drops the record here, so a
//! cached record is never older than the database. A read that raced with a
//! write does not fill the cache: each read notes the write generation
//! before it queries, and its row is cached only if no write was committed
//! meanwhile. A store shared by several processes (PostgreSQL replicas) must
//! not use this cache.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::MachineRecord;

/// Records kept at most; past that, an arbitrary one is dropped per insert.
const CAPACITY: usize = 65_536;

#[derive(Debug, Default)]
struct Inner {
    records: HashMap<String, MachineRecord>,
    generation: u64,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct RowCache(Mutex<Inner>);

/// The write generation a read started at.
#[derive(Debug, Clone, Copy)]
pub struct Ticket(u64);

impl RowCache {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The cached record, or a ticket to present with the row read instead.
    pub fn get(&self, id: &str) -> Result<MachineRecord, Ticket> {
        let inner = self.lock();
        inner
            .records
            .get(id)
            .cloned()
            .ok_or(Ticket(inner.generation))
    }

    /// A ticket for a read of several rows.
    pub fn ticket(&self) -> Ticket {
        Ticket(self.lock().generation)
    }

    /// Caches a row read from the database, unless a write committed since
    /// the ticket was issued.
    pub fn fill(&self, ticket: Ticket, record: &MachineRecord) {
        let mut inner = self.lock();
        if inner.generation == ticket.0 {
            insert(&mut inner, record.clone());
        }
    }

    /// After a committed write of `record`.
    pub fn written(&self, record: &MachineRecord) {
        let mut inner = self.lock();
        inner.generation += 1;
        insert(&mut inner, record.clone());
    }

    /// After a committed write that changed `id` in a way not worth
    /// rebuilding here (archiving).
    pub fn invalidate(&self, id: &str) {
        let mut inner = self.lock();
        inner.generation += 1;
        inner.records.remove(id);
    }
}

fn insert(inner: &mut Inner, record: MachineRecord) {
    if inner.records.len() >= CAPACITY && !inner.records.contains_key(&record.id) {
        let victim = inner.records.keys().next().cloned();
        if let Some(victim) = victim {
            inner.records.remove(&victim);
        }
    }
    inner.records.insert(record.id.clone(), record);
}

#[cfg(test)]
mod tests {
    use peaqos_protocol::{IdentityRef, Timestamp};

    use super::*;
    use crate::store::StoredStatus;

    fn record(id: &str, name: &str) -> MachineRecord {
        MachineRecord {
            id: id.into(),
            identity: IdentityRef::parse("did:peaq:1").unwrap(),
            status: StoredStatus::Draft,
            display_name: name.into(),
            owner_id: "o".into(),
            machine_type: String::new(),
            runtime_profile: String::new(),
            capabilities: vec![],
            labels: std::collections::BTreeMap::new(),
            policy_ids: vec![],
            skill_keys: vec![],
            proof: None,
            created_at: Timestamp::from_unix_millis(0).unwrap(),
            updated_at: Timestamp::from_unix_millis(0).unwrap(),
        }
    }

    #[test]
    fn a_read_that_raced_with_a_write_is_not_cached() {
        let cache = RowCache::default();
        let ticket = cache.get("m").unwrap_err();
        // A write commits while the read is in flight with the old row.
        cache.written(&record("m", "new"));
        cache.fill(ticket, &record("m", "old"));
        assert_eq!(cache.get("m").unwrap().display_name, "new");

        cache.invalidate("m");
        let ticket = cache.get("m").unwrap_err();
        cache.fill(ticket, &record("m", "read"));
        assert_eq!(cache.get("m").unwrap().display_name, "read");
    }
}
