//! `GET /api/v1/openapi.json`: the OpenAPI 3.1 document of this API, so that
//! users can generate clients and fuzz the server.
//!
//! The wire types live in `peaqos-protocol`, which has no OpenAPI
//! dependency; the schemas below describe them for the document only. The
//! test suite compares them with real responses, so they cannot drift
//! silently.
//!
//! Why this file is over 600 lines: it is one declarative document, a
//! schema per wire type and an annotated stub per operation, and the
//! `#[openapi(...)]` list that names them all; splitting it by resource would
//! put each operation away from the schemas it shares with the others and
//! from that list, which must name every one.

// The schema types below are never constructed (they exist for the derive),
// and their field names are the wire's (`challengeId` in `Challenge`).
#![allow(dead_code, clippy::struct_field_names)]

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::routing::get;
use peaqos_protocol::paths;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::Schema;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::{OpenApi, ToSchema};

use super::AppState;

/// `{"ok": true}`
#[derive(ToSchema)]
struct Health {
    ok: bool,
}

/// Readiness: the store and the controller source answer.
#[derive(ToSchema)]
#[serde(rename_all = "camelCase")]
struct Ready {
    ok: bool,
    store: String,
    controllers: String,
    /// `mcr`, `registry` or `none`.
    controller_source: String,
}

/// `pass` or `fail`.
#[derive(ToSchema)]
#[serde(rename_all = "lowercase")]
enum CheckStatus {
    Pass,
    Fail,
}

/// One dependency's answer: `store` (its message names the database kind)
/// or `controller_source` (`mcr`, `registry` or `none`; on failure, why).
#[derive(ToSchema)]
struct ReadinessCheck {
    name: String,
    status: CheckStatus,
    message: Option<String>,
}

/// `ready` or `not_ready`.
#[derive(ToSchema)]
#[serde(rename_all = "snake_case")]
enum ReadinessStatus {
    Ready,
    NotReady,
}

/// Readiness as the peaqOS SDK reads it (`get_readiness`).
#[derive(ToSchema)]
struct Readiness {
    status: ReadinessStatus,
    checks: Vec<ReadinessCheck>,
}

/// One change to a resource, in snake_case as the SDK reads it.
#[derive(ToSchema)]
struct AuditEvent {
    /// Decimal; ids follow commit order without gaps, on every replica. An
    /// id is also a cursor.
    id: String,
    /// The API key's name (auth on), else the signer of the change's proof,
    /// else `anonymous`.
    actor: String,
    /// `machine.created`, `machine.updated`, `machine.proof_renewed`,
    /// `machine.activated`, `machine.blocked`, `machine.drafted`,
    /// `machine.archived`.
    #[serde(rename = "type")]
    kind: String,
    /// `machine`.
    resource_type: String,
    resource_id: String,
    /// What changed: `fields` (wire names), `old_status` and `new_status`,
    /// `signer` and `challenge_id` of a fresh proof; `identity_ref` on
    /// creation.
    payload: BTreeMap<String, serde_json::Value>,
    #[schema(format = DateTime)]
    created_at: String,
}

/// One Server-Sent Event of `GET /api/v1/events`, as a client parses the
/// stream (in OpenAPI 3.1 the schema of `text/event-stream` describes each
/// event; 3.2 calls it `itemSchema`). Comments (`: keep-alive`) are not
/// events.
#[derive(ToSchema)]
struct StreamEvent {
    /// The audit event's id, also a cursor to resume from
    /// (`Last-Event-ID`). The final `too_slow` and `unavailable` events have
    /// none of their own.
    #[schema(pattern = "^[0-9]{1,18}$")]
    id: Option<String>,
    /// The audit event's `type`; or, as the last event before the stream
    /// ends, `too_slow` (the subscriber fell behind or stopped reading) or
    /// `unavailable` (the database stopped answering while it caught up).
    event: String,
    /// JSON: an `AuditEvent`; for `too_slow` and `unavailable`,
    /// `{"message", "cursor"}` with the cursor to resume from.
    #[schema(content_media_type = "application/json")]
    data: String,
    retry: Option<u64>,
}

#[derive(ToSchema)]
struct AuditEventList {
    /// Oldest first.
    items: Vec<AuditEvent>,
    /// Set when the page is full; `null` at the end of the log as committed
    /// now (the last item's id resumes from there later).
    next_cursor: Option<String>,
}

