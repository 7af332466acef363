//! `/api/v1/machines`: create, read, update, archive and list machine
//! records, each bound to one verified machine identity.

use std::collections::BTreeMap;

use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use peaqos_protocol::envelope::pagination::{DEFAULT_LIMIT, MAX_LIMIT};
use peaqos_protocol::{
    CreateMachineRequest, ErrorCode, ItemResponse, ListResponse, Machine, MachineStatus,
    UpdateMachineRequest, paths,
};
use serde::Deserialize;

use super::{ApiError, ApiJson, AppState};
use crate::app::App;
use crate::controllers::Resolution;
use crate::ids;
use crate::store::{Consume, MachineRecord, PageKey, StoreError, StoredStatus};

/// The path of one machine, as routed.
pub const MACHINE_ROUTE: &str = "/api/v1/machines/{machineId}";

/// Text fields: display name, owner, type, runtime profile, list entries.
const MAX_TEXT: usize = 200;
/// Entries of each list field, and labels.
const MAX_ITEMS: usize = 100;
const MAX_LABEL_KEY: usize = 100;
const MAX_LABEL_VALUE: usize = 500;
/// A list request examines at most this many batches of `limit` records
/// looking for visible ones; past that it returns a short page with a cursor.
const MAX_SCAN_BATCHES: usize = 8;

pub fn router() -> Router<AppState> {
    Router::new()
        .route(paths::MACHINES, get(list).post(create))
        .route(MACHINE_ROUTE, get(read).patch(update).delete(archive))
}

type Item = axum::Json<ItemResponse<Machine>>;

fn item(machine: Machine) -> Item {
    axum::Json(ItemResponse { item: machine })
}

fn check_text(field: &str, value: &str, non_empty: bool) -> Result<(), ApiError> {
    if non_empty && value.trim().is_empty() {
        return Err(ApiError::validation(
            field,
            format!("{field} must not be empty"),
        ));
    }
    if value.len() > MAX_TEXT {
        return Err(ApiError::validation(
            field,
            format!("{field} is longer than {MAX_TEXT} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::validation(
            field,
            format!("{field} must not contain control characters"),
        ));
    }
    Ok(())
}

fn check_list(field: &str, values: &[String]) -> Result<(), ApiError> {
    if values.len() > MAX_ITEMS {
        return Err(ApiError::validation(
            field,
            format!("{field} has more than {MAX_ITEMS} entries"),
        ));
    }
    for (i, v) in values.iter().enumerate() {
        check_text(&format!("{field}[{i}]"), v, true)?;
    }
    Ok(())
}

fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if labels.len() > MAX_ITEMS {
        return Err(ApiError::validation(
            "labels",
            format!("labels has more than {MAX_ITEMS} entries"),
        ));
    }
    for (k, v) in labels {
        let bad = |message: &str| ApiError::validation("labels", message.to_owned());
        if k.is_empty() || k.len() > MAX_LABEL_KEY || k.chars().any(char::is_control) {
            return Err(bad(&format!(
                "label keys must be 1 to {MAX_LABEL_KEY} bytes without control characters"
            )));
        }
        if v.len() > MAX_LABEL_VALUE || v.chars().any(char::is_control) {
            return Err(bad(&format!(
                "label values must be at most {MAX_LABEL_VALUE} bytes without control characters"
            )));
        }
    }
    Ok(())
}

fn validate_create(r: &CreateMachineRequest) -> Result<(), ApiError> {
    check_text("displayName", &r.display_name, true)?;
    check_text("ownerId", &r.owner_id, true)?;
    check_text("machineType", &r.machine_type, false)?;
    check_text("runtimeProfile", &r.runtime_profile, false)?;
    check_list(
        "capabilities",
        r.capabilities.as_deref().unwrap_or_default(),
    )?;
    check_list("policyIds", r.policy_ids.as_deref().unwrap_or_default())?;
    check_list("skillKeys", r.skill_keys.as_deref().unwrap_or_default())?;
    check_labels(r.labels.as_ref().unwrap_or(&BTreeMap::new()))
}

