//! The audit trail on every store: one event per machine write, in the
//! write's transaction; none for a refused write; ids in commit order with
//! no gap, also under concurrent writers on two PostgreSQL pools (two
//! replicas); pruning in bounded batches.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use peaqos_orchestrator::audit::{self, AuditEvent, AuditQuery, EventType, NewEvent};
use peaqos_orchestrator::store::{PostgresStore, Store, StoreError, StoredStatus};
use serde_json::json;

use crate::{consume, databases, machine, ts};

fn event(kind: EventType, machine: &str, at: i64) -> NewEvent {
    NewEvent {
        actor: "fleet-a".into(),
        kind,
        resource_id: machine.into(),
        payload: json!({"fields": ["displayName"]}),
        created_at: ts(at),
    }
}

async fn all(store: &dyn Store, machine_id: Option<&str>) -> Vec<AuditEvent> {
    store
        .list_audit_events(&AuditQuery {
            machine_id: machine_id.map(str::to_owned),
            resource_type: None,
            after: 0,
            limit: 500,
        })
        .await
        .unwrap()
}

fn ids(events: &[AuditEvent]) -> Vec<i64> {
    events.iter().map(|e| e.id).collect()
}

#[tokio::test]
#[allow(
    clippy::too_many_lines,
    reason = "one story: each write and refusal, then the log"
)]
async fn every_write_is_one_event_and_a_refused_write_none() {
    for db in databases("every_write_is_one_event_and_a_refused_write_none").await {
        let (store, name) = (&*db.store, db.name);
        let m = machine("mach_a", "did:peaq:1", 1_000);
        let created = audit::created(&m, "fleet-a".into());
        // An expired challenge: no machine, no event.
        assert!(matches!(
            store
                .insert_machine(&m, consume("chl_x", 1_000, 1_000), Some(&created))
                .await,
            Err(StoreError::ChallengeGone)
        ));
        assert!(all(store, None).await.is_empty(), "{name}");
        store
            .insert_machine(&m, consume("chl_0", 9_000_000, 1_000), Some(&created))
            .await
            .unwrap();
        // The identity is taken: refused, and no event.
        let clash = machine("mach_b", "did:peaq:1", 1_001);
        let clash_event = audit::created(&clash, "fleet-a".into());
        assert!(matches!(
            store.insert_machine(&clash, None, Some(&clash_event)).await,
            Err(StoreError::IdentityTaken { .. })
        ));
        let mut renamed = m.clone();
        renamed.display_name = "Renamed".into();
        renamed.status = StoredStatus::Active;
        renamed.updated_at = ts(2_000);
        let activated = audit::updated(&m, &renamed, false, "fleet-a".into());
        assert!(
            store
                .update_machine(&renamed, None, Some(&activated))
                .await
                .unwrap()
        );
        // An update consuming a used challenge: nothing changes, no event.
        assert!(matches!(
            store
                .update_machine(
                    &renamed,
                    consume("chl_0", 9_000_000, 2_000),
                    Some(&activated)
                )
                .await,
            Err(StoreError::ChallengeGone)
        ));
        assert_eq!(
            store
                .archive_machine("mach_a", ts(3_000), Some("ops"))
                .await
                .unwrap(),
            Some(true)
        );
        // Archived already, archived again, unknown: no event.
        assert_eq!(
            store
                .archive_machine("mach_a", ts(3_001), Some("ops"))
                .await
                .unwrap(),
            Some(false)
        );
        assert_eq!(
            store
                .archive_machine("mach_z", ts(3_002), Some("ops"))
                .await
                .unwrap(),
            None
        );
        let mut late = renamed.clone();
        late.display_name = "Late".into();
        let late_event = audit::updated(&renamed, &late, false, "fleet-a".into());
        assert!(
            !store
                .update_machine(&late, None, Some(&late_event))
                .await
                .unwrap(),
            "{name}: archived is final"
        );

        let events = all(store, None).await;
        assert_eq!(ids(&events), [1, 2, 3], "{name}: {events:#?}");
        assert_eq!(store.audit_head().await.unwrap(), 3, "{name}");
        let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(
            kinds,
            ["machine.created", "machine.activated", "machine.archived"],
            "{name}"
        );
        assert!(
            events
                .iter()
                .all(|e| e.resource_type == "machine" && e.resource_id == "mach_a")
        );
        assert_eq!(events[0].actor, "fleet-a");
        assert_eq!(events[0].created_at, ts(1_000));
        assert_eq!(
            events[0].payload["identity_ref"], "did:peaq:1",
            "{name}: {}",
            events[0].payload
        );
        assert_eq!(
            events[1].payload,
            json!({"fields": ["displayName"], "old_status": "draft", "new_status": "active"}),
            "{name}"
        );
        assert_eq!(events[2].actor, "ops");
        assert_eq!(events[2].created_at, ts(3_000));
        assert_eq!(
            events[2].payload,
            json!({"old_status": "active", "new_status": "archived"}),
            "{name}"
        );
        // Without an event (the trail off) the write happens all the same.
        store
            .insert_machine(&machine("mach_c", "did:peaq:2", 4_000), None, None)
            .await
            .unwrap();
        store
            .archive_machine("mach_c", ts(4_001), None)
            .await
            .unwrap();
        assert_eq!(all(store, None).await.len(), 3, "{name}");
    }
}

