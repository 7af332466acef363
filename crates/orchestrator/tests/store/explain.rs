//! A list page is one range scan of the keyset index, wherever the cursor
//! is: the plans of the statements the stores run, on a table large enough
//! that a planner would rather scan and sort if it could not use the index.
//! And PostgreSQL's numbering of audit events reads only the events still
//! waiting, however many it numbered before.

use peaqos_orchestrator::store::{PageKey, PoolSettings, postgres, sqlite};
use sqlx::{AssertSqlSafe, Connection as _, Executor as _, Row as _};

use crate::{Kind, machine, sqlite_file};

const ROWS: i64 = 20_000;
const PAGE: i64 = 500;

/// `(created_at, id)` of the i-th generated machine (1-based).
fn key_of(i: i64) -> PageKey {
    PageKey {
        created_at_ms: 1_000_000 + i,
        id: format!("mach_{i:026}"),
    }
}

#[tokio::test]
async fn sqlite_list_pages_search_the_index_without_sorting() {
    let db = sqlite_file().await;
    // One row through the store, the rest generated in SQL; every tenth
    // archived (outside the partial index).
    db.store
        .insert_machine(&machine("mach_first", "did:peaq:1", 1), None, None)
        .await
        .unwrap();
    let Kind::SqliteFile { url, .. } = &db.kind else {
        unreachable!()
    };
    let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
    conn.execute(AssertSqlSafe(format!(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {ROWS}) \
             INSERT INTO machines SELECT printf('mach_%026d', i), 'did:peaq:' || (i + 10), \
               CASE WHEN i % 10 = 0 THEN 'archived' ELSE 'active' END, 'Robot', 'o', '', '', \
               '[]', '{{}}', '[]', '[]', NULL, 1000000 + i, 1000000 + i FROM n"
    )))
    .await
    .unwrap();
    for analyzed in [false, true] {
        if analyzed {
            conn.execute("ANALYZE").await.unwrap();
        }
        for sql in [sqlite::LIST_KEYS_SQL, sqlite::LIST_ROWS_SQL] {
            for key in [
                PageKey {
                    created_at_ms: i64::MIN,
                    id: String::new(),
                },
                key_of(19_000),
            ] {
                let plan: Vec<String> =
                    sqlx::query(AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}")))
                        .bind(key.created_at_ms)
                        .bind(key.id.clone())
                        .bind(PAGE)
                        .fetch_all(&mut conn)
                        .await
                        .unwrap()
                        .iter()
                        .map(|r| r.get::<String, _>("detail"))
                        .collect();
                let text = plan.join(" | ");
                assert!(
                    plan.iter().any(|d| d.starts_with("SEARCH machines USING")
                        && d.contains("INDEX machines_live_page ((created_at,id)>(?,?))")),
                    "analyzed={analyzed}: {sql}: {text}"
                );
                assert!(!text.contains("TEMP B-TREE"), "sorts: {text}");
                assert!(!text.contains("SCAN machines"), "scans: {text}");
            }
        }
    }
}

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// `sql` explained with what it actually did: the query, to bind.
fn explain(sql: &str) -> PgQuery<'static> {
    sqlx::query(AssertSqlSafe(format!(
        "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) {sql}"
    )))
}

/// The plan an `explain` query printed, one line each.
async fn plan_of<'e>(query: PgQuery<'e>, conn: impl sqlx::PgExecutor<'e>) -> String {
    let lines: Vec<String> = query
        .fetch_all(conn)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<String, _>(0))
        .collect();
    lines.join("\n")
}

/// The plan of a page after `key`, with what it actually did.
async fn pg_plan(conn: &mut sqlx::PgConnection, key: &PageKey) -> String {
    let query = explain(postgres::LIST_PAGE_SQL)
        .bind(key.created_at_ms)
        .bind(key.id.clone())
        .bind(PAGE);
    plan_of(query, &mut *conn).await
}

