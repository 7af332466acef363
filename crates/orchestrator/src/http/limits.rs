//! What a request may be before any handler sees it: the size of its URI,
//! its headers and its declared body, and the `x-request-id` it may bring.
//!
//! hyper refuses a request line or head it cannot hold (a URI over 64 KiB,
//! more than [`crate::serve::HYPER_MAX_HEADERS`] headers, a head over
//! ~400 KiB, a malformed request line) with a bare status and closes the
//! connection: there is no request yet to answer in the envelope. The limits
//! here are lower, so that every oversized request hyper can still parse is
//! answered in the contract's envelope (`414`, `431`, `413`).

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use peaqos_protocol::ErrorCode;

use super::{ApiError, AppState};

/// Longest URI (path and query) answered; longer is `414`.
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// Most headers a request may carry; more is `431`.
pub const MAX_HEADERS: usize = 100;
/// Largest total of header names and values; more is `431`.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;
/// Longest `x-request-id` kept; longer ones are replaced.
pub const MAX_REQUEST_ID: usize = 128;

/// Refuses a request whose URI or headers are too large, or whose declared
/// body is over the limit, before its body is read. Refusing on
/// `content-length` also means a client that sent `Expect: 100-continue`
/// gets its `413` instead of a `100 Continue` for a body that would be
/// refused after the upload.
pub async fn refuse_oversized(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let uri_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if uri_len > MAX_URI_BYTES {
        return too_large(
            StatusCode::URI_TOO_LONG,
            format!("the request URI is longer than {MAX_URI_BYTES} bytes"),
        );
    }
    let headers = req.headers();
    let header_bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if headers.len() > MAX_HEADERS || header_bytes > MAX_HEADER_BYTES {
        return too_large(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "the request carries more than {MAX_HEADERS} headers or {MAX_HEADER_BYTES} bytes of them"
            ),
        );
    }
    let limit = app.config.body_limit_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return too_large(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is too large (the limit is {limit} bytes)"),
        );
    }
    next.run(req).await
}

fn too_large(status: StatusCode, message: String) -> Response {
    ApiError::new(ErrorCode::ValidationError, message)
        .with_status(status)
        .into_response()
}

/// Removes an `x-request-id` that is too long or holds anything but
/// letters, digits and `-_.:`, so that a fresh one is made for it: the id
/// is echoed to the client and written into every log line of the request,
/// where a forged one could pass for another line (`ERROR ...`).
pub async fn sanitize_request_id(mut req: Request, next: Next) -> Response {
    let bad = req
        .headers()
        .get_all("x-request-id")
        .iter()
        .enumerate()
        .any(|(i, v)| i > 0 || !acceptable_request_id(v));
    if bad {
        req.headers_mut().remove("x-request-id");
    }
    next.run(req).await
}

fn acceptable_request_id(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_REQUEST_ID
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_short_and_plain() {
        for ok in [
            "4f1c2a9e-2b51-4e0b-9a9e-0f7c1f5b8d11",
            "req_01HZ.x:1",
            &"a".repeat(MAX_REQUEST_ID),
        ] {
            assert!(
                acceptable_request_id(&HeaderValue::from_str(ok).unwrap()),
                "{ok}"
            );
        }
        for bad in [
            "",
            "x ERROR peaqos_orchestrator: forged",
            "a\tb",
            "id=1;drop",
            &"a".repeat(MAX_REQUEST_ID + 1),
        ] {
            assert!(
                !acceptable_request_id(&HeaderValue::from_str(bad).unwrap()),
                "{bad:?}"
            );
        }
        assert!(!acceptable_request_id(
            &HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap()
        ));
    }
}
