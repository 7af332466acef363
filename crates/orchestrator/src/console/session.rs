//! The console's sessions: a login exchanges an API key for a random
//! session id, kept by the browser in an `HttpOnly`, `SameSite=Strict`
//! cookie, so that the key is sent once and never stored by the page.
//!
//! The table is in memory, per process: a restart or another replica
//! behind a load balancer without sticky sessions asks for a login again.
//! Ids are 256 random bits and kept only as their digest, so a lookup's
//! timing says nothing usable and a memory dump holds no live cookie. Each
//! session also has a CSRF token that the page sends in a header on every
//! action (see `http::require_api_key`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use sha3::{Digest, Keccak256};
use subtle::ConstantTimeEq;

use crate::audit::Caller;

/// The cookie's name.
pub const COOKIE: &str = "peaqos_session";
/// The header the page sends its CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a session lasts from its login, used or not.
pub const LIFETIME: Duration = Duration::from_hours(8);
/// Sessions held at most (memory stays bounded whoever logs in).
pub const MAX_SESSIONS: usize = 10_000;

/// A logged-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    pub caller: Caller,
    pub csrf: String,
    expires: Instant,
}

impl Session {
    /// Whether `presented` is this session's CSRF token (constant time).
    pub fn csrf_matches(&self, presented: Option<&[u8]>) -> bool {
        presented.is_some_and(|p| bool::from(p.ct_eq(self.csrf.as_bytes())))
    }
}

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("too many console sessions are open")]
    Full,
    #[error("cannot draw a session id")]
    Random(#[source] getrandom::Error),
}

/// The session table.
#[derive(Debug, Default)]
pub struct Sessions {
    table: Mutex<HashMap<[u8; 32], Session>>,
}

fn digest(id: &str) -> [u8; 32] {
    Keccak256::digest(id.as_bytes()).into()
}

fn random_hex() -> Result<String, OpenError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(OpenError::Random)?;
    Ok(hex::encode(bytes))
}

impl Sessions {
    /// Opens a session for `caller`: its id (for the cookie) and itself.
    pub fn open(&self, caller: Caller) -> Result<(String, Session), OpenError> {
        let id = random_hex()?;
        let session = Session {
            caller,
            csrf: random_hex()?,
            expires: Instant::now() + LIFETIME,
        };
        let mut table = self
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if table.len() >= MAX_SESSIONS {
            let now = Instant::now();
            table.retain(|_, s| s.expires > now);
            if table.len() >= MAX_SESSIONS {
                return Err(OpenError::Full);
            }
        }
        table.insert(digest(&id), session.clone());
        Ok((id, session))
    }

    /// The live session the request's cookie names, if any.
    pub fn of_request(&self, headers: &HeaderMap) -> Option<Session> {
        let id = cookie_value(headers)?;
        let mut table = self
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = digest(id);
        match table.get(&key) {
            Some(s) if s.expires > Instant::now() => Some(s.clone()),
            Some(_) => {
                table.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Ends the session the request's cookie names.
    pub fn close(&self, headers: &HeaderMap) {
        if let Some(id) = cookie_value(headers) {
            self.table
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&digest(id));
        }
    }
}

/// The session id in the request's `Cookie` header(s).
pub fn cookie_value(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == COOKIE && !value.is_empty()).then_some(value)
        })
}

/// Whether the request reached us over TLS (through a proxy that says so,
/// or as the page's own origin says): the cookie is then `Secure`.
fn over_tls(headers: &HeaderMap) -> bool {
    let says = |name: &str, prefix: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().starts_with(prefix))
    };
    says("x-forwarded-proto", "https") || says("origin", "https://")
}

/// The `Set-Cookie` value that stores `id`.
pub fn set_cookie(id: &str, request: &HeaderMap) -> String {
    let secure = if over_tls(request) { "; Secure" } else { "" };
    format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        LIFETIME.as_secs()
    )
}

/// The `Set-Cookie` value that removes the cookie.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::http::HeaderValue;

    use super::*;
    use crate::roles::Role;

    fn caller() -> Caller {
        Caller {
            key_name: Arc::from("ops"),
            role: Role::Operator,
        }
    }

    #[test]
    fn a_cookie_finds_its_session_until_it_is_closed() {
        let sessions = Sessions::default();
        let (id, opened) = sessions.open(caller()).unwrap();
        assert_eq!(id.len(), 64);
        let mut headers = HeaderMap::new();
        headers.insert(
            "cookie",
            HeaderValue::from_str(&format!("a=b; {COOKIE}={id}; c=d")).unwrap(),
        );
        let found = sessions.of_request(&headers).unwrap();
        assert_eq!(found.csrf, opened.csrf);
        assert!(found.csrf_matches(Some(opened.csrf.as_bytes())));
        assert!(!found.csrf_matches(Some(b"0000")) && !found.csrf_matches(None));
        sessions.close(&headers);
        assert!(sessions.of_request(&headers).is_none());
        let mut forged = HeaderMap::new();
        forged.insert("cookie", HeaderValue::from_static("peaqos_session=00"));
        assert!(sessions.of_request(&forged).is_none());
    }

    #[test]
    fn the_cookie_is_http_only_strict_and_secure_over_tls() {
        let plain = set_cookie("x", &HeaderMap::new());
        assert!(plain.contains("HttpOnly") && plain.contains("SameSite=Strict"));
        assert!(!plain.contains("Secure"));
        let mut tls = HeaderMap::new();
        tls.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        assert!(set_cookie("x", &tls).ends_with("; Secure"));
    }
}
