//! How a cycle failed, and what that means for the next attempt.

use std::time::Duration;

use peaqos_logging::error_chain;
use peaqos_protocol::ErrorCode;

use crate::client::ClientError;
use crate::local_code::Code;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FailureKind {
    /// Orchestrator or its identity source unavailable: back off.
    Transient,
    /// Our key is not (or no longer) a controller of the identity.
    NotController,
    /// The signing policy refused the server's challenge: only an operator
    /// (changing the policy or the orchestrator) can fix it.
    ChallengeRefused,
    /// Something else an operator must fix (API key, record fields): retried
    /// slowly.
    NeedsOperator,
    /// This machine's clock fails a certificate's dates (`CLOCK`): tried
    /// again every [`CLOCK_RETRY`], so that the agent is active within
    /// seconds of NTP syncing.
    Clock,
    /// The controller key's token does not answer or refuses to sign:
    /// retried with backoff when it went away, slowly when an operator must
    /// act (PIN, key). Never replaced by another key.
    KeyUnavailable { transient: bool },
}

/// How soon a `CLOCK` failure is tried again (a TLS handshake: cheap for
/// both sides).
pub(super) const CLOCK_RETRY: Duration = Duration::from_secs(3);

#[derive(Debug)]
pub(super) struct Failure {
    pub kind: FailureKind,
    pub code: Code,
    pub message: String,
    pub retry_after: Option<Duration>,
    /// Says nothing about the orchestrator's load (unreachable, timed out,
    /// a 5xx): waiting for it may be cut short by a probe (`probe.rs`).
    pub load_neutral: bool,
}

impl Failure {
    pub(super) fn new(
        kind: FailureKind,
        code: impl Into<Code>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            code: code.into(),
            message: message.into(),
            retry_after: None,
            load_neutral: false,
        }
    }
}

impl From<crate::signer::SignError> for Failure {
    fn from(e: crate::signer::SignError) -> Self {
        Self::new(
            FailureKind::KeyUnavailable {
                transient: e.is_transient(),
            },
            crate::local_code::LocalCode::KeyUnavailable,
            error_chain(&e),
        )
    }
}

/// What a failed request means for the loop.
pub(super) fn classify(e: &ClientError) -> FailureKind {
    if let ClientError::Tls { failure, .. } = e
        && failure.is_clock()
    {
        FailureKind::Clock
    } else if e.is_transient() || e.is(&ErrorCode::ProofExpired) {
        FailureKind::Transient
    } else if e.is(&ErrorCode::ProofInvalid) || e.is(&ErrorCode::NotActivated) {
        FailureKind::NotController
    } else {
        FailureKind::NeedsOperator
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Self {
            kind: classify(&e),
            code: e.code(),
            message: error_chain(&e),
            retry_after: e.retry_after(),
            load_neutral: match &e {
                ClientError::Network { .. }
                | ClientError::Tls { .. }
                | ClientError::Timeout { .. } => true,
                other => other.status().is_some_and(|s| s >= 500),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16, code: &str) -> ClientError {
        ClientError::Api {
            status,
            code: ErrorCode::from_wire(code),
            message: "m".into(),
            details: None,
            retry_after: None,
        }
    }

    #[test]
    fn failures_are_classified_by_code_whatever_the_status() {
        assert_eq!(
            classify(&api(503, "PEAQOS_IDENTITY_UNAVAILABLE")),
            FailureKind::Transient
        );
        assert_eq!(
            classify(&api(410, "MACHINE_IDENTITY_PROOF_EXPIRED")),
            FailureKind::Transient
        );
        // Another server may send a contract code under another status.
        assert_eq!(
            classify(&api(400, "MACHINE_IDENTITY_PROOF_EXPIRED")),
            FailureKind::Transient
        );
        assert_eq!(
            classify(&api(400, "MACHINE_IDENTITY_PROOF_INVALID")),
            FailureKind::NotController
        );
        assert_eq!(
            classify(&api(422, "VALIDATION_ERROR")),
            FailureKind::NeedsOperator
        );
        assert_eq!(
            classify(&api(401, "AUTH_INVALID")),
            FailureKind::NeedsOperator
        );
        let f = Failure::from(api(422, "VALIDATION_ERROR"));
        assert_eq!(f.code.as_str(), "VALIDATION_ERROR");
        assert!(f.message.contains("HTTP 422"), "{}", f.message);
    }
}