fn validate_update(r: &UpdateMachineRequest) -> Result<(), ApiError> {
    let text = [
        ("displayName", &r.display_name, true),
        ("ownerId", &r.owner_id, true),
        ("machineType", &r.machine_type, false),
        ("runtimeProfile", &r.runtime_profile, false),
    ];
    for (field, value, non_empty) in text {
        if let Some(v) = value {
            check_text(field, v, non_empty)?;
        }
    }
    let lists = [
        ("capabilities", &r.capabilities),
        ("policyIds", &r.policy_ids),
        ("skillKeys", &r.skill_keys),
    ];
    for (field, value) in lists {
        if let Some(v) = value {
            check_list(field, v)?;
        }
    }
    if let Some(labels) = &r.labels {
        check_labels(labels)?;
    }
    Ok(())
}

fn exists(machine_id: &str) -> ApiError {
    ApiError::new(
        ErrorCode::IdentityExists,
        "this identity already has a machine record",
    )
    .with_details(serde_json::json!({ "machineId": machine_id }))
}

fn challenge_gone() -> ApiError {
    ApiError::new(
        ErrorCode::ProofInvalid,
        "identityProof.challengeId: unknown or already used challenge",
    )
    .with_details(serde_json::json!({ "field": "identityProof.challengeId" }))
}

/// The machine id from the path; anything we cannot have issued is 404
/// without touching the database.
fn machine_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    match path {
        Ok(Path(id)) if ids::looks_like(ids::MACHINE_PREFIX, &id) => Ok(id),
        _ => Err(ApiError::not_found("machine")),
    }
}

async fn create(
    State(app): State<AppState>,
    ApiJson(request): ApiJson<CreateMachineRequest>,
) -> Result<(StatusCode, Item), ApiError> {
    validate_create(&request)?;
    let identity = request.identity_ref;
    if app.verification_required() && request.identity_proof.is_none() {
        return Err(ApiError::new(
            ErrorCode::ProofRequired,
            "identityProof is required: request a challenge for the identity, sign its message \
             with a controller key, and send {challengeId, signature}",
        )
        .with_details(serde_json::json!({ "field": "identityProof" })));
    }
    // Answer early, before any proof work; the unique index decides races.
    if let Some(existing) = app.store.live_machine_for(&identity).await? {
        return Err(exists(&existing));
    }
    let proof = match &request.identity_proof {
        Some(input) => Some(app.verify_submitted(&identity, input).await?),
        None => None,
    };
    let now = app.now();
    let record = MachineRecord {
        id: ids::machine_id().map_err(|e| ApiError::internal(&e))?,
        identity,
        status: StoredStatus::Draft,
        display_name: request.display_name,
        owner_id: request.owner_id,
        machine_type: request.machine_type,
        runtime_profile: request.runtime_profile,
        capabilities: request.capabilities.unwrap_or_default(),
        labels: request.labels.unwrap_or_default(),
        policy_ids: request.policy_ids.unwrap_or_default(),
        skill_keys: request.skill_keys.unwrap_or_default(),
        proof,
        created_at: now,
        updated_at: now,
    };
    let consume = request.identity_proof.as_ref().map(|p| Consume {
        challenge_id: &p.challenge_id,
        identity: &record.identity,
        now,
    });
    match app.store.insert_machine(&record, consume).await {
        Ok(()) => {}
        Err(StoreError::IdentityTaken { machine_id }) => return Err(exists(&machine_id)),
        Err(StoreError::ChallengeGone) => return Err(challenge_gone()),
        Err(e) => return Err(e.into()),
    }
    tracing::info!(machine = %record.id, identity = %record.identity, "machine created");
    Ok((StatusCode::CREATED, item(app.to_wire(record))))
}