/// A fresh PostgreSQL schema with the store's tables (kept while the
/// first half lives) and a connection to it; `None`: skipped.
async fn postgres_schema(test: &str) -> Option<(crate::Db, sqlx::PgConnection)> {
    let db = crate::postgres(test, &PoolSettings::default()).await?;
    let Kind::Postgres { schema, .. } = &db.kind else {
        unreachable!()
    };
    let conn = schema.connect().await;
    Some((db, conn))
}

#[tokio::test]
async fn postgres_list_pages_scan_one_index_range_without_sorting() {
    let Some((_db, mut conn)) =
        postgres_schema("postgres_list_pages_scan_one_index_range_without_sorting").await
    else {
        return;
    };
    conn.execute(AssertSqlSafe(format!(
        "INSERT INTO machines SELECT 'mach_' || lpad(i::text, 26, '0'), 'did:peaq:' || i, \
               CASE WHEN i % 10 = 0 THEN 'archived' ELSE 'active' END, 'Robot', 'o', '', '', \
               '[]', '{{}}', '[]', '[]', NULL, 1000000 + i, 1000000 + i \
             FROM generate_series(1, {ROWS}) AS i; \
             ANALYZE machines"
    )))
    .await
    .unwrap();
    let first = PageKey {
        created_at_ms: i64::MIN,
        id: String::new(),
    };
    // Custom plans (the first executions of a prepared statement) and the
    // generic plan PostgreSQL switches to after five of them.
    for mode in ["force_custom_plan", "force_generic_plan"] {
        conn.execute(AssertSqlSafe(format!("SET plan_cache_mode = {mode}")))
            .await
            .unwrap();
        for key in [&first, &key_of(19_000)] {
            let plan = pg_plan(&mut conn, key).await;
            assert!(
                plan.contains("Index Scan using machines_live_page on machines"),
                "{mode}: {plan}"
            );
            assert!(!plan.contains("Sort"), "{mode}: sorts: {plan}");
            assert!(!plan.contains("Seq Scan"), "{mode}: scans: {plan}");
            assert!(!plan.contains("Removed by Filter"), "{mode}: {plan}");
            // The index scan stops after one page, deep in the table too.
            let scan = plan
                .lines()
                .find(|l| l.contains("Index Scan"))
                .unwrap_or_default();
            assert!(scan.contains(&format!("rows={PAGE} ")), "{mode}: {plan}");
        }
    }
}

/// Every numbered event leaves its entry in `audit_events_unnumbered`,
/// pointing at the row version the numbering replaced, until a vacuum. A
/// plain or index-only scan marks such entries dead as it passes them, so
/// the next numbering skips them; a bitmap scan never does, and then every
/// numbering visits every event numbered since the last vacuum (measured in
/// docs/performance.md). With 20,000 numbered and 20 waiting, and no
/// statistics yet, the planner left to itself picks the bitmap scan.
#[tokio::test]
async fn postgres_audit_numbering_scans_the_waiting_index_without_a_bitmap() {
    let Some((_db, mut conn)) =
        postgres_schema("postgres_audit_numbering_scans_the_waiting_index_without_a_bitmap").await
    else {
        return;
    };
    let waiting = |n: i64| {
        format!(
            "INSERT INTO audit_events (actor, type, resource_type, resource_id, payload, created_at) \
             SELECT 'a', 'machine.updated', 'machine', 'mach_' || (i % 1000), '{{}}', i \
             FROM generate_series(1, {n}) AS i"
        )
    };
    conn.execute(AssertSqlSafe(waiting(ROWS))).await.unwrap();
    // 10,000 a numbering.
    for _ in 0..2 {
        sqlx::raw_sql(postgres::AUDIT_NUMBER_SQL)
            .execute(&mut conn)
            .await
            .unwrap();
    }
    conn.execute(AssertSqlSafe(waiting(20))).await.unwrap();
    // The statements before the last set up its transaction, as the store
    // sends them; the last is the numbering, explained.
    let (setup, numbering) = postgres::AUDIT_NUMBER_SQL.rsplit_once("; ").unwrap();
    let mut tx = conn.begin().await.unwrap();
    sqlx::raw_sql(AssertSqlSafe(setup.to_owned()))
        .execute(&mut *tx)
        .await
        .unwrap();
    let plan = plan_of(explain(numbering), &mut *tx).await;
    tx.commit().await.unwrap();
    assert!(!plan.contains("Bitmap"), "{plan}");
    assert!(plan.contains("using audit_events_unnumbered"), "{plan}");
    let numbered: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE id IS NOT NULL")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(numbered, ROWS + 20);
}

