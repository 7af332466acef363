//! The controller key held in a token: signs EIP-191 hashes with
//! `CKM_ECDSA`, turns `r || s` into an Ethereum signature against the
//! token's own public key, and reconnects after the token went away.

use std::sync::Mutex;

use cryptoki::mechanism::Mechanism;
use cryptoki::object::ObjectHandle;
use peaqos_protocol::{Address, Signature};
use zeroize::Zeroizing;

use super::error::TokenError;
use super::refused::RefusedPins;
use super::session::{Connection, Login, device};
use super::uri::Pkcs11Uri;

/// A key pair in a PKCS#11 token. The private key never leaves the token;
/// this holds its public key, address and (while the token answers) a
/// logged-in session.
pub struct TokenKey {
    uri: Pkcs11Uri,
    pin_location: Option<String>,
    /// Where refused PINs are recorded across restarts.
    refused: Option<RefusedPins>,
    address: Address,
    public_key: Vec<u8>,
    live: Mutex<Live>,
}

struct Live {
    connection: Option<(Connection, ObjectHandle)>,
    /// The PIN the token last refused in this process: not offered again
    /// (a token locks after a few wrong tries) until the PIN file says
    /// something else. Across restarts, `TokenKey::refused` remembers.
    refused_pin: Option<Zeroizing<String>>,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKey")
            .field("uri", &self.uri)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl TokenKey {
    /// Opens the token, finds the key pair and reads its address. Every
    /// failure here is reported; none is waited out. With a state
    /// directory, a PIN the token refused is recorded there and not offered
    /// again, by this process or a later one, until its file changes.
    pub fn open(
        uri: Pkcs11Uri,
        pin_location: Option<String>,
        state_dir: Option<&std::path::Path>,
    ) -> Result<Self, TokenError> {
        let refused = state_dir.map(RefusedPins::new);
        let mut login = Login {
            location: pin_location.as_deref(),
            record: refused.as_ref(),
            refused_here: None,
        };
        let connection = Connection::open(&uri, &mut login, false)?;
        let private = connection.private_key(&uri)?;
        let (public_key, address) = connection.public_key(&uri, private)?;
        Ok(Self {
            uri,
            pin_location,
            refused,
            address,
            public_key,
            live: Mutex::new(Live {
                connection: Some((connection, private)),
                refused_pin: None,
            }),
        })
    }

    pub fn address(&self) -> Address {
        self.address
    }

    pub fn uri(&self) -> &Pkcs11Uri {
        &self.uri
    }

    /// Signs a 32-byte hash. A failed operation drops the session (and the
    /// module's state) and tries once more on a fresh one, so that a token
    /// that was restarted or re-plugged is picked up at once.
    pub fn sign_prehash(&self, hash: &[u8; 32]) -> Result<Signature, TokenError> {
        let mut live = self
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let had_connection = live.connection.is_some();
        match self.sign_on(&mut live, hash) {
            Err(e) if had_connection && e.is_transient() => {
                tracing::debug!("token operation failed; reconnecting once: {e}");
                live.connection = None;
                self.sign_on(&mut live, hash)
            }
            other => other,
        }
    }

    /// Runs `f` on the live session with the private key's handle.
    pub(crate) fn with_session<T>(
        &self,
        f: impl FnOnce(&Connection, ObjectHandle) -> Result<T, TokenError>,
    ) -> Result<T, TokenError> {
        let mut live = self
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let result = self.connected(&mut live).and_then(|(c, key)| f(c, *key));
        if result.as_ref().is_err_and(TokenError::is_transient) {
            live.connection = None;
        }
        result
    }

    /// Whether the token still answers for the key (a cheap attribute read
    /// on the open session, or a reconnect).
    pub fn probe(&self) -> Result<(), TokenError> {
        let mut live = self
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let result = self.connected(&mut live).and_then(|(c, key)| {
            c.session()
                .get_attributes(*key, &[cryptoki::object::AttributeType::Sign])
                .map(drop)
                .map_err(device("answer for the key"))
        });
        if result.is_err() {
            live.connection = None;
        }
        result
    }

    fn sign_on(&self, live: &mut Live, hash: &[u8; 32]) -> Result<Signature, TokenError> {
        let result = self.connected(live).and_then(|(c, key)| {
            c.session()
                .sign(&Mechanism::Ecdsa, *key, hash)
                .map_err(device("sign"))
        });
        let rs = match result {
            Ok(rs) => rs,
            Err(e) => {
                live.connection = None;
                return Err(e);
            }
        };
        Signature::from_raw_ecdsa(hash, &rs, &self.public_key).map_err(TokenError::BadSignature)
    }

    fn connected<'a>(
        &self,
        live: &'a mut Live,
    ) -> Result<&'a (Connection, ObjectHandle), TokenError> {
        if live.connection.is_none() {
            let mut login = Login {
                location: self.pin_location.as_deref(),
                record: self.refused.as_ref(),
                refused_here: live.refused_pin.take(),
            };
            let connection = Connection::open(&self.uri, &mut login, false);
            live.refused_pin = login.refused_here;
            let connection = connection?;
            let private = connection.private_key(&self.uri)?;
            let (_, address) = connection.public_key(&self.uri, private)?;
            if address != self.address {
                return Err(TokenError::AddressChanged {
                    expected: self.address,
                    found: address,
                });
            }
            tracing::info!(token = %self.uri.token_name(), "token session opened again");
            live.connection = Some((connection, private));
        }
        Ok(live.connection.as_ref().expect("set above"))
    }
}
