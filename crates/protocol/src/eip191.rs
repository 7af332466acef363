//! EIP-191 version 0x45 (`personal_sign`): hashing, signing, strict
//! signature decoding and signer recovery, byte-compatible with Ethereum
//! wallets (see the `eth-account` interop vectors in `tests/`).

use std::fmt;

use k256::ecdsa::{RecoveryId, Signature as EcdsaSignature, SigningKey, VerifyingKey};
use sha3::{Digest, Keccak256};
use zeroize::Zeroizing;

use crate::address::Address;

/// secp256k1 group order / 2, big-endian. A signature with `s` above this
/// is the malleable twin of a low-s one; wallets never produce it.
const HALF_ORDER: [u8; 32] = [
    0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0x5d, 0x57, 0x6e, 0x73, 0x57, 0xa4, 0x50, 0x1d, 0xdf, 0xe9, 0x2f, 0x46, 0x68, 0x1b, 0x20, 0xa0,
];

/// keccak256("\x19Ethereum Signed Message:\n" + decimal byte length + message).
pub fn personal_message_hash(message: &[u8]) -> [u8; 32] {
    let mut hasher = Keccak256::new();
    hasher.update(b"\x19Ethereum Signed Message:\n");
    hasher.update(message.len().to_string().as_bytes());
    hasher.update(message);
    hasher.finalize().into()
}

/// Why a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("signature must be `0x`-prefixed hex")]
    MissingPrefix,
    #[error("signature must be hex; found {ch:?} at position {index}")]
    NotHex { index: usize, ch: char },
    #[error("signature must be 65 bytes (130 hex digits after `0x`); found {len} hex digits")]
    Length { len: usize },
    #[error("signature recovery byte v must be 27, 28, 0 or 1; found {v}")]
    RecoveryByte { v: u8 },
    #[error("signature has a high s value (malleable form); wallets produce low-s signatures")]
    HighS,
    #[error("signature r or s is zero or not below the curve order")]
    Scalars,
    #[error("no public key can be recovered from this signature and message")]
    Unrecoverable,
}

/// A 65-byte `r || s || v` signature that passed strict decoding: `v` is
/// stored as 27 or 28 and `s` is low.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature([u8; 65]);

impl Signature {
    /// Decodes `0x` + 130 hex digits, refusing anything a wallet would not
    /// produce: other lengths, `v` outside {0, 1, 27, 28}, high `s`.
    pub fn parse(input: &str) -> Result<Self, SignatureError> {
        let hex = input
            .strip_prefix("0x")
            .ok_or(SignatureError::MissingPrefix)?;
        if let Some((index, ch)) = hex.char_indices().find(|(_, c)| !c.is_ascii_hexdigit()) {
            return Err(SignatureError::NotHex { index, ch });
        }
        if hex.len() != 130 {
            return Err(SignatureError::Length { len: hex.len() });
        }
        let mut bytes = [0u8; 65];
        hex::decode_to_slice(hex, &mut bytes)
            .map_err(|_| SignatureError::Length { len: hex.len() })?;
        Self::from_bytes(bytes)
    }