/// Error codes clients branch on.
#[derive(ToSchema)]
#[allow(clippy::upper_case_acronyms, non_camel_case_types)]
enum ErrorCode {
    VALIDATION_ERROR,
    MACHINE_IDENTITY_PROOF_REQUIRED,
    AUTH_REQUIRED,
    AUTH_INVALID,
    FORBIDDEN,
    MACHINE_IDENTITY_PROOF_INVALID,
    NOT_FOUND,
    METHOD_NOT_ALLOWED,
    MACHINE_IDENTITY_EXISTS,
    MACHINE_IDENTITY_IMMUTABLE,
    MACHINE_NOT_ACTIVATED,
    MACHINE_IDENTITY_PROOF_EXPIRED,
    RATE_LIMITED,
    INTERNAL_ERROR,
    PEAQOS_IDENTITY_UNAVAILABLE,
    SERVICE_UNAVAILABLE,
}

#[derive(ToSchema)]
struct ErrorBody {
    code: ErrorCode,
    /// Human text; never branch on it.
    message: String,
    /// For example `{"field": "identityRef"}` or `{"machineId": "mach_..."}`.
    details: Option<BTreeMap<String, serde_json::Value>>,
}

/// `{"error": {...}}` with a 4xx or 5xx status.
#[derive(ToSchema)]
struct ErrorResponse {
    error: ErrorBody,
}

#[derive(ToSchema)]
#[serde(rename_all = "camelCase")]
struct CreateChallengeRequest {
    /// `did:peaq:<decimal>`, `peaqos:machine:<decimal>` or `did:peaq:0x<40 hex>`.
    #[schema(
        pattern = "^(did:peaq:(0|[1-9][0-9]{0,77})|peaqos:machine:(0|[1-9][0-9]{0,77})|did:peaq:0x[0-9a-fA-F]{40})$",
        max_length = 128
    )]
    identity_ref: String,
}

#[derive(ToSchema)]
#[serde(rename_all = "camelCase")]
struct Challenge {
    challenge_id: String,
    /// Canonical form.
    identity_ref: String,
    /// Sign exactly this text with EIP-191 `personal_sign`.
    message: String,
    #[schema(format = DateTime)]
    expires_at: String,
    /// Always `eip191`.
    verification_method: String,
    /// EIP-55 checksummed; at least one.
    controller_addresses: Vec<String>,
}

#[derive(ToSchema)]
struct ChallengeItem {
    item: Challenge,
}

#[derive(ToSchema)]
#[serde(rename_all = "camelCase")]
struct MachineIdentityProofInput {
    challenge_id: String,
    /// `0x` + 130 hex digits: `r || s || v`, low `s`, `v` 27/28 (0/1 accepted).
    #[schema(pattern = "^0x[0-9a-fA-F]{130}$")]
    signature: String,
}

#[derive(ToSchema)]
#[serde(rename_all = "lowercase")]
enum MachineStatus {
    Draft,
    Active,
    Degraded,
    Blocked,
    Archived,
}

#[derive(ToSchema)]
#[serde(rename_all = "camelCase")]
struct MachineIdentityProof {
    /// Always `eip191`.
    method: String,
    identity_ref: String,
    signer_address: String,
    challenge_id: String,
    #[schema(format = DateTime)]
    verified_at: String,
    #[schema(format = DateTime)]
    challenge_expires_at: String,
    controller_addresses: Vec<String>,
    /// Always `peaqos-mcr`.
    resolution_source: String,
    /// When a maximum proof age is configured: after this the machine reads
    /// as `degraded` until a fresh proof is submitted.
    #[schema(format = DateTime)]
    expires_at: Option<String>,
}

#[derive(ToSchema)]
#[serde(rename_all = "camelCase")]
struct Machine {
    /// Opaque (`mach_...`).
    id: String,
    display_name: String,
    status: MachineStatus,
    owner_id: String,
    /// Canonical form.
    identity_ref: String,
    identity_proof: Option<MachineIdentityProof>,
    machine_type: String,
    runtime_profile: String,
    capabilities: Vec<String>,
    labels: BTreeMap<String, String>,
    policy_ids: Vec<String>,
    skill_keys: Vec<String>,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    updated_at: String,
}

#[derive(ToSchema)]
struct MachineItem {
    item: Machine,
}

#[derive(ToSchema)]
#[serde(rename_all = "camelCase")]
struct MachineList {
    items: Vec<Machine>,
    /// Absent or `null` on the last page.
    next_cursor: Option<String>,
}

