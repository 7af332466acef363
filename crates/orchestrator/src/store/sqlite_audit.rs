//! The audit trail on SQLite: the last id drawn, and reading and pruning
//! the log. Events are inserted by the writer (`sqlite_writer`), in the
//! same query as the change they record, numbered in the order its writes
//! run, so that ids follow commit order.

use peaqos_protocol::Timestamp;
use sqlx::sqlite::{SqliteConnection, SqlitePool};

use super::StoreError;
use super::rows::{audit_columns, audit_event_from_row};
use crate::audit::{AuditEvent, AuditQuery};

/// The last event id drawn (0 if none ever was).
pub(super) async fn last_id(conn: &mut SqliteConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT last_id FROM audit_sequence WHERE only_row = 1")
        .fetch_one(conn)
        .await
}

/// Stores the last event id drawn, once per transaction that drew any.
pub(super) async fn set_last_id(conn: &mut SqliteConnection, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE audit_sequence SET last_id = ? WHERE only_row = 1")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Deletes up to `?2` of the oldest events before the first one written at
/// or after `?1` (log order: a clock that stepped back does not make a
/// later event go first).
const PRUNE_AUDIT_SQL: &str = "DELETE FROM audit_events WHERE id IN (\
        SELECT id FROM audit_events WHERE id < COALESCE(\
            (SELECT id FROM audit_events WHERE created_at >= ?1 ORDER BY id LIMIT 1), \
            9223372036854775807) \
        ORDER BY id LIMIT ?2)";

/// One page of the log after `q.after`, oldest first.
pub(super) async fn list(
    reader: &SqlitePool,
    q: &AuditQuery,
) -> Result<Vec<AuditEvent>, StoreError> {
    let sql = match (q.machine_id.is_some(), q.resource_type.is_some()) {
        (false, false) => concat!(
            "SELECT ",
            audit_columns!(),
            " FROM audit_events WHERE id > ? ORDER BY id LIMIT ?"
        ),
        (true, false) => concat!(
            "SELECT ",
            audit_columns!(),
            " FROM audit_events WHERE id > ? AND resource_id = ? ORDER BY id LIMIT ?"
        ),
        (false, true) => concat!(
            "SELECT ",
            audit_columns!(),
            " FROM audit_events WHERE id > ? AND resource_type = ? ORDER BY id LIMIT ?"
        ),
        (true, true) => concat!(
            "SELECT ",
            audit_columns!(),
            " FROM audit_events WHERE id > ? AND resource_id = ? \
             AND resource_type = ? ORDER BY id LIMIT ?"
        ),
    };
    let mut query = sqlx::query(sql).bind(q.after);
    if let Some(m) = &q.machine_id {
        query = query.bind(m);
    }
    if let Some(t) = &q.resource_type {
        query = query.bind(t);
    }
    let rows = query.bind(i64::from(q.limit)).fetch_all(reader).await?;
    rows.iter().map(audit_event_from_row).collect()
}

/// The last id numbered (and so committed: the writer is the only one).
pub(super) async fn head(reader: &SqlitePool) -> Result<i64, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT last_id FROM audit_sequence WHERE only_row = 1")
            .fetch_one(reader)
            .await?,
    )
}

/// Deletes up to `batch` of the oldest events written before `before`.
pub(super) async fn prune(
    writer: &SqlitePool,
    before: Timestamp,
    batch: u32,
) -> Result<u64, StoreError> {
    let done = sqlx::query(PRUNE_AUDIT_SQL)
        .bind(before.unix_millis())
        .bind(i64::from(batch))
        .execute(writer)
        .await?;
    Ok(done.rows_affected())
}
