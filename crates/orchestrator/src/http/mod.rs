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
use crate::audit::Caller;
use crate::auth::KeyCheck;
use crate::console;
/// Kept here for callers from before the helper had its own module.
pub use crate::error_chain::error_chain;
use crate::metrics::{RequestLabels, RouteLabels};
use crate::roles::{self, Role};

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
    "/",
    console::PAGE,
    console::LOGIN,
    console::LOGOUT,
    console::SESSION,
    console::COUNTS,
    console::SCRIPT,
    console::STYLE,
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
/// and wrong methods included, so that probing learns nothing), `/metrics`
/// and the console's data (`/console/api/`) need the key or a session.
const PUBLIC_WITH_AUTH: &[&str] = &[paths::OPENAPI, paths::API_HEALTH, health::API_READINESS];

fn needs_api_key(path: &str) -> bool {
    (path == "/metrics" || path.starts_with("/api/") || path.starts_with("/console/api/"))
        && !PUBLIC_WITH_AUTH.contains(&path)
}

/// Who a request comes from: its `x-api-key`, or else the console session
/// its cookie names.
///
/// A session authenticates the API too (an `EventSource` cannot send a
/// header, and the page acts through the API). A cookie goes with every
/// request the browser makes, whoever's page asks, so a session's request
/// that changes anything must also carry the session's CSRF token in a
/// header: another site can neither read the token nor set the header
/// without a CORS preflight, which this server never grants; and the
/// cookie is `SameSite=Strict` besides. A request with `x-api-key` needs
/// no token: a browser never adds that header by itself.
fn authenticate(app: &App, keys: &crate::auth::ApiKeys, req: &Request) -> Result<Caller, ApiError> {
    let headers = req.headers();
    if let Some(presented) = headers.get(paths::API_KEY_HEADER) {
        return match keys.check(Some(presented.as_bytes())) {
            KeyCheck::Accepted(caller) => Ok(caller),
            KeyCheck::Missing | KeyCheck::Invalid => Err(ApiError::new(
                ErrorCode::AuthInvalid,
                "the API key is not valid",
            )),
        };
    }
    if console::session::cookie_value(headers).is_none() {
        return Err(ApiError::new(
            ErrorCode::AuthRequired,
            "an API key is required (header x-api-key)",
        ));
    }
    let Some(session) = app.console.sessions.of_request(headers) else {
        return Err(ApiError::new(
            ErrorCode::AuthInvalid,
            "the console session has ended; log in again",
        ));
    };
    let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !safe
        && !session.csrf_matches(
            headers
                .get(console::session::CSRF_HEADER)
                .map(HeaderValue::as_bytes),
        )
    {
        return Err(console::csrf_refused());
    }
    Ok(session.caller)
}

/// Refuses requests without a valid `x-api-key` or session (when auth is
/// on), or whose key's role does not allow the method; and tells the
/// handlers whose key it was (the audit trail's actor, and its role).
async fn require_api_key(State(app): State<AppState>, mut req: Request, next: Next) -> Response {
    let Some(keys) = &app.api_keys else {
        return next.run(req).await;
    };
    if !needs_api_key(req.uri().path()) {
        return next.run(req).await;
    }
    let caller = match authenticate(&app, keys, &req) {
        Ok(caller) => caller,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = roles::require(
        Some(&caller),
        Role::needed_for(req.method()),
        "use this method",
    ) {
        return ApiError::from(e).into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
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
        .merge(console::router())
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
