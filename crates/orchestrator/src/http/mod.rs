//! The HTTP surface: routes, and the middleware every request passes
//! (request id, tracing, error reports, metrics, timeout, panic guard,
//! API-key auth). Handlers parse a request, call the service, and map its
//! answer; errors become the contract's envelope in [`error`].

pub mod audit;
pub mod challenges;
pub mod error;
pub mod events;
pub mod extract;
pub mod health;
pub mod limits;
pub mod machines;
pub mod metrics;
pub mod openapi;
mod validate;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use peaqos_protocol::{ErrorCode, paths};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnFailure, TraceLayer};

pub use self::error::ApiError;
pub use self::extract::ApiJson;
use crate::app::App;
use crate::auth::KeyCheck;
/// Kept here for callers from before the helper had its own module.
pub use crate::error_chain::error_chain;
use crate::metrics::{RequestLabels, RouteLabels};

pub type AppState = Arc<App>;

/// Standard methods as static strings (metric labels must not allocate or
/// grow without bound).
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::PUT => "PUT",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

const ROUTES: &[&str] = &[
    paths::HEALTH,
    paths::READY,
    paths::API_HEALTH,
    health::API_READINESS,
    "/metrics",
    paths::OPENAPI,
    paths::CHALLENGES,
    paths::MACHINES,
    "/api/v1/machines/{machineId}",
    audit::AUDIT_EVENTS,
    events::EVENTS,
];

fn route_label(matched: Option<&MatchedPath>) -> &'static str {
    matched
        .and_then(|m| ROUTES.iter().find(|r| **r == m.as_str()).copied())
        .unwrap_or("unmatched")
}

/// Records the request in the metrics, and bounds its time.
async fn observe(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(req.method());
    let route = route_label(req.extensions().get::<MatchedPath>());
    let timeout = app.config.request_timeout;
    let mut response = match tokio::time::timeout(timeout, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            ErrorCode::ServiceUnavailable,
            format!("the request took longer than {} s", timeout.as_secs()),
        )
        .retry_after(1)
        .into_response(),
    };
    if !app.verification_required() {
        response.headers_mut().insert(
            "x-peaqos-identity-verification",
            HeaderValue::from_static("disabled"),
        );
    }
    let status = response.status().as_u16();
    app.metrics
        .requests
        .get_or_create(&RequestLabels {
            method,
            route,
            status,
        })
        .inc();
    app.metrics
        .latency
        .get_or_create(&RouteLabels { method, route })
        .observe(started.elapsed().as_secs_f64());
    response
}

/// Routes answered without an API key even when auth is on: probes, and
/// the API's description (it holds no data, and clients and fuzzers read it
/// before they have a key). Everything else under `/api/` (unknown routes
/// and wrong methods included, so that probing learns nothing) and
/// `/metrics` need the key.
const PUBLIC_WITH_AUTH: &[&str] = &[paths::OPENAPI, paths::API_HEALTH, health::API_READINESS];

fn needs_api_key(path: &str) -> bool {
    (path == "/metrics" || path.starts_with("/api/")) && !PUBLIC_WITH_AUTH.contains(&path)
}

/// Refuses requests without a valid `x-api-key` (when auth is on), and
/// tells the handlers whose key it was (the audit trail's actor).
async fn require_api_key(State(app): State<AppState>, mut req: Request, next: Next) -> Response {
    let Some(keys) = &app.api_keys else {
        return next.run(req).await;
    };
    if !needs_api_key(req.uri().path()) {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(paths::API_KEY_HEADER)
        .map(HeaderValue::as_bytes);
    match keys.check(presented) {
        KeyCheck::Accepted(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        KeyCheck::Missing => ApiError::new(
            ErrorCode::AuthRequired,
            "an API key is required (header x-api-key)",
        )
        .into_response(),
        KeyCheck::Invalid => {
            ApiError::new(ErrorCode::AuthInvalid, "the API key is not valid").into_response()
        }
    }
}

async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "this method is not allowed on this route",
    )
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("request handler panicked");
    ApiError::new(ErrorCode::InternalError, "internal error").into_response()
}

/// The whole application.
pub fn router(app: AppState) -> Router {
    let body_limit = app.config.body_limit_bytes;
    Router::new()
        .merge(health::router())
        .merge(openapi::router(openapi::Served {
            auth: app.api_keys.is_some(),
            proofs_required: app.verification_required(),
        }))
        .merge(metrics::router())
        .merge(challenges::router())
        .merge(machines::router())
        .merge(audit::router())
        .merge(events::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Around the fallbacks too: an unknown route or a wrong method
        // under /api/ answers 401 without a key, like a known one.
        .layer(middleware::from_fn_with_state(app.clone(), require_api_key))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(
            app.clone(),
            limits::refuse_oversized,
        ))
        .layer(middleware::from_fn_with_state(app.clone(), observe))
        // Inside the request span, so that a logged cause carries the
        // request id.
        .layer(middleware::from_fn(error::log_reports))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request| {
                    let id = req
                        .headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    tracing::info_span!(
                        "request",
                        method = %req.method(),
                        path = %req.uri().path(),
                        request_id = %id
                    )
                })
                // 5xx answers are mostly "the MCR is down, retry": worth a
                // warning each, not an error.
                .on_failure(DefaultOnFailure::new().level(tracing::Level::WARN)),
        )
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        // Outermost: an id that is not kept is replaced before anything
        // echoes or logs it.
        .layer(middleware::from_fn(limits::sanitize_request_id))
        .with_state(app)
}
