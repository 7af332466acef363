//! `GET /health` (liveness: the process answers) and `GET /ready`
//! (readiness: the store and the controller source answer). Neither is
//! behind API-key auth.

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use peaqos_protocol::{ErrorCode, paths};
use serde_json::json;

use super::{ApiError, AppState};
use crate::error_chain::error_chain;

pub fn router() -> Router<AppState> {
    Router::new()
        .route(paths::HEALTH, get(health))
        .route(paths::READY, get(ready))
}

async fn health() -> axum::Json<serde_json::Value> {
    axum::Json(json!({ "ok": true }))
}

async fn ready(State(app): State<AppState>) -> Response {
    let (store, controllers) = tokio::join!(app.store.ping(), app.resolver.ready());
    let store = store.map_err(|e| {
        tracing::warn!(error = %error_chain(&e), "readiness: store not answering");
        "unavailable".to_owned()
    });
    let controllers = controllers.map_err(|e| e.reason);
    match (&store, &controllers) {
        (Ok(()), Ok(())) => axum::Json(json!({
            "ok": true,
            "store": "ok",
            "controllers": "ok",
            "controllerSource": app.resolver.source_name(),
        }))
        .into_response(),
        _ => ApiError::new(ErrorCode::ServiceUnavailable, "not ready")
            .with_details(json!({
                "store": store.err().unwrap_or_else(|| "ok".to_owned()),
                "controllers": controllers.err().unwrap_or_else(|| "ok".to_owned()),
                "controllerSource": app.resolver.source_name(),
            }))
            .retry_after(5)
            .into_response(),
    }
}
