//! The HTTP edge of errors: [`ApiError`] is the contract's envelope
//! `{"error": {"code", "message", "details"?}}` with its status, and the one
//! place where a [`ServiceError`] becomes a status and a code.
//!
//! Internals never reach a client: a fault answers `500 INTERNAL_ERROR` and
//! a database that does not answer `503 SERVICE_UNAVAILABLE`, with fixed
//! messages. Their cause travels with the response as an [`ErrorReport`]
//! extension, which [`log_reports`] (a middleware inside the request span)
//! takes off and logs; converting an error logs nothing.

use std::sync::Arc;

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use peaqos_protocol::{ErrorBody, ErrorCode, ErrorResponse};

use crate::error_chain::error_chain;
use crate::lifecycle::Refusal;
use crate::service::ServiceError;
use crate::verify::ProofError;

/// Seconds a client should wait before retrying after the controller source
/// failed.
const IDENTITY_RETRY_AFTER_SECS: u64 = 5;
/// Seconds a client should wait before retrying when the database did not
/// answer.
const DATABASE_RETRY_AFTER_SECS: u64 = 2;

/// An error answered in the contract's envelope.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
    details: Option<serde_json::Value>,
    retry_after: Option<u64>,
    report: Option<ErrorReport>,
}

/// The cause of a 5xx that the client is not told, for the log.
#[derive(Debug, Clone)]
pub struct ErrorReport {
    /// `true`: a fault of ours (logged as an error); `false`: a dependency
    /// that is down (a warning: the client was told to retry).
    fault: bool,
    cause: Arc<ServiceError>,
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
            report: None,
        }
    }

    /// `400 VALIDATION_ERROR` naming the offending field.
    pub fn validation(field: &str, message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ValidationError, message).with_field(field)
    }

    #[must_use]
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }

    #[must_use]
    fn with_field(self, field: &str) -> Self {
        self.with_details(serde_json::json!({ "field": field }))
    }

    #[must_use]
    fn with_machine(self, machine_id: &str) -> Self {
        self.with_details(serde_json::json!({ "machineId": machine_id }))
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

    /// `500 INTERNAL_ERROR`, with nothing about the cause.
    pub fn internal() -> Self {
        Self::new(ErrorCode::InternalError, "internal error")
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(ErrorCode::NotFound, format!("{what} not found"))
    }

    #[must_use]
    fn reported(mut self, fault: bool, cause: ServiceError) -> Self {
        self.report = Some(ErrorReport {
            fault,
            cause: Arc::new(cause),
        });
        self
    }
}

/// The contract's status and code for a refused proof.
fn proof_error(e: &ProofError) -> ApiError {
    let code = match e {
        ProofError::Expired { .. } => ErrorCode::ProofExpired,
        ProofError::NotActivated { .. } => ErrorCode::NotActivated,
        ProofError::Signature(_)
        | ProofError::UnknownChallenge
        | ProofError::ForeignChallenge
        | ProofError::NotController { .. } => ErrorCode::ProofInvalid,
    };
    let field = match e {
        ProofError::Signature(_) => Some("identityProof.signature"),
        ProofError::UnknownChallenge
        | ProofError::ForeignChallenge
        | ProofError::Expired { .. } => Some("identityProof.challengeId"),
        ProofError::NotController { .. } | ProofError::NotActivated { .. } => None,
    };
    let error = ApiError::new(code, e.to_string());
    match field {
        Some(f) => error.with_field(f),
        None => error,
    }
}

