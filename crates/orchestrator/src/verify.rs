//! Identity proofs: checking a submitted `{challengeId, signature}` against
//! its stored challenge and fresh controller data, and re-checking a stored
//! proof later.
//!
//! The signer is recovered from the signature once, when the proof is
//! submitted, and stored with it. A stored proof is immutable, so
//! re-verification on every read is "is the stored signer still a
//! controller?", never a second ECDSA recovery.

use std::time::Duration;

use peaqos_protocol::{
    Address, IdentityRef, MachineIdentityProof, MachineIdentityProofInput, ProofMethod,
    ResolutionSource, Signature, Timestamp,
};

use crate::controllers::Resolution;
use crate::store::ChallengeRecord;

/// Why a submitted proof was refused. Messages are for the client: they name
/// the problem and never echo its input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("identityProof.signature: {0}")]
    Signature(#[from] peaqos_protocol::SignatureError),
    #[error("identityProof.challengeId: unknown or already used challenge")]
    UnknownChallenge,
    #[error("identityProof.challengeId: the challenge was issued for another identity")]
    ForeignChallenge,
    #[error("identityProof.challengeId: the challenge expired at {expired_at}; request a new one")]
    Expired { expired_at: Timestamp },
    #[error("the signer {signer} is not a controller of {identity}")]
    NotController { signer: Address, identity: String },
    #[error("{identity} does not resolve to any controller (not activated on peaqOS)")]
    NotActivated { identity: String },
}

impl ProofError {
    /// Label for the verification-outcome metric.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::Signature(_) => "bad_signature",
            Self::UnknownChallenge => "unknown_challenge",
            Self::ForeignChallenge => "foreign_challenge",
            Self::Expired { .. } => "expired",
            Self::NotController { .. } => "not_controller",
            Self::NotActivated { .. } => "not_activated",
        }
    }
}

/// Decodes the submitted signature strictly (length, hex, `v`, low `s`).
pub fn parse_signature(input: &MachineIdentityProofInput) -> Result<Signature, ProofError> {
    Ok(Signature::parse(input.signature.trim())?)
}

/// Requires the challenge to exist, to be for `identity` and to be unexpired
/// at `now`. (Whether it was used already is decided by the store, when
/// the machine write redeems it.)
pub fn check_challenge<'c>(
    challenge: Option<&'c ChallengeRecord>,
    identity: &IdentityRef,
    now: Timestamp,
) -> Result<&'c ChallengeRecord, ProofError> {
    let challenge = challenge.ok_or(ProofError::UnknownChallenge)?;
    if challenge.identity != *identity {
        return Err(ProofError::ForeignChallenge);
    }
    if now >= challenge.expires_at {
        return Err(ProofError::Expired {
            expired_at: challenge.expires_at,
        });
    }
    Ok(challenge)
}

/// Recovers the signer of `challenge` and requires it to be a controller.
/// Returns the proof record to persist.
pub fn accept(
    signature: &Signature,
    challenge: &ChallengeRecord,
    controllers: &Resolution,
    now: Timestamp,
) -> Result<MachineIdentityProof, ProofError> {
    if !controllers.is_active() {
        return Err(ProofError::NotActivated {
            identity: challenge.identity.canonical(),
        });
    }
    let signer = signature.recover_personal(challenge.message.as_bytes())?;
    if !controllers.is_controller(&signer) {
        return Err(ProofError::NotController {
            signer,
            identity: challenge.identity.canonical(),
        });
    }
    Ok(MachineIdentityProof {
        method: ProofMethod::Eip191,
        identity_ref: challenge.identity.clone(),
        signer_address: signer,
        challenge_id: challenge.id.clone(),
        verified_at: now,
        challenge_expires_at: challenge.expires_at,
        controller_addresses: controllers.controllers().to_vec(),
        resolution_source: ResolutionSource::PeaqosMcr,
        expires_at: None,
    })
}

/// Whether a stored proof still holds: its signer is among the fresh
/// controllers.
pub fn still_valid(proof: &MachineIdentityProof, controllers: &Resolution) -> bool {
    controllers.is_controller(&proof.signer_address)
}

/// When a proof stops keeping its machine active, if proofs age.
pub fn proof_expiry(proof: &MachineIdentityProof, max_age: Option<Duration>) -> Option<Timestamp> {
    max_age.map(|age| proof.verified_at.saturating_add(age))
}

/// Whether a proof is past the deployment's maximum age at `now`.
pub fn is_stale(proof: &MachineIdentityProof, max_age: Option<Duration>, now: Timestamp) -> bool {
    proof_expiry(proof, max_age).is_some_and(|expiry| now >= expiry)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use peaqos_protocol::SecretKey;

    use super::*;

    fn challenge(identity: &str, expires_ms: i64) -> ChallengeRecord {
        ChallengeRecord {
            id: "chl_x".into(),
            identity: IdentityRef::parse(identity).unwrap(),
            message: "peaqOS machine identity challenge\nsign me".into(),
            issued_at: Timestamp::from_unix_millis(0).unwrap(),
            expires_at: Timestamp::from_unix_millis(expires_ms).unwrap(),
        }
    }

    fn input(sig: &str) -> MachineIdentityProofInput {
        MachineIdentityProofInput {
            challenge_id: "chl_x".into(),
            signature: sig.into(),
        }
    }

    #[test]
    fn challenge_rules_in_order() {
        let c = challenge("did:peaq:1", 1000);
        let id = IdentityRef::parse("did:peaq:1").unwrap();
        let at = |ms| Timestamp::from_unix_millis(ms).unwrap();
        assert!(matches!(
            parse_signature(&input("0x12")),
            Err(ProofError::Signature(_))
        ));
        let key = SecretKey::generate().unwrap();
        let sig = key.sign_personal(c.message.as_bytes()).to_hex();
        assert!(parse_signature(&input(&format!(" {sig}\n"))).is_ok());
        assert_eq!(
            check_challenge(None, &id, at(0)),
            Err(ProofError::UnknownChallenge)
        );
        let other = IdentityRef::parse("did:peaq:2").unwrap();
        assert_eq!(
            check_challenge(Some(&c), &other, at(0)),
            Err(ProofError::ForeignChallenge)
        );
        assert!(matches!(
            check_challenge(Some(&c), &id, at(1000)),
            Err(ProofError::Expired { .. })
        ));
        assert!(check_challenge(Some(&c), &id, at(999)).is_ok());
    }

    #[test]
    fn signer_must_be_a_controller() {
        let key = SecretKey::generate().unwrap();
        let c = challenge("did:peaq:1", 1000);
        let sig = key.sign_personal(c.message.as_bytes());
        let now = Timestamp::from_unix_millis(10).unwrap();
        let others = Resolution::Found(Arc::from([Address::from_bytes([1; 20])]));
        assert!(matches!(
            accept(&sig, &c, &others, now),
            Err(ProofError::NotController { .. })
        ));
        assert!(matches!(
            accept(&sig, &c, &Resolution::NotFound, now),
            Err(ProofError::NotActivated { .. })
        ));
        let mine = Resolution::Found(Arc::from([Address::from_bytes([1; 20]), key.address()]));
        let proof = accept(&sig, &c, &mine, now).unwrap();
        assert_eq!(proof.signer_address, key.address());
        assert!(still_valid(&proof, &mine));
        assert!(!still_valid(&proof, &others));
        let day = Duration::from_hours(24);
        assert!(!is_stale(&proof, None, now.saturating_add(day * 365)));
        assert!(!is_stale(&proof, Some(day), now.saturating_add(day / 2)));
        assert!(is_stale(&proof, Some(day), now.saturating_add(day)));
    }
}
