//! Issuing challenges: single use, expiring, bound to one identity, naming
//! its current controllers. Rate limited per client address. Issuing one
//! writes nothing (`crate::challenge_key`): single use is decided when it
//! is redeemed.

use std::net::IpAddr;

use peaqos_protocol::{Challenge, IdentityRef, ProofMethod};

use super::ServiceError;
use crate::app::App;
use crate::lifecycle::Refusal;

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
        let issued_at = self.now();
        let expires_at = issued_at.saturating_add(self.config.challenge_ttl);
        let record = self
            .challenge_key
            .issue(
                &self.config.orchestrator_name,
                &identity,
                issued_at,
                expires_at,
            )
            .map_err(|e| ServiceError::internal("cannot draw a challenge", e))?;
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
