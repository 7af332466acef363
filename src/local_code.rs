//! Error codes the agent reports for failures it finds itself, beside the
//! orchestrator's own codes. Operators and dashboards read both in the same
//! `lastError.code` field, so the local ones use the same UPPER_SNAKE shape
//! and never collide with a contract code's meaning.

use std::fmt;

use peaqos_protocol::ErrorCode;

/// A failure the agent detected without an error envelope from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LocalCode {
    /// The orchestrator could not be reached (DNS, refused, reset).
    Network,
    /// A request did not complete within `request_timeout`.
    Timeout,
    /// An answer that is not the contract's (a proxy's page, garbage, an
    /// unsafe machine id, a record that does not settle).
    BadResponse,
    /// The signing policy refused the challenge the server sent.
    BadChallenge,
    /// `state.json` could not be written.
    StateWrite,
    /// A record we knew disappeared while we were proving it.
    NotFound,
    /// The controller key's PKCS#11 token did not answer or refused to
    /// sign (unplugged, restarted, PIN refused).
    KeyUnavailable,
    /// A TLS check other than time failed (unknown CA, wrong name, client
    /// certificate refused): `ca_file` or a certificate needs fixing.
    Tls,
    /// This machine's clock is off: a certificate not valid yet or expired
    /// by it (a board without a real-time clock before NTP syncs).
    Clock,
}

impl LocalCode {
    pub const ALL: [Self; 9] = [
        Self::Network,
        Self::Timeout,
        Self::BadResponse,
        Self::BadChallenge,
        Self::StateWrite,
        Self::NotFound,
        Self::KeyUnavailable,
        Self::Tls,
        Self::Clock,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Network => "NETWORK",
            Self::Timeout => "TIMEOUT",
            Self::BadResponse => "BAD_RESPONSE",
            Self::BadChallenge => "BAD_CHALLENGE",
            Self::StateWrite => "STATE_WRITE",
            Self::NotFound => "NOT_FOUND",
            Self::KeyUnavailable => "KEY_UNAVAILABLE",
            Self::Tls => "TLS",
            Self::Clock => "CLOCK",
        }
    }
}

impl fmt::Display for LocalCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The code of a reported failure: the orchestrator's, or ours.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Code {
    Server(ErrorCode),
    Local(LocalCode),
}

impl Code {
    pub fn as_str(&self) -> &str {
        match self {
            Self::Server(c) => c.as_str(),
            Self::Local(c) => c.as_str(),
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<ErrorCode> for Code {
    fn from(c: ErrorCode) -> Self {
        Self::Server(c)
    }
}

impl From<LocalCode> for Code {
    fn from(c: LocalCode) -> Self {
        Self::Local(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_codes_keep_their_wire_text() {
        let texts: Vec<&str> = LocalCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(
            texts,
            [
                "NETWORK",
                "TIMEOUT",
                "BAD_RESPONSE",
                "BAD_CHALLENGE",
                "STATE_WRITE",
                "NOT_FOUND",
                "KEY_UNAVAILABLE",
                "TLS",
                "CLOCK"
            ]
        );
        assert_eq!(Code::from(LocalCode::Timeout).to_string(), "TIMEOUT");
        assert_eq!(Code::from(ErrorCode::RateLimited).as_str(), "RATE_LIMITED");
    }
}