// The request schemas say exactly what `validate.rs` and the extractor
// enforce, so that a fuzzer's "valid" input is valid here (schemathesis runs
// in the suite: `tests/http/schema.rs`). Lengths are in characters, as JSON
// Schema counts them; "no control characters" is the Unicode Cc category;
// "not blank" is at least one character that is neither control nor
// whitespace.

/// An entry of `capabilities`, `policyIds` or `skillKeys`.
#[derive(ToSchema)]
#[schema(
    min_length = 1,
    max_length = 200,
    pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]*[^\\s\\u0000-\\u001f\\u007f-\\u009f][^\\u0000-\\u001f\\u007f-\\u009f]*$"
)]
struct ListEntry(String);

/// `labels`: at most 100; keys of 1 to 100 characters, values of at most
/// 500, neither with control characters.
fn labels_schema() -> utoipa::openapi::schema::Schema {
    serde_json::from_value(serde_json::json!({
        "type": "object",
        "maxProperties": 100,
        "propertyNames": {"type": "string", "minLength": 1, "maxLength": 100, "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"},
        "additionalProperties": {"type": "string", "maxLength": 500, "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"}
    }))
    .unwrap_or_default()
}

/// The statuses a client may set.
#[derive(ToSchema)]
#[serde(rename_all = "lowercase")]
enum SettableStatus {
    Draft,
    Active,
    Blocked,
}

#[derive(ToSchema)]
#[serde(rename_all = "camelCase")]
struct CreateMachineRequest {
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]*[^\\s\\u0000-\\u001f\\u007f-\\u009f][^\\u0000-\\u001f\\u007f-\\u009f]*$"
    )]
    display_name: String,
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]*[^\\s\\u0000-\\u001f\\u007f-\\u009f][^\\u0000-\\u001f\\u007f-\\u009f]*$"
    )]
    owner_id: String,
    #[schema(max_length = 200, pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$")]
    machine_type: String,
    #[schema(max_length = 200, pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$")]
    runtime_profile: String,
    #[schema(
        pattern = "^(did:peaq:(0|[1-9][0-9]{0,77})|peaqos:machine:(0|[1-9][0-9]{0,77})|did:peaq:0x[0-9a-fA-F]{40})$",
        max_length = 128
    )]
    identity_ref: String,
    /// Required unless identity verification is disabled.
    identity_proof: Option<MachineIdentityProofInput>,
    #[schema(max_items = 100)]
    capabilities: Option<Vec<ListEntry>>,
    #[schema(schema_with = labels_schema, nullable)]
    labels: Option<BTreeMap<String, String>>,
    #[schema(max_items = 100)]
    policy_ids: Option<Vec<ListEntry>>,
    #[schema(max_items = 100)]
    skill_keys: Option<Vec<ListEntry>>,
}

/// Every field optional; absent or `null` leaves it as it is.
#[derive(ToSchema)]
#[serde(rename_all = "camelCase")]
struct UpdateMachineRequest {
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]*[^\\s\\u0000-\\u001f\\u007f-\\u009f][^\\u0000-\\u001f\\u007f-\\u009f]*$"
    )]
    display_name: Option<String>,
    /// `degraded` is derived and `archived` is set with DELETE: neither is
    /// accepted here.
    status: Option<SettableStatus>,
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]*[^\\s\\u0000-\\u001f\\u007f-\\u009f][^\\u0000-\\u001f\\u007f-\\u009f]*$"
    )]
    owner_id: Option<String>,
    /// Immutable: only the machine's own identity (any spelling) is accepted.
    #[schema(
        pattern = "^(did:peaq:(0|[1-9][0-9]{0,77})|peaqos:machine:(0|[1-9][0-9]{0,77})|did:peaq:0x[0-9a-fA-F]{40})$",
        max_length = 128
    )]
    identity_ref: Option<String>,
    #[schema(max_length = 200, pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$")]
    machine_type: Option<String>,
    #[schema(max_length = 200, pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$")]
    runtime_profile: Option<String>,
    #[schema(max_items = 100)]
    capabilities: Option<Vec<ListEntry>>,
    #[schema(schema_with = labels_schema, nullable)]
    labels: Option<BTreeMap<String, String>>,
    #[schema(max_items = 100)]
    policy_ids: Option<Vec<ListEntry>>,
    #[schema(max_items = 100)]
    skill_keys: Option<Vec<ListEntry>>,
    identity_proof: Option<MachineIdentityProofInput>,
}