#[tokio::test]
async fn events_page_by_cursor_and_filter_by_machine() {
    for db in databases("events_page_by_cursor_and_filter_by_machine").await {
        let (store, name) = (&*db.store, db.name);
        for i in 0..5 {
            let m = machine(&format!("mach_{i}"), &format!("did:peaq:{i}"), i);
            let e = audit::created(&m, "fleet-a".into());
            store.insert_machine(&m, None, Some(&e)).await.unwrap();
        }
        for i in 0..5 {
            let mut m = machine(&format!("mach_{i}"), &format!("did:peaq:{i}"), i);
            m.display_name = "x".into();
            let e = event(EventType::Updated, &m.id, 10 + i);
            assert!(store.update_machine(&m, None, Some(&e)).await.unwrap());
        }
        let mut seen = Vec::new();
        let mut after = 0;
        loop {
            let page = store
                .list_audit_events(&AuditQuery {
                    machine_id: None,
                    resource_type: Some("machine".into()),
                    after,
                    limit: 3,
                })
                .await
                .unwrap();
            seen.extend(ids(&page));
            match page.last() {
                Some(last) => after = last.id,
                None => break,
            }
        }
        assert_eq!(seen, (1..=10).collect::<Vec<_>>(), "{name}");
        assert_eq!(ids(&all(store, Some("mach_3")).await), [4, 9], "{name}");
        let other_type = store
            .list_audit_events(&AuditQuery {
                machine_id: Some("mach_3".into()),
                resource_type: Some("policy".into()),
                after: 0,
                limit: 10,
            })
            .await
            .unwrap();
        assert!(other_type.is_empty(), "{name}");
    }
}

#[tokio::test]
async fn retention_prunes_the_oldest_events_in_bounded_batches() {
    for db in databases("retention_prunes_the_oldest_events_in_bounded_batches").await {
        let (store, name) = (&*db.store, db.name);
        let m = machine("mach_a", "did:peaq:1", 0);
        store.insert_machine(&m, None, None).await.unwrap();
        for i in 0..25 {
            let e = event(EventType::Updated, "mach_a", 1_000 * i);
            assert!(store.update_machine(&m, None, Some(&e)).await.unwrap());
        }
        // Events 1..=20 were written before 20 s.
        assert_eq!(store.prune_audit_events(ts(20_000), 8).await.unwrap(), 8);
        assert_eq!(store.prune_audit_events(ts(20_000), 8).await.unwrap(), 8);
        assert_eq!(store.prune_audit_events(ts(20_000), 8).await.unwrap(), 4);
        assert_eq!(store.prune_audit_events(ts(20_000), 8).await.unwrap(), 0);
        assert_eq!(ids(&all(store, None).await), [21, 22, 23, 24, 25], "{name}");
        // Numbering goes on after pruning (a cursor never points backwards).
        let e = event(EventType::Updated, "mach_a", 99_000);
        assert!(store.update_machine(&m, None, Some(&e)).await.unwrap());
        assert_eq!(all(store, None).await.last().unwrap().id, 26, "{name}");
        assert_eq!(
            store.prune_audit_events(ts(1_000_000), 100).await.unwrap(),
            6
        );
        assert_eq!(
            store.audit_head().await.unwrap(),
            26,
            "{name}: the head outlives pruning"
        );
        let e = event(EventType::Updated, "mach_a", 1_000_001);
        assert!(store.update_machine(&m, None, Some(&e)).await.unwrap());
        assert_eq!(
            ids(&all(store, None).await),
            [27],
            "{name}: not reused after emptying"
        );
    }
}

/// Concurrent writers, and the writes each makes. With ids from a sequence
/// instead of the counter row, this test failed in 1 of 6 runs at 25 writes
/// each, 3 of 5 at 100 and 4 of 4 at 300 (a later-committed smaller id was
/// skipped); 50 keeps it to seconds, as every write here takes its turn.
const WRITERS: usize = 16;
const WRITES: usize = 50;

