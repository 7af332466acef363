//! Why a service operation did not happen, in the domain's terms. The HTTP
//! edge (`http::error`) maps each case to the contract's status and code;
//! nothing here knows about HTTP.

use std::time::Duration;

use crate::admission::Busy;
use crate::controllers::Unavailable;
use crate::lifecycle::Refusal;
use crate::store::StoreError;
use crate::verify::ProofError;

/// See the module documentation.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A lifecycle rule refuses the request.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// A submitted identity proof is refused.
    #[error(transparent)]
    Proof(#[from] ProofError),
    #[error("this identity already has a machine record")]
    IdentityExists { machine_id: String },
    #[error("{what} not found")]
    NotFound { what: &'static str },
    /// The caller's role does not allow this change.
    #[error("this API key's role ({role}) may not {action}")]
    Forbidden {
        role: &'static str,
        action: &'static str,
    },
    #[error("too many challenge requests from this address; retry later")]
    RateLimited { retry_after: Duration },
    /// Too many writes are queued already (`crate::admission`).
    #[error(transparent)]
    Busy(#[from] Busy),
    /// The controller source cannot answer; nothing was decided or written.
    #[error(transparent)]
    IdentityUnavailable(#[from] Unavailable),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A fault of ours; the client learns nothing more than that.
    #[error("{what}")]
    Internal {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl ServiceError {
    pub fn not_found(what: &'static str) -> Self {
        Self::NotFound { what }
    }

    pub fn internal(
        what: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Internal {
            what,
            source: Box::new(source),
        }
    }
}