    /// Validates raw `r || s || v` bytes.
    pub fn from_bytes(mut bytes: [u8; 65]) -> Result<Self, SignatureError> {
        bytes[64] = match bytes[64] {
            0 | 27 => 27,
            1 | 28 => 28,
            v => return Err(SignatureError::RecoveryByte { v }),
        };
        if bytes[32..64] > HALF_ORDER[..] {
            return Err(SignatureError::HighS);
        }
        EcdsaSignature::from_slice(&bytes[..64]).map_err(|_| SignatureError::Scalars)?;
        Ok(Self(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 65] {
        &self.0
    }

    /// `0x` + 130 lowercase hex digits, as wallets print it.
    pub fn to_hex(&self) -> String {
        format!("0x{}", hex::encode(self.0))
    }

    /// Recovers the address that signed `message` with `personal_sign`.
    pub fn recover_personal(&self, message: &[u8]) -> Result<Address, SignatureError> {
        self.recover_prehash(&personal_message_hash(message))
    }

    /// Recovers the signer from a 32-byte message hash.
    pub fn recover_prehash(&self, prehash: &[u8; 32]) -> Result<Address, SignatureError> {
        let sig = EcdsaSignature::from_slice(&self.0[..64]).map_err(|_| SignatureError::Scalars)?;
        let recid = RecoveryId::from_byte(self.0[64] - 27)
            .ok_or(SignatureError::RecoveryByte { v: self.0[64] })?;
        let key = VerifyingKey::recover_from_prehash(prehash, &sig, recid)
            .map_err(|_| SignatureError::Unrecoverable)?;
        Ok(address_of(&key))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({})", self.to_hex())
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

fn address_of(key: &VerifyingKey) -> Address {
    let point = key.to_sec1_point(false);
    let bytes: &[u8] = point.as_bytes();
    let mut uncompressed = [0u8; 65];
    uncompressed.copy_from_slice(bytes);
    Address::from_uncompressed_point(&uncompressed)
}

/// Why a secret key was refused. Never carries key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretKeyError {
    #[error("secret key must be 64 hex digits (32 bytes, optionally `0x`-prefixed); found {len}")]
    Length { len: usize },
    #[error("secret key must be hex; found a non-hex character at position {index}")]
    NotHex { index: usize },
    #[error("secret key is zero or not below the secp256k1 group order")]
    OutOfRange,
    #[error("the operating system's random source failed")]
    Random,
}

/// A secp256k1 controller key. The scalar is wiped from memory on drop
/// (k256's `SigningKey` zeroizes itself), and neither `Debug` nor any error
/// ever shows it: `Debug` prints the address only.
pub struct SecretKey {
    key: SigningKey,
    address: Address,
}

impl SecretKey {
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, SecretKeyError> {
        let key = SigningKey::from_slice(bytes).map_err(|_| SecretKeyError::OutOfRange)?;
        let address = address_of(key.verifying_key());
        Ok(Self { key, address })
    }

    /// Parses 64 hex digits, with an optional `0x` and surrounding
    /// whitespace (a key file usually ends with a newline).
    pub fn from_hex(text: &str) -> Result<Self, SecretKeyError> {
        let trimmed = text.trim();
        let hex = trimmed.strip_prefix("0x").unwrap_or(trimmed);
        if let Some(index) = hex.bytes().position(|b| !b.is_ascii_hexdigit()) {
            return Err(SecretKeyError::NotHex { index });
        }
        if hex.len() != 64 {
            return Err(SecretKeyError::Length { len: hex.len() });
        }
        let mut bytes = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(hex, bytes.as_mut())
            .map_err(|_| SecretKeyError::Length { len: hex.len() })?;
        Self::from_bytes(&bytes)
    }

    /// A fresh key from the operating system's random source.
    pub fn generate() -> Result<Self, SecretKeyError> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        // A uniformly random 256-bit value is out of range with probability
        // about 2^-128; the loop is for correctness, not expected to repeat.
        loop {
            getrandom::fill(bytes.as_mut()).map_err(|_| SecretKeyError::Random)?;
            if let Ok(key) = Self::from_bytes(&bytes) {
                return Ok(key);
            }
        }
    }

    pub fn address(&self) -> Address {
        self.address
    }

    /// The secret as 64 lowercase hex digits, for writing a key file. The
    /// returned buffer is wiped when dropped.
    pub fn to_hex(&self) -> Zeroizing<String> {
        let bytes = Zeroizing::new(self.key.to_bytes());
        Zeroizing::new(hex::encode(bytes.as_slice()))
    }

    /// EIP-191 `personal_sign`: deterministic (RFC 6979), low-s, v = 27/28.
    pub fn sign_personal(&self, message: &[u8]) -> Signature {
        self.sign_prehash(&personal_message_hash(message))
    }

    pub fn sign_prehash(&self, prehash: &[u8; 32]) -> Signature {
        let (sig, recid) = self.key.sign_prehash_recoverable(prehash);
        let mut bytes = [0u8; 65];
        bytes[..64].copy_from_slice(&sig.to_bytes());
        bytes[64] = 27 + recid.to_byte();
        // k256 normalises s and adjusts the recovery id itself, so the result
        // always passes our own strict decoder.
        Signature(bytes)
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretKey")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The private key of the `eth-account` documentation examples
    // (`Account.from_key(...)`), a well-known test key.
    const DOC_KEY: &str = "b25c7db31feed9122727bf0939dc769a96564b2de4c4726d035b36ecf1e5b364";

    #[test]
    fn sign_then_recover_round_trips() {
        let key = SecretKey::from_hex(DOC_KEY).unwrap();
        for msg in [
            &b""[..],
            b"hello",
            b"line\nbreak",
            "\u{1F916} robot".as_bytes(),
        ] {
            let sig = key.sign_personal(msg);
            assert_eq!(sig.recover_personal(msg).unwrap(), key.address());
            assert_eq!(Signature::parse(&sig.to_hex()).unwrap(), sig);
        }
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let key = SecretKey::from_hex(DOC_KEY).unwrap();
        let shown = format!("{key:?} {key:#?}");
        assert!(!shown.to_lowercase().contains(&DOC_KEY[..16]), "{shown}");
        assert!(shown.contains(&key.address().checksummed()), "{shown}");
    }

    #[test]
    fn key_errors_do_not_echo_the_input() {
        let bad = "zz".repeat(32);
        let err = SecretKey::from_hex(&bad).unwrap_err();
        assert!(!err.to_string().contains("zz"));
        assert_eq!(
            SecretKey::from_hex("00").unwrap_err(),
            SecretKeyError::Length { len: 2 }
        );
        assert_eq!(
            SecretKey::from_hex(&"0".repeat(64)).unwrap_err(),
            SecretKeyError::OutOfRange
        );
    }

    #[test]
    fn high_s_is_refused_and_low_s_twin_accepted() {
        let key = SecretKey::from_hex(DOC_KEY).unwrap();
        let sig = key.sign_personal(b"malleability");
        // s' = n - s flips the parity bit of v.
        let ecdsa = EcdsaSignature::from_slice(&sig.as_bytes()[..64]).unwrap();
        let (r, s) = ecdsa.split_scalars();
        let high = EcdsaSignature::from_scalars(r.to_bytes(), (-*s).to_bytes()).unwrap();
        let mut bytes = [0u8; 65];
        bytes[..64].copy_from_slice(&high.to_bytes());
        bytes[64] = if sig.as_bytes()[64] == 27 { 28 } else { 27 };
        assert_eq!(Signature::from_bytes(bytes), Err(SignatureError::HighS));
    }

    #[test]
    fn strict_decoding_names_the_problem() {
        let good = SecretKey::from_hex(DOC_KEY)
            .unwrap()
            .sign_personal(b"x")
            .to_hex();
        assert_eq!(
            Signature::parse(&good[2..]),
            Err(SignatureError::MissingPrefix)
        );
        assert_eq!(
            Signature::parse(&good[..130]),
            Err(SignatureError::Length { len: 128 })
        );
        assert_eq!(
            Signature::parse(&format!("{good}00")),
            Err(SignatureError::Length { len: 132 })
        );
        let mut bad_v = good.clone();
        bad_v.replace_range(130..132, "1d");
        assert_eq!(
            Signature::parse(&bad_v),
            Err(SignatureError::RecoveryByte { v: 29 })
        );
        let zero = format!("0x{}1b", "0".repeat(128));
        assert_eq!(Signature::parse(&zero), Err(SignatureError::Scalars));
        let mut not_hex = good.clone();
        not_hex.replace_range(10..11, "g");
        assert_eq!(
            Signature::parse(&not_hex),
            Err(SignatureError::NotHex { index: 8, ch: 'g' })
        );
    }

    #[test]
    fn v_zero_and_one_are_normalised() {
        let sig = SecretKey::from_hex(DOC_KEY).unwrap().sign_personal(b"v");
        let mut bytes = *sig.as_bytes();
        bytes[64] -= 27;
        assert_eq!(Signature::from_bytes(bytes).unwrap(), sig);
    }
}
