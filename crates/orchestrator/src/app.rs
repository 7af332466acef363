//! The state every request handler shares, and the identity operations
//! several endpoints use: verifying a submitted proof, re-verifying a stored
//! one, and showing a stored machine as the wire carries it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use peaqos_protocol::{
    ErrorCode, IdentityRef, Machine, MachineIdentityProof, MachineIdentityProofInput,
    MachineStatus, Timestamp,
};

use crate::auth::ApiKeys;
use crate::clock::Clock;
use crate::config::{Config, VerificationMode};
use crate::controllers::{Resolution, Resolver};
use crate::http::ApiError;
use crate::ids;
use crate::metrics::Metrics;
use crate::rate_limit::RateLimiter;
use crate::store::{MachineRecord, Store, StoredStatus};
use crate::verify::{self, ProofError};

/// Controller look-ups one list request runs at once.
const PARALLEL_LOOKUPS: usize = 16;

/// Shared by all handlers (behind an `Arc`).
#[derive(Debug)]
pub struct App {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub resolver: Arc<Resolver>,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    pub limiter: RateLimiter,
    pub api_keys: Option<ApiKeys>,
}

impl App {
    pub fn verification_required(&self) -> bool {
        self.config.verification == VerificationMode::Required
    }

    pub fn now(&self) -> Timestamp {
        self.clock.timestamp()
    }

    /// Fresh controllers of `identity`; 503 when the source cannot answer.
    pub async fn controllers(&self, identity: &IdentityRef) -> Result<Resolution, ApiError> {
        Ok(self.resolver.resolve(identity).await?)
    }

