//! Challenges that cost no write: a challenge id carries everything needed
//! to check it later (its random part, issue and expiry times, a tag of the
//! identity it is for) and a MAC over all of it with a key every replica
//! shares (stored once in the database, `Store::challenge_key`). Issuing
//! one touches no database; redeeming one checks the MAC, rebuilds the
//! exact message that was signed, and leaves single use to the store: a
//! unique insert of the id in the transaction of the machine write.
//!
//! The MAC is SHA3-256 over the key followed by the data, truncated to 128
//! bits: unlike SHA-2, SHA-3 has no length extension, so the prefix-keyed
//! hash is a MAC (the construction KMAC builds on). The orchestrator's name
//! is MACed too, because it is part of the signed message: replicas must
//! share it, and a challenge from an orchestrator of another name is
//! unknown here rather than a signature that does not match.

use std::fmt;

use peaqos_protocol::{ChallengeMessage, IdentityRef, Timestamp};
use sha3::{Digest, Sha3_256};
use subtle::ConstantTimeEq;

use crate::ids::{self, RandomError};
use crate::store::ChallengeRecord;
use crate::verify::ProofError;

/// Layout of the token after `chl_`, as bytes before base32: version,
/// random part, issued at (unix ms, 48 bits, big-endian), validity (ms,
/// 32 bits), identity tag, MAC. Kept short on purpose: the id is a word of
/// the signed message, and careful agents refuse to sign a base64-like word
/// of more than 88 characters (an embedded payload: ours does, with its
/// default challenge policy); `chl_` and 51 bytes of base32 make 86.
const VERSION: u8 = 1;
const RANDOM: usize = 16;
const ISSUED: usize = 1 + RANDOM;
const VALIDITY: usize = ISSUED + 6;
const TAGGED: usize = VALIDITY + 4;
const TAG: usize = 8;
const MAC: usize = 16;
const BODY: usize = TAGGED + TAG;
const TOKEN: usize = BODY + MAC;

/// Length of the key (bytes).
pub const KEY_LEN: usize = 32;

/// The shared key. Never printed.
#[derive(Clone)]
pub struct ChallengeKey([u8; KEY_LEN]);

impl fmt::Debug for ChallengeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChallengeKey(..)")
    }
}

impl ChallengeKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// A key drawn from the operating system's random source (offered to
    /// the store, which keeps the first one any replica offered).
    pub fn random_bytes() -> Result<[u8; KEY_LEN], RandomError> {
        let mut bytes = [0u8; KEY_LEN];
        getrandom::fill(&mut bytes).map_err(|_| RandomError)?;
        Ok(bytes)
    }

    /// A new challenge for `identity`, valid from `issued_at` until
    /// `expires_at`, with the message to sign.
    pub fn issue(
        &self,
        orchestrator: &str,
        identity: &IdentityRef,
        issued_at: Timestamp,
        expires_at: Timestamp,
    ) -> Result<ChallengeRecord, RandomError> {
        let mut random = [0u8; RANDOM];
        getrandom::fill(&mut random).map_err(|_| RandomError)?;
        let mut token = [0u8; TOKEN];
        token[0] = VERSION;
        token[1..=RANDOM].copy_from_slice(&random);
        // 48 bits of milliseconds last until the year 10889; a validity
        // past 49 days (the configuration allows an hour) is cut there, and
        // the record below is built from what the id says, so the message
        // and the id always agree.
        token[ISSUED..VALIDITY].copy_from_slice(&issued_at.unix_millis().to_be_bytes()[2..]);
        let validity = u32::try_from(
            expires_at
                .unix_millis()
                .saturating_sub(issued_at.unix_millis())
                .max(0),
        )
        .unwrap_or(u32::MAX);
        token[VALIDITY..TAGGED].copy_from_slice(&validity.to_be_bytes());
        token[TAGGED..BODY].copy_from_slice(&self.tag(identity));
        let mac = self.mac(orchestrator, &token[..BODY]);
        token[BODY..].copy_from_slice(&mac);
        let id = ids::with_prefix_bytes(ids::CHALLENGE_PREFIX, &token);
        Ok(record(
            orchestrator,
            identity,
            id,
            &random,
            issued_at,
            expires(issued_at, validity),
        ))
    }

    /// The challenge `id` names, if this key issued it for `identity` (the
    /// caller checks its expiry). Forged, altered or other orchestrators'
    /// ids are unknown; ours for another identity are foreign.
    pub fn open(
        &self,
        orchestrator: &str,
        id: &str,
        identity: &IdentityRef,
    ) -> Result<ChallengeRecord, ProofError> {
        let token: [u8; TOKEN] = id
            .strip_prefix(ids::CHALLENGE_PREFIX)
            .and_then(ids::decode_base32)
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or(ProofError::UnknownChallenge)?;
        if token[0] != VERSION {
            return Err(ProofError::UnknownChallenge);
        }
        let mac = self.mac(orchestrator, &token[..BODY]);
        if !bool::from(mac.ct_eq(&token[BODY..])) {
            return Err(ProofError::UnknownChallenge);
        }
        if !bool::from(self.tag(identity).ct_eq(&token[TAGGED..BODY])) {
            return Err(ProofError::ForeignChallenge);
        }
        let mut issued = [0u8; 8];
        issued[2..].copy_from_slice(&token[ISSUED..VALIDITY]);
        let issued_at = Timestamp::from_unix_millis(i64::from_be_bytes(issued))
            .ok_or(ProofError::UnknownChallenge)?;
        let mut validity = [0u8; 4];
        validity.copy_from_slice(&token[VALIDITY..TAGGED]);
        let expires_at = expires(issued_at, u32::from_be_bytes(validity));
        let mut random = [0u8; RANDOM];
        random.copy_from_slice(&token[1..=RANDOM]);
        Ok(record(
            orchestrator,
            identity,
            id.to_owned(),
            &random,
            issued_at,
            expires_at,
        ))
    }

    fn mac(&self, orchestrator: &str, body: &[u8]) -> [u8; MAC] {
        let digest = Sha3_256::new()
            .chain_update(self.0)
            .chain_update(b"peaqos challenge v1\0")
            .chain_update((orchestrator.len() as u64).to_be_bytes())
            .chain_update(orchestrator.as_bytes())
            .chain_update(body)
            .finalize();
        let mut out = [0u8; MAC];
        out.copy_from_slice(&digest[..MAC]);
        out
    }

    /// A keyed tag of the identity: tells "ours, for another identity"
    /// from "not ours" without carrying the identity in the id.
    fn tag(&self, identity: &IdentityRef) -> [u8; TAG] {
        let digest = Sha3_256::new()
            .chain_update(self.0)
            .chain_update(b"peaqos challenge identity\0")
            .chain_update(identity.canonical().as_bytes())
            .finalize();
        let mut out = [0u8; TAG];
        out.copy_from_slice(&digest[..TAG]);
        out
    }
}

