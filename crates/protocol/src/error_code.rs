//! The `code` of the error envelope. Clients branch on it, never on the
//! message, so it is one enum shared by the server and the agent.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

macro_rules! error_codes {
    ($($variant:ident = $text:literal => $status:literal,)*) => {
        /// An error code of the contract, with the HTTP status it is sent with.
        #[derive(Clone, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($variant,)*
            /// A code this version does not know (a newer server's); kept
            /// verbatim so that it can be reported.
            Other(String),
        }

        impl ErrorCode {
            pub fn as_str(&self) -> &str {
                match self {
                    $(Self::$variant => $text,)*
                    Self::Other(s) => s,
                }
            }

            /// Parses wire text; unknown codes become [`ErrorCode::Other`].
            pub fn from_wire(text: &str) -> Self {
                match text {
                    $($text => Self::$variant,)*
                    other => Self::Other(other.to_owned()),
                }
            }

            /// The status this code is usually sent with. `VALIDATION_ERROR`
            /// is also sent with 413 and 415 (body too large, wrong content
            /// type); an unknown code maps to 500.
            pub fn http_status(&self) -> u16 {
                match self {
                    $(Self::$variant => $status,)*
                    Self::Other(_) => 500,
                }
            }

            /// Every code this version knows, for documentation and tests.
            pub const KNOWN: &'static [&'static str] = &[$($text,)*];
        }
    };
}

error_codes! {
    ValidationError = "VALIDATION_ERROR" => 400,
    ProofRequired = "MACHINE_IDENTITY_PROOF_REQUIRED" => 400,
    AuthRequired = "AUTH_REQUIRED" => 401,
    AuthInvalid = "AUTH_INVALID" => 401,
    // Our extension: the API key's role does not allow the request.
    Forbidden = "FORBIDDEN" => 403,
    ProofInvalid = "MACHINE_IDENTITY_PROOF_INVALID" => 403,
    NotFound = "NOT_FOUND" => 404,
    MethodNotAllowed = "METHOD_NOT_ALLOWED" => 405,
    IdentityExists = "MACHINE_IDENTITY_EXISTS" => 409,
    IdentityImmutable = "MACHINE_IDENTITY_IMMUTABLE" => 409,
    NotActivated = "MACHINE_NOT_ACTIVATED" => 409,
    ProofExpired = "MACHINE_IDENTITY_PROOF_EXPIRED" => 410,
    RateLimited = "RATE_LIMITED" => 429,
    InternalError = "INTERNAL_ERROR" => 500,
    IdentityUnavailable = "PEAQOS_IDENTITY_UNAVAILABLE" => 503,
    ServiceUnavailable = "SERVICE_UNAVAILABLE" => 503,
}

impl ErrorCode {
    /// Whether a client should retry the same request later (with backoff)
    /// rather than change what it sends.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::RateLimited
                | Self::InternalError
                | Self::IdentityUnavailable
                | Self::ServiceUnavailable
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Ok(Self::from_wire(&s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_match_the_contract() {
        let expect = [
            ("VALIDATION_ERROR", 400),
            ("MACHINE_IDENTITY_PROOF_REQUIRED", 400),
            ("AUTH_REQUIRED", 401),
            ("AUTH_INVALID", 401),
            ("MACHINE_IDENTITY_PROOF_INVALID", 403),
            ("NOT_FOUND", 404),
            ("MACHINE_IDENTITY_EXISTS", 409),
            ("MACHINE_IDENTITY_IMMUTABLE", 409),
            ("MACHINE_NOT_ACTIVATED", 409),
            ("MACHINE_IDENTITY_PROOF_EXPIRED", 410),
            ("RATE_LIMITED", 429),
            ("PEAQOS_IDENTITY_UNAVAILABLE", 503),
            ("INTERNAL_ERROR", 500),
        ];
        for (code, status) in expect {
            let parsed = ErrorCode::from_wire(code);
            assert!(!matches!(parsed, ErrorCode::Other(_)), "{code} unknown");
            assert_eq!(parsed.http_status(), status, "{code}");
            assert_eq!(parsed.as_str(), code);
        }
    }

    #[test]
    fn unknown_codes_survive_a_round_trip() {
        let c: ErrorCode = serde_json::from_str("\"SOMETHING_NEW\"").unwrap();
        assert_eq!(c, ErrorCode::Other("SOMETHING_NEW".into()));
        assert_eq!(serde_json::to_string(&c).unwrap(), "\"SOMETHING_NEW\"");
    }
}