#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, description = "The process answers", body = Health)))]
fn health() {}

#[utoipa::path(get, path = "/ready", tag = "operations",
    responses(
        (status = 200, description = "Store and controller source answer", body = Ready),
        (status = 503, description = "SERVICE_UNAVAILABLE, with details", body = ErrorResponse)))]
fn ready() {}

#[utoipa::path(get, path = "/api/v1/health", tag = "observability",
    responses((status = 200, description = "The process answers (the SDK's `check_health`)", body = Health)))]
fn api_health() {}

#[utoipa::path(get, path = "/api/v1/readiness", tag = "observability",
    responses((status = 200, description = "Each dependency's check; `status` is `not_ready` when one fails (the SDK's `get_readiness`). Probes use `/ready`, which answers 503 instead", body = Readiness)))]
fn api_readiness() {}

#[utoipa::path(post, path = "/api/v1/machine-identity/challenges", tag = "identity",
    request_body = CreateChallengeRequest,
    security(("apiKey" = [])),
    responses(
        (status = 201, description = "A single-use challenge for the identity", body = ChallengeItem),
        (status = 400, description = "VALIDATION_ERROR", body = ErrorResponse),
        (status = 401, description = "AUTH_REQUIRED or AUTH_INVALID", body = ErrorResponse),
        (status = 409, description = "MACHINE_NOT_ACTIVATED: the identity has no controller", body = ErrorResponse),
        (status = 413, description = "VALIDATION_ERROR: body too large", body = ErrorResponse),
        (status = 415, description = "VALIDATION_ERROR: body is not JSON", body = ErrorResponse),
        (status = 429, description = "RATE_LIMITED, with Retry-After", body = ErrorResponse),
        (status = 503, description = "PEAQOS_IDENTITY_UNAVAILABLE, with Retry-After", body = ErrorResponse)))]
fn create_challenge() {}

#[utoipa::path(get, path = "/api/v1/machines", tag = "machines",
    params(
        ("limit" = Option<u32>, Query, description = "1..500, default 100", minimum = 1, maximum = 500),
        ("cursor" = Option<String>, Query, description = "`nextCursor` of the previous page. Opaque to clients; the pattern is only what this server issues, so that a fuzzer's \"valid\" cursor is one", pattern = "^(3[0-9]){1,18}3a6d6163685f(6[1-9a-f]|7[0-9a]|3[2-7]){26}$")),
    security(("apiKey" = [])),
    responses(
        (status = 200, description = "Machines whose identity resolves and whose proof still matches", body = MachineList),
        (status = 400, description = "VALIDATION_ERROR: bad limit or cursor", body = ErrorResponse),
        (status = 401, description = "AUTH_REQUIRED or AUTH_INVALID", body = ErrorResponse),
        (status = 503, description = "PEAQOS_IDENTITY_UNAVAILABLE, with Retry-After", body = ErrorResponse)))]
fn list_machines() {}

#[utoipa::path(post, path = "/api/v1/machines", tag = "machines",
    request_body = CreateMachineRequest,
    security(("apiKey" = [])),
    responses(
        (status = 201, description = "Created, as a draft", body = MachineItem),
        (status = 400, description = "VALIDATION_ERROR or MACHINE_IDENTITY_PROOF_REQUIRED", body = ErrorResponse),
        (status = 401, description = "AUTH_REQUIRED or AUTH_INVALID", body = ErrorResponse),
        (status = 403, description = "MACHINE_IDENTITY_PROOF_INVALID", body = ErrorResponse),
        (status = 409, description = "MACHINE_IDENTITY_EXISTS (details.machineId) or MACHINE_NOT_ACTIVATED", body = ErrorResponse),
        (status = 410, description = "MACHINE_IDENTITY_PROOF_EXPIRED: the challenge expired", body = ErrorResponse),
        (status = 413, description = "VALIDATION_ERROR: body too large", body = ErrorResponse),
        (status = 415, description = "VALIDATION_ERROR: body is not JSON", body = ErrorResponse),
        (status = 503, description = "PEAQOS_IDENTITY_UNAVAILABLE, with Retry-After; nothing written", body = ErrorResponse)))]
fn create_machine() {}

