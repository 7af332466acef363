//! One cycle of the loop: from what the agent knows to a settled record,
//! with the requests that takes (register, take back, prove, push fields).

use std::time::SystemTime;

use peaqos_logging::error_chain;
use peaqos_protocol::{
    Address, CreateMachineRequest, ErrorCode, IdentityRef, Machine, MachineIdentityProofInput,
    MachineStatus, Timestamp, UpdateMachineRequest,
};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::challenge::{self, ChallengeRefusal, Expected};
use super::failure::{Failure, FailureKind};
use super::policy::{existing_machine_id, field_changes, update_is_empty};
use super::{Registrar, Settled};
use crate::backoff;
use crate::client::{self, ClientError, Received, Response};
use crate::local_code::LocalCode;
use crate::state::ProofFacts;
use crate::status::AgentState;

/// How many state transitions one cycle may make (GET, re-register, take
/// back...) before it waits: a misbehaving server cannot spin the loop.
const MAX_STEPS: usize = 4;
/// Pages of `GET /machines` read looking for our record (500 per page).
const MAX_PAGES: usize = 100;

/// Lowercase hex SHA-256, as `sha256sum` prints it.
fn sha256_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    Sha256::digest(bytes)
        .iter()
        .fold(String::with_capacity(64), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

/// The id of a listed record if it holds `identity` (in any spelling).
fn own_record_id(item: &serde_json::Value, identity: &IdentityRef) -> Option<String> {
    let theirs = IdentityRef::parse(item.get("identityRef")?.as_str()?).ok()?;
    let id = item.get("id")?.as_str()?;
    (theirs == *identity && client::is_valid_machine_id(id)).then(|| id.to_owned())
}

impl Registrar {
    /// One pass from what we know to a settled record.
    pub(super) async fn cycle(&mut self, force_renew: bool) -> Result<Settled, Failure> {
        // A token that went away shows in the status at the next check,
        // not only when a proof is next due.
        self.key.probe().await?;
        self.rotation_poll().await;
        let mut just_proved = false;
        for _ in 0..MAX_STEPS {
            let Some(id) = self.state.machine_id.clone() else {
                self.register().await?;
                just_proved = true;
                continue;
            };
            let machine = match self.client.get_machine(&id).await {
                Ok(r) => self.observe(r),
                Err(e) if e.status() == Some(404) || e.is(&ErrorCode::NotFound) => {
                    tracing::warn!(machine_id = %id, "record not found; registering again");
                    self.forget_machine()?;
                    continue;
                }
                Err(e) if e.is(&ErrorCode::NotActivated) || e.is(&ErrorCode::ProofExpired) => {
                    tracing::info!(machine_id = %id, error_code = %e.code(), "record needs a fresh proof");
                    self.prove(&id, AgentState::Activating, None, false).await?;
                    return Ok(Settled::Active);
                }
                Err(e) => return Err(e.into()),
            };
            if machine.identity_ref != self.identity {
                tracing::warn!(machine_id = %id, "record is for another identity; registering again");
                self.forget_machine()?;
                continue;
            }
            self.remember_record(&machine, false)?;
            return match machine.status {
                MachineStatus::Blocked => Ok(Settled::Blocked),
                MachineStatus::Archived => Ok(Settled::Archived),
                MachineStatus::Draft | MachineStatus::Degraded => {
                    self.prove(&id, AgentState::Activating, Some(&machine), false)
                        .await?;
                    Ok(Settled::Active)
                }
                MachineStatus::Active => {
                    let due = self.until_renewal().is_some_and(|d| d.is_zero());
                    if (force_renew && !just_proved) || due {
                        self.prove(&id, AgentState::Renewing, Some(&machine), false)
                            .await?;
                    } else {
                        // A successor waits: a challenge at each check
                        // says whether it is a controller yet.
                        if self.rotation.next.is_some() {
                            self.prove(&id, AgentState::Active, Some(&machine), true)
                                .await?;
                        }
                        if !self.fields_pushed {
                            self.push_fields(&id, &machine).await?;
                        }
                    }
                    Ok(Settled::Active)
                }
            };
        }
        Err(Failure::new(
            FailureKind::Transient,
            LocalCode::BadResponse,
            "the orchestrator's answers keep changing; waiting before trying again",
        ))
    }

    /// Creates the record, or takes back the one that already holds our
    /// identity. Leaves `machine_id` set on success.
    async fn register(&mut self) -> Result<(), Failure> {
        self.publish(AgentState::Registering, |s| s.next_attempt_at = None);
        let m = &self.machine;
        let mut request = CreateMachineRequest {
            display_name: m.display_name.clone(),
            owner_id: m.owner_id.clone(),
            machine_type: m.machine_type.clone(),
            runtime_profile: m.runtime_profile.clone(),
            identity_ref: self.identity.clone(),
            identity_proof: None,
            capabilities: m.capabilities.clone(),
            labels: m.labels.clone(),
            policy_ids: m.policy_ids.clone(),
            skill_keys: m.skill_keys.clone(),
        };
        let mut retried = false;
        let created = loop {
            let Some((proof, expires_at)) = self.fresh_proof(false).await? else {
                unreachable!("any controller key signs a registration")
            };
            request.identity_proof = Some(proof);
            match self.client.create_machine(&request).await {
                Ok(r) => break self.observe(r),
                Err(e) if !retried && self.expired_in_transit(&e, expires_at) => {
                    tracing::info!("challenge expired before it was submitted; retrying once");
                    retried = true;
                }
                Err(ClientError::Api {
                    code: ErrorCode::IdentityExists,
                    details,
                    ..
                }) => return self.take_back(details.as_ref()).await,
                Err(e) => return Err(e.into()),
            }
        };
        tracing::info!(machine_id = %created.id, "machine record created");
        self.fields_pushed = true;
        self.remember_record(&created, true)?;
        if self.rotation.signed_by_next {
            self.promote().await?;
        }
        // The new record holds a proof verified a moment ago: activating
        // reuses it.
        self.publish(AgentState::Activating, |s| {
            s.machine_id = Some(created.id.clone());
        });
        let activate = UpdateMachineRequest {
            status: Some(MachineStatus::Active),
            ..UpdateMachineRequest::default()
        };
        let r = self.client.update_machine(&created.id, &activate).await?;
        let active = self.observe(r);
        self.remember_record(&active, false)?;
        tracing::info!(machine_id = %active.id, status = %active.status, "machine record activated");
        Ok(())
    }

    /// `MACHINE_IDENTITY_EXISTS`: the record is ours (we can sign for the
    /// identity); remember its id and let the next step re-prove it, after
    /// reading it (an operator may have blocked or archived it).
    async fn take_back(&mut self, details: Option<&serde_json::Value>) -> Result<(), Failure> {
        let id = match existing_machine_id(details) {
            Some(id) => id,
            None => self.find_own_record().await?,
        };
        tracing::info!(machine_id = %id, "identity already has a record; taking it back");
        super::note_machine_id(&id);
        self.state.machine_id = Some(id.clone());
        self.state.proof = None;
        self.save()?;
        let r = self.client.get_machine(&id).await;
        let needs_proof = match r {
            Ok(r) => {
                let m = self.observe(r);
                match m.status {
                    MachineStatus::Blocked | MachineStatus::Archived => {
                        self.remember_record(&m, false)?;
                        return Ok(());
                    }
                    _ => Some(m),
                }
            }
            Err(e) if e.is(&ErrorCode::NotActivated) || e.is(&ErrorCode::ProofExpired) => None,
            Err(e) => return Err(e.into()),
        };
        self.prove(&id, AgentState::Activating, needs_proof.as_ref(), false)
            .await
    }

    /// Pages through `GET /machines` for our identity's record, when a
    /// server's `MACHINE_IDENTITY_EXISTS` does not name it (the contract
    /// does not promise that it does). Items are read one by one, so that a
    /// record this version cannot read does not hide ours; a server that
    /// repeats a cursor does not keep us paging.
    async fn find_own_record(&mut self) -> Result<String, Failure> {
        let mut cursor: Option<String> = None;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..MAX_PAGES {
            let page = self.client.list_machines(cursor.as_deref()).await?;
            let page = self.observe(page);
            if let Some(id) = page
                .items
                .iter()
                .find_map(|m| own_record_id(m, &self.identity))
            {
                return Ok(id);
            }
            match page.next_cursor.filter(|c| !c.is_empty()) {
                Some(c) if seen.insert(c.clone()) => cursor = Some(c),
                _ => break,
            }
        }
        Err(Failure::new(
            FailureKind::NeedsOperator,
            ErrorCode::IdentityExists,
            "the identity already has a record, but the orchestrator does not say which, \
             and GET /machines does not list it (a record without a verified proof may be \
             left out of the list); archive or fix that record",
        ))
    }

    /// Fresh challenge, then `PATCH {identityProof, status: active}` (plus
    /// config fields that differ). One immediate retry when the challenge
    /// expires before it arrives. With `only_next`, only when the challenge
    /// lists the successor key among the controllers (else nothing is
    /// signed and the record is left as it is).
    async fn prove(
        &mut self,
        id: &str,
        state: AgentState,
        record: Option<&Machine>,
        only_next: bool,
    ) -> Result<(), Failure> {
        if !only_next {
            self.publish(state, |s| s.next_attempt_at = None);
        }
        let mut update = match record {
            Some(m) if !self.fields_pushed => field_changes(&self.machine, m),
            _ => UpdateMachineRequest::default(),
        };
        update.status = Some(MachineStatus::Active);
        let mut retried = false;
        let machine = loop {
            let Some((proof, expires_at)) = self.fresh_proof(only_next).await? else {
                return Ok(());
            };
            update.identity_proof = Some(proof);
            match self.client.update_machine(id, &update).await {
                Ok(r) => break self.observe(r),
                Err(e) if !retried && self.expired_in_transit(&e, expires_at) => {
                    tracing::info!("challenge expired before it was submitted; retrying once");
                    retried = true;
                }
                Err(e) if e.status() == Some(404) || e.is(&ErrorCode::NotFound) => {
                    self.forget_machine()?;
                    return Err(Failure::new(
                        FailureKind::Transient,
                        LocalCode::NotFound,
                        "the record disappeared; registering again",
                    ));
                }
                Err(e) => {
                    // The current key is refused: a waiting successor signs
                    // the next challenge.
                    self.rotation.try_next = e.is(&ErrorCode::ProofInvalid)
                        && !self.rotation.signed_by_next
                        && self.rotation.next.is_some();
                    return Err(e.into());
                }
            }
        };
        // Without the record in hand no fields went with the proof; the
        // next read of the record pushes them.
        self.fields_pushed |= record.is_some();
        self.remember_record(&machine, true)?;
        tracing::info!(
            machine_id = %machine.id,
            status = %machine.status,
            state = %state,
            "identity proof accepted"
        );
        if self.rotation.signed_by_next && machine.status == MachineStatus::Active {
            self.promote().await?;
        }
        if machine.status == MachineStatus::Active {
            Ok(())
        } else {
            Err(Failure::new(
                FailureKind::Transient,
                LocalCode::BadResponse,
                format!("record is {} after activation", machine.status),
            ))
        }
    }

    /// Pushes changed `[machine]` fields to an active record.
    async fn push_fields(&mut self, id: &str, record: &Machine) -> Result<(), Failure> {
        let update = field_changes(&self.machine, record);
        if !update_is_empty(&update) {
            tracing::info!(machine_id = %id, "pushing changed machine fields");
            let r = self.client.update_machine(id, &update).await?;
            let m = self.observe(r);
            self.remember_record(&m, false)?;
        }
        self.fields_pushed = true;
        Ok(())
    }

    /// Whether a refused submission failed because its challenge expired on
    /// the way: the server says so (`..._PROOF_EXPIRED`), or it calls the
    /// challenge unknown (`..._PROOF_INVALID`, as a server that has already
    /// purged expired challenges does) while its clock, as measured here,
    /// is past the challenge's expiry.
    fn expired_in_transit(&mut self, e: &ClientError, challenge_expires_at: Timestamp) -> bool {
        if e.is(&ErrorCode::ProofExpired) {
            return true;
        }
        e.is(&ErrorCode::ProofInvalid)
            && self
                .clock
                .server_now()
                .is_some_and(|now| now >= challenge_expires_at)
    }

    /// Asks for a challenge, vets it under the signing policy and signs
    /// it: with the successor key when the challenge lists it among the
    /// controllers, else with the key. Returns the proof and the
    /// challenge's expiry (server time); `None` with `only_next` when the
    /// successor is not listed (nothing signed).
    async fn fresh_proof(
        &mut self,
        only_next: bool,
    ) -> Result<Option<(MachineIdentityProofInput, Timestamp)>, Failure> {
        let r = self.client.create_challenge(&self.identity).await?;
        let received = r.received;
        let challenge = self.observe(r);
        let listed = |a: Address| challenge.controller_addresses.contains(&a);
        // The successor signs once the challenge lists it, or once the
        // current key's proof was refused; never both keys one challenge.
        let try_next = std::mem::take(&mut self.rotation.try_next);
        let next = self
            .rotation
            .next
            .as_ref()
            .filter(|n| listed(n.address()) || try_next)
            .cloned();
        if only_next && next.is_none() {
            tracing::debug!("the successor key is not a controller yet");
            return Ok(None);
        }
        self.rotation.signed_by_next = next.is_some();
        let key = next.unwrap_or_else(|| self.key.clone());
        // The policy vets the challenge as bound to a key of ours: the
        // successor when listed, else the current key (a list that lags).
        let vetted_for = if listed(key.address()) {
            key.address()
        } else {
            self.key.address()
        };
        let expected = Expected {
            identity: &self.identity,
            ours: vetted_for,
            host: &self.host,
            server_now: self.clock.server_now(),
            local_now: crate::clock::sane_now(),
        };
        match challenge::vet(self.policy.policy, &challenge, &expected) {
            Ok(vetted) => {
                if let Some(issued_at) = vetted.issued_at {
                    // Our format's issue time is the server's "now", to the
                    // millisecond; other servers' texts carry no such promise.
                    self.clock
                        .observe_precise(issued_at, received.at, received.local);
                }
                let text = challenge.message.as_bytes();
                let signature = key.sign_personal(text).await?;
                // One record per signature, so that what the key signed can
                // be audited on the machine (the text itself only at debug).
                tracing::info!(
                    orchestrator = self.client.base(),
                    challenge_id = %challenge.challenge_id,
                    text_sha256 = %sha256_hex(text),
                    identity = %self.identity,
                    policy = %self.policy.policy,
                    signer = %key.address().checksummed(),
                    "signed identity challenge"
                );
                tracing::debug!(
                    challenge_id = %challenge.challenge_id,
                    text = %challenge.message,
                    "signed challenge text"
                );
                Ok(Some((
                    MachineIdentityProofInput {
                        challenge_id: challenge.challenge_id,
                        signature: signature.to_hex(),
                    },
                    challenge.expires_at,
                )))
            }
            Err(ChallengeRefusal::NotController { controllers }) => {
                let list: Vec<String> = controllers.iter().map(Address::checksummed).collect();
                Err(Failure::new(
                    FailureKind::NotController,
                    ErrorCode::ProofInvalid,
                    format!(
                        "our address {} is not among the controllers of {} ({}); \
                         add it to the identity's controller record",
                        self.key.address().checksummed(),
                        self.identity,
                        if list.is_empty() {
                            "none".to_owned()
                        } else {
                            list.join(", ")
                        }
                    ),
                ))
            }
            Err(refusal) => Err(Failure::new(
                FailureKind::ChallengeRefused,
                LocalCode::BadChallenge,
                format!(
                    "{refusal}; challenge_policy {} (change the policy or the orchestrator)",
                    self.policy
                ),
            )),
        }
    }

    /// Takes the clock evidence of a response and returns its value.
    fn observe<T>(&mut self, r: Response<T>) -> T {
        let Received { at, local, date } = r.received;
        if let Some(date) = date {
            self.clock.observe_date(date, at, local);
        }
        r.value
    }

    /// Updates state and status from a record the server sent. With `fresh`
    /// the record carries a proof verified while answering us, whose
    /// `verifiedAt` is a precise reading of the server's clock.
    fn remember_record(&mut self, m: &Machine, fresh: bool) -> Result<(), Failure> {
        let proof = m.identity_proof.as_ref().map(|p| ProofFacts {
            challenge_id: p.challenge_id.clone(),
            signer_address: p.signer_address,
            verified_at: p.verified_at,
            expires_at: p.expires_at,
            clock_skew_ms: self.clock.skew_ms(),
        });
        if fresh && let Some(p) = &proof {
            // verifiedAt was stamped moments before the response left.
            self.clock
                .observe_precise(p.verified_at, Instant::now(), SystemTime::now());
        }
        let proof_changed = self.state.proof.as_ref().map(|p| &p.challenge_id)
            != proof.as_ref().map(|p| &p.challenge_id);
        if proof_changed {
            self.renew_jitter = backoff::random_fraction();
        }
        let new_id = self.state.machine_id.as_deref() != Some(m.id.as_str());
        if new_id {
            super::note_machine_id(&m.id);
        }
        let changed = new_id || proof_changed;
        self.state.machine_id = Some(m.id.clone());
        if let Some(p) = proof {
            self.state.proof = Some(p);
        }
        if changed {
            self.save()?;
        }
        let (id, status, facts, skew) = (
            m.id.clone(),
            m.status,
            self.state.proof.clone(),
            self.clock.skew_ms(),
        );
        self.update_status(|s| {
            s.machine_id = Some(id);
            s.record_status = Some(status);
            s.proof_verified_at = facts.as_ref().map(|p| p.verified_at);
            s.proof_expires_at = facts.and_then(|p| p.expires_at);
            s.clock_skew_ms = skew;
        });
        Ok(())
    }

    fn forget_machine(&mut self) -> Result<(), Failure> {
        self.state.machine_id = None;
        self.state.proof = None;
        self.fields_pushed = false;
        self.update_status(|s| {
            s.machine_id = None;
            s.record_status = None;
            s.proof_verified_at = None;
            s.proof_expires_at = None;
        });
        self.save()
    }

    fn save(&mut self) -> Result<(), Failure> {
        self.state.saved_at = Timestamp::now();
        self.store.save(&self.state).map_err(|e| {
            Failure::new(
                FailureKind::NeedsOperator,
                LocalCode::StateWrite,
                error_chain(&e),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_texts_are_identified_by_their_sha256() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn own_record_is_found_in_any_spelling_among_unreadable_ones() {
        let ours = IdentityRef::parse("did:peaq:42").unwrap();
        let item =
            |id: &str, identity: &str| serde_json::json!({"id": id, "identityRef": identity});
        assert_eq!(
            own_record_id(&item("m1", "peaqos:machine:42"), &ours).as_deref(),
            Some("m1")
        );
        assert_eq!(own_record_id(&item("m1", "did:peaq:43"), &ours), None);
        assert_eq!(own_record_id(&item("../x", "did:peaq:42"), &ours), None);
        assert_eq!(own_record_id(&serde_json::json!({"id": 5}), &ours), None);
        let addr =
            IdentityRef::parse("did:peaq:0x00000000000000000000000000000000000000ab").unwrap();
        assert_eq!(
            own_record_id(
                &item("m2", "did:peaq:0x00000000000000000000000000000000000000AB"),
                &addr
            )
            .as_deref(),
            Some("m2")
        );
    }
}
