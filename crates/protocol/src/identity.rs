//! Machine identity references: `did:peaq:<decimal>`, its alias
//! `peaqos:machine:<decimal>`, and the address form `did:peaq:0x<40 hex>`.
//!
//! Parsing is strict because the canonical string is the database key for
//! "one machine per identity": two spellings of one identity must never both
//! be accepted as different records.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::address::Address;

const DID_PREFIX: &str = "did:peaq:";
const ALIAS_PREFIX: &str = "peaqos:machine:";
/// 2^256 - 1, the largest on-chain machine id.
const UINT256_MAX: &str =
    "115792089237316195423570985008687907853269984665640564039457584007913129639935";
/// Longer inputs are refused before any per-character work, and the error
/// never echoes them, so a hostile megabyte-long reference costs nothing.
const MAX_INPUT_LEN: usize = 128;

/// A validated machine identity.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IdentityRef {
    /// An on-chain machine id: canonical decimal text of a uint256.
    MachineId(MachineId),
    /// The address form: the identity is an EVM account, which is also its
    /// own controller.
    Address(Address),
}

/// The decimal text of an on-chain machine id, kept as text so that no
/// precision is lost anywhere (SDKs keep it as a string for the same reason).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MachineId(String);

impl MachineId {
    /// Validates a canonical uint256 decimal: ASCII digits only, no sign, no
    /// leading zero except `0` itself, at most 2^256-1.
    pub fn parse(digits: &str) -> Result<Self, IdentityRefError> {
        if digits.is_empty() {
            return Err(IdentityRefError::EmptyMachineId);
        }
        if let Some((index, ch)) = digits.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
            return Err(IdentityRefError::NotADigit { index, ch });
        }
        if digits.len() > 1 && digits.starts_with('0') {
            return Err(IdentityRefError::LeadingZero);
        }
        // Equal-length ASCII digit strings compare like the numbers they spell.
        if digits.len() > UINT256_MAX.len()
            || (digits.len() == UINT256_MAX.len() && digits > UINT256_MAX)
        {
            return Err(IdentityRefError::OutOfRange);
        }
        Ok(Self(digits.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MachineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for MachineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MachineId({})", self.0)
    }
}

/// Why a string is not an identity reference. Messages name the rule broken
/// and never echo the input, which may be arbitrarily long or hostile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityRefError {
    #[error("identity reference is empty")]
    Empty,
    #[error("identity reference is longer than {MAX_INPUT_LEN} bytes")]
    TooLong,
    #[error(
        "identity reference must start with `did:peaq:` or `peaqos:machine:` \
         (forms: did:peaq:<decimal>, peaqos:machine:<decimal>, did:peaq:0x<40 hex>)"
    )]
    UnknownPrefix,
    #[error("machine id after the prefix is empty")]
    EmptyMachineId,
    #[error("machine id must be ASCII decimal digits; found {ch:?} at position {index}")]
    NotADigit { index: usize, ch: char },
    #[error("machine id must not have leading zeros")]
    LeadingZero,
    #[error("machine id is larger than 2^256-1")]
    OutOfRange,
    #[error("address must be 40 hex digits after `0x`; found {len} characters")]
    AddressLength { len: usize },
    #[error("address must be hex; found {ch:?} at position {index}")]
    AddressNotHex { index: usize, ch: char },
    #[error("the `peaqos:machine:` alias takes a decimal machine id, not an address")]
    AliasWithAddress,
}

impl IdentityRef {
    /// Parses any accepted input form.
    pub fn parse(input: &str) -> Result<Self, IdentityRefError> {
        if input.is_empty() {
            return Err(IdentityRefError::Empty);
        }
        if input.len() > MAX_INPUT_LEN {
            return Err(IdentityRefError::TooLong);
        }
        if let Some(rest) = input.strip_prefix(DID_PREFIX) {
            if let Some(hex) = rest.strip_prefix("0x") {
                return parse_address_hex(hex).map(Self::Address);
            }
            return MachineId::parse(rest).map(Self::MachineId);
        }
        if let Some(rest) = input.strip_prefix(ALIAS_PREFIX) {
            if rest.starts_with("0x") {
                return Err(IdentityRefError::AliasWithAddress);
            }
            return MachineId::parse(rest).map(Self::MachineId);
        }
        Err(IdentityRefError::UnknownPrefix)
    }

    /// The canonical form used in every response and as the storage key:
    /// `did:peaq:<decimal>` or `did:peaq:0x<lowercase hex>`.
    pub fn canonical(&self) -> String {
        self.to_string()
    }

    /// The DID used to query the MCR API (`GET {mcr}/machine/{did}`).
    pub fn did(&self) -> String {
        self.to_string()
    }

    /// For the address form, the address itself, which always controls it.
    pub fn address(&self) -> Option<Address> {
        match self {
            Self::Address(a) => Some(*a),
            Self::MachineId(_) => None,
        }
    }
}

