//! Identity operations several endpoints share: fresh controllers (one or a
//! page's worth), verifying a submitted proof, and re-verifying a stored
//! one. The decisions are `verify`'s and `lifecycle`'s; this file fetches
//! what they need and counts the outcomes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use peaqos_protocol::{IdentityRef, MachineIdentityProof, MachineIdentityProofInput};

use super::ServiceError;
use crate::app::App;
use crate::controllers::Resolution;
use crate::lifecycle::{self, Refusal};
use crate::store::MachineRecord;
use crate::verify;

/// Controller look-ups one list request runs at once.
const PARALLEL_LOOKUPS: usize = 16;

impl App {
    /// Fresh controllers of `identity`; unavailable when the source cannot
    /// answer.
    pub async fn controllers(&self, identity: &IdentityRef) -> Result<Resolution, ServiceError> {
        Ok(self.resolver.resolve(identity).await?)
    }

    /// Fresh controllers of many identities at once (a list page): cached
    /// answers first, then at most [`PARALLEL_LOOKUPS`] look-ups at a time.
    /// Any unavailable answer fails the whole request: leaving machines out
    /// of a list because the source hiccuped would misreport the fleet.
    pub async fn resolve_all<'a>(
        &self,
        identities: impl Iterator<Item = &'a IdentityRef>,
    ) -> Result<HashMap<IdentityRef, Resolution>, ServiceError> {
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
            let (identity, result) =
                done.map_err(|e| ServiceError::internal("a controller look-up task failed", e))?;
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
    ) -> Result<MachineIdentityProof, ServiceError> {
        let result = self.verify_inner(identity, input).await;
        self.metrics.verification(match &result {
            Ok(_) => "verified",
            Err(ServiceError::Proof(e)) => e.outcome(),
            Err(_) => "unavailable",
        });
        result
    }

    async fn verify_inner(
        &self,
        identity: &IdentityRef,
        input: &MachineIdentityProofInput,
    ) -> Result<MachineIdentityProof, ServiceError> {
        let signature = verify::parse_signature(input)?;
        let challenge = self.challenge_key.open(
            &self.config.orchestrator_name,
            &input.challenge_id,
            identity,
        )?;
        let now = self.now();
        let challenge = verify::check_challenge(Some(&challenge), identity, now)?;
        let controllers = self.controllers(identity).await?;
        Ok(verify::accept(&signature, challenge, &controllers, now)?)
    }

    /// Re-verifies a machine's stored proof against fresh controller data:
    /// its signer must still be a controller. No ECDSA work: the signer was
    /// recovered when the proof was submitted.
    pub async fn reverify(&self, machine: &MachineRecord) -> Result<(), ServiceError> {
        if machine.proof.is_none() {
            self.metrics.reverification("no_proof");
            return Err(Refusal::NoStoredProof.into());
        }
        let controllers = match self.controllers(&machine.identity).await {
            Ok(c) => c,
            Err(e) => {
                self.metrics.reverification("unavailable");
                return Err(e);
            }
        };
        let checked = lifecycle::check_stored_proof(machine, &controllers);
        self.metrics
            .reverification(if checked.is_ok() { "valid" } else { "revoked" });
        Ok(checked?)
    }
}