/// The expiry an id's validity gives.
fn expires(issued_at: Timestamp, validity_ms: u32) -> Timestamp {
    issued_at.saturating_add(std::time::Duration::from_millis(u64::from(validity_ms)))
}

/// The challenge with its message. The message's nonce is a hash of the
/// random part (as unpredictable, and rebuilt from the id).
fn record(
    orchestrator: &str,
    identity: &IdentityRef,
    id: String,
    random: &[u8; RANDOM],
    issued_at: Timestamp,
    expires_at: Timestamp,
) -> ChallengeRecord {
    let nonce = hex::encode(
        Sha3_256::new()
            .chain_update(b"peaqos challenge nonce\0")
            .chain_update(random)
            .finalize(),
    );
    let message = ChallengeMessage {
        orchestrator: orchestrator.to_owned(),
        identity: identity.clone(),
        challenge_id: id.clone(),
        nonce,
        issued_at,
        expires_at,
    }
    .render();
    ChallengeRecord {
        id,
        identity: identity.clone(),
        message,
        issued_at,
        expires_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(ms: i64) -> Timestamp {
        Timestamp::from_unix_millis(ms).unwrap()
    }

    fn id(text: &str) -> IdentityRef {
        IdentityRef::parse(text).unwrap()
    }

    #[test]
    fn an_issued_challenge_opens_to_the_same_message_for_its_identity_only() {
        let key = ChallengeKey::from_bytes([7; KEY_LEN]);
        let one = id("did:peaq:1");
        let c = key.issue("orch", &one, ts(1_000), ts(301_000)).unwrap();
        assert!(c.id.starts_with("chl_") && c.id.is_ascii(), "{}", c.id);
        // A word of the signed message: agents refuse base64-like words
        // over 88 characters (the agent's encoded-payload rule).
        assert!(c.id.len() <= 88, "{} is {} characters", c.id, c.id.len());
        assert_eq!(key.open("orch", &c.id, &one).unwrap(), c);
        let parsed = ChallengeMessage::parse(&c.message).unwrap();
        assert_eq!(parsed.challenge_id, c.id);
        assert_eq!(parsed.expires_at, ts(301_000));
        assert_eq!(
            key.open("orch", &c.id, &id("did:peaq:2")),
            Err(ProofError::ForeignChallenge)
        );
        // Two issues differ (id and nonce).
        let again = key.issue("orch", &one, ts(1_000), ts(301_000)).unwrap();
        assert_ne!(again.id, c.id);
        assert_ne!(again.message, c.message);
    }

    #[test]
    fn another_key_another_orchestrator_or_any_altered_character_is_unknown() {
        let key = ChallengeKey::from_bytes([7; KEY_LEN]);
        let one = id("did:peaq:1");
        let c = key.issue("orch", &one, ts(1_000), ts(301_000)).unwrap();
        let other = ChallengeKey::from_bytes([8; KEY_LEN]);
        assert_eq!(
            other.open("orch", &c.id, &one),
            Err(ProofError::UnknownChallenge)
        );
        assert_eq!(
            key.open("other", &c.id, &one),
            Err(ProofError::UnknownChallenge)
        );
        // Every position, every other character of the alphabet: a later
        // expiry, another random part or a cut MAC never passes.
        for i in 4..c.id.len() {
            for replacement in ["a", "q", "7"] {
                let mut altered = c.id.clone();
                if &altered[i..=i] == replacement {
                    continue;
                }
                altered.replace_range(i..=i, replacement);
                // The last character is partly padding, which must be zero:
                // one token has one spelling, so one redemption.
                assert_eq!(
                    key.open("orch", &altered, &one),
                    Err(ProofError::UnknownChallenge),
                    "{altered}"
                );
            }
        }
        for bad in [
            "",
            "chl_",
            "chl_aaaaaaaaaaaaaaaaaaaaaaaaaa",
            "mach_x",
            "chl_!!",
        ] {
            assert_eq!(
                key.open("orch", bad, &one),
                Err(ProofError::UnknownChallenge)
            );
        }
    }

    #[test]
    fn the_key_is_never_printed() {
        let key = ChallengeKey::from_bytes([0xab; KEY_LEN]);
        assert_eq!(format!("{key:?}"), "ChallengeKey(..)");
    }
}
