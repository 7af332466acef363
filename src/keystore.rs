//! Ethereum V3 keystores ("Web3 Secret Storage"), as geth, MetaMask exports
//! and `eth_account.Account.encrypt` write them: scrypt or PBKDF2-HMAC-SHA256
//! derives a key from the password; its second half, hashed with the
//! ciphertext (keccak256), must match `mac`; its first half decrypts the
//! secret with AES-128-CTR.
//!
//! A keystore only protects the key at rest if the password is kept
//! elsewhere (a systemd credential). Costs are bounded: an attacker-supplied
//! file cannot make the agent allocate gigabytes or spin for hours.

use aes::cipher::{KeyIvInit, StreamCipher};
use peaqos_protocol::{Address, SecretKey};
use serde::Deserialize;
use sha3::{Digest, Keccak256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// scrypt memory (128 * r * n bytes) allowed while unlocking: geth's and
/// eth-account's default (n = 2^18, r = 8) needs 256 MiB.
const MAX_SCRYPT_MEMORY: u64 = 256 * 1024 * 1024;
const MAX_PBKDF2_ROUNDS: u32 = 10_000_000;

/// Why a keystore could not be opened. Never carries key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeystoreError {
    #[error("not a V3 keystore: {0}")]
    Format(String),
    #[error("unsupported keystore: {0}")]
    Unsupported(String),
    #[error("wrong keystore password (MAC mismatch)")]
    WrongPassword,
    #[error("the keystore decrypts to a key whose address is not the one it names")]
    AddressMismatch,
}

#[derive(Deserialize)]
struct Keystore {
    version: u32,
    #[serde(alias = "Crypto")]
    crypto: Crypto,
    #[serde(default)]
    address: Option<String>,
}

#[derive(Deserialize)]
struct Crypto {
    cipher: String,
    cipherparams: CipherParams,
    ciphertext: String,
    kdf: String,
    kdfparams: serde_json::Value,
    mac: String,
}

#[derive(Deserialize)]
struct CipherParams {
    iv: String,
}

#[derive(Deserialize)]
struct ScryptParams {
    dklen: usize,
    n: u64,
    r: u32,
    p: u32,
    salt: String,
}

#[derive(Deserialize)]
struct Pbkdf2Params {
    dklen: usize,
    c: u32,
    prf: String,
    salt: String,
}

/// Whether `text` looks like a JSON keystore rather than a hex key.
pub fn looks_like_keystore(text: &str) -> bool {
    text.trim_start().starts_with('{')
}

fn unhex(field: &str, value: &str) -> Result<Vec<u8>, KeystoreError> {
    hex_decode(value.strip_prefix("0x").unwrap_or(value))
        .ok_or_else(|| KeystoreError::Format(format!("`{field}` is not hex")))
}

fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Decrypts a keystore with `password`.
pub fn decrypt(json: &str, password: &[u8]) -> Result<SecretKey, KeystoreError> {
    // From bytes, as the agent's other JSON: `from_str` would link a second
    // copy of serde_json's parser (docs/performance.md, footprint).
    let ks: Keystore = serde_json::from_slice(json.as_bytes())
        .map_err(|e| KeystoreError::Format(e.to_string()))?;
    if ks.version != 3 {
        return Err(KeystoreError::Unsupported(format!(
            "version {} (only 3)",
            ks.version
        )));
    }
    let c = ks.crypto;
    if c.cipher != "aes-128-ctr" {
        return Err(KeystoreError::Unsupported(format!(
            "cipher {:?} (only aes-128-ctr)",
            c.cipher
        )));
    }
    let iv = unhex("cipherparams.iv", &c.cipherparams.iv)?;
    let ciphertext = unhex("ciphertext", &c.ciphertext)?;
    let mac = unhex("mac", &c.mac)?;
    if iv.len() != 16 || ciphertext.len() != 32 || mac.len() != 32 {
        return Err(KeystoreError::Format(
            "iv must be 16 bytes, ciphertext and mac 32".into(),
        ));
    }
    let derived = derive(&c.kdf, c.kdfparams, password)?;
    let mut hasher = Keccak256::new();
    hasher.update(&derived[16..32]);
    hasher.update(&ciphertext);
    let expected = hasher.finalize();
    if !bool::from(expected.as_slice().ct_eq(&mac)) {
        return Err(KeystoreError::WrongPassword);
    }
    let mut secret = Zeroizing::new([0u8; 32]);
    secret.copy_from_slice(&ciphertext);
    let mut cipher = ctr::Ctr128BE::<aes::Aes128>::new_from_slices(&derived[..16], &iv)
        .map_err(|_| KeystoreError::Format("iv must be 16 bytes".into()))?;
    cipher.apply_keystream(secret.as_mut());
    let key = SecretKey::from_bytes(&secret).map_err(|_| {
        KeystoreError::Format("the decrypted key is not a valid secp256k1 key".into())
    })?;
    if let Some(named) = ks.address.as_deref().filter(|a| !a.is_empty()) {
        let named = if named.starts_with("0x") {
            named.to_owned()
        } else {
            format!("0x{named}")
        };
        let named = Address::parse(&named.to_ascii_lowercase())
            .map_err(|_| KeystoreError::Format("`address` is not an address".into()))?;
        if named != key.address() {
            return Err(KeystoreError::AddressMismatch);
        }
    }
    Ok(key)
}

