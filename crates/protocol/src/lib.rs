//! The wire contract shared by `peaqos-agent` and `peaqos-orchestrator`:
//! request and response types of the Machine Markets machines & identity API,
//! machine identity references, and EIP-191 `personal_sign` proofs.
//!
//! No I/O and no async: both sides, and their tests, use the same types, so
//! they cannot disagree about the wire.

pub mod address;
pub mod challenge;
pub mod eip191;
pub mod envelope;
pub mod error_code;
pub mod identity;
pub mod machine;
pub mod raw_ecdsa;
pub mod timestamp;

pub use address::{Address, AddressError};
pub use challenge::{Challenge, ChallengeMessage, ChallengeMessageError, CreateChallengeRequest};
pub use eip191::{SecretKey, SecretKeyError, Signature, SignatureError, personal_message_hash};
pub use envelope::{ErrorBody, ErrorResponse, ItemResponse, ListResponse};
pub use error_code::ErrorCode;
pub use identity::{IdentityRef, IdentityRefError, MachineId};
pub use machine::{
    CreateMachineRequest, Machine, MachineIdentityProof, MachineIdentityProofInput, MachineStatus,
    ProofMethod, ResolutionSource, UpdateMachineRequest,
};
pub use raw_ecdsa::{RawSignatureError, address_of_public_key};
pub use timestamp::{Timestamp, TimestampError};

/// Paths of the API, relative to the server's base URL.
pub mod paths {
    /// Liveness, at the host root and never behind API-key auth.
    pub const HEALTH: &str = "/health";
    /// Liveness as the SDK calls it. Optional for clients: the contract
    /// does not promise that any health endpoint is served.
    pub const API_HEALTH: &str = "/api/v1/health";
    /// Readiness: store and controller source reachable.
    pub const READY: &str = "/ready";
    pub const API_BASE: &str = "/api/v1";
    pub const CHALLENGES: &str = "/api/v1/machine-identity/challenges";
    pub const MACHINES: &str = "/api/v1/machines";
    pub const OPENAPI: &str = "/api/v1/openapi.json";
    /// Header carrying the platform API key.
    pub const API_KEY_HEADER: &str = "x-api-key";

    /// `/api/v1/machines/{id}`. Machine ids are opaque but URL-safe
    /// (`mach_` + base32); they are not escaped here.
    pub fn machine(id: &str) -> String {
        format!("{MACHINES}/{id}")
    }
}