/// The contract's status and code for a lifecycle refusal.
fn refusal(r: &Refusal) -> ApiError {
    let message = r.to_string();
    match r {
        Refusal::DegradedNotSettable | Refusal::ArchiveWithDelete => {
            ApiError::validation("status", message)
        }
        Refusal::IdentityImmutable { .. } => {
            ApiError::new(ErrorCode::IdentityImmutable, message).with_field("identityRef")
        }
        Refusal::ProofRequired => {
            ApiError::new(ErrorCode::ProofRequired, message).with_field("identityProof")
        }
        Refusal::BlockedNeedsFreshProof | Refusal::NoStoredProof | Refusal::NotActivated { .. } => {
            ApiError::new(ErrorCode::NotActivated, message)
        }
        Refusal::StoredProofExpired { .. } => ApiError::new(ErrorCode::ProofExpired, message),
        Refusal::NoLongerController { machine_id, .. }
        | Refusal::NoLongerResolves { machine_id, .. } => {
            ApiError::new(ErrorCode::NotActivated, message).with_machine(machine_id)
        }
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match &e {
            ServiceError::Refused(r) => refusal(r),
            ServiceError::Proof(p) => proof_error(p),
            ServiceError::IdentityExists { machine_id } => {
                Self::new(ErrorCode::IdentityExists, e.to_string()).with_machine(machine_id)
            }
            ServiceError::NotFound { .. } => Self::new(ErrorCode::NotFound, e.to_string()),
            ServiceError::Forbidden { .. } => Self::new(ErrorCode::Forbidden, e.to_string()),
            ServiceError::RateLimited { retry_after } => {
                Self::new(ErrorCode::RateLimited, e.to_string())
                    .retry_after(retry_after.as_secs() + 1)
            }
            ServiceError::Busy(busy) => Self::new(ErrorCode::RateLimited, e.to_string())
                .retry_after(
                    busy.retry_after.as_secs() + u64::from(busy.retry_after.subsec_nanos() > 0),
                ),
            ServiceError::IdentityUnavailable(u) => Self::new(
                ErrorCode::IdentityUnavailable,
                "peaqOS identity data is unavailable right now; nothing was changed, retry later",
            )
            .with_details(serde_json::json!({ "reason": u.reason }))
            .retry_after(IDENTITY_RETRY_AFTER_SECS),
            // A database that does not answer: the client may retry the
            // same request.
            ServiceError::Store(s) if s.is_unavailable() => Self::new(
                ErrorCode::ServiceUnavailable,
                "the database is not answering right now; retry later",
            )
            .retry_after(DATABASE_RETRY_AFTER_SECS)
            .reported(false, e),
            ServiceError::Store(_) | ServiceError::Internal { .. } => {
                Self::internal().reported(true, e)
            }
        }
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
        if let Some(report) = self.report {
            response.extensions_mut().insert(report);
        }
        response
    }
}

/// Logs the cause an [`ApiError`] left on its response (and removes it).
pub async fn log_reports(req: Request, next: Next) -> Response {
    let mut response = next.run(req).await;
    if let Some(report) = response.extensions_mut().remove::<ErrorReport>() {
        let chain = error_chain(report.cause.as_ref());
        if report.fault {
            tracing::error!(error = %chain, "internal error");
        } else {
            tracing::warn!(error = %chain, "database not answering");
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use axum::body::to_bytes;

    use super::*;
    use crate::store::StoreError;

    async fn answer(e: ServiceError) -> (Response, String) {
        let mut response = ApiError::from(e).into_response();
        let body = std::mem::take(response.body_mut());
        let bytes = to_bytes(body, 64 * 1024).await.unwrap();
        (response, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn a_fault_answers_500_without_its_cause_which_travels_to_the_log() {
        let secret = "relation \"machines\" does not exist at /var/lib/x";
        let e = ServiceError::internal("cannot read", std::io::Error::other(secret));
        let (response, body) = answer(e).await;
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(
            body.contains("INTERNAL_ERROR") && !body.contains("relation"),
            "{body}"
        );
        let report = response.extensions().get::<ErrorReport>().unwrap();
        assert!(report.fault);
        assert!(error_chain(report.cause.as_ref()).contains(secret));
    }

    #[tokio::test]
    async fn a_database_that_does_not_answer_is_503_with_retry_after() {
        let e = ServiceError::Store(StoreError::from(sqlx::Error::PoolTimedOut));
        let (response, body) = answer(e).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        assert!(
            body.contains("SERVICE_UNAVAILABLE") && !body.contains("pool"),
            "{body}"
        );
        assert!(!response.extensions().get::<ErrorReport>().unwrap().fault);
    }

    #[tokio::test]
    async fn refusals_carry_their_code_and_the_field_or_machine() {
        let (r, body) = answer(Refusal::DegradedNotSettable.into()).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert!(body.contains(r#""field":"status""#), "{body}");
        let gone = Refusal::NoLongerResolves {
            machine_id: "mach_1".into(),
            identity: peaqos_protocol::IdentityRef::parse("did:peaq:1").unwrap(),
        };
        let (r, body) = answer(gone.into()).await;
        assert_eq!(r.status(), StatusCode::CONFLICT);
        assert!(
            body.contains("MACHINE_NOT_ACTIVATED") && body.contains("mach_1"),
            "{body}"
        );
        assert!(r.extensions().get::<ErrorReport>().is_none());
    }
}