fn derive(
    kdf: &str,
    params: serde_json::Value,
    password: &[u8],
) -> Result<Zeroizing<[u8; 32]>, KeystoreError> {
    let bad = |e: serde_json::Error| KeystoreError::Format(format!("kdfparams: {e}"));
    let mut out = Zeroizing::new([0u8; 32]);
    match kdf {
        "scrypt" => {
            let p: ScryptParams = serde_json::from_value(params).map_err(bad)?;
            check_dklen(p.dklen)?;
            if !p.n.is_power_of_two() || p.n < 2 {
                return Err(KeystoreError::Format(
                    "scrypt n must be a power of two".into(),
                ));
            }
            let memory = 128 * u64::from(p.r) * p.n;
            if memory > MAX_SCRYPT_MEMORY || p.p > 16 {
                return Err(KeystoreError::Unsupported(format!(
                    "scrypt parameters need {} MiB (at most {} MiB allowed)",
                    memory >> 20,
                    MAX_SCRYPT_MEMORY >> 20
                )));
            }
            let log_n = u8::try_from(p.n.trailing_zeros()).unwrap_or(u8::MAX);
            let params = scrypt::Params::new(log_n, p.r, p.p)
                .map_err(|_| KeystoreError::Unsupported("scrypt parameters".into()))?;
            let salt = unhex("kdfparams.salt", &p.salt)?;
            scrypt::scrypt(password, &salt, &params, out.as_mut())
                .map_err(|_| KeystoreError::Unsupported("scrypt output length".into()))?;
        }
        "pbkdf2" => {
            let p: Pbkdf2Params = serde_json::from_value(params).map_err(bad)?;
            check_dklen(p.dklen)?;
            if p.prf != "hmac-sha256" {
                return Err(KeystoreError::Unsupported(format!(
                    "pbkdf2 prf {:?} (only hmac-sha256)",
                    p.prf
                )));
            }
            if p.c == 0 || p.c > MAX_PBKDF2_ROUNDS {
                return Err(KeystoreError::Unsupported(format!(
                    "pbkdf2 with {} rounds",
                    p.c
                )));
            }
            let salt = unhex("kdfparams.salt", &p.salt)?;
            pbkdf2::pbkdf2_hmac::<sha2::Sha256>(password, &salt, p.c, out.as_mut());
        }
        other => {
            return Err(KeystoreError::Unsupported(format!(
                "kdf {other:?} (only scrypt and pbkdf2)"
            )));
        }
    }
    Ok(out)
}

