//! Recently read machine records, kept in memory.
//!
//! The SQLite store is the only writer of its database (it holds an
//! exclusive lock on its file): every write it commits replaces or drops the
//! record here, so a cached record is never older than the database. A
//! PostgreSQL replica shares its database with other writers: it also drops
//! the records that the audit log says another replica changed, and serves
//! them only while that log has been read recently (`pg_cached`).
//!
//! A read that raced with a write or a drop of its record does not fill the
//! cache: each read notes the generation before it queries, and its row is
//! cached only if that record was not written or dropped meanwhile. A write
//! of several writers does the same with [`RowCache::written_since`], so
//! that a slower write never overwrites a newer version.
//!
//! Per record, not for the whole cache: with one generation for every
//! record, any write anywhere refused every read in flight, so under a
//! steady stream of writes (a herd re-proving, hundreds a second) almost no
//! read filled the cache and every re-proof read its row from PostgreSQL
//! twice (measured: 1.9 reads per re-proof, docs/performance.md). Only a
//! change of the same record can make a row read before it stale: another
//! replica's change reaches [`RowCache::invalidate_all`] only after it
//! committed, so after any read that could have missed it began.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::MachineRecord;

/// Records kept at most; past that, the oldest cached is dropped per insert.
const CAPACITY: usize = 65_536;

#[derive(Debug, Default)]
struct Inner {
    records: HashMap<String, MachineRecord>,
    /// Ids in the order they were cached, oldest first: eviction in
    /// constant time. (Dropping "the first key" of the map instead costs a
    /// scan over every emptied slot before it, which made pages slow down
    /// as a walk through 100,000 machines went on.) May name ids no longer
    /// cached, or twice: those are skipped when they come up.
    order: VecDeque<String>,
    generation: u64,
    /// The generation of each record's last change (write or drop), for
    /// the last [`CHANGES_KEPT`] changes, oldest first in `changes`.
    changed: HashMap<String, u64>,
    changes: VecDeque<(u64, String)>,
    /// Tickets older than this are refused: a change after them has been
    /// forgotten (or everything was dropped).
    refuse_below: u64,
}

/// Changes remembered per record; a read that began more changes ago than
/// this is not cached (it was in flight for long, under many writes).
const CHANGES_KEPT: usize = 65_536;

impl Inner {
    /// Whether a row of `id` read with `ticket` is as new as every change
    /// of `id` this cache has seen since.
    fn unchanged_since(&self, ticket: Ticket, id: &str) -> bool {
        ticket.0 >= self.refuse_below && self.changed.get(id).is_none_or(|at| *at <= ticket.0)
    }

    /// Counts a change of `id`.
    fn change(&mut self, id: &str) {
        self.generation += 1;
        let at = self.generation;
        self.changed.insert(id.to_owned(), at);
        self.changes.push_back((at, id.to_owned()));
        while self.changes.len() > CHANGES_KEPT {
            let Some((at, id)) = self.changes.pop_front() else {
                break;
            };
            if self.changed.get(&id) == Some(&at) {
                self.changed.remove(&id);
            }
            self.refuse_below = at;
        }
    }
}

/// See the module documentation.
#[derive(Debug)]
pub struct RowCache {
    inner: Mutex<Inner>,
    capacity: usize,
}

impl Default for RowCache {
    fn default() -> Self {
        Self::with_capacity(CAPACITY)
    }
}

/// The write generation a read started at.
#[derive(Debug, Clone, Copy)]
pub struct Ticket(u64);

impl RowCache {
    /// A cache of at most `capacity` records (at least one).
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            inner: Mutex::default(),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
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

    /// Caches a row read from the database, unless a write or drop of it
    /// came since the ticket was issued.
    pub fn fill(&self, ticket: Ticket, record: &MachineRecord) {
        let mut inner = self.lock();
        if inner.unchanged_since(ticket, &record.id) {
            insert_bounded(&mut inner, record.clone(), self.capacity);
        }
    }

    /// After a committed write of `record`.
    pub fn written(&self, record: &MachineRecord) {
        let mut inner = self.lock();
        inner.change(&record.id);
        insert_bounded(&mut inner, record.clone(), self.capacity);
    }

    /// After a committed write of `record` that began at `ticket`, in a
    /// store with concurrent writers: cached only if nothing was written or
    /// dropped since, for otherwise a newer version may already have been
    /// seen (a later commit, here or at another replica) and this one would
    /// replace it. Dropped then, so that the next read asks the database.
    pub fn written_since(&self, ticket: Ticket, record: &MachineRecord) {
        let mut inner = self.lock();
        let unchanged = inner.unchanged_since(ticket, &record.id);
        inner.change(&record.id);
        if unchanged {
            insert_bounded(&mut inner, record.clone(), self.capacity);
        } else {
            inner.records.remove(&record.id);
        }
    }

