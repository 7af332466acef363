//! EVM account addresses with EIP-55 mixed-case checksums.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha3::{Digest, Keccak256};

/// A 20-byte EVM address. `Display` is the EIP-55 checksummed form, which is
/// what every response carries.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address([u8; 20]);

/// Why a string is not an address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("address must start with `0x`")]
    MissingPrefix,
    #[error("address must be 40 hex digits after `0x`; found {len} characters")]
    Length { len: usize },
    #[error("address must be hex; found {ch:?} at position {index}")]
    NotHex { index: usize, ch: char },
    #[error("address has mixed case but its EIP-55 checksum is wrong")]
    Checksum,
}

impl Address {
    pub const fn from_bytes(bytes: [u8; 20]) -> Self {
        Self(bytes)
    }

    pub const fn as_bytes(&self) -> &[u8; 20] {
        &self.0
    }

    /// The address of an uncompressed SEC1 public key (`0x04 || x || y`):
    /// the last 20 bytes of keccak256(x || y).
    pub(crate) fn from_uncompressed_point(point: &[u8; 65]) -> Self {
        let hash = Keccak256::digest(&point[1..]);
        let mut out = [0u8; 20];
        out.copy_from_slice(&hash[12..]);
        Self(out)
    }

    /// `0x` + 40 lowercase hex digits.
    pub fn to_lower_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses `0x` + 40 hex digits. All-lowercase and all-uppercase are taken
    /// as they are; mixed case must carry a valid EIP-55 checksum, because a
    /// wrong checksum means someone mistyped the address.
    pub fn parse(input: &str) -> Result<Self, AddressError> {
        let hex = input
            .strip_prefix("0x")
            .or_else(|| input.strip_prefix("0X"))
            .ok_or(AddressError::MissingPrefix)?;
        if let Some((index, ch)) = hex.char_indices().find(|(_, c)| !c.is_ascii_hexdigit()) {
            return Err(AddressError::NotHex { index, ch });
        }
        if hex.len() != 40 {
            return Err(AddressError::Length { len: hex.len() });
        }
        let mut bytes = [0u8; 20];
        hex::decode_to_slice(hex, &mut bytes).map_err(|_| AddressError::Length { len: 40 })?;
        let address = Self(bytes);
        let has_lower = hex.bytes().any(|b| b.is_ascii_lowercase());
        let has_upper = hex.bytes().any(|b| b.is_ascii_uppercase());
        if has_lower && has_upper && address.checksummed()[2..] != *hex {
            return Err(AddressError::Checksum);
        }
        Ok(address)
    }

    /// EIP-55: a hex letter is upper case where the matching nibble of
    /// keccak256(lowercase hex) is 8 or more.
    pub fn checksummed(&self) -> String {
        let lower = hex::encode(self.0);
        let hash = Keccak256::digest(lower.as_bytes());
        let mut out = String::with_capacity(42);
        out.push_str("0x");
        for (i, c) in lower.chars().enumerate() {
            let byte = hash[i / 2];
            let nibble = if i % 2 == 0 { byte >> 4 } else { byte & 0x0f };
            out.push(if nibble >= 8 {
                c.to_ascii_uppercase()
            } else {
                c
            });
        }
        out
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.checksummed())
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Address({})", self.checksummed())
    }
}

impl FromStr for Address {
    type Err = AddressError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for Address {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.checksummed())
    }
}

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vectors published in EIP-55 itself.
    const EIP55_VECTORS: &[&str] = &[
        "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
        "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
        "0xdbF03B407c01E7cD3CBea99509d93f8DDDC8C6FB",
        "0xD1220A0cf47c7B9Be7A2E6BA89F429762e7b9aDb",
        "0x52908400098527886E0F7030069857D2E4169EE7",
        "0x8617E340B3D01FA5F11F306F4090FD50E238070D",
        "0xde709f2102306220921060314715629080e2fb77",
        "0x27b1fdb04752bbc536007a920d24acb045561c26",
    ];

    #[test]
    fn eip55_published_vectors() {
        for v in EIP55_VECTORS {
            let a = Address::parse(v).unwrap();
            assert_eq!(a.checksummed(), *v);
            assert_eq!(Address::parse(&v.to_lowercase()).unwrap(), a);
        }
    }

    #[test]
    fn wrong_checksum_is_refused() {
        // One letter's case flipped.
        let bad = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAeD";
        assert_eq!(Address::parse(bad), Err(AddressError::Checksum));
    }

    #[test]
    fn malformed_addresses_name_the_problem() {
        assert_eq!(
            Address::parse("5aAeb6053F3E94C9"),
            Err(AddressError::MissingPrefix)
        );
        assert_eq!(
            Address::parse("0x1234"),
            Err(AddressError::Length { len: 4 })
        );
        assert_eq!(
            Address::parse("0xg234"),
            Err(AddressError::NotHex { index: 0, ch: 'g' })
        );
    }
}