/// Encrypts `key` with `password` as a V3 keystore that uses the same KDF,
/// work factors, cipher and MAC as `like` (a keystore that opens with the
/// same password): fresh salt and IV, so the successor of a keystore key is
/// held exactly as it was (key rotation). What eth-account and geth read.
pub fn encrypt_like(like: &str, key: &SecretKey, password: &[u8]) -> Result<String, KeystoreError> {
    let ks: Keystore = serde_json::from_slice(like.as_bytes())
        .map_err(|e| KeystoreError::Format(e.to_string()))?;
    let c = ks.crypto;
    let mut params = c.kdfparams;
    let salt_len = params
        .get("salt")
        .and_then(serde_json::Value::as_str)
        .map_or(32, |s| (s.len() / 2).clamp(16, 64));
    let mut salt = vec![0u8; salt_len];
    let mut iv = [0u8; 16];
    let mut id = [0u8; 16];
    for buf in [salt.as_mut_slice(), &mut iv, &mut id] {
        getrandom::fill(buf).map_err(|_| KeystoreError::Format("no random source".into()))?;
    }
    params["salt"] = serde_json::Value::String(hex(&salt));
    let derived = derive(&c.kdf, params.clone(), password)?;
    let mut secret = Zeroizing::new([0u8; 32]);
    let plain = key.to_hex();
    for (i, b) in secret.iter_mut().enumerate() {
        *b = u8::from_str_radix(&plain[2 * i..2 * i + 2], 16)
            .map_err(|_| KeystoreError::Format("key".into()))?;
    }
    let mut cipher = ctr::Ctr128BE::<aes::Aes128>::new_from_slices(&derived[..16], &iv)
        .map_err(|_| KeystoreError::Format("iv must be 16 bytes".into()))?;
    cipher.apply_keystream(secret.as_mut());
    let mut hasher = Keccak256::new();
    hasher.update(&derived[16..32]);
    hasher.update(secret.as_ref());
    let mac = hasher.finalize();
    // A v4 UUID, as eth-account writes one.
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    let id = hex(&id);
    let json = serde_json::json!({
        "address": key.address().checksummed().trim_start_matches("0x").to_ascii_lowercase(),
        "crypto": {
            "cipher": "aes-128-ctr",
            "cipherparams": {"iv": hex(&iv)},
            "ciphertext": hex(secret.as_ref()),
            "kdf": c.kdf,
            "kdfparams": params,
            "mac": hex(&mac),
        },
        "id": format!("{}-{}-{}-{}-{}", &id[..8], &id[8..12], &id[12..16], &id[16..20], &id[20..]),
        "version": 3,
    });
    Ok(json.to_string())
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

fn check_dklen(dklen: usize) -> Result<(), KeystoreError> {
    if dklen == 32 {
        Ok(())
    } else {
        Err(KeystoreError::Unsupported(format!(
            "dklen {dklen} (only 32)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made by eth-account 0.13 (`Account.encrypt(key, "correct horse",
    // kdf=..., iterations=...)`), with small work factors so that the
    // debug-build test stays fast.
    const PBKDF2: &str = r#"{"address": "7d931fd3f5a12c18Cd77f9Cb90ff58E677dF9479", "crypto": {"cipher": "aes-128-ctr", "cipherparams": {"iv": "937f3221bcea027c6e7122159fc563ba"}, "ciphertext": "0e6712ab6feda0f0f1ee7505eaa51728c4584de9205c6f160ff4a38bc84f99e3", "kdf": "pbkdf2", "kdfparams": {"c": 1000, "dklen": 32, "prf": "hmac-sha256", "salt": "93b24bc470b120de208561f1912d61cf"}, "mac": "2892a17a95918506ad4476755d69c448574c942d3d2ca5d96f2fd0ad96314898"}, "id": "e882f2a5-374e-42df-a747-a34cb3b62d00", "version": 3}"#;
    const SCRYPT: &str = r#"{"address": "7d931fd3f5a12c18Cd77f9Cb90ff58E677dF9479", "crypto": {"cipher": "aes-128-ctr", "cipherparams": {"iv": "ae21a6336c4edbc1ce915fe74cc9eb31"}, "ciphertext": "8f563caa87491963c2c7f98c00d1e3c8cdc98e0b3e892d976c219e4508f0b878", "kdf": "scrypt", "kdfparams": {"dklen": 32, "n": 1024, "r": 8, "p": 1, "salt": "a72ceb9cafb1f788398fe4277d7ae18e"}, "mac": "91cb3ec91c4e6e8741641aefc5b7d0a7c69355b9ec10c72247991ab1ea2b1f46"}, "id": "5bb6f2c6-1226-4dce-85c6-0e4c941923df", "version": 3}"#;
    const KEY: &str = "1111111111111111111111111111111111111111111111111111111111111122";

    #[test]
    fn decrypts_eth_account_keystores_and_rejects_a_wrong_password() {
        let want = SecretKey::from_hex(KEY).unwrap().address();
        for ks in [PBKDF2, SCRYPT] {
            let key = decrypt(ks, b"correct horse").unwrap();
            assert_eq!(key.address(), want);
            assert_eq!(
                decrypt(ks, b"correct horse!").unwrap_err(),
                KeystoreError::WrongPassword
            );
        }
        let other = PBKDF2.replace("7d931fd3", "7d931fd4");
        assert_eq!(
            decrypt(&other, b"correct horse").unwrap_err(),
            KeystoreError::AddressMismatch
        );
    }

    #[test]
    fn a_successor_keystore_opens_with_the_same_password_and_work_factors() {
        let key = SecretKey::generate().unwrap();
        for like in [PBKDF2, SCRYPT] {
            let json = encrypt_like(like, &key, b"correct horse").unwrap();
            assert_eq!(
                decrypt(&json, b"correct horse").unwrap().address(),
                key.address()
            );
            assert_eq!(
                decrypt(&json, b"wrong").unwrap_err(),
                KeystoreError::WrongPassword
            );
            let (a, b): (serde_json::Value, serde_json::Value) = (
                serde_json::from_str(like).unwrap(),
                serde_json::from_str(&json).unwrap(),
            );
            assert_eq!(a["crypto"]["kdf"], b["crypto"]["kdf"]);
            for field in ["n", "r", "p", "c", "prf", "dklen"] {
                assert_eq!(
                    a["crypto"]["kdfparams"][field],
                    b["crypto"]["kdfparams"][field]
                );
            }
            assert_ne!(
                a["crypto"]["kdfparams"]["salt"],
                b["crypto"]["kdfparams"]["salt"]
            );
            assert!(!json.contains(key.to_hex().as_str()));
        }
    }

    #[test]
    fn hostile_parameters_are_refused_before_any_work() {
        let huge = SCRYPT.replace("\"n\": 1024", "\"n\": 1073741824");
        assert!(matches!(
            decrypt(&huge, b"x"),
            Err(KeystoreError::Unsupported(m)) if m.contains("MiB")
        ));
        let spin = PBKDF2.replace("\"c\": 1000", "\"c\": 4000000000");
        assert!(matches!(
            decrypt(&spin, b"x"),
            Err(KeystoreError::Unsupported(_))
        ));
        assert!(matches!(
            decrypt("{\"version\": 3}", b"x"),
            Err(KeystoreError::Format(_))
        ));
        let v1 = PBKDF2.replace("\"version\": 3", "\"version\": 1");
        assert!(matches!(
            decrypt(&v1, b"x"),
            Err(KeystoreError::Unsupported(_))
        ));
    }
}
