//! What can go wrong with a key in a PKCS#11 token, each with the fix, and
//! which failures a running agent waits out and which need an operator.

use std::path::PathBuf;

use peaqos_protocol::{Address, RawSignatureError};

use crate::secrets::SecretError;

/// Why the token's key cannot be used. Never carries the PIN.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "cannot load PKCS#11 module {path}: install the token's PKCS#11 provider \
         (e.g. Debian's softhsm2, opensc, yubihsm-pkcs11) or fix module-path in the URI"
    )]
    Module {
        path: PathBuf,
        source: cryptoki::error::Error,
    },
    #[error("PKCS#11 module {path} failed to initialise")]
    Initialize {
        path: PathBuf,
        source: cryptoki::error::Error,
    },
    #[error(
        "no token matches {wanted} (tokens present: {present}); plug the token in, or fix \
         token=/serial= in the URI"
    )]
    NoToken { wanted: String, present: String },
    #[error(
        "no PIN for the token: name the file holding it with pin-source= in the URI or \
         [identity] key_pin_file (a path or credential:NAME)"
    )]
    NoPin,
    #[error("cannot read the token PIN")]
    Pin(#[source] SecretError),
    #[error(
        "the token rejected the PIN (CKR_PIN_INCORRECT); fix the PIN file. It is not tried \
         again until the file changes, so that retries cannot lock the token"
    )]
    PinIncorrect,
    #[error(
        "the token refused the PIN in {path} before (at {refused_at}) and the file has not \
         changed since; fix the PIN file. The agent does not offer a refused PIN again, so \
         that restarts cannot lock the token (the refusal is recorded in {record})"
    )]
    PinRefusedBefore {
        path: PathBuf,
        refused_at: peaqos_protocol::Timestamp,
        record: PathBuf,
    },
    #[error(
        "the token's user PIN is locked (CKF_USER_PIN_LOCKED or CKR_PIN_LOCKED); no login was \
         attempted. Unblock it with the SO PIN (e.g. pkcs11-tool --init-pin --login \
         --login-type so), then fix the PIN file"
    )]
    PinLocked,
    #[error(
        "the token allows one more PIN attempt before it locks (CKF_USER_PIN_FINAL_TRY); the \
         agent does not attempt a login. Check the PIN file's PIN by hand (e.g. pkcs11-tool \
         --login --test), which resets the count when it is right"
    )]
    PinFinalTry,
    #[error(
        "{token} has no private key {key}; create one with `peaqos-agent keygen --pkcs11 URI` \
         or fix object=/id= in the URI"
    )]
    NoKey { token: String, key: String },
    #[error("{token} has {count} private keys matching {key}; add id= to the URI to pick one")]
    Ambiguous {
        token: String,
        key: String,
        count: usize,
    },
    #[error(
        "the private key {key} is not a secp256k1 EC key (the controller key must be \
         secp256k1: CKA_EC_PARAMS 06052b8104000a)"
    )]
    NotSecp256k1 { key: String },
    #[error(
        "{token} has no public key object beside the private key {key} (same id or label), \
         so its address cannot be read"
    )]
    NoPublicKey { token: String, key: String },
    #[error("the token's public key {key} is unusable")]
    PublicKey {
        key: String,
        source: RawSignatureError,
    },
    #[error(
        "the key in the token now has address {found}, not {expected} as at start; another \
         token or key answers to the URI. Restart the agent if the key was replaced on purpose"
    )]
    AddressChanged { expected: Address, found: Address },
    #[error("the token did not {operation}")]
    Device {
        operation: &'static str,
        source: cryptoki::error::Error,
    },
    #[error("the token's signature does not check out against its public key")]
    BadSignature(#[source] RawSignatureError),
    #[error("{token} already holds a key {key}; refusing to generate another under that name")]
    Exists { token: String, key: String },
    #[error("cannot make a random key id")]
    Random,
}

impl TokenError {
    /// Whether the failure is one a running agent waits out (the token was
    /// unplugged, restarted, or answered with a device error), as opposed to
    /// one an operator must fix (module, PIN, key, URI).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::NoToken { .. } | Self::Device { .. } | Self::Initialize { .. }
        )
    }
}
