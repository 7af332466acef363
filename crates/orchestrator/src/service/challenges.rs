//! Issuing challenges: single use, expiring, bound to one identity, naming
//! its current controllers. Rate limited per client address, and bounded in
//! number over all clients.

use std::net::IpAddr;

use peaqos_protocol::{Challenge, ChallengeMessage, IdentityRef, ProofMethod};

use super::ServiceError;
use crate::app::App;
use crate::ids;
use crate::lifecycle::Refusal;
use crate::store::{ChallengeInsert, ChallengeRecord};

impl App {
    /// A fresh challenge for `identity`, requested from `client`.
    pub async fn issue_challenge(
        &self,
        client: IpAddr,
        identity: IdentityRef,
    ) -> Result<Challenge, ServiceError> {
        if let Err(wait) = self.limiter.check(client) {
            self.metrics.rate_limited.inc();
            return Err(ServiceError::RateLimited { retry_after: wait });
        }
        let controllers = self.controllers(&identity).await?;
        if !controllers.is_active() {
            return Err(Refusal::NotActivated { identity }.into());
        }
        let random_failed = |e| ServiceError::internal("cannot draw a challenge", e);
        let issued_at = self.now();
        let expires_at = issued_at.saturating_add(self.config.challenge_ttl);
        let challenge_id = ids::challenge_id().map_err(random_failed)?;
        let message = ChallengeMessage {
            orchestrator: self.config.orchestrator_name.clone(),
            identity: identity.clone(),
            challenge_id: challenge_id.clone(),
            nonce: ids::nonce().map_err(random_failed)?,
            issued_at,
            expires_at,
        }
        .render();
        let record = ChallengeRecord {
            id: challenge_id,
            identity,
            message,
            issued_at,
            expires_at,
        };
        match self
            .store
            .insert_challenge(&record, self.config.max_pending_challenges)
            .await?
        {
            ChallengeInsert::Stored => {}
            ChallengeInsert::Full => {
                self.metrics.rate_limited.inc();
                return Err(ServiceError::TooManyPending);
            }
        }
        self.metrics.challenges_issued.inc();
        Ok(Challenge {
            challenge_id: record.id,
            identity_ref: record.identity,
            message: record.message,
            expires_at: record.expires_at,
            verification_method: ProofMethod::Eip191,
            controller_addresses: controllers.controllers().to_vec(),
        })
    }
}
