//! Liveness and readiness, twice: `GET /health` and `GET /ready` at the host
//! root for probes (readiness answers `503` when not ready), and
//! `GET /api/v1/health` and `GET /api/v1/readiness` in the shape the peaqOS
//! SDK reads (`check_health`, `get_readiness`). None is behind API-key auth.
//!
//! The SDK's readiness is always `200` with `status: "not_ready"` when a
//! check fails: the SDK returns a not-ready answer only from a success
//! status (it raises on any other), and its type has a `not_ready` value for
//! exactly this. Probes use `/ready`, which fails with the status code.

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use peaqos_protocol::{ErrorCode, paths};
use serde_json::json;

use super::{ApiError, AppState};
use crate::error_chain::error_chain;

/// Readiness as the SDK reads it.
pub const API_READINESS: &str = "/api/v1/readiness";

pub fn router() -> Router<AppState> {
    Router::new()
        .route(paths::HEALTH, get(health))
        .route(paths::API_HEALTH, get(health))
        .route(paths::READY, get(ready))
        .route(API_READINESS, get(readiness))
}

async fn health() -> axum::Json<serde_json::Value> {
    axum::Json(json!({ "ok": true }))
}

/// What each dependency answered: `Err` carries what may be shown.
struct Checks {
    store: Result<(), String>,
    controllers: Result<(), String>,
    source: &'static str,
}

impl Checks {
    async fn run(app: &AppState) -> Self {
        let (store, controllers) = tokio::join!(app.store.ping(), app.resolver.ready());
        Self {
            // The cause may name hosts or users: logged, not shown.
            store: store.map_err(|e| {
                tracing::warn!(error = %error_chain(&e), "readiness: store not answering");
                "unavailable".to_owned()
            }),
            controllers: controllers.map_err(|e| e.reason),
            source: app.resolver.source_name(),
        }
    }

    fn ready(&self) -> bool {
        self.store.is_ok() && self.controllers.is_ok()
    }
}

async fn ready(State(app): State<AppState>) -> Response {
    let checks = Checks::run(&app).await;
    if checks.ready() {
        return axum::Json(json!({
            "ok": true,
            "store": "ok",
            "controllers": "ok",
            "controllerSource": checks.source,
        }))
        .into_response();
    }
    ApiError::new(ErrorCode::ServiceUnavailable, "not ready")
        .with_details(json!({
            "store": checks.store.err().unwrap_or_else(|| "ok".to_owned()),
            "controllers": checks.controllers.err().unwrap_or_else(|| "ok".to_owned()),
            "controllerSource": checks.source,
        }))
        .retry_after(5)
        .into_response()
}

fn check(name: &str, result: &Result<(), String>, passed: Option<String>) -> serde_json::Value {
    match (result, passed) {
        (Ok(()), Some(message)) => json!({"name": name, "status": "pass", "message": message}),
        (Ok(()), None) => json!({"name": name, "status": "pass"}),
        (Err(message), _) => json!({"name": name, "status": "fail", "message": message}),
    }
}

async fn readiness(State(app): State<AppState>) -> axum::Json<serde_json::Value> {
    let checks = Checks::run(&app).await;
    let status = if checks.ready() { "ready" } else { "not_ready" };
    axum::Json(json!({
        "status": status,
        "checks": [
            check("store", &checks.store, Some(app.store.backend().name().to_owned())),
            check("controller_source", &checks.controllers, Some(checks.source.to_owned())),
        ],
    }))
}
