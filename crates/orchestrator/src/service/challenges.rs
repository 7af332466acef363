//! Issuing challenges: single use, expiring, bound to one identity, naming
//! its current controllers. Rate limited per client address. Issuing one
//! writes nothing (`crate::challenge_key`): single use is decided when it
//! is redeemed. Refused, like a write, while the write queue is full
//! (`crate::admission`).

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
        // A challenge is the first step of a write: while writes are being
        // turned away, the client is told now, with the booking its write
        // would get, before it signs and sends a write that would be
        // refused anyway (in a herd, one refused write per agent or more).
        self.admission.room().map_err(|busy| self.refused(busy))?;
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

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::Arc;
    use std::time::Duration;

    use peaqos_protocol::IdentityRef;

    use crate::admission::Admission;
    use crate::service::ServiceError;

    /// While a write would be refused, so is a challenge, with a booking
    /// (`429` and `Retry-After`), before the client signs anything; once
    /// the queue drains, challenges are issued again.
    #[tokio::test]
    async fn a_challenge_is_refused_with_a_booking_while_writes_would_be() {
        let app = crate::app::test_app(Admission::new(1, Duration::from_secs(3))).await;
        // After the store is open (its pool's timeouts run on this clock):
        // the queue below waits without a clock running out under it.
        tokio::time::pause();
        let identity: IdentityRef = "did:peaq:0x00000000000000000000000000000000000000aa"
            .parse()
            .unwrap();
        let client = |n: u8| IpAddr::V4(Ipv4Addr::new(10, 0, 0, n));
        let held = app.admission.enter().await.unwrap();
        let mut queued = Vec::new();
        while app.admission.room().is_ok() {
            let writer = Arc::clone(&app);
            queued.push(tokio::spawn(async move {
                writer.admission.enter().await.map(|_| ())
            }));
            while app.admission.queued() < queued.len() {
                tokio::task::yield_now().await;
            }
        }
        match app.issue_challenge(client(1), identity.clone()).await {
            Err(ServiceError::Busy(busy)) => {
                assert!(busy.retry_after > Duration::ZERO, "{busy:?}");
                assert!(
                    busy.retry_after <= crate::admission::BOOKING_HORIZON,
                    "{busy:?}"
                );
            }
            other => panic!("expected a refusal with a booking, got {other:?}"),
        }
        drop(held);
        for q in queued {
            q.await.unwrap().unwrap();
        }
        let challenge = app.issue_challenge(client(2), identity.clone()).await;
        assert_eq!(challenge.unwrap().identity_ref, identity);
    }
}
