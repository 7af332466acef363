//! The fleet console: a live page of the machines, served at `/console`
//! from files compiled into the binary (no build step, nothing fetched
//! from elsewhere), with its login, its session, and the one aggregate the
//! contract's API has no route for (counts by status).
//!
//! The page reads the contract's own API (`/api/v1/machines`, the audit
//! trail, the event stream) and acts through it (`PATCH` a status), with
//! the session cookie in place of `x-api-key`; `http::require_api_key`
//! says how a session is accepted there and why actions need its CSRF
//! token too. The page itself never holds the key: it sends it once to
//! `/console/login`.

pub mod session;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use peaqos_protocol::ErrorCode;
use serde::{Deserialize, Serialize};

use crate::auth::KeyCheck;
use crate::http::{ApiError, ApiJson, AppState};

/// The page.
pub const PAGE: &str = "/console";
/// Counts by status (session or key, like `/api/`).
pub const COUNTS: &str = "/console/api/counts";
pub const LOGIN: &str = "/console/login";
pub const LOGOUT: &str = "/console/logout";
pub const SESSION: &str = "/console/session";
pub const SCRIPT: &str = "/console/console.js";
pub const STYLE: &str = "/console/console.css";

const INDEX_HTML: &str = include_str!("assets/index.html");
const CONSOLE_JS: &str = include_str!("assets/console.js");
const CONSOLE_CSS: &str = include_str!("assets/console.css");

/// Scripts and styles from this origin only, no inline code, no framing,
/// no request anywhere else.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; form-action 'self'; base-uri 'none'; \
     frame-ancestors 'none'";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { Redirect::to(PAGE) }))
        .route(
            PAGE,
            get(|| async { asset(INDEX_HTML, "text/html; charset=utf-8") }),
        )
        .route(
            SCRIPT,
            get(|| async { asset(CONSOLE_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            STYLE,
            get(|| async { asset(CONSOLE_CSS, "text/css; charset=utf-8") }),
        )
        .route(LOGIN, post(login))
        .route(LOGOUT, post(logout))
        .route(SESSION, get(session))
        .route(COUNTS, get(counts))
        .layer(middleware::from_fn(security_headers))
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn security_headers(req: Request, next: Next) -> Response {
    let mut response = next.run(req).await;
    let headers = response.headers_mut();
    for (name, value) in [
        ("content-security-policy", CSP),
        ("x-frame-options", "DENY"),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        ("cache-control", "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Login {
    api_key: String,
}

/// What the page knows of its session.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct SessionView {
    /// `false`: the orchestrator runs without API keys (the page says so).
    auth: bool,
    role: &'static str,
    key_name: Option<String>,
    /// Sent back in `x-csrf-token` on every action.
    csrf_token: Option<String>,
}

impl SessionView {
    fn of(s: &session::Session) -> Self {
        Self {
            auth: true,
            role: s.caller.role.as_str(),
            key_name: Some(s.caller.key_name.to_string()),
            csrf_token: Some(s.csrf.clone()),
        }
    }

    const OPEN: Self = Self {
        auth: false,
        role: "operator",
        key_name: None,
        csrf_token: None,
    };
}

/// Exchanges an API key for a session cookie. The body must be JSON (the
/// extractor refuses anything else), which a cross-site form cannot send:
/// no other site can log a browser in under its own key.
async fn login(
    State(app): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Login>,
) -> Result<Response, ApiError> {
    let Some(keys) = &app.api_keys else {
        return Ok(axum::Json(SessionView::OPEN).into_response());
    };
    let caller = match keys.check(Some(body.api_key.as_bytes())) {
        KeyCheck::Accepted(caller) => caller,
        KeyCheck::Missing | KeyCheck::Invalid => {
            // Never the key itself: a near miss is still most of one.
            tracing::warn!("console login refused: the API key is not valid");
            return Err(ApiError::new(
                ErrorCode::AuthInvalid,
                "the API key is not valid",
            ));
        }
    };
    let (id, session) = app.console.sessions.open(caller).map_err(|e| match e {
        session::OpenError::Full => {
            ApiError::new(ErrorCode::RateLimited, e.to_string()).retry_after(60)
        }
        session::OpenError::Random(_) => ApiError::internal(),
    })?;
    tracing::info!(key = %session.caller.key_name, role = session.caller.role.as_str(), "console login");
    let cookie = HeaderValue::from_str(&session::set_cookie(&id, &headers))
        .map_err(|_| ApiError::internal())?;
    let mut response = axum::Json(SessionView::of(&session)).into_response();
    response.headers_mut().insert(header::SET_COOKIE, cookie);
    Ok(response)
}

fn no_session() -> ApiError {
    ApiError::new(ErrorCode::AuthRequired, "log in first (no console session)")
}

/// The session the cookie names, for the page after a reload.
async fn session(
    State(app): State<AppState>,
    headers: HeaderMap,
) -> Result<axum::Json<SessionView>, ApiError> {
    if app.api_keys.is_none() {
        return Ok(axum::Json(SessionView::OPEN));
    }
    let s = app
        .console
        .sessions
        .of_request(&headers)
        .ok_or_else(no_session)?;
    Ok(axum::Json(SessionView::of(&s)))
}

/// Ends the session; like every action, only with its CSRF token.
async fn logout(State(app): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let s = app
        .console
        .sessions
        .of_request(&headers)
        .ok_or_else(no_session)?;
    if !s.csrf_matches(headers.get(session::CSRF_HEADER).map(HeaderValue::as_bytes)) {
        return Err(csrf_refused());
    }
    app.console.sessions.close(&headers);
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&session::clear_cookie()).map_err(|_| ApiError::internal())?,
    );
    Ok(response)
}

/// `403 FORBIDDEN` for an action without its session's CSRF token.
pub fn csrf_refused() -> ApiError {
    ApiError::new(
        ErrorCode::Forbidden,
        "the console's CSRF token is missing or wrong (header x-csrf-token); reload the page",
    )
}

/// How long one count is reused: however many pages are open, one
/// aggregate query per this (it reads every live row).
const COUNTS_TTL: Duration = Duration::from_secs(2);

/// What the console keeps per process.
#[derive(Debug, Default)]
pub struct ConsoleState {
    /// Logged-in browsers.
    pub sessions: session::Sessions,
    /// The counts by status, reused for a moment.
    pub counts: CountsCache,
}

/// The last counts, with when they were read.
#[derive(Debug, Default)]
pub struct CountsCache(Mutex<Option<(Instant, Arc<Counts>)>>);

#[derive(Debug, Serialize)]
pub struct Counts {
    /// Live machines by stored status (`degraded` is read from `active`
    /// per machine, so it is not counted apart).
    counts: std::collections::BTreeMap<String, i64>,
    total: i64,
}

/// One aggregate query, whatever the fleet's size, at most every
/// [`COUNTS_TTL`].
async fn counts(State(app): State<AppState>) -> Result<axum::Json<Arc<Counts>>, ApiError> {
    let cache = &app.console.counts.0;
    let lock = || {
        cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    if let Some((read, counts)) = &*lock()
        && read.elapsed() < COUNTS_TTL
    {
        return Ok(axum::Json(Arc::clone(counts)));
    }
    let rows = app
        .store
        .count_by_status()
        .await
        .map_err(crate::service::ServiceError::from)?;
    let total = rows.iter().map(|(_, n)| n).sum();
    let counts = Arc::new(Counts {
        counts: rows.into_iter().collect(),
        total,
    });
    *lock() = Some((Instant::now(), Arc::clone(&counts)));
    Ok(axum::Json(counts))
}
