//! An open, logged-in session with the token that holds the controller key:
//! loading the module at run time (no link-time dependency), finding the
//! token and the key pair named by the URI, and reading the public key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use peaqos_protocol::{Address, address_of_public_key};
use zeroize::Zeroizing;

use super::error::TokenError;
use super::refused::{PinFileIdentity, RefusedPins};
use super::uri::Pkcs11Uri;
use crate::secrets;

/// DER of the secp256k1 OID (1.3.132.0.10), the value of CKA_EC_PARAMS.
pub const SECP256K1_PARAMS: [u8; 7] = [0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x0a];

/// A loaded module with one session on the key's token. Dropping it closes
/// the session and, when it was the module's last user in this process,
/// finalises the module, so that a later one starts afresh (which is how a
/// restarted or re-plugged token is found again).
pub(crate) struct Connection {
    session: Option<Session>,
    module: ModuleRef,
    pub(crate) slot: Slot,
}

/// The modules this process has loaded and initialised, by path, with how
/// many connections use each: a gateway's many keys on one token share one
/// module load and one `C_Initialize` (and so one login: the token's login
/// state belongs to the application, not to a session). `C_Finalize`, which
/// ends every session of the module, runs only when the last connection
/// goes. Loading and finalising happen under this lock, so that a new
/// connection never initialises a module that is being finalised.
static MODULES: Mutex<BTreeMap<PathBuf, LoadedModule>> = Mutex::new(BTreeMap::new());

struct LoadedModule {
    context: Pkcs11,
    /// Whether `C_Initialize` was ours to undo.
    initialized: bool,
    users: usize,
}

/// One connection's use of a loaded module.
struct ModuleRef {
    path: PathBuf,
    context: Pkcs11,
}

fn modules() -> std::sync::MutexGuard<'static, BTreeMap<PathBuf, LoadedModule>> {
    // The map is changed by whole inserts and removes only.
    MODULES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ModuleRef {
    /// The module at `path`, loaded and initialised by its first user.
    fn get(path: &Path) -> Result<Self, TokenError> {
        let mut loaded = modules();
        if let Some(module) = loaded.get_mut(path) {
            module.users += 1;
            return Ok(Self {
                path: path.to_owned(),
                context: module.context.clone(),
            });
        }
        let context = Pkcs11::new(path).map_err(|source| TokenError::Module {
            path: path.to_owned(),
            source,
        })?;
        let initialized =
            match context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
                Ok(()) => true,
                // Another user of the module in this process (not through
                // this map) initialised it.
                Err(e) if rv(&e) == Some(RvError::CryptokiAlreadyInitialized) => false,
                Err(source) => {
                    return Err(TokenError::Initialize {
                        path: path.to_owned(),
                        source,
                    });
                }
            };
        loaded.insert(
            path.to_owned(),
            LoadedModule {
                context: context.clone(),
                initialized,
                users: 1,
            },
        );
        Ok(Self {
            path: path.to_owned(),
            context,
        })
    }
}

impl Drop for ModuleRef {
    fn drop(&mut self) {
        let mut loaded = modules();
        let Some(module) = loaded.get_mut(&self.path) else {
            return;
        };
        module.users -= 1;
        if module.users == 0
            && let Some(module) = loaded.remove(&self.path)
            && module.initialized
        {
            let _ = module.context.finalize();
        }
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("slot", &self.slot.id())
            .finish_non_exhaustive()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // The session first; the module (finalised if this was its last
        // user) when the fields drop.
        drop(self.session.take());
    }
}

pub(crate) fn device(operation: &'static str) -> impl FnOnce(CkError) -> TokenError {
    move |source| TokenError::Device { operation, source }
}

