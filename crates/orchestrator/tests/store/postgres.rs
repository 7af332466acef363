//! What only the PostgreSQL store has: replicas migrating at once, and the
//! limits that keep a slow or saturated database from holding requests.

use std::time::{Duration, Instant};

use peaqos_orchestrator::store::{PoolSettings, PostgresStore, Store, StoreError};
use sqlx::{Connection as _, Executor as _};

use crate::pg::PgSchema;
use crate::{Kind, machine};

#[tokio::test]
async fn replicas_starting_together_migrate_once() {
    let Some(schema) = PgSchema::create("replicas_starting_together_migrate_once").await else {
        return;
    };
    let opened: Vec<_> = (0..4)
        .map(|_| {
            let url = schema.url.clone();
            tokio::spawn(async move { PostgresStore::open(&url, &PoolSettings::default()).await })
        })
        .collect();
    let mut stores = Vec::new();
    for o in opened {
        stores.push(o.await.unwrap().expect("every replica starts"));
    }
    let mut conn = schema.connect().await;
    let (applied, ok): (i64, bool) =
        sqlx::query_as("SELECT count(*), bool_and(success) FROM _sqlx_migrations")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres"))
        .unwrap()
        .count();
    assert_eq!(usize::try_from(applied).unwrap(), files);
    assert!(ok);
    // A later start finds nothing to do.
    PostgresStore::open(&schema.url, &PoolSettings::default())
        .await
        .unwrap();
    for s in stores {
        s.ping().await.unwrap();
        s.close().await;
    }
}

#[tokio::test]
async fn a_write_stuck_behind_a_lock_gives_up_at_the_statement_timeout() {
    let settings = PoolSettings {
        statement_timeout: Duration::from_millis(300),
        ..PoolSettings::default()
    };
    let test = "a_write_stuck_behind_a_lock_gives_up_at_the_statement_timeout";
    let Some(db) = crate::postgres(test, &settings).await else {
        return;
    };
    let Kind::Postgres { store, schema } = &db.kind else {
        unreachable!()
    };
    let shown: String = {
        let mut conn = store.pool().acquire().await.unwrap();
        sqlx::query_scalar("SHOW statement_timeout")
            .fetch_one(&mut *conn)
            .await
            .unwrap()
    };
    assert_eq!(shown, "300ms");

    let m = machine("mach_a", "did:peaq:1", 1);
    store.insert_machine(&m, None, None).await.unwrap();
    // Another session (an operator's psql, a stuck replica) holds the row.
    let mut other = schema.connect().await;
    other.execute("BEGIN").await.unwrap();
    other
        .execute("SELECT * FROM machines WHERE id = 'mach_a' FOR UPDATE")
        .await
        .unwrap();
    let started = Instant::now();
    let mut renamed = m.clone();
    renamed.display_name = "renamed".into();
    let result = store.update_machine(&renamed, None, None).await;
    let waited = started.elapsed();
    assert!(
        matches!(&result, Err(e @ StoreError::Unavailable(_)) if e.is_unavailable()),
        "{result:?}"
    );
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    other.execute("ROLLBACK").await.unwrap();
    assert!(store.update_machine(&renamed, None, None).await.unwrap());
    let _ = other.close().await;
}

#[tokio::test]
async fn a_saturated_pool_answers_unavailable_after_the_acquire_timeout() {
    let settings = PoolSettings {
        max_connections: 2,
        acquire_timeout: Duration::from_millis(300),
        ..PoolSettings::default()
    };
    let test = "a_saturated_pool_answers_unavailable_after_the_acquire_timeout";
    let Some(db) = crate::postgres(test, &settings).await else {
        return;
    };
    let Kind::Postgres { store, .. } = &db.kind else {
        unreachable!()
    };
    // Requests beyond the limit queue for a connection...
    let many: Vec<_> = (0..12)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let m = machine(&format!("mach_{i}"), &format!("did:peaq:{i}"), i);
                store.insert_machine(&m, None, None).await
            })
        })
        .collect();
    for t in many {
        t.await.unwrap().unwrap();
    }
    assert!(store.pool().size() <= 2, "{}", store.pool().size());
    // ... but not for ever: with every connection taken, a request gives up.
    let held = (
        store.pool().acquire().await.unwrap(),
        store.pool().acquire().await.unwrap(),
    );
    let started = Instant::now();
    let result = store.get_machine("mach_1").await;
    assert!(
        matches!(result, Err(StoreError::Unavailable(_))),
        "{result:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    drop(held);
    assert!(store.get_machine("mach_1").await.unwrap().is_some());
}

/// Needs no PostgreSQL: nothing listens at the address.
#[tokio::test]
async fn an_unreachable_database_fails_start_up_quickly() {
    let port = peaqos_testkit::free_port();
    let started = Instant::now();
    let settings = PoolSettings {
        acquire_timeout: Duration::from_millis(500),
        ..PoolSettings::default()
    };
    let result = PostgresStore::open(
        &format!("postgres://postgres@127.0.0.1:{port}/test"),
        &settings,
    )
    .await;
    assert!(
        matches!(result, Err(StoreError::Unavailable(_))),
        "{result:?}"
    );
    // Connection refused is retried (a database that is starting), within
    // the time a request would wait for a connection.
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(100) && waited <= Duration::from_millis(1500),
        "{waited:?}"
    );
}