async fn read(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Item, ApiError> {
    let id = machine_id(path)?;
    let machine = app
        .store
        .get_machine(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("machine"))?;
    // An archived record is a tombstone: shown as it is, nothing to verify.
    if machine.status != StoredStatus::Archived && app.verification_required() {
        app.reverify(&machine).await?;
    }
    Ok(item(app.to_wire(machine)))
}

/// The stored status a PATCH asks for; `degraded` and `archived` are not
/// set this way.
fn requested_status(status: Option<MachineStatus>) -> Result<Option<StoredStatus>, ApiError> {
    match status {
        None => Ok(None),
        Some(MachineStatus::Degraded) => Err(ApiError::validation(
            "status",
            "status: `degraded` follows from the proof's age and cannot be set",
        )),
        Some(MachineStatus::Archived) => Err(ApiError::validation(
            "status",
            "status: archive a machine with DELETE /api/v1/machines/{machineId}",
        )),
        Some(s) => Ok(StoredStatus::from_wire(s)),
    }
}

async fn update(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    ApiJson(mut request): ApiJson<UpdateMachineRequest>,
) -> Result<Item, ApiError> {
    let id = machine_id(path)?;
    validate_update(&request)?;
    let proof_input = request.identity_proof.take();
    let target = requested_status(request.status)?;
    let mut machine = app
        .store
        .get_machine(&id)
        .await?
        .filter(|m| m.status != StoredStatus::Archived)
        .ok_or_else(|| ApiError::not_found("machine"))?;
    if let Some(new) = &request.identity_ref
        && *new != machine.identity
    {
        return Err(ApiError::new(
            ErrorCode::IdentityImmutable,
            format!("identityRef is {} and cannot be changed", machine.identity),
        )
        .with_details(serde_json::json!({ "field": "identityRef" })));
    }
    if target == Some(StoredStatus::Draft) && machine.status == StoredStatus::Blocked {
        return Err(ApiError::validation(
            "status",
            "status: a blocked machine can only become active, with a fresh identity proof",
        ));
    }
    let fresh = match &proof_input {
        Some(input) => Some(app.verify_submitted(&machine.identity, input).await?),
        None => None,
    };
    if fresh.is_none() {
        if app.verification_required() {
            app.reverify(&machine).await?;
        }
        if target == Some(StoredStatus::Active) {
            check_activation_with_stored_proof(&app, &machine)?;
        }
    }
    let now = app.now();
    apply(&mut machine, request);
    if let Some(proof) = fresh {
        machine.proof = Some(proof);
    }
    if let Some(status) = target {
        machine.status = status;
    }
    machine.updated_at = now;
    let consume = proof_input.as_ref().map(|p| Consume {
        challenge_id: &p.challenge_id,
        identity: &machine.identity,
        now,
    });
    match app.store.update_machine(&machine, consume).await {
        Ok(true) => {}
        Ok(false) => return Err(ApiError::not_found("machine")),
        Err(StoreError::ChallengeGone) => return Err(challenge_gone()),
        Err(e) => return Err(e.into()),
    }
    Ok(item(app.to_wire(machine)))
}

/// Activation without a new proof reuses the stored one, which must exist
/// (checked by re-verification), be young enough, and not be a way out of
/// `blocked`.
fn check_activation_with_stored_proof(app: &App, machine: &MachineRecord) -> Result<(), ApiError> {
    if machine.status == StoredStatus::Blocked {
        return Err(ApiError::new(
            ErrorCode::NotActivated,
            "a blocked machine is activated only with a fresh identity proof",
        ));
    }
    if !app.verification_required() {
        return Ok(());
    }
    match &machine.proof {
        None => Err(ApiError::new(
            ErrorCode::NotActivated,
            "the machine has no verified identity proof",
        )),
        Some(proof) if app.is_stale(proof) => {
            let expired = crate::verify::proof_expiry(proof, app.config.proof_max_age)
                .map(|t| t.to_string())
                .unwrap_or_default();
            Err(ApiError::new(
                ErrorCode::ProofExpired,
                format!(
                    "the stored identity proof expired at {expired}; request a challenge and \
                     send a fresh identityProof with status `active`"
                ),
            ))
        }
        Some(_) => Ok(()),
    }
}

/// Copies the plain fields of an update (status, identity and proof are
/// handled before).
fn apply(m: &mut MachineRecord, f: UpdateMachineRequest) {
    if let Some(v) = f.display_name {
        m.display_name = v;
    }
    if let Some(v) = f.owner_id {
        m.owner_id = v;
    }
    if let Some(v) = f.machine_type {
        m.machine_type = v;
    }
    if let Some(v) = f.runtime_profile {
        m.runtime_profile = v;
    }
    if let Some(v) = f.capabilities {
        m.capabilities = v;
    }
    if let Some(v) = f.labels {
        m.labels = v;
    }
    if let Some(v) = f.policy_ids {
        m.policy_ids = v;
    }
    if let Some(v) = f.skill_keys {
        m.skill_keys = v;
    }
}

async fn archive(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let id = machine_id(path)?;
    match app.store.archive_machine(&id, app.now()).await? {
        None => Err(ApiError::not_found("machine")),
        Some(archived_now) => {
            if archived_now {
                tracing::info!(machine = %id, "machine archived");
            }
            Ok(StatusCode::NO_CONTENT)
        }
    }
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    limit: Option<String>,
    cursor: Option<String>,
}

const MAX_CURSOR_LEN: usize = 128;

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

fn page_key(m: &MachineRecord) -> PageKey {
    PageKey {
        created_at_ms: m.created_at.unix_millis(),
        id: m.id.clone(),
    }
}

fn parse_limit(limit: Option<&str>) -> Result<u32, ApiError> {
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

/// Listed: live machines whose identity resolves and whose stored proof's
/// signer is still a controller. Drafts without a proof are never listed;
/// with verification disabled, proofs are not checked.
fn visible(app: &App, m: &MachineRecord, resolution: Option<&Resolution>) -> bool {
    match &m.proof {
        None => !app.verification_required() && m.status != StoredStatus::Draft,
        Some(_) if !app.verification_required() => true,
        Some(proof) => resolution.is_some_and(|r| r.is_controller(&proof.signer_address)),
    }
}

async fn list(
    State(app): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<axum::Json<ListResponse<Machine>>, ApiError> {
    let Query(query) =
        query.map_err(|_| ApiError::validation("query", "the query string is malformed"))?;
    let limit = parse_limit(query.limit.as_deref())?;
    let mut after = match query.cursor.as_deref() {
        None => None,
        Some(c) => Some(decode_cursor(c).ok_or_else(|| {
            ApiError::validation("cursor", "cursor is not one this server issued")
        })?),
    };
    let want = limit as usize;
    let mut items = Vec::with_capacity(want.min(64));
    let mut next = None;
    'scan: for _ in 0..MAX_SCAN_BATCHES {
        let rows = app.store.list_machines(after.as_ref(), limit).await?;
        let exhausted = rows.len() < want;
        let resolutions = if app.verification_required() {
            app.resolve_all(
                rows.iter()
                    .filter(|m| m.proof.is_some())
                    .map(|m| &m.identity),
            )
            .await?
        } else {
            std::collections::HashMap::new()
        };
        let mut rows = rows.into_iter().peekable();
        while let Some(m) = rows.next() {
            let key = page_key(&m);
            if visible(&app, &m, resolutions.get(&m.identity)) {
                items.push(app.to_wire(m));
            }
            after = Some(key);
            if items.len() == want {
                next = (rows.peek().is_some() || !exhausted)
                    .then(|| after.as_ref().map(encode_cursor))
                    .flatten();
                break 'scan;
            }
        }
        if exhausted {
            next = None;
            break;
        }
        // Out of batches: the client continues from the last record examined.
        next = after.as_ref().map(encode_cursor);
    }
    Ok(axum::Json(ListResponse {
        items,
        next_cursor: next,
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