fn parse_address_hex(hex: &str) -> Result<Address, IdentityRefError> {
    if let Some((index, ch)) = hex.char_indices().find(|(_, c)| !c.is_ascii_hexdigit()) {
        return Err(IdentityRefError::AddressNotHex { index, ch });
    }
    if hex.len() != 40 {
        return Err(IdentityRefError::AddressLength { len: hex.len() });
    }
    let mut bytes = [0u8; 20];
    hex::decode_to_slice(hex, &mut bytes)
        .map_err(|_| IdentityRefError::AddressLength { len: hex.len() })?;
    Ok(Address::from_bytes(bytes))
}

impl fmt::Display for IdentityRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MachineId(id) => write!(f, "{DID_PREFIX}{id}"),
            Self::Address(a) => write!(f, "{DID_PREFIX}0x{}", a.to_lower_hex()),
        }
    }
}

impl fmt::Debug for IdentityRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdentityRef({self})")
    }
}

impl FromStr for IdentityRef {
    type Err = IdentityRefError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for IdentityRef {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IdentityRef {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(s: &str) -> String {
        IdentityRef::parse(s).unwrap().canonical()
    }

    #[test]
    fn accepted_forms_canonicalise() {
        assert_eq!(canon("did:peaq:0"), "did:peaq:0");
        assert_eq!(canon("did:peaq:42"), "did:peaq:42");
        assert_eq!(canon("peaqos:machine:42"), "did:peaq:42");
        assert_eq!(
            canon(&format!("did:peaq:{UINT256_MAX}")),
            format!("did:peaq:{UINT256_MAX}")
        );
        assert_eq!(
            canon("did:peaq:0xABCDEF0123456789abcdef0123456789ABCDEF01"),
            "did:peaq:0xabcdef0123456789abcdef0123456789abcdef01"
        );
    }

    #[test]
    fn alias_and_did_are_the_same_identity() {
        assert_eq!(
            IdentityRef::parse("peaqos:machine:7").unwrap(),
            IdentityRef::parse("did:peaq:7").unwrap()
        );
    }

    #[test]
    fn every_rule_is_enforced_with_a_named_error() {
        use IdentityRefError as E;
        let cases: &[(&str, E)] = &[
            ("", E::Empty),
            ("did:peaq:", E::EmptyMachineId),
            ("peaqos:machine:", E::EmptyMachineId),
            ("did:peaq:007", E::LeadingZero),
            ("did:peaq:00", E::LeadingZero),
            ("did:peaq:+1", E::NotADigit { index: 0, ch: '+' }),
            ("did:peaq:-1", E::NotADigit { index: 0, ch: '-' }),
            ("did:peaq: 1", E::NotADigit { index: 0, ch: ' ' }),
            ("did:peaq:1 ", E::NotADigit { index: 1, ch: ' ' }),
            ("did:peaq:1.0", E::NotADigit { index: 1, ch: '.' }),
            ("did:peaq:1e3", E::NotADigit { index: 1, ch: 'e' }),
            // Arabic-Indic and full-width digits are digits to Unicode, not to us.
            (
                "did:peaq:\u{0661}",
                E::NotADigit {
                    index: 0,
                    ch: '\u{0661}',
                },
            ),
            (
                "did:peaq:\u{FF11}",
                E::NotADigit {
                    index: 0,
                    ch: '\u{FF11}',
                },
            ),
            ("DID:PEAQ:1", E::UnknownPrefix),
            ("did:key:1", E::UnknownPrefix),
            (" did:peaq:1", E::UnknownPrefix),
            ("did:peaq:0x123", E::AddressLength { len: 3 }),
            (
                "did:peaq:0xzz23456789abcdef0123456789abcdef01234567",
                E::AddressNotHex { index: 0, ch: 'z' },
            ),
            (
                "peaqos:machine:0xabcdef0123456789abcdef0123456789abcdef01",
                E::AliasWithAddress,
            ),
        ];
        for (input, want) in cases {
            assert_eq!(
                IdentityRef::parse(input).as_ref(),
                Err(want),
                "input {input:?}"
            );
        }
    }

    #[test]
    fn range_is_uint256() {
        // 2^256 exactly: one more than the maximum.
        let two_256 =
            "115792089237316195423570985008687907853269984665640564039457584007913129639936";
        assert_eq!(
            IdentityRef::parse(&format!("did:peaq:{two_256}")),
            Err(IdentityRefError::OutOfRange)
        );
        let longer = format!("did:peaq:1{}", "0".repeat(78));
        assert_eq!(
            IdentityRef::parse(&longer),
            Err(IdentityRefError::OutOfRange)
        );
        assert_eq!(
            IdentityRef::parse(&"9".repeat(200)),
            Err(IdentityRefError::TooLong),
            "huge inputs are refused before scanning"
        );
    }

    #[test]
    fn serde_round_trip_uses_canonical_text() {
        let id: IdentityRef = serde_json::from_str("\"peaqos:machine:9\"").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"did:peaq:9\"");
        let err = serde_json::from_str::<IdentityRef>("\"did:peaq:09\"").unwrap_err();
        assert!(err.to_string().contains("leading zeros"), "{err}");
    }
}