#[utoipa::path(get, path = "/api/v1/machines/{machineId}", tag = "machines",
    params(("machineId" = String, Path, description = "Opaque machine id")),
    security(("apiKey" = [])),
    responses(
        (status = 200, description = "The machine, its stored proof re-verified", body = MachineItem),
        (status = 401, description = "AUTH_REQUIRED or AUTH_INVALID", body = ErrorResponse),
        (status = 404, description = "NOT_FOUND", body = ErrorResponse),
        (status = 409, description = "MACHINE_NOT_ACTIVATED: the signer is no longer a controller", body = ErrorResponse),
        (status = 503, description = "PEAQOS_IDENTITY_UNAVAILABLE, with Retry-After", body = ErrorResponse)))]
fn get_machine() {}

#[utoipa::path(patch, path = "/api/v1/machines/{machineId}", tag = "machines",
    params(("machineId" = String, Path, description = "Opaque machine id")),
    request_body = UpdateMachineRequest,
    security(("apiKey" = [])),
    responses(
        (status = 200, description = "Updated", body = MachineItem),
        (status = 400, description = "VALIDATION_ERROR", body = ErrorResponse),
        (status = 401, description = "AUTH_REQUIRED or AUTH_INVALID", body = ErrorResponse),
        (status = 403, description = "MACHINE_IDENTITY_PROOF_INVALID", body = ErrorResponse),
        (status = 404, description = "NOT_FOUND (also for archived machines)", body = ErrorResponse),
        (status = 409, description = "MACHINE_IDENTITY_IMMUTABLE or MACHINE_NOT_ACTIVATED", body = ErrorResponse),
        (status = 410, description = "MACHINE_IDENTITY_PROOF_EXPIRED: challenge or stored proof expired", body = ErrorResponse),
        (status = 413, description = "VALIDATION_ERROR: body too large", body = ErrorResponse),
        (status = 415, description = "VALIDATION_ERROR: body is not JSON", body = ErrorResponse),
        (status = 503, description = "PEAQOS_IDENTITY_UNAVAILABLE, with Retry-After; nothing written", body = ErrorResponse)))]
fn update_machine() {}

#[utoipa::path(delete, path = "/api/v1/machines/{machineId}", tag = "machines",
    params(("machineId" = String, Path, description = "Opaque machine id")),
    security(("apiKey" = [])),
    responses(
        (status = 204, description = "Archived (also when it already was)"),
        (status = 401, description = "AUTH_REQUIRED or AUTH_INVALID", body = ErrorResponse),
        (status = 404, description = "NOT_FOUND", body = ErrorResponse)))]
fn archive_machine() {}

#[utoipa::path(get, path = "/api/v1/audit-events", tag = "observability",
    params(
        ("machineId" = Option<String>, Query, description = "Only this machine's events (also `machine_id`)", pattern = "^mach_[a-z2-7]{26}$"),
        ("resourceType" = Option<String>, Query, description = "`machine` (also `resource_type`)", pattern = "^machine$"),
        ("limit" = Option<u32>, Query, description = "1..500, default 100", minimum = 1, maximum = 500),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page, or any event id", pattern = "^[0-9]{1,18}$")),
    security(("apiKey" = [])),
    responses(
        (status = 200, description = "Audit events after the cursor, oldest first", body = AuditEventList),
        (status = 400, description = "VALIDATION_ERROR: bad limit, cursor, machine id or resource type; a cursor past the last event (details.field, details.head)", body = ErrorResponse),
        (status = 401, description = "AUTH_REQUIRED or AUTH_INVALID", body = ErrorResponse),
        (status = 503, description = "SERVICE_UNAVAILABLE: the database is not answering", body = ErrorResponse)))]
fn list_audit_events() {}

#[utoipa::path(get, path = "/api/v1/events", tag = "observability",
    params(
        ("machineId" = Option<String>, Query, description = "Only this machine's events (also `machine_id`)", pattern = "^mach_[a-z2-7]{26}$"),
        ("cursor" = Option<String>, Query, description = "Start right after this event id; without one, at the end of the log", pattern = "^[0-9]{1,18}$"),
        ("Last-Event-ID" = Option<String>, Header, description = "As `cursor`, and wins over it (what EventSource sends when it reconnects)", pattern = "^[0-9]{1,18}$")),
    security(("apiKey" = [])),
    responses(
        (status = 200, description = "Server-Sent Events, each a StreamEvent: `id` the event id, `event` its type, `data` an AuditEvent; `: keep-alive` comments every 15 s; a final `too_slow` (or `unavailable`) event with the `cursor` to resume from. The stream ends then, or at shutdown", content_type = "text/event-stream", body = StreamEvent),
        (status = 400, description = "VALIDATION_ERROR: bad cursor, Last-Event-ID or machine id; a cursor or Last-Event-ID past the last event (details.field, details.head)", body = ErrorResponse),
        (status = 401, description = "AUTH_REQUIRED or AUTH_INVALID", body = ErrorResponse),
        (status = 429, description = "RATE_LIMITED: this client (API key, or address without auth) holds its share of streams (details.limit), with Retry-After", body = ErrorResponse),
        (status = 503, description = "SERVICE_UNAVAILABLE: every stream slot is taken (details.limit), or the database is not answering; with Retry-After", body = ErrorResponse)))]
