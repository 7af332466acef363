//! The controller key as the rest of the agent sees it: an address and
//! EIP-191 signatures, whether the key is a file loaded into this process
//! or a key pair in a PKCS#11 token that never leaves it. Registration,
//! `check` and `address` do not care which.

use std::sync::Arc;

use peaqos_protocol::{Address, SecretKey, Signature, personal_message_hash};

use crate::config::{IdentityConfig, KeySource};
use crate::key::{self, KeyError};
#[cfg(feature = "pkcs11")]
use crate::pkcs11::{TokenError, TokenKey};

/// The controller key.
#[derive(Debug, Clone)]
pub enum Signer {
    /// A key file's key, held in this process (wiped on drop).
    File(Arc<SecretKey>),
    /// A key in a PKCS#11 token.
    #[cfg(feature = "pkcs11")]
    Token(Arc<TokenKey>),
}

/// Why the controller key could not be opened. Never carries key material
/// or a PIN.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot load the controller key file")]
    File(#[source] KeyError),
    #[error("the rotated key at {location} is not the one its record names ({expected})")]
    Rotated { location: String, expected: String },
    #[cfg(feature = "pkcs11")]
    #[error("cannot use the controller key in the PKCS#11 token {uri}")]
    Token {
        uri: String,
        #[source]
        source: TokenError,
    },
}

impl OpenError {
    /// Whether waiting may fix it (a token not plugged in yet), as opposed
    /// to a configuration an operator must change.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::File(_) | Self::Rotated { .. } => false,
            #[cfg(feature = "pkcs11")]
            Self::Token { source, .. } => source.is_transient(),
        }
    }
}

/// Why a signature could not be made (a token that went away, a PIN the
/// token now refuses). A file key always signs.
#[derive(Debug, thiserror::Error)]
#[error("the controller key in the token did not sign")]
pub struct SignError {
    transient: bool,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl SignError {
    /// Whether the failure is waited out (backoff), or needs an operator.
    pub fn is_transient(&self) -> bool {
        self.transient
    }
}

#[cfg(feature = "pkcs11")]
impl From<TokenError> for SignError {
    fn from(e: TokenError) -> Self {
        Self {
            transient: e.is_transient(),
            source: Box::new(e),
        }
    }
}

impl Signer {
    /// Opens the configured key: loads the key file, or opens the token
    /// and finds the key pair in it. `state_dir` is where a PIN the token
    /// refused is recorded, so that no later start offers it again.
    pub fn open(
        identity: &IdentityConfig,
        #[cfg_attr(not(feature = "pkcs11"), allow(unused_variables))] state_dir: Option<
            &std::path::Path,
        >,
    ) -> Result<Self, OpenError> {
        match identity.key_source() {
            KeySource::File { location, password } => {
                let (key, _) = key::load(location, password).map_err(OpenError::File)?;
                Ok(Self::File(Arc::new(key)))
            }
            #[cfg(feature = "pkcs11")]
            KeySource::Token { uri, pin } => {
                let key = TokenKey::open(uri.clone(), pin, state_dir).map_err(|source| {
                    OpenError::Token {
                        uri: uri.to_string(),
                        source,
                    }
                })?;
                Ok(Self::Token(Arc::new(key)))
            }
            #[cfg(not(feature = "pkcs11"))]
            KeySource::Token { .. } => unreachable!("Config::check refuses it in this build"),
        }
    }

    pub fn address(&self) -> Address {
        match self {
            Self::File(key) => key.address(),
            #[cfg(feature = "pkcs11")]
            Self::Token(key) => key.address(),
        }
    }

    /// `file` or `pkcs11`, for logs and status.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::File(_) => "file",
            #[cfg(feature = "pkcs11")]
            Self::Token(_) => "pkcs11",
        }
    }

    /// EIP-191 `personal_sign` of `message`. A token is asked on a blocking
    /// thread: a USB HSM may take tens of milliseconds, which must not stall
    /// the MQTT interface that shares the runtime.
    #[cfg_attr(not(feature = "pkcs11"), allow(clippy::unused_async))]
    pub async fn sign_personal(&self, message: &[u8]) -> Result<Signature, SignError> {
        let hash = personal_message_hash(message);
        match self {
            Self::File(key) => Ok(key.sign_prehash(&hash)),
            #[cfg(feature = "pkcs11")]
            Self::Token(key) => {
                let key = key.clone();
                tokio::task::spawn_blocking(move || key.sign_prehash(&hash))
                    .await
                    .map_err(|e| SignError {
                        transient: true,
                        source: Box::new(e),
                    })?
                    .map_err(SignError::from)
            }
        }
    }

    /// Whether the key can still be used: always for a file; for a token, a
    /// cheap request on its session (reconnecting if it went away).
    #[cfg_attr(not(feature = "pkcs11"), allow(clippy::unused_async))]
    pub async fn probe(&self) -> Result<(), SignError> {
        match self {
            Self::File(_) => Ok(()),
            #[cfg(feature = "pkcs11")]
            Self::Token(key) => {
                let key = key.clone();
                tokio::task::spawn_blocking(move || key.probe())
                    .await
                    .map_err(|e| SignError {
                        transient: true,
                        source: Box::new(e),
                    })?
                    .map_err(SignError::from)
            }
        }
    }
}

impl From<SecretKey> for Signer {
    fn from(key: SecretKey) -> Self {
        Self::File(Arc::new(key))
    }
}
