//! Identity challenges: the request, the response, and the text that the
//! controller key signs.
//!
//! The message has a fixed line format so that the agent can check what it
//! is asked to sign. A controller key signs with `personal_sign`, and the same
//! key may authorise other things elsewhere (an MCR monetization opt-in, a
//! token transfer permit); an agent that signed any text a server sent would
//! let a compromised orchestrator borrow its key. The agent signs only text
//! that parses here and names its own identity and challenge.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::address::Address;
use crate::identity::IdentityRef;
use crate::machine::ProofMethod;
use crate::timestamp::Timestamp;

/// `POST /machine-identity/challenges` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateChallengeRequest {
    pub identity_ref: IdentityRef,
}

/// The challenge item returned by the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Challenge {
    pub challenge_id: String,
    pub identity_ref: IdentityRef,
    pub message: String,
    pub expires_at: Timestamp,
    pub verification_method: ProofMethod,
    pub controller_addresses: Vec<Address>,
}

const TITLE: &str = "peaqOS machine identity challenge";

/// The structured content of a challenge message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChallengeMessage {
    /// Who issues the challenge (a name or URL of the orchestrator).
    pub orchestrator: String,
    pub identity: IdentityRef,
    pub challenge_id: String,
    /// Hex of at least 16 random bytes.
    pub nonce: String,
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
}

/// Why a text is not a challenge message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChallengeMessageError {
    #[error("challenge message does not start with `{TITLE}`")]
    Title,
    #[error("challenge message line {line} should start with `{label}: `")]
    Field { line: usize, label: &'static str },
    #[error("challenge message has text after its last field")]
    TrailingText,
    #[error("challenge message field `{label}` is invalid")]
    Value { label: &'static str },
}

const LABELS: [&str; 6] = [
    "Orchestrator",
    "Identity",
    "Challenge ID",
    "Nonce",
    "Issued At",
    "Expires At",
];

impl ChallengeMessage {
    /// Renders the exact text to sign (LF line ends, no trailing newline).
    pub fn render(&self) -> String {
        self.to_string()
    }

    /// Parses a message rendered by [`ChallengeMessage::render`], strictly.
    pub fn parse(text: &str) -> Result<Self, ChallengeMessageError> {
        let mut lines = text.split('\n');
        if lines.next() != Some(TITLE) {
            return Err(ChallengeMessageError::Title);
        }
        let mut values = [""; 6];
        for (i, label) in LABELS.iter().enumerate() {
            let line = lines.next().unwrap_or_default();
            values[i] = line
                .strip_prefix(label)
                .and_then(|rest| rest.strip_prefix(": "))
                .ok_or(ChallengeMessageError::Field { line: i + 2, label })?;
        }
        if lines.next().is_some() {
            return Err(ChallengeMessageError::TrailingText);
        }
        let [
            orchestrator,
            identity,
            challenge_id,
            nonce,
            issued_at,
            expires_at,
        ] = values;
        let bad = |label| ChallengeMessageError::Value { label };
        if orchestrator.is_empty() || orchestrator.chars().any(char::is_control) {
            return Err(bad("Orchestrator"));
        }
        if challenge_id.is_empty() || !challenge_id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad("Challenge ID"));
        }
        if nonce.len() < 32 || !nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("Nonce"));
        }
        Ok(Self {
            orchestrator: orchestrator.to_owned(),
            identity: IdentityRef::parse(identity).map_err(|_| bad("Identity"))?,
            challenge_id: challenge_id.to_owned(),
            nonce: nonce.to_owned(),
            issued_at: Timestamp::parse(issued_at).map_err(|_| bad("Issued At"))?,
            expires_at: Timestamp::parse(expires_at).map_err(|_| bad("Expires At"))?,
        })
    }
}

impl fmt::Display for ChallengeMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{TITLE}\nOrchestrator: {}\nIdentity: {}\nChallenge ID: {}\nNonce: {}\nIssued At: {}\nExpires At: {}",
            self.orchestrator,
            self.identity,
            self.challenge_id,
            self.nonce,
            self.issued_at,
            self.expires_at
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ChallengeMessage {
        ChallengeMessage {
            orchestrator: "https://orchestrator.example".into(),
            identity: IdentityRef::parse("peaqos:machine:42").unwrap(),
            challenge_id: "chl_0123".into(),
            nonce: "ab".repeat(16),
            issued_at: Timestamp::from_unix_millis(1_000).unwrap(),
            expires_at: Timestamp::from_unix_millis(301_000).unwrap(),
        }
    }

    #[test]
    fn render_parse_round_trip() {
        let m = sample();
        let text = m.render();
        assert!(text.contains("\nIdentity: did:peaq:42\n"), "{text}");
        assert_eq!(ChallengeMessage::parse(&text).unwrap(), m);
    }

    #[test]
    fn foreign_texts_are_refused() {
        let text = sample().render();
        assert_eq!(
            ChallengeMessage::parse("I authorise transfer of all funds"),
            Err(ChallengeMessageError::Title)
        );
        assert_eq!(
            ChallengeMessage::parse(&format!("{text}\nAlso: sign this")),
            Err(ChallengeMessageError::TrailingText)
        );
        let crlf = text.replace('\n', "\r\n");
        assert!(ChallengeMessage::parse(&crlf).is_err());
        let short_nonce = text.replace(&"ab".repeat(16), "abcd");
        assert_eq!(
            ChallengeMessage::parse(&short_nonce),
            Err(ChallengeMessageError::Value { label: "Nonce" })
        );
    }
}
