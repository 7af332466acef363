//! `GET /api/v1/audit-events`: the audit trail, oldest first, in the shape
//! the peaqOS SDK reads (`list_audit_events`): snake_case fields and
//! `next_cursor`. The SDK sends its filters in camelCase (`machineId`,
//! `resourceType`); the snake_case spellings are accepted too.
//!
//! A cursor is an event id: the last id of a page (`next_cursor`), or of
//! anything seen before, resumes right after it on any replica. A cursor
//! past the last committed event is refused (`400`, naming it and the
//! head): accepted, it would skip the events written up to it.

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::routing::get;
use peaqos_protocol::ErrorCode;
use serde::{Deserialize, Serialize};

use super::machines::parse_limit;
use super::{ApiError, AppState};
use crate::audit::{AuditEvent, AuditQuery, RESOURCE_MACHINE};
use crate::ids;

pub const AUDIT_EVENTS: &str = "/api/v1/audit-events";

/// Digits of a cursor: 18 always fit an event id (the document's pattern
/// says the same, so that a fuzzer's valid cursor is one).
const MAX_CURSOR_LEN: usize = 18;

pub fn router() -> Router<AppState> {
    Router::new().route(AUDIT_EVENTS, get(list))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    limit: Option<String>,
    cursor: Option<String>,
    machine_id: Option<String>,
    #[serde(rename = "machineId")]
    machine_id_camel: Option<String>,
    resource_type: Option<String>,
    #[serde(rename = "resourceType")]
    resource_type_camel: Option<String>,
}

/// An event on the wire.
#[derive(Debug, Serialize)]
pub struct WireEvent {
    pub id: String,
    pub actor: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub resource_type: String,
    pub resource_id: String,
    pub payload: serde_json::Value,
    pub created_at: peaqos_protocol::Timestamp,
}

impl From<AuditEvent> for WireEvent {
    fn from(e: AuditEvent) -> Self {
        Self {
            id: e.id.to_string(),
            actor: e.actor,
            kind: e.kind,
            resource_type: e.resource_type,
            resource_id: e.resource_id,
            payload: e.payload,
            created_at: e.created_at,
        }
    }
}

#[derive(Debug, Serialize)]
struct Page {
    items: Vec<WireEvent>,
    next_cursor: Option<String>,
}

/// An event id given back as a cursor.
pub fn parse_cursor(cursor: &str) -> Option<i64> {
    if cursor.is_empty()
        || cursor.len() > MAX_CURSOR_LEN
        || !cursor.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    cursor.parse().ok()
}

/// Refuses a cursor past the last committed event: the ids between the
/// head and the cursor would be skipped as they are written. The head is
/// read from the database, not this process's tail, since another replica
/// may have written further.
pub(super) async fn refuse_past_head(
    app: &AppState,
    field: &str,
    cursor: i64,
) -> Result<(), ApiError> {
    let head = app.audit_head().await?;
    if cursor <= head {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorCode::ValidationError,
        format!(
            "{field} {cursor} is past the end of the audit log (its last event is {head}); \
             resume from an id this server issued"
        ),
    )
    .with_details(serde_json::json!({ "field": field, "head": head.to_string() })))
}

/// One filter given in either spelling (the same value if both).
fn either(
    field: &str,
    snake: Option<String>,
    camel: Option<String>,
) -> Result<Option<String>, ApiError> {
    match (snake, camel) {
        (Some(a), Some(b)) if a != b => Err(ApiError::validation(
            field,
            format!("{field} is given twice with different values"),
        )),
        (a, b) => Ok(a.or(b)),
    }
}

async fn list(
    State(app): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<axum::Json<Page>, ApiError> {
    let Query(q) =
        query.map_err(|_| ApiError::validation("query", "the query string is malformed"))?;
    let limit = parse_limit(q.limit.as_deref())?;
    let after = match q.cursor.as_deref() {
        None => 0,
        Some(c) => parse_cursor(c).ok_or_else(|| {
            ApiError::validation(
                "cursor",
                "cursor is not one this server issued (an event id)",
            )
        })?,
    };
    let machine_id = either("machine_id", q.machine_id, q.machine_id_camel)?;
    if let Some(id) = &machine_id
        && !ids::looks_like(ids::MACHINE_PREFIX, id)
    {
        return Err(ApiError::validation(
            "machine_id",
            "machine_id is not a machine id (mach_...)",
        ));
    }
    let resource_type = either("resource_type", q.resource_type, q.resource_type_camel)?;
    if resource_type
        .as_deref()
        .is_some_and(|t| t != RESOURCE_MACHINE)
    {
        return Err(ApiError::validation(
            "resource_type",
            format!("resource_type must be {RESOURCE_MACHINE:?}, the only resource recorded"),
        ));
    }
    let page = app
        .list_audit_events(&AuditQuery {
            machine_id,
            resource_type,
            after,
            limit,
        })
        .await?;
    // A page with events shows the cursor is within the log; only an
    // empty one costs the look-up of the head.
    if page.items.is_empty() && after > 0 {
        refuse_past_head(&app, "cursor", after).await?;
    }
    Ok(axum::Json(Page {
        items: page.items.into_iter().map(WireEvent::from).collect(),
        next_cursor: page.next.map(|id| id.to_string()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_are_event_ids() {
        assert_eq!(parse_cursor("0"), Some(0));
        assert_eq!(parse_cursor("42"), Some(42));
        assert_eq!(
            parse_cursor("999999999999999999"),
            Some(999_999_999_999_999_999)
        );
        for bad in ["", "-1", "+1", "1.5", "x", "1234567890123456789", "1 "] {
            assert_eq!(parse_cursor(bad), None, "{bad}");
        }
    }
}
