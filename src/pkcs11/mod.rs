//! Controller keys in PKCS#11 tokens (secure elements, HSMs, SoftHSM2).
//!
//! The URI syntax is always built, so that configurations are checked the
//! same way by every build; the backend itself (`cryptoki`, which loads the
//! module at run time with `dlopen`) is the `pkcs11` cargo feature.

pub mod uri;

#[cfg(feature = "pkcs11")]
mod error;
#[cfg(feature = "pkcs11")]
mod manage;
#[cfg(feature = "pkcs11")]
mod refused;
#[cfg(feature = "pkcs11")]
mod session;
#[cfg(feature = "pkcs11")]
mod token_key;

#[cfg(feature = "pkcs11")]
pub use error::TokenError;
#[cfg(feature = "pkcs11")]
pub use manage::{TokenReport, destroy, generate, inspect, test_signature};
#[cfg(feature = "pkcs11")]
pub use session::{SECP256K1_PARAMS, decode_ec_point};
#[cfg(feature = "pkcs11")]
pub use token_key::TokenKey;
pub use uri::{Pkcs11Uri, UriError};
