//! The JSON request body extractor: every way a body can be wrong becomes
//! a `VALIDATION_ERROR` that names the problem.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use peaqos_protocol::ErrorCode;
use serde::de::DeserializeOwned;

use super::ApiError;

/// Error messages never carry more than this of anything a client sent.
const MAX_MESSAGE_LEN: usize = 300;

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
        // serde's derive also reads a struct from an array of its fields in
        // order, so `["did:peaq:3"]` would pass for `{"identityRef": ...}`.
        // Every request body of this API is an object.
        if text.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ApiError::validation(
                "body",
                "request body must be a JSON object",
            ));
        }
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
    // serde names the Rust type it wanted ("expected struct
    // IdentityProofInput"); a client knows only JSON.
    let message = match message.split_once("expected struct ") {
        Some((head, _)) => format!("{head}expected a JSON object"),
        None => message.to_owned(),
    };
    ApiError::validation(&field, bounded(&format!("{field}: {message}")))
}

#[cfg(test)]
mod tests {
    use axum::body::Body;

    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    #[allow(dead_code)]
    struct Inner {
        challenge_id: String,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    #[allow(dead_code)]
    struct Outer {
        identity_ref: String,
        identity_proof: Option<Inner>,
    }

    async fn read(body: &str) -> Result<Outer, String> {
        let req = Request::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_owned()))
            .unwrap();
        ApiJson::<Outer>::from_request(req, &())
            .await
            .map(|ApiJson(v)| v)
            .map_err(|e| format!("{e:?}"))
    }

    #[tokio::test]
    async fn only_an_object_is_a_body() {
        for body in [r#"["did:peaq:3"]"#, r#""did:peaq:3""#, "3", "null", " [ ]"] {
            let e = read(body).await.unwrap_err();
            assert!(e.contains("must be a JSON object"), "{body}: {e}");
        }
        assert!(read(r#" {"identityRef": "did:peaq:3"}"#).await.is_ok());
    }

    #[tokio::test]
    async fn messages_name_json_types_not_rust_types() {
        let e = read(r#"{"identityRef": "x", "identityProof": "no"}"#)
            .await
            .unwrap_err();
        assert!(e.contains("expected a JSON object"), "{e}");
        assert!(!e.contains("struct") && !e.contains("Inner"), "{e}");
    }
}