fn stream_events() {}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "peaqOS orchestrator: machines & identity",
        description = "Machine Markets machines & identity API with EIP-191 challenge-signed identity proofs.\n\nAnswers any operation may give besides those listed: `405 METHOD_NOT_ALLOWED` for a method a path does not have, `413 VALIDATION_ERROR` for a declared body over the limit, `414 VALIDATION_ERROR` for a URI over 8 KiB, `431 VALIDATION_ERROR` for more than 100 headers or 32 KiB of them, `503 SERVICE_UNAVAILABLE` (with `Retry-After`) when the database does not answer or a request exceeds its time, `500 INTERNAL_ERROR`. All carry the error envelope. With API-key auth on, every `/api/` path but this document, `/api/v1/health` and `/api/v1/readiness` needs `x-api-key` (unknown paths and wrong methods included: `401`)."
    ),
    paths(
        health,
        ready,
        api_health,
        api_readiness,
        create_challenge,
        list_machines,
        create_machine,
        get_machine,
        update_machine,
        archive_machine,
        list_audit_events,
        stream_events
    ),
    components(schemas(
        Health,
        Ready,
        CheckStatus,
        ReadinessCheck,
        ReadinessStatus,
        Readiness,
        AuditEvent,
        StreamEvent,
        AuditEventList,
        ErrorCode,
        ErrorBody,
        ErrorResponse,
        CreateChallengeRequest,
        Challenge,
        ChallengeItem,
        MachineIdentityProofInput,
        MachineStatus,
        MachineIdentityProof,
        Machine,
        MachineItem,
        MachineList,
        CreateMachineRequest,
        UpdateMachineRequest,
        ListEntry,
        SettableStatus
    ))
)]
struct ApiDoc;

/// What the served document depends on.
#[derive(Debug, Clone, Copy)]
pub struct Served {
    /// API-key auth is on.
    pub auth: bool,
    /// Machine writes need an identity proof (verification `required`).
    pub proofs_required: bool,
}

/// The document, as served. With auth on it has API-key security and the
/// `401` answers, and without it neither (a document that asks for a key
/// the server ignores sends clients and fuzzers after one). When proofs are
/// required, a create request must carry `identityProof`.
pub fn document(served: Served) -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    env!("CARGO_PKG_VERSION").clone_into(&mut doc.info.version);
    if served.auth {
        if let Some(components) = doc.components.as_mut() {
            components.add_security_scheme(
                "apiKey",
                SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new(paths::API_KEY_HEADER))),
            );
        }
    } else {
        for item in doc.paths.paths.values_mut() {
            for op in [
                &mut item.get,
                &mut item.post,
                &mut item.patch,
                &mut item.delete,
                &mut item.put,
            ]
            .into_iter()
            .flatten()
            {
                op.security = None;
                op.responses.responses.remove("401");
            }
        }
    }
    if served.proofs_required
        && let Some(RefOr::T(Schema::Object(create))) = doc
            .components
            .as_mut()
            .and_then(|c| c.schemas.get_mut("CreateMachineRequest"))
    {
        create.required.push("identityProof".to_owned());
        // Required, and not `null` either.
        create.properties.insert(
            "identityProof".to_owned(),
            RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                "MachineIdentityProofInput",
            )),
        );
    }
    doc
}

pub fn router(served: Served) -> Router<AppState> {
    let document: Arc<str> = document(served)
        .to_json()
        .unwrap_or_else(|_| "{}".to_owned())
        .into();
    Router::new().route(
        paths::OPENAPI,
        get(move || async move {
            (
                [(header::CONTENT_TYPE, "application/json")],
                document.to_string(),
            )
        }),
    )
}