fn rv(e: &CkError) -> Option<RvError> {
    match e {
        CkError::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

impl Connection {
    /// Loads the module, finds the token and logs in with the PIN read now
    /// from its file (so that a changed PIN file is picked up), unless the
    /// token's flags or a recorded refusal forbid the login (see
    /// [`Login`]).
    pub(crate) fn open(
        uri: &Pkcs11Uri,
        login: &mut Login<'_>,
        read_write: bool,
    ) -> Result<Self, TokenError> {
        let me = Self::connect(uri, read_write)?;
        let info = me.token_info()?;
        login_allowed(
            info.user_pin_locked(),
            info.user_pin_final_try(),
            info.user_pin_count_low(),
        )?;
        // The file's identity before its content: a change in between makes
        // the record name the old file, which only costs one more login.
        let identity = login.location.and_then(PinFileIdentity::of);
        let pin = read_pin(login.location)?;
        if login.refused_here.as_ref().is_some_and(|p| *p == pin) {
            return Err(TokenError::PinIncorrect);
        }
        if let (Some(record), Some(identity)) = (login.record, &identity)
            && let Some(refusal) = record.find(uri.as_str(), identity, info.user_pin_count_low())
        {
            return Err(TokenError::PinRefusedBefore {
                path: identity.path.clone(),
                refused_at: refusal.refused_at,
                record: refusal.record,
            });
        }
        match me.login(&pin) {
            Err(TokenError::PinIncorrect) => {
                if let (Some(record), Some(identity)) = (login.record, identity) {
                    record.remember(uri.as_str(), identity);
                }
                login.refused_here = Some(pin);
                Err(TokenError::PinIncorrect)
            }
            Err(e) => Err(e),
            Ok(()) => {
                if let Some(record) = login.record {
                    record.forget(uri.as_str());
                }
                login.refused_here = None;
                Ok(me)
            }
        }
    }

    /// The module loaded (once per process, shared), the token found and a
    /// session opened; not yet logged in.
    fn connect(uri: &Pkcs11Uri, read_write: bool) -> Result<Self, TokenError> {
        let mut me = Self {
            session: None,
            module: ModuleRef::get(&uri.module_path)?,
            slot: Slot::try_from(0u64).map_err(device("name a slot"))?,
        };
        me.slot = find_slot(&me.module.context, uri)?;
        let session = if read_write {
            me.module.context.open_rw_session(me.slot)
        } else {
            me.module.context.open_ro_session(me.slot)
        }
        .map_err(device("open a session"))?;
        me.session = Some(session);
        Ok(me)
    }

    fn login(&self, pin: &Zeroizing<String>) -> Result<(), TokenError> {
        let auth = AuthPin::from(pin.as_str());
        match self.session().login(UserType::User, Some(&auth)) {
            Ok(()) => Ok(()),
            Err(e) => match rv(&e) {
                Some(RvError::UserAlreadyLoggedIn) => Ok(()),
                Some(RvError::PinIncorrect) => Err(TokenError::PinIncorrect),
                Some(RvError::PinLocked) => Err(TokenError::PinLocked),
                _ => Err(device("accept the login")(e)),
            },
        }
    }

    pub(crate) fn session(&self) -> &Session {
        self.session.as_ref().expect("set in open")
    }

    pub(crate) fn token_info(&self) -> Result<cryptoki::slot::TokenInfo, TokenError> {
        self.module
            .context
            .get_token_info(self.slot)
            .map_err(device("report its token information"))
    }

    /// Objects of `class` matching the URI's label and id.
    pub(crate) fn find(
        &self,
        class: ObjectClass,
        uri: &Pkcs11Uri,
    ) -> Result<Vec<ObjectHandle>, TokenError> {
        let mut template = vec![Attribute::Class(class)];
        if let Some(label) = &uri.object {
            template.push(Attribute::Label(label.as_bytes().to_vec()));
        }
        if let Some(id) = &uri.id {
            template.push(Attribute::Id(id.clone()));
        }
        self.session()
            .find_objects(&template)
            .map_err(device("list its objects"))
    }

    /// The private key the URI names, checked to be secp256k1.
    pub(crate) fn private_key(&self, uri: &Pkcs11Uri) -> Result<ObjectHandle, TokenError> {
        let found = self.find(ObjectClass::PRIVATE_KEY, uri)?;
        let key = match found.as_slice() {
            [one] => *one,
            [] => {
                return Err(TokenError::NoKey {
                    token: uri.token_name(),
                    key: uri.key_name(),
                });
            }
            many => {
                return Err(TokenError::Ambiguous {
                    token: uri.token_name(),
                    key: uri.key_name(),
                    count: many.len(),
                });
            }
        };
        let attrs = self
            .session()
            .get_attributes(key, &[AttributeType::KeyType, AttributeType::EcParams])
            .map_err(device("report the key's type"))?;
        let is_ec = attrs
            .iter()
            .any(|a| matches!(a, Attribute::KeyType(t) if *t == KeyType::EC));
        let on_curve = attrs
            .iter()
            .any(|a| matches!(a, Attribute::EcParams(p) if p.as_slice() == SECP256K1_PARAMS));
        if !(is_ec && on_curve) {
            return Err(TokenError::NotSecp256k1 {
                key: uri.key_name(),
            });
        }
        Ok(key)
    }

    /// The SEC1 public key and address of the pair `private` belongs to,
    /// from the public key object with the same CKA_ID (or, without an id,
    /// the same label).
    pub(crate) fn public_key(
        &self,
        uri: &Pkcs11Uri,
        private: ObjectHandle,
    ) -> Result<(Vec<u8>, Address), TokenError> {
        let attrs = self
            .session()
            .get_attributes(private, &[AttributeType::Id, AttributeType::Label])
            .map_err(device("report the key's id"))?;
        let mut template = vec![Attribute::Class(ObjectClass::PUBLIC_KEY)];
        let id = attrs.iter().find_map(|a| match a {
            Attribute::Id(id) if !id.is_empty() => Some(id.clone()),
            _ => None,
        });
        let label = attrs.iter().find_map(|a| match a {
            Attribute::Label(l) if !l.is_empty() => Some(l.clone()),
            _ => None,
        });
        match (id, label) {
            (Some(id), _) => template.push(Attribute::Id(id)),
            (None, Some(label)) => template.push(Attribute::Label(label)),
            (None, None) => {
                return Err(TokenError::NoPublicKey {
                    token: uri.token_name(),
                    key: uri.key_name(),
                });
            }
        }
        let found = self
            .session()
            .find_objects(&template)
            .map_err(device("list its objects"))?;
        let no_public = || TokenError::NoPublicKey {
            token: uri.token_name(),
            key: uri.key_name(),
        };
        let public = *found.first().ok_or_else(no_public)?;
        let point = self
            .session()
            .get_attributes(public, &[AttributeType::EcPoint])
            .map_err(device("report the public key"))?
            .into_iter()
            .find_map(|a| match a {
                Attribute::EcPoint(p) => Some(p),
                _ => None,
            })
            .ok_or_else(no_public)?;
        decode_ec_point(&point).map_err(|source| TokenError::PublicKey {
            key: uri.key_name(),
            source,
        })
    }
}

/// CKA_EC_POINT is a DER OCTET STRING around the SEC1 point (PKCS#11
/// v2.40); some modules return the bare point. Both are accepted.
pub fn decode_ec_point(
    value: &[u8],
) -> Result<(Vec<u8>, Address), peaqos_protocol::RawSignatureError> {
    if let [0x04, len, rest @ ..] = value
        && usize::from(*len) == rest.len()
        && let Ok(address) = address_of_public_key(rest)
    {
        return Ok((rest.to_vec(), address));
    }
    address_of_public_key(value).map(|a| (value.to_vec(), a))
}

fn read_pin(location: Option<&str>) -> Result<Zeroizing<String>, TokenError> {
    let location = location.ok_or(TokenError::NoPin)?;
    let path = secrets::resolve(location).map_err(TokenError::Pin)?;
    secrets::read(&path).map_err(TokenError::Pin)
}

/// Whether the token's flags let the agent try its PIN at all. A token
/// one wrong PIN away from locking (`CKF_USER_PIN_FINAL_TRY`), or locked,
/// is never offered a PIN: an operator must check the PIN by hand. A low
/// count (`CKF_USER_PIN_COUNT_LOW`: wrong PINs since the last good login)
/// is logged; the recorded refusals decide then.
fn login_allowed(locked: bool, final_try: bool, count_low: bool) -> Result<(), TokenError> {
    if locked {
        return Err(TokenError::PinLocked);
    }
    if final_try {
        return Err(TokenError::PinFinalTry);
    }
    if count_low {
        tracing::warn!(
            "the token reports failed PIN logins since its last good one \
             (CKF_USER_PIN_COUNT_LOW); a wrong PIN now may bring it closer to locking"
        );
    }
    Ok(())
}

/// What a login needs besides the token: where the PIN is, where refused
/// PINs are recorded (the state directory; none for one-shot commands
/// without a configuration), and the PIN this process saw refused.
#[derive(Default)]
pub(crate) struct Login<'a> {
    pub(crate) location: Option<&'a str>,
    pub(crate) record: Option<&'a RefusedPins>,
    pub(crate) refused_here: Option<Zeroizing<String>>,
}

/// The slot whose token matches every token attribute of the URI; the
/// first token when the URI names none.
fn find_slot(context: &Pkcs11, uri: &Pkcs11Uri) -> Result<Slot, TokenError> {
    let slots = context
        .get_slots_with_token()
        .map_err(device("list its slots"))?;
    let mut present = Vec::new();
    for slot in slots {
        let Ok(info) = context.get_token_info(slot) else {
            continue;
        };
        let matches = uri.token.as_deref().is_none_or(|t| t == info.label())
            && uri
                .serial
                .as_deref()
                .is_none_or(|s| s == info.serial_number())
            && uri
                .manufacturer
                .as_deref()
                .is_none_or(|m| m == info.manufacturer_id())
            && uri.model.as_deref().is_none_or(|m| m == info.model())
            && uri.slot_id.is_none_or(|id| id == slot.id());
        if matches {
            return Ok(slot);
        }
        present.push(format!("{:?}", info.label()));
    }
    Err(TokenError::NoToken {
        wanted: uri.token_name(),
        present: if present.is_empty() {
            "none".to_owned()
        } else {
            present.join(", ")
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_locked_or_last_try_token_is_never_offered_a_pin() {
        assert!(matches!(
            login_allowed(true, false, true),
            Err(TokenError::PinLocked)
        ));
        assert!(matches!(
            login_allowed(false, true, true),
            Err(TokenError::PinFinalTry)
        ));
        assert!(login_allowed(false, false, true).is_ok());
        assert!(login_allowed(false, false, false).is_ok());
    }
}