/// Every reader's statement finds its events through the id index or the
/// per-machine index, with events still waiting for their number beside
/// them: a page is one index range (in id order, without a sort, for the
/// whole log), never a scan of the table, deep in the log too; pruning
/// finds the oldest events by id. (Partial indexes of numbered events
/// only kept these plans too and saved 10 % of the trail's WAL, but no
/// registrations a second: docs/performance.md.)
#[tokio::test]
async fn postgres_audit_pages_and_pruning_read_by_index() {
    let Some((_db, mut conn)) =
        postgres_schema("postgres_audit_pages_and_pruning_read_by_index").await
    else {
        return;
    };
    conn.execute(AssertSqlSafe(format!(
        "INSERT INTO audit_events (actor, type, resource_type, resource_id, payload, created_at) \
         SELECT 'a', 'machine.updated', 'machine', 'mach_' || (i % 1000), '{{}}', i \
         FROM generate_series(1, {ROWS}) AS i"
    )))
    .await
    .unwrap();
    for _ in 0..2 {
        sqlx::raw_sql(postgres::AUDIT_NUMBER_SQL)
            .execute(&mut conn)
            .await
            .unwrap();
    }
    // Some still waiting for their number, as under writes.
    conn.execute(
        "INSERT INTO audit_events (actor, type, resource_type, resource_id, payload, created_at) \
         SELECT 'a', 'machine.updated', 'machine', 'mach_7', '{}', i \
         FROM generate_series(1, 20) AS i; ANALYZE audit_events",
    )
    .await
    .unwrap();
    // Custom plans first, then the generic plan PostgreSQL switches to.
    for round in 0..7 {
        for after in [0_i64, 19_000] {
            for (variant, sql) in postgres::AUDIT_PAGE_SQL.iter().enumerate() {
                let mut query = explain(sql).bind(after);
                if variant % 2 == 1 {
                    query = query.bind("mach_7");
                }
                if variant >= 2 {
                    query = query.bind("machine");
                }
                let plan = plan_of(query.bind(PAGE), &mut conn).await;
                let index = if variant % 2 == 1 {
                    "audit_events_resource"
                } else {
                    "audit_events_id"
                };
                let mode = format!("round {round}, after {after}, page {variant}");
                assert!(plan.contains(&format!(" {index} ")), "{mode}: {plan}");
                assert!(!plan.contains("Seq Scan"), "{mode}: scans: {plan}");
                // One machine's 20 events may be fetched and sorted; the
                // whole log never is.
                if variant % 2 == 0 {
                    assert!(!plan.contains("Sort"), "{mode}: sorts: {plan}");
                }
            }
        }
        // Nothing is old enough: pruning deletes nothing and reads by id.
        let mut tx = conn.begin().await.unwrap();
        let query = explain(postgres::AUDIT_PRUNE_SQL)
            .bind(0_i64)
            .bind(1_000_i64);
        let plan = plan_of(query, &mut *tx).await;
        tx.rollback().await.unwrap();
        // The oldest ids are found in the id index; which rows the delete
        // then visits is the planner's costing (a hash join over a table
        // this small, index probes over a large one).
        assert!(
            plan.contains("Index Only Scan using audit_events_id"),
            "round {round}: {plan}"
        );
    }
}