    /// Fresh controllers of many identities at once (a list page): cached
    /// answers first, then at most [`PARALLEL_LOOKUPS`] look-ups at a time.
    /// Any unavailable answer fails the whole request: leaving machines out
    /// of a list because the source hiccuped would misreport the fleet.
    pub async fn resolve_all<'a>(
        &self,
        identities: impl Iterator<Item = &'a IdentityRef>,
    ) -> Result<HashMap<IdentityRef, Resolution>, ApiError> {
        let mut found = HashMap::new();
        let mut missing = HashSet::new();
        for identity in identities {
            if found.contains_key(identity) || missing.contains(identity) {
                continue;
            }
            match self.resolver.cached(identity) {
                Some(r) => {
                    found.insert(identity.clone(), r);
                }
                None => {
                    missing.insert(identity.clone());
                }
            }
        }
        let mut tasks = tokio::task::JoinSet::new();
        let mut queue = missing.into_iter();
        loop {
            while tasks.len() < PARALLEL_LOOKUPS {
                let Some(identity) = queue.next() else { break };
                let resolver = Arc::clone(&self.resolver);
                tasks.spawn(async move {
                    let r = resolver.resolve(&identity).await;
                    (identity, r)
                });
            }
            let Some(done) = tasks.join_next().await else {
                break;
            };
            let (identity, result) = done.map_err(|e| ApiError::internal(&e))?;
            found.insert(identity, result?);
        }
        Ok(found)
    }

    /// Verifies a submitted proof for `identity`: strict signature, a live
    /// challenge issued for this identity, and a signer among the fresh
    /// controllers. The challenge is not consumed here; the caller consumes it
    /// in the transaction that writes the machine.
    pub async fn verify_submitted(
        &self,
        identity: &IdentityRef,
        input: &MachineIdentityProofInput,
    ) -> Result<MachineIdentityProof, ApiError> {
        let result = self.verify_inner(identity, input).await;
        match &result {
            Ok(_) => self.metrics.verification("verified"),
            Err(Failure::Proof(e)) => self.metrics.verification(e.outcome()),
            Err(Failure::Other(_)) => self.metrics.verification("unavailable"),
        }
        result.map_err(|f| match f {
            Failure::Proof(e) => proof_error(&e),
            Failure::Other(e) => e,
        })
    }

    async fn verify_inner(
        &self,
        identity: &IdentityRef,
        input: &MachineIdentityProofInput,
    ) -> Result<MachineIdentityProof, Failure> {
        let signature = verify::parse_signature(input)?;
        let challenge = if ids::looks_like(ids::CHALLENGE_PREFIX, &input.challenge_id) {
            self.store
                .get_challenge(&input.challenge_id)
                .await
                .map_err(|e| Failure::Other(e.into()))?
        } else {
            None
        };
        let now = self.now();
        let challenge = verify::check_challenge(challenge.as_ref(), identity, now)?;
        let controllers = self.controllers(identity).await.map_err(Failure::Other)?;
        Ok(verify::accept(&signature, challenge, &controllers, now)?)
    }

    /// Re-verifies a machine's stored proof against fresh controller data:
    /// its signer must still be a controller. No ECDSA work: the signer was
    /// recovered when the proof was submitted.
    pub async fn reverify(&self, machine: &MachineRecord) -> Result<(), ApiError> {
        let Some(proof) = &machine.proof else {
            self.metrics.reverification("no_proof");
            return Err(ApiError::new(
                ErrorCode::NotActivated,
                "the machine has no verified identity proof",
            ));
        };
        let controllers = match self.controllers(&machine.identity).await {
            Ok(c) => c,
            Err(e) => {
                self.metrics.reverification("unavailable");
                return Err(e);
            }
        };
        if verify::still_valid(proof, &controllers) {
            self.metrics.reverification("valid");
            Ok(())
        } else {
            self.metrics.reverification("revoked");
            Err(not_activated(machine, &controllers, proof))
        }
    }

    /// Whether a stored proof is past the maximum proof age now.
    pub fn is_stale(&self, proof: &MachineIdentityProof) -> bool {
        verify::is_stale(proof, self.config.proof_max_age, self.now())
    }

    /// The machine as responses carry it: `active` reads as `degraded` once
    /// its proof is older than the maximum age, and the proof shows when
    /// that happens (`expiresAt`).
    pub fn to_wire(&self, m: MachineRecord) -> Machine {
        let max_age = self.config.proof_max_age;
        let now = self.now();
        let stale = m
            .proof
            .as_ref()
            .is_some_and(|p| verify::is_stale(p, max_age, now));
        let status = match m.status {
            StoredStatus::Draft => MachineStatus::Draft,
            StoredStatus::Active if stale => MachineStatus::Degraded,
            StoredStatus::Active => MachineStatus::Active,
            StoredStatus::Blocked => MachineStatus::Blocked,
            StoredStatus::Archived => MachineStatus::Archived,
        };
        let identity_proof = m.proof.map(|mut p| {
            p.expires_at = verify::proof_expiry(&p, max_age);
            p
        });
        Machine {
            id: m.id,
            display_name: m.display_name,
            status,
            owner_id: m.owner_id,
            identity_ref: m.identity,
            identity_proof,
            machine_type: m.machine_type,
            runtime_profile: m.runtime_profile,
            capabilities: m.capabilities,
            labels: m.labels,
            policy_ids: m.policy_ids,
            skill_keys: m.skill_keys,
            created_at: m.created_at,
            updated_at: m.updated_at,
        }
    }
}

enum Failure {
    Proof(ProofError),
    Other(ApiError),
}

impl From<ProofError> for Failure {
    fn from(e: ProofError) -> Self {
        Self::Proof(e)
    }
}

/// The contract's status and code for a refused proof.
pub fn proof_error(e: &ProofError) -> ApiError {
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
        Some(f) => error.with_details(serde_json::json!({ "field": f })),
        None => error,
    }
}

fn not_activated(
    machine: &MachineRecord,
    controllers: &Resolution,
    proof: &MachineIdentityProof,
) -> ApiError {
    let message = if controllers.is_active() {
        format!(
            "the proof's signer {} is no longer a controller of {}",
            proof.signer_address, machine.identity
        )
    } else {
        format!(
            "{} no longer resolves to any controller (not activated on peaqOS)",
            machine.identity
        )
    };
    ApiError::new(ErrorCode::NotActivated, message)
        .with_details(serde_json::json!({ "machineId": machine.id }))
}