/// Writers on two pools (two replicas of one database) while a reader
/// follows the log by cursor: whatever commits later with a smaller id
/// would be skipped for good. The reader must end with every id, once.
#[tokio::test]
async fn a_reader_following_concurrent_writers_on_two_replicas_misses_nothing() {
    let test = "a_reader_following_concurrent_writers_on_two_replicas_misses_nothing";
    let Some(schema) = crate::pg::PgSchema::create(test).await else {
        return;
    };
    let settings = peaqos_orchestrator::store::PoolSettings::default();
    let a = PostgresStore::open(&schema.url, &settings).await.unwrap();
    let b = PostgresStore::open(&schema.url, &settings).await.unwrap();
    let replicas: [Arc<dyn Store>; 2] = [Arc::new(a), Arc::new(b)];
    for w in 0..WRITERS {
        let m = machine(&format!("mach_{w:02}"), &format!("did:peaq:{w}"), 0);
        replicas[w % 2]
            .insert_machine(&m, None, None)
            .await
            .unwrap();
    }
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = Arc::clone(&replicas[w % 2]);
            tokio::spawn(async move {
                let mut m = machine(&format!("mach_{w:02}"), &format!("did:peaq:{w}"), 0);
                for i in 0..WRITES {
                    m.display_name = format!("write {i}");
                    let e = event(EventType::Updated, &m.id, 1);
                    assert!(store.update_machine(&m, None, Some(&e)).await.unwrap());
                }
            })
        })
        .collect();
    let total = i64::try_from(WRITERS * WRITES).unwrap();
    let reader = {
        let replicas = replicas.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut after = 0;
            let mut turn = 0;
            let deadline = tokio::time::Instant::now() + Duration::from_mins(1);
            while after < total {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "reader stalled at {after}"
                );
                turn += 1;
                let page = replicas[turn % 2]
                    .list_audit_events(&AuditQuery {
                        after,
                        limit: 7,
                        ..AuditQuery::default()
                    })
                    .await
                    .unwrap();
                if let Some(last) = page.last() {
                    after = last.id;
                } else {
                    tokio::task::yield_now().await;
                }
                seen.extend(ids(&page));
            }
            seen
        })
    };
    for w in writers {
        w.await.unwrap();
    }
    let seen = tokio::time::timeout(Duration::from_mins(1), reader)
        .await
        .expect("the reader catches up")
        .unwrap();
    assert_eq!(
        seen,
        (1..=total).collect::<Vec<_>>(),
        "no gap, no duplicate"
    );
    let from_a: BTreeSet<i64> = ids(&all(&*replicas[0], None).await).into_iter().collect();
    let from_b: BTreeSet<i64> = ids(&all(&*replicas[1], None).await).into_iter().collect();
    assert_eq!(from_a, from_b);
}

/// A writer whose transaction is still open after it wrote its event (a
/// slow commit: here a connection of the test's own, inserting the event
/// as a writer does) while another writer, on another replica, commits.
/// A reader on a third pool is shown the committed event; once the slow
/// one commits, the reader must still get it by cursor. Deterministic: an
/// id drawn when the event is written (a plain sequence) makes the slow
/// event's id smaller than the one the reader already paged past, every
/// time.
#[tokio::test]
async fn an_event_that_commits_after_a_later_one_is_not_skipped_by_cursor() {
    use sqlx::Executor as _;
    let test = "an_event_that_commits_after_a_later_one_is_not_skipped_by_cursor";
    let Some(schema) = crate::pg::PgSchema::create(test).await else {
        return;
    };
    let settings = peaqos_orchestrator::store::PoolSettings::default();
    let writer = PostgresStore::open(&schema.url, &settings).await.unwrap();
    let reader = PostgresStore::open(&schema.url, &settings).await.unwrap();
    for (id, identity) in [("mach_a", "did:peaq:1"), ("mach_b", "did:peaq:2")] {
        writer
            .insert_machine(&machine(id, identity, 0), None, None)
            .await
            .unwrap();
    }
    let mut slow = schema.connect().await;
    slow.execute("BEGIN").await.unwrap();
    slow.execute(
        "INSERT INTO audit_events (actor, type, resource_type, resource_id, payload, created_at) \
         VALUES ('slow', 'machine.updated', 'machine', 'mach_a', '{}', 1)",
    )
    .await
    .unwrap();
    let mut b = machine("mach_b", "did:peaq:2", 0);
    b.display_name = "fast".into();
    let e = event(EventType::Updated, "mach_b", 2);
    assert!(writer.update_machine(&b, None, Some(&e)).await.unwrap());

    let mut seen = Vec::new();
    let mut after = 0;
    let mut read = |page: Vec<AuditEvent>| {
        if let Some(last) = page.last() {
            after = last.id;
        }
        seen.extend(page.into_iter().map(|e| (e.id, e.resource_id)));
        after
    };
    let query = |after| AuditQuery {
        after,
        limit: 100,
        ..AuditQuery::default()
    };
    let cursor = read(reader.list_audit_events(&query(0)).await.unwrap());
    slow.execute("COMMIT").await.unwrap();
    read(reader.list_audit_events(&query(cursor)).await.unwrap());
    assert_eq!(
        seen,
        [(1, "mach_b".to_owned()), (2, "mach_a".to_owned())],
        "the committed event first, the slow one after it, none skipped"
    );
    assert_eq!(writer.audit_head().await.unwrap(), 2);
}