    /// Drops every id of `ids` (changed elsewhere), in one step.
    pub fn invalidate_all<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let mut inner = self.lock();
        for id in ids {
            inner.change(id);
            inner.records.remove(id);
        }
    }

    /// Drops every record.
    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.generation += 1;
        inner.refuse_below = inner.generation;
        inner.changed.clear();
        inner.changes.clear();
        inner.records.clear();
        inner.order.clear();
    }

    /// After a committed write that changed `id` in a way not worth
    /// rebuilding here (archiving).
    pub fn invalidate(&self, id: &str) {
        let mut inner = self.lock();
        inner.change(id);
        inner.records.remove(id);
    }
}

fn insert_bounded(inner: &mut Inner, record: MachineRecord, capacity: usize) {
    if let Some(cached) = inner.records.get_mut(&record.id) {
        *cached = record;
        return;
    }
    while inner.records.len() >= capacity {
        let Some(oldest) = inner.order.pop_front() else {
            break;
        };
        inner.records.remove(&oldest);
    }
    inner.order.push_back(record.id.clone());
    inner.records.insert(record.id.clone(), record);
    // Ids of dropped records pile up only through invalidations; keep the
    // queue within twice the capacity.
    if inner.order.len() > 2 * capacity {
        let Inner { records, order, .. } = inner;
        order.retain(|id| records.contains_key(id));
    }
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
    fn the_oldest_record_makes_room_and_the_bound_holds() {
        let mut inner = Inner::default();
        for i in 0..5 {
            insert_bounded(&mut inner, record(&format!("m{i}"), "a"), 3);
        }
        let mut kept: Vec<_> = inner.records.keys().cloned().collect();
        kept.sort();
        assert_eq!(kept, ["m2", "m3", "m4"]);
        // A rewrite keeps its place; invalidated ids are skipped.
        insert_bounded(&mut inner, record("m2", "b"), 3);
        inner.records.remove("m3");
        insert_bounded(&mut inner, record("m5", "a"), 3);
        insert_bounded(&mut inner, record("m6", "a"), 3);
        let mut kept: Vec<_> = inner.records.keys().cloned().collect();
        kept.sort();
        assert_eq!(kept, ["m4", "m5", "m6"]);
        // Many invalidations do not grow the queue without bound.
        for i in 0..100 {
            let id = format!("x{i}");
            insert_bounded(&mut inner, record(&id, "a"), 3);
            inner.records.remove(&id);
        }
        assert!(inner.order.len() <= 6, "{}", inner.order.len());
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

        // A drop of this id (a change at another replica) refuses the
        // fill; a change of other records does not.
        let ticket = cache.get("n").unwrap_err();
        cache.invalidate_all(["x", "n"]);
        cache.fill(ticket, &record("n", "old"));
        assert!(cache.get("n").is_err());
    }

    #[test]
    fn writes_of_other_records_do_not_stop_a_read_from_filling() {
        let cache = RowCache::default();
        let ticket = cache.get("m").unwrap_err();
        // A herd: other machines written here and at other replicas while
        // this read is in flight.
        cache.written(&record("a", "x"));
        cache.written_since(cache.ticket(), &record("b", "x"));
        cache.invalidate_all(["c", "d"]);
        cache.invalidate("e");
        cache.fill(ticket, &record("m", "read"));
        assert_eq!(cache.get("m").unwrap().display_name, "read");
        // A write that began before those changes of other records is
        // cached too.
        let ticket = cache.ticket();
        cache.invalidate_all(["c"]);
        cache.written_since(ticket, &record("m", "written"));
        assert_eq!(cache.get("m").unwrap().display_name, "written");
    }

    #[test]
    fn a_read_older_than_the_changes_remembered_or_a_clear_is_not_cached() {
        let cache = RowCache::default();
        let ticket = cache.get("m").unwrap_err();
        cache.invalidate("m");
        // The change of "m" is forgotten once enough others follow it.
        for i in 0..CHANGES_KEPT {
            cache.invalidate(&format!("x{i}"));
        }
        assert!(!cache.lock().changed.contains_key("m"));
        cache.fill(ticket, &record("m", "old"));
        assert!(cache.get("m").is_err(), "refused all the same");
        assert!(cache.lock().changes.len() <= CHANGES_KEPT);

        let ticket = cache.get("n").unwrap_err();
        cache.clear();
        cache.fill(ticket, &record("n", "old"));
        assert!(cache.get("n").is_err());
        let ticket = cache.get("n").unwrap_err();
        cache.fill(ticket, &record("n", "new"));
        assert_eq!(cache.get("n").unwrap().display_name, "new");
    }

    #[test]
    fn a_slower_write_never_replaces_a_newer_version() {
        let cache = RowCache::default();
        // Two writes of one record begin; the second commits and is cached
        // first; the first, older, arrives last and must not replace it.
        let (first, second) = (cache.ticket(), cache.ticket());
        cache.written_since(second, &record("m", "v2"));
        cache.written_since(first, &record("m", "v1"));
        assert!(cache.get("m").is_err(), "dropped, to be read again");
        // Alone, a write is cached: a client reads what it wrote.
        let t = cache.ticket();
        cache.written_since(t, &record("m", "v3"));
        assert_eq!(cache.get("m").unwrap().display_name, "v3");
        cache.clear();
        assert!(cache.get("m").is_err());
    }
}
