//! The HTTP surface: routes, the error envelope, the JSON extractor, and the
//! middleware every request passes (request id, tracing, metrics, timeout,
//! panic guard, API-key auth).

pub mod challenges;
pub mod health;
pub mod machines;
pub mod metrics;
pub mod openapi;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use peaqos_protocol::{ErrorBody, ErrorCode, ErrorResponse, paths};
use serde::de::DeserializeOwned;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnFailure, TraceLayer};

use crate::app::App;
use crate::auth::KeyCheck;
use crate::controllers::Unavailable;
use crate::metrics::{RequestLabels, RouteLabels};
use crate::store::StoreError;

/// Seconds a client should wait before retrying after the controller source
/// failed.
const IDENTITY_RETRY_AFTER_SECS: u64 = 5;
/// Seconds a client should wait before retrying when the database did not
/// answer.
const DATABASE_RETRY_AFTER_SECS: u64 = 2;
/// Error messages never carry more than this of anything a client sent.
const MAX_MESSAGE_LEN: usize = 300;

pub type AppState = Arc<App>;

/// An error answered in the contract's envelope:
/// `{"error": {"code", "message", "details"?}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
    details: Option<serde_json::Value>,
    retry_after: Option<u64>,
}

impl ApiError {
    /// An error with the status the contract gives `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::from_u16(code.http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code,
            message: message.into(),
            details: None,
            retry_after: None,
        }
    }

    /// `400 VALIDATION_ERROR` naming the offending field.
    pub fn validation(field: &str, message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ValidationError, message)
            .with_details(serde_json::json!({ "field": field }))
    }

    #[must_use]
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }

    #[must_use]
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    #[must_use]
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }

    pub fn code(&self) -> &ErrorCode {
        &self.code
    }

    /// `500 INTERNAL_ERROR`; the cause is logged, never sent.
    pub fn internal(cause: &(dyn std::error::Error + 'static)) -> Self {
        tracing::error!(error = %error_chain(cause), "internal error");
        Self::new(ErrorCode::InternalError, "internal error")
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(ErrorCode::NotFound, format!("{what} not found"))
    }
}

/// `a: b: c` from an error and its sources. A source whose text the
/// message before already ends with is left out (sqlx's errors repeat their
/// cause in their own message).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut last = out.clone();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !last.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        last = text;
        source = s.source();
    }
    out
}

impl From<Unavailable> for ApiError {
    fn from(e: Unavailable) -> Self {
        Self::new(
            ErrorCode::IdentityUnavailable,
            "peaqOS identity data is unavailable right now; nothing was changed, retry later",
        )
        .with_details(serde_json::json!({ "reason": e.reason }))
        .retry_after(IDENTITY_RETRY_AFTER_SECS)
    }
}

impl From<StoreError> for ApiError {
    /// A database that does not answer is `503 SERVICE_UNAVAILABLE` with
    /// `Retry-After` (the client may retry the same request); anything else
    /// is a fault. The cause is logged, never sent.
    fn from(e: StoreError) -> Self {
        if e.is_unavailable() {
            tracing::warn!(error = %error_chain(&e), "database not answering");
            return Self::new(
                ErrorCode::ServiceUnavailable,
                "the database is not answering right now; retry later",
            )
            .retry_after(DATABASE_RETRY_AFTER_SECS);
        }
        Self::internal(&e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorResponse {
            error: ErrorBody {
                code: self.code,
                message: self.message,
                details: self.details,
            },
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// Cuts client-influenced text to a bounded length at a character boundary.
pub fn bounded(text: &str) -> String {
    if text.len() <= MAX_MESSAGE_LEN {
        return text.to_owned();
    }
    let mut end = MAX_MESSAGE_LEN;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// A JSON request body. Errors are `VALIDATION_ERROR` naming the field (400),
/// or the body being too large (413) or not JSON (415). An empty body reads
/// as `{}`, so that a bodyless request that declares JSON is understood and a
/// missing required field is named.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

fn is_json_content_type(value: &HeaderValue) -> bool {
    let Ok(text) = value.to_str() else {
        return false;
    };
    let essence = text
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let content_type = req.headers().get(header::CONTENT_TYPE).cloned();
        let body = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(ErrorCode::ValidationError, "request body is too large")
                    .with_status(StatusCode::PAYLOAD_TOO_LARGE)
            } else {
                ApiError::new(ErrorCode::ValidationError, "cannot read the request body")
            }
        })?;
        let text: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            if !content_type.as_ref().is_some_and(is_json_content_type) {
                return Err(ApiError::new(
                    ErrorCode::ValidationError,
                    "request body must be JSON (content-type: application/json)",
                )
                .with_status(StatusCode::UNSUPPORTED_MEDIA_TYPE));
            }
            &body
        };
        let mut de = serde_json::Deserializer::from_slice(text);
        let value = serde_path_to_error::deserialize(&mut de).map_err(|e| json_error(&e))?;
        de.end().map_err(|_| {
            ApiError::new(
                ErrorCode::ValidationError,
                "request body has text after the JSON value",
            )
        })?;
        Ok(Self(value))
    }
}

fn json_error(e: &serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let inner = e.inner();
    if inner.is_syntax() || inner.is_eof() {
        return ApiError::new(
            ErrorCode::ValidationError,
            bounded(&format!("request body is not valid JSON: {inner}")),
        );
    }
    let path = e.path().to_string();
    let message = inner.to_string();
    // serde reports a missing field at its parent; name the field itself.
    let field = match message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
    {
        Some(missing) if path == "." => missing.to_owned(),
        Some(missing) => format!("{path}.{missing}"),
        None if path == "." => "body".to_owned(),
        None => path,
    };
    // Drop serde_json's position suffix: the field name says more.
    let message = message
        .rsplit_once(" at line ")
        .map_or(message.as_str(), |(m, _)| m);
    ApiError::validation(&field, bounded(&format!("{field}: {message}")))
}

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
    "/metrics",
    paths::OPENAPI,
    paths::CHALLENGES,
    paths::MACHINES,
    "/api/v1/machines/{machineId}",
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

/// Refuses requests without a valid `x-api-key` (when auth is on).
async fn require_api_key(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let Some(keys) = &app.api_keys else {
        return next.run(req).await;
    };
    let presented = req
        .headers()
        .get(paths::API_KEY_HEADER)
        .map(HeaderValue::as_bytes);
    match keys.check(presented) {
        KeyCheck::Accepted => next.run(req).await,
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
    let mut api = Router::new()
        .merge(challenges::router())
        .merge(machines::router());
    let mut operations = Router::new().merge(metrics::router());
    if app.api_keys.is_some() {
        api = api.route_layer(middleware::from_fn_with_state(app.clone(), require_api_key));
        operations =
            operations.route_layer(middleware::from_fn_with_state(app.clone(), require_api_key));
    }
    let body_limit = app.config.body_limit_bytes;
    Router::new()
        .merge(health::router())
        .merge(openapi::router())
        .merge(operations)
        .merge(api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(app.clone(), observe))
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
        .with_state(app)
}
