//! Signatures made elsewhere (a PKCS#11 token, an HSM) turned into
//! Ethereum ones. A device's `CKM_ECDSA` gives `r || s` only: it may give
//! the high-s twin, and it never says which of the candidate public keys
//! the signature recovers to. Both are settled here against the device's
//! own public key, so that nothing on the wire is a guess.

use k256::ecdsa::{RecoveryId, Signature as EcdsaSignature, VerifyingKey};

use crate::address::Address;
use crate::eip191::Signature;

/// Why a device's signature or public key cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RawSignatureError {
    #[error("public key is not an uncompressed or compressed secp256k1 point")]
    PublicKey,
    #[error("ECDSA signature must be r || s, 64 bytes; found {len} bytes")]
    Length { len: usize },
    #[error("ECDSA signature r or s is zero or not below the curve order")]
    Scalars,
    #[error("the signature does not belong to the public key and hash (wrong key or curve)")]
    NotOurs,
}

/// The Ethereum address of a SEC1-encoded secp256k1 public key
/// (`04 || x || y`, or the compressed form).
pub fn address_of_public_key(sec1: &[u8]) -> Result<Address, RawSignatureError> {
    let key = VerifyingKey::from_sec1_bytes(sec1).map_err(|_| RawSignatureError::PublicKey)?;
    Ok(address_of(&key))
}

fn address_of(key: &VerifyingKey) -> Address {
    let point = key.to_sec1_point(false);
    let mut uncompressed = [0u8; 65];
    uncompressed.copy_from_slice(point.as_bytes());
    Address::from_uncompressed_point(&uncompressed)
}

impl Signature {
    /// An Ethereum signature from a raw `r || s` over `prehash` made by the
    /// key `public_key` (SEC1): `s` normalised to the low half, and `v` the
    /// recovery id whose recovered key *is* `public_key`. A signature that
    /// recovers to neither candidate is refused, never sent.
    pub fn from_raw_ecdsa(
        prehash: &[u8; 32],
        rs: &[u8],
        public_key: &[u8],
    ) -> Result<Self, RawSignatureError> {
        let ours =
            VerifyingKey::from_sec1_bytes(public_key).map_err(|_| RawSignatureError::PublicKey)?;
        if rs.len() != 64 {
            return Err(RawSignatureError::Length { len: rs.len() });
        }
        let sig = EcdsaSignature::from_slice(rs)
            .map_err(|_| RawSignatureError::Scalars)?
            .normalize_s();
        // Ethereum's v encodes y parity only (ids 0 and 1); ids 2 and 3 (x
        // above the group order) occur with probability ~2^-127 and cannot
        // be expressed, so they are not tried.
        for byte in [0u8, 1] {
            let Some(id) = RecoveryId::from_byte(byte) else {
                continue;
            };
            let Ok(recovered) = VerifyingKey::recover_from_prehash(prehash, &sig, id) else {
                continue;
            };
            if recovered == ours {
                let mut bytes = [0u8; 65];
                bytes[..64].copy_from_slice(&sig.to_bytes());
                bytes[64] = 27 + byte;
                return Signature::from_bytes(bytes).map_err(|_| RawSignatureError::Scalars);
            }
        }
        Err(RawSignatureError::NotOurs)
    }
}

#[cfg(test)]
mod tests {
    use k256::ecdsa::SigningKey;
    use k256::ecdsa::signature::hazmat::PrehashSigner;

    use super::*;
    use crate::eip191::{SecretKey, personal_message_hash};

    const DOC_KEY: &str = "b25c7db31feed9122727bf0939dc769a96564b2de4c4726d035b36ecf1e5b364";

    fn signing_key() -> SigningKey {
        SigningKey::from_slice(&hex::decode(DOC_KEY).unwrap()).unwrap()
    }

    fn public(key: &SigningKey) -> Vec<u8> {
        key.verifying_key().to_sec1_point(false).as_bytes().to_vec()
    }

    /// The high-s twin of a signature: (r, n - s), as a device may return.
    fn high_s(sig: &EcdsaSignature) -> Vec<u8> {
        let (r, s) = sig.split_scalars();
        let twin = EcdsaSignature::from_scalars(r.to_bytes(), (-*s).to_bytes()).unwrap();
        twin.to_bytes().to_vec()
    }

    #[test]
    fn raw_signatures_match_the_file_key_whatever_the_s_half() {
        let sk = signing_key();
        let file_key = SecretKey::from_hex(DOC_KEY).unwrap();
        for message in [&b"hello"[..], b"", b"peaq challenge 42"] {
            let hash = personal_message_hash(message);
            let raw: EcdsaSignature = sk.sign_prehash(&hash).unwrap();
            let expected = file_key.sign_prehash(&hash);
            let low = Signature::from_raw_ecdsa(&hash, &raw.to_bytes(), &public(&sk)).unwrap();
            assert_eq!(low, expected, "same r, s, v as the in-process signer");
            let twin = Signature::from_raw_ecdsa(&hash, &high_s(&raw), &public(&sk)).unwrap();
            assert_eq!(twin, expected, "high s normalised, v follows");
            assert_eq!(twin.recover_personal(message).unwrap(), file_key.address());
        }
    }

    #[test]
    fn a_signature_from_another_key_is_refused_not_guessed() {
        let sk = signing_key();
        let other = SigningKey::from_slice(&[7u8; 32]).unwrap();
        let hash = personal_message_hash(b"x");
        let raw: EcdsaSignature = other.sign_prehash(&hash).unwrap();
        assert_eq!(
            Signature::from_raw_ecdsa(&hash, &raw.to_bytes(), &public(&sk)),
            Err(RawSignatureError::NotOurs)
        );
        assert_eq!(
            Signature::from_raw_ecdsa(&hash, &raw.to_bytes()[..63], &public(&sk)),
            Err(RawSignatureError::Length { len: 63 })
        );
        assert_eq!(
            Signature::from_raw_ecdsa(&hash, &[0u8; 64], &public(&sk)),
            Err(RawSignatureError::Scalars)
        );
        assert_eq!(
            Signature::from_raw_ecdsa(&hash, &raw.to_bytes(), &[4u8; 65]),
            Err(RawSignatureError::PublicKey)
        );
    }

    #[test]
    fn public_key_addresses_match_the_secret_keys() {
        let sk = signing_key();
        let compressed = sk.verifying_key().to_sec1_point(true).as_bytes().to_vec();
        let want = SecretKey::from_hex(DOC_KEY).unwrap().address();
        assert_eq!(address_of_public_key(&public(&sk)).unwrap(), want);
        assert_eq!(address_of_public_key(&compressed).unwrap(), want);
        assert_eq!(
            address_of_public_key(&[1, 2, 3]),
            Err(RawSignatureError::PublicKey)
        );
    }
}
