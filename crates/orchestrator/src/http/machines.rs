//! `/api/v1/machines`: create, read, update, archive and list machine
//! records. Each handler parses (path, query, body, field bounds), calls the
//! service, and maps its answer; the rules live in `lifecycle`.

use axum::Extension;
use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use peaqos_protocol::envelope::pagination::{DEFAULT_LIMIT, MAX_LIMIT};
use peaqos_protocol::{
    CreateMachineRequest, ItemResponse, ListResponse, Machine, UpdateMachineRequest, paths,
};
use serde::Deserialize;

use super::validate::{validate_create, validate_update};
use super::{ApiError, ApiJson, AppState};
use crate::audit::Caller;
use crate::ids;
use crate::roles::{self, Role};
use crate::store::PageKey;

/// The path of one machine, as routed.
pub const MACHINE_ROUTE: &str = "/api/v1/machines/{machineId}";

const MAX_CURSOR_LEN: usize = 128;

pub fn router() -> Router<AppState> {
    Router::new()
        .route(paths::MACHINES, get(list).post(create))
        .route(MACHINE_ROUTE, get(read).patch(update).delete(archive))
}

type Item = axum::Json<ItemResponse<Machine>>;

fn item(machine: Machine) -> Item {
    axum::Json(ItemResponse { item: machine })
}

/// The machine id from the path; anything we cannot have issued is 404
/// without touching the database.
fn machine_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    match path {
        Ok(Path(id)) if ids::looks_like(ids::MACHINE_PREFIX, &id) => Ok(id),
        _ => Err(ApiError::not_found("machine")),
    }
}

/// Whose API key a request came with (none when auth is off).
type CallerExt = Option<Extension<Caller>>;

async fn create(
    State(app): State<AppState>,
    caller: CallerExt,
    ApiJson(request): ApiJson<CreateMachineRequest>,
) -> Result<(StatusCode, Item), ApiError> {
    validate_create(&request)?;
    let machine = app
        .create_machine(request, caller.as_ref().map(|c| &c.0))
        .await?;
    Ok((StatusCode::CREATED, item(machine)))
}

async fn read(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Item, ApiError> {
    let id = machine_id(path)?;
    Ok(item(app.read_machine(&id).await?))
}

async fn update(
    State(app): State<AppState>,
    caller: CallerExt,
    path: Result<Path<String>, PathRejection>,
    ApiJson(request): ApiJson<UpdateMachineRequest>,
) -> Result<Item, ApiError> {
    let id = machine_id(path)?;
    let caller = caller.as_ref().map(|c| &c.0);
    roles::require(
        caller,
        Role::needed_to_set(request.status),
        "set this status",
    )?;
    validate_update(&request)?;
    Ok(item(app.update_machine(&id, request, caller).await?))
}

async fn archive(
    State(app): State<AppState>,
    caller: CallerExt,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let id = machine_id(path)?;
    app.archive_machine(&id, caller.as_ref().map(|c| &c.0))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    limit: Option<String>,
    cursor: Option<String>,
}

/// The opaque cursor: hex of `<created_at ms>:<machine id>`.
fn encode_cursor(key: &PageKey) -> String {
    hex::encode(format!("{}:{}", key.created_at_ms, key.id))
}

fn decode_cursor(cursor: &str) -> Option<PageKey> {
    if cursor.len() > MAX_CURSOR_LEN {
        return None;
    }
    let text = String::from_utf8(hex::decode(cursor).ok()?).ok()?;
    let (created, id) = text.split_once(':')?;
    let created_at_ms = created.parse().ok()?;
    ids::looks_like(ids::MACHINE_PREFIX, id).then(|| PageKey {
        created_at_ms,
        id: id.to_owned(),
    })
}

pub(super) fn parse_limit(limit: Option<&str>) -> Result<u32, ApiError> {
    let Some(text) = limit else {
        return Ok(DEFAULT_LIMIT);
    };
    text.parse::<u32>()
        .ok()
        .filter(|n| (1..=MAX_LIMIT).contains(n))
        .ok_or_else(|| {
            ApiError::validation(
                "limit",
                format!("limit must be a whole number from 1 to {MAX_LIMIT}"),
            )
        })
}

async fn list(
    State(app): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<axum::Json<ListResponse<Machine>>, ApiError> {
    let Query(query) =
        query.map_err(|_| ApiError::validation("query", "the query string is malformed"))?;
    let limit = parse_limit(query.limit.as_deref())?;
    let after = match query.cursor.as_deref() {
        None => None,
        Some(c) => Some(decode_cursor(c).ok_or_else(|| {
            ApiError::validation("cursor", "cursor is not one this server issued")
        })?),
    };
    let page = app.list_machines(after, limit).await?;
    Ok(axum::Json(ListResponse {
        items: page.items,
        next_cursor: page.next.as_ref().map(encode_cursor),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_foreign_ones_are_refused() {
        let key = PageKey {
            created_at_ms: 1_764_089_659_123,
            id: ids::machine_id().unwrap(),
        };
        assert_eq!(decode_cursor(&encode_cursor(&key)), Some(key));
        for bad in [
            "",
            "zz",
            "00",
            &hex::encode("12:mach_x"),
            &hex::encode("x:y"),
            &"ab".repeat(100),
        ] {
            assert_eq!(decode_cursor(bad), None, "{bad}");
        }
    }

    #[test]
    fn limits() {
        assert_eq!(parse_limit(None).unwrap(), 100);
        assert_eq!(parse_limit(Some("500")).unwrap(), 500);
        for bad in ["0", "501", "-1", "1.5", "ten", ""] {
            assert!(parse_limit(Some(bad)).is_err(), "{bad}");
        }
    }
}
