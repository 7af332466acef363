//! Staged key rotation: a successor key is made beside the current one,
//! under the same protection, and waits until the owner makes it a
//! controller; the registration loop then proves with it, promotes it and
//! retires the old key (`src/registration/rotate.rs`).
//!
//! Keys the agent writes, and the rotation's record, live in the machine's
//! state directory, `<state dir>/keys/` (writable under the unit's
//! `ProtectSystem=strict`; `/etc/peaqos-agent` stays read-only). The record
//! (`keys/rotation.json`) is replaced whole (temp file, fsync, rename,
//! fsync of the directory), and each step is durable before the next one
//! starts, so that after a power cut at any point the machine has a key
//! that is a controller: the current key until the successor's proof is
//! accepted and the record says it is promoted, the successor after.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use peaqos_logging::error_chain;
use peaqos_protocol::{Address, SecretKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::config::{IdentityConfig, KeySource, RetireOldKey};
use crate::key::{self, Held, KeyError};
use crate::keystore::{self, KeystoreError};
use crate::secrets;
use crate::signer::{OpenError, Signer};
use crate::state::write_atomically;

/// The directory, inside a machine's state directory, of the keys the
/// agent writes and of the rotation record.
pub const DIR: &str = "keys";
const RECORD: &str = "rotation.json";
const VERSION: u32 = 1;
/// Test only: after the named step is durable and journalled, the agent
/// logs and sleeps forever, so that a test can kill -9 it exactly there.
pub const HOLD_ENV: &str = "PEAQOS_AGENT_TEST_HOLD_AFTER";

/// Where a key is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Location {
    /// The key the configuration names.
    Configured,
    /// A key file the agent wrote (in `keys/`).
    File { path: PathBuf },
    /// A key pair the agent generated on the configured key's token.
    Pkcs11 { uri: String },
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Configured => f.write_str("the configured key"),
            Self::File { path } => write!(f, "{}", path.display()),
            Self::Pkcs11 { uri } => f.write_str(uri),
        }
    }
}

/// A key the record names: its address and where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRef {
    pub address: Address,
    pub location: Location,
}

/// The rotation record of one machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub version: u32,
    /// The configured key's address when rotation began: a configuration
    /// naming another key since then wins, and the record is dropped.
    pub configured: Address,
    /// The key in use when it is not the configured one (promoted).
    #[serde(default)]
    pub current: Option<KeyRef>,
    /// The successor, waiting to become a controller.
    #[serde(default)]
    pub next: Option<KeyRef>,
    /// A promoted-away key not retired yet.
    #[serde(default)]
    pub retiring: Option<KeyRef>,
    /// Retired keys still on disk (kept, or a configured file the agent may
    /// not delete): never signed with again; `check` names them.
    #[serde(default)]
    pub retired: Vec<KeyRef>,
    /// The successor is a plaintext file standing in for a sealed key.
    #[serde(default)]
    pub next_unsealed: bool,
}

/// A step of rotation, as the journal records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Prepared,
    Proven,
    Promoted,
    Retired,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prepared => "prepared",
            Self::Proven => "proven",
            Self::Promoted => "promoted",
            Self::Retired => "retired",
        }
    }

    /// Whether the test-only hold asks to stop after this step.
    pub fn held(self) -> bool {
        std::env::var(HOLD_ENV).is_ok_and(|v| v == self.as_str())
    }
}

/// Why a rotation step failed. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error("a successor key {0} is already waiting to become a controller")]
    Pending(String),
    #[error("cannot read the current key to match its protection")]
    Current(#[source] KeyError),
    #[error("cannot read the keystore to match its protection")]
    Keystore(#[source] KeystoreError),
    #[error("cannot write {path}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot generate a key")]
    Generate(#[source] peaqos_protocol::SecretKeyError),
    #[cfg(feature = "pkcs11")]
    #[error("the token refused")]
    Token(#[source] crate::pkcs11::TokenError),
    #[error("the successor's PKCS#11 URI")]
    Uri(#[source] crate::pkcs11::UriError),
    #[error("cannot delete the retired key {path}")]
    Delete { path: PathBuf, source: io::Error },
}

/// `<state dir>/keys`.
pub fn keys_dir(state_dir: &Path) -> PathBuf {
    state_dir.join(DIR)
}

impl Record {
    /// The record in `keys`, if any. One that cannot be read is logged and
    /// ignored: the configured key is then used, which is a controller
    /// unless a promotion happened, and a promotion wrote a readable one.
    pub fn load(keys: &Path) -> Option<Self> {
        let path = keys.join(RECORD);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(file = %path.display(), "cannot read the key rotation record: {e}");
                return None;
            }
        };
        match serde_json::from_slice::<Self>(&bytes) {
            Ok(r) if r.version == VERSION => Some(r),
            Ok(r) => {
                tracing::warn!(file = %path.display(), version = r.version, "unsupported key rotation record; ignored");
                None
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), "unreadable key rotation record, ignored: {e}");
                None
            }
        }
    }

    /// Writes the record durably (temp file, fsync, rename, fsync).
    pub fn save(&self, keys: &Path) -> Result<(), RotateError> {
        let path = keys.join(RECORD);
        let write = || -> io::Result<()> {
            make_dir(keys)?;
            let mut json = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
            json.push(b'\n');
            write_atomically(keys, RECORD, &json, 0o600)?;
            adopt(&path, keys);
            Ok(())
        };
        write().map_err(|source| RotateError::Write { path, source })
    }

    /// The key in use: the promoted one, else the configured one.
    pub fn current_ref(record: Option<&Self>, address: Address) -> KeyRef {
        record
            .and_then(|r| r.current.clone())
            .filter(|c| c.address == address)
            .unwrap_or(KeyRef {
                address,
                location: Location::Configured,
            })
    }
}

/// Removes the record (the configuration names another key now).
fn drop_record(keys: &Path) {
    let path = keys.join(RECORD);
    if fs::remove_file(&path).is_ok() {
        let _ = key::sync_parent(&path);
    }
}

/// `keys/` with mode 0700, owned as the state directory is.
fn make_dir(keys: &Path) -> io::Result<()> {
    if !keys.is_dir() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(keys)?;
        if let Some(parent) = keys.parent() {
            adopt(keys, parent);
        }
    }
    Ok(())
}

/// Gives `path` the owner of `like` when they differ: `key rotate` run as
/// root writes files that the service user must read. Best effort: only
/// root may change owners, and a service writing its own files needs not.
fn adopt(path: &Path, like: &Path) {
    let (Ok(mine), Ok(theirs)) = (fs::metadata(path), fs::metadata(like)) else {
        return;
    };
    if (mine.uid(), mine.gid()) != (theirs.uid(), theirs.gid()) {
        let _ = std::os::unix::fs::chown(path, Some(theirs.uid()), Some(theirs.gid()));
    }
}

/// Opens the key a machine signs with: the configured key, unless its
/// rotation record says that a promoted key replaced it. When the
/// configured key is another one than rotation started from (an operator
/// changed the configuration), the configuration wins and the record is
/// dropped.
pub fn open_effective(
    identity: &IdentityConfig,
    state_dir: &Path,
    state_root: &Path,
) -> Result<Signer, OpenError> {
    let keys = keys_dir(state_dir);
    let configured = Signer::open(identity, Some(state_root));
    let Some(record) = Record::load(&keys) else {
        return configured;
    };
    let current = record.current.clone();
    match configured {
        Ok(key)
            if key.address() != record.configured
                && current.as_ref().is_none_or(|c| c.address != key.address()) =>
        {
            tracing::warn!(
                configured = %key.address().checksummed(),
                rotated_from = %record.configured.checksummed(),
                "the configuration names another key than key rotation started from; \
                 following the configuration and dropping the rotation record"
            );
            drop_record(&keys);
            Ok(key)
        }
        Ok(key) if current.as_ref().is_some_and(|c| c.address == key.address()) => {
            // The operator now configures the promoted key (sealed it, for
            // example): the configuration names it, the record follows.
            tracing::info!(
                controller = %key.address().checksummed(),
                "the configuration names the rotated key now"
            );
            let record = Record {
                configured: key.address(),
                current: None,
                ..record
            };
            if let Err(e) = record.save(&keys) {
                log_failure("cannot update the record", &e);
            }
            Ok(key)
        }
        configured => match current {
            Some(current) => open_ref(&current, identity, state_root),
            None => configured,
        },
    }
}

/// Opens a key the record names, checking that it is the one recorded.
pub fn open_ref(
    at: &KeyRef,
    identity: &IdentityConfig,
    state_root: &Path,
) -> Result<Signer, OpenError> {
    let key = match &at.location {
        Location::Configured => Signer::open(identity, Some(state_root))?,
        Location::File { path } => {
            let password = identity
                .key_password_file
                .as_deref()
                .map(secrets::resolve)
                .transpose()
                .map_err(|e| OpenError::File(KeyError::Password(e)))?;
            let (key, _) = key::load_path(path, password.as_deref()).map_err(OpenError::File)?;
            Signer::from(key)
        }
        #[cfg(feature = "pkcs11")]
        Location::Pkcs11 { uri } => {
            let (parsed, pin) = token_of(identity, uri);
            let parsed = parsed.map_err(|_| OpenError::Rotated {
                location: uri.clone(),
                expected: at.address.checksummed(),
            })?;
            let opened = crate::pkcs11::TokenKey::open(parsed, pin, Some(state_root));
            Signer::Token(std::sync::Arc::new(opened.map_err(|source| {
                OpenError::Token {
                    uri: uri.clone(),
                    source,
                }
            })?))
        }
        #[cfg(not(feature = "pkcs11"))]
        Location::Pkcs11 { uri } => {
            return Err(OpenError::Rotated {
                location: uri.clone(),
                expected: at.address.checksummed(),
            });
        }
    };
    if key.address() == at.address {
        Ok(key)
    } else {
        Err(OpenError::Rotated {
            location: at.location.to_string(),
            expected: at.address.checksummed(),
        })
    }
}

/// A rotated key's URI and the configured PIN's location.
#[cfg(feature = "pkcs11")]
fn token_of(
    identity: &IdentityConfig,
    uri: &str,
) -> (
    Result<crate::pkcs11::Pkcs11Uri, crate::pkcs11::UriError>,
    Option<String>,
) {
    let pin = match identity.key_source() {
        KeySource::Token { pin, .. } => pin,
        KeySource::File { .. } => None,
    };
    (uri.parse(), pin)
}

/// How the current key is held, which its successor copies.
enum Protection {
    Plain {
        mode: u32,
    },
    Keystore {
        like: Zeroizing<String>,
        password: PathBuf,
    },
    /// A sealed credential: the sandboxed agent cannot seal, so the
    /// successor is a 0600 plaintext file until an operator seals it.
    Sealed,
    #[cfg(feature = "pkcs11")]
    Token {
        uri: Box<crate::pkcs11::Pkcs11Uri>,
        pin: Option<String>,
    },
}

fn protection(at: &KeyRef, identity: &IdentityConfig) -> Result<Protection, RotateError> {
    let password = || {
        identity
            .key_password_file
            .as_deref()
            .map(secrets::resolve)
            .transpose()
            .map_err(|e| RotateError::Current(KeyError::Password(e)))
    };
    let path = match (&at.location, identity.key_source()) {
        (Location::File { path }, _) => path.clone(),
        #[cfg(feature = "pkcs11")]
        (Location::Pkcs11 { uri }, _) => {
            let (parsed, pin) = token_of(identity, uri);
            let uri = parsed.map_err(RotateError::Uri)?;
            return Ok(Protection::Token {
                uri: Box::new(uri),
                pin,
            });
        }
        #[cfg(feature = "pkcs11")]
        (Location::Configured, KeySource::Token { uri, pin }) => {
            return Ok(Protection::Token {
                uri: Box::new(uri.clone()),
                pin,
            });
        }
        (Location::Configured, KeySource::File { location, .. }) => {
            // Under systemd a sealed credential arrives decrypted: only the
            // unit says it was sealed at rest.
            if location
                .strip_prefix(secrets::CREDENTIAL_PREFIX)
                .is_some_and(secrets::loaded_sealed)
            {
                return Ok(Protection::Sealed);
            }
            secrets::resolve(location).map_err(|e| RotateError::Current(KeyError::Locate(e)))?
        }
        #[allow(unreachable_patterns)]
        _ => unreachable!("a token location without the pkcs11 feature"),
    };
    let password = password()?;
    let (_, info) = key::load_path(&path, password.as_deref()).map_err(RotateError::Current)?;
    Ok(match info.held {
        Held::Plaintext => Protection::Plain { mode: info.mode },
        Held::Sealed(_) => Protection::Sealed,
        Held::Keystore => Protection::Keystore {
            like: secrets::read(&path).map_err(|e| RotateError::Current(KeyError::Read(e)))?,
            password: password.expect("a keystore opened with its password"),
        },
    })
}

/// Makes a successor for the key `current` (the address the machine signs
/// with now) under the same protection, and records it durably. Returns
/// its address and whether it stands in for a sealed key (a plaintext
/// file an operator should seal).
pub fn prepare(
    identity: &IdentityConfig,
    state_dir: &Path,
    current: Address,
) -> Result<(Address, bool), RotateError> {
    let keys = keys_dir(state_dir);
    let record = Record::load(&keys);
    if let Some(next) = record.as_ref().and_then(|r| r.next.as_ref()) {
        return Err(RotateError::Pending(next.address.checksummed()));
    }
    let at = Record::current_ref(record.as_ref(), current);
    let protection = protection(&at, identity)?;
    make_dir(&keys).map_err(|source| RotateError::Write {
        path: keys.clone(),
        source,
    })?;
    let sealed = matches!(protection, Protection::Sealed);
    let next = match protection {
        Protection::Plain { mode } => write_key(&keys, "key", mode, |k| Ok(k.to_hex()))?,
        Protection::Sealed => write_key(&keys, "key", 0o600, |k| Ok(k.to_hex()))?,
        Protection::Keystore { like, password } => {
            let password = secrets::read(&password)
                .map_err(|e| RotateError::Current(KeyError::Password(e)))?;
            write_key(&keys, "json", 0o600, |k| {
                keystore::encrypt_like(&like, k, password.as_bytes())
                    .map(Zeroizing::new)
                    .map_err(RotateError::Keystore)
            })?
        }
        #[cfg(feature = "pkcs11")]
        Protection::Token { uri, pin } => {
            let mut id = vec![0u8; 8];
            getrandom::fill(&mut id)
                .map_err(|_| RotateError::Token(crate::pkcs11::TokenError::Random))?;
            let sibling = uri.sibling(&id).map_err(RotateError::Uri)?;
            let address =
                crate::pkcs11::generate(&sibling, pin.as_deref()).map_err(RotateError::Token)?;
            KeyRef {
                address,
                location: Location::Pkcs11 {
                    uri: sibling.as_str().to_owned(),
                },
            }
        }
    };
    let address = next.address;
    let mut record = record.unwrap_or(Record {
        version: VERSION,
        configured: current,
        current: None,
        next: None,
        retiring: None,
        retired: Vec::new(),
        next_unsealed: false,
    });
    record.next = Some(next);
    record.next_unsealed = sealed;
    record.save(&keys)?;
    Ok((address, sealed))
}

/// Generates a key and writes it as `keys/<address>.<ext>` with `mode`,
/// durably; the file holds what `encode` makes of it.
fn write_key(
    keys: &Path,
    ext: &str,
    mode: u32,
    encode: impl FnOnce(&SecretKey) -> Result<Zeroizing<String>, RotateError>,
) -> Result<KeyRef, RotateError> {
    let key = SecretKey::generate().map_err(RotateError::Generate)?;
    let name = format!("{}.{ext}", key.address().checksummed());
    let path = keys.join(&name);
    let mut text = encode(&key)?;
    text.push('\n');
    write_atomically(keys, &name, text.as_bytes(), mode).map_err(|source| RotateError::Write {
        path: path.clone(),
        source,
    })?;
    adopt(&path, keys);
    Ok(KeyRef {
        address: key.address(),
        location: Location::File { path },
    })
}

/// Retires a key that no longer signs: per `[identity] retire_old_key`,
/// destroys it (unlinks an agent-written file, destroys a token's key
/// pair) or keeps it. Returns the key when it stays on disk (kept, or a
/// configured file, which belongs to the operator and may sit on a
/// read-only `/etc` or be a credential).
pub fn retire(old: &KeyRef, identity: &IdentityConfig) -> Result<Option<KeyRef>, RotateError> {
    if identity.retire_old_key == RetireOldKey::Keep {
        return Ok(Some(old.clone()));
    }
    match (&old.location, identity.key_source()) {
        (Location::File { path }, _) => {
            match fs::remove_file(path) {
                Ok(()) => key::sync_parent(path),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            }
            .map_err(|source| RotateError::Delete {
                path: path.clone(),
                source,
            })?;
            Ok(None)
        }
        #[cfg(feature = "pkcs11")]
        (Location::Pkcs11 { uri }, _) => {
            let (parsed, pin) = token_of(identity, uri);
            let uri = parsed.map_err(RotateError::Uri)?;
            crate::pkcs11::destroy(&uri, pin.as_deref()).map_err(RotateError::Token)?;
            Ok(None)
        }
        #[cfg(feature = "pkcs11")]
        (Location::Configured, KeySource::Token { uri, pin }) => {
            crate::pkcs11::destroy(uri, pin.as_deref()).map_err(RotateError::Token)?;
            Ok(None)
        }
        _ => Ok(Some(old.clone())),
    }
}

/// The file a retired key still lives in, for `check`'s advice.
pub fn retired_file(at: &KeyRef, identity: &IdentityConfig) -> Option<String> {
    match (&at.location, identity.key_source()) {
        (Location::File { path }, _) => Some(path.display().to_string()),
        (Location::Configured, KeySource::File { location, .. }) => Some(
            location
                .strip_prefix(secrets::CREDENTIAL_PREFIX)
                .and_then(|name| secrets::unit_source(name, Path::new(secrets::UNIT_CONFIG_DIR)))
                .map_or_else(|| location.to_owned(), |p| p.display().to_string()),
        ),
        _ => None,
    }
}

/// Logs a step in the journal once it is durable (addresses, never keys);
/// the machine's span adds its name.
pub fn journal(step: Step, old: Address, new: Address) {
    tracing::info!(
        rotation_step = step.as_str(),
        old_controller = %old.checksummed(),
        new_controller = %new.checksummed(),
        "key rotation: {}",
        step.as_str()
    );
}

/// Logs why a rotation step failed.
pub fn log_failure(what: &str, e: &RotateError) {
    tracing::warn!("key rotation: {what}: {}", error_chain(e));
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn identity(key: &Path) -> IdentityConfig {
        toml::from_str(&format!(
            "ref = \"did:peaq:1\"\nkey_file = \"{}\"\n",
            key.display()
        ))
        .unwrap()
    }

    fn write(path: &Path, key: &SecretKey) {
        std::fs::write(path, format!("{}\n", key.to_hex().as_str())).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    #[test]
    fn the_key_at_start_follows_the_record_unless_the_configuration_changed() {
        let dir = tempfile::tempdir().unwrap();
        let (state, configured) = (dir.path().join("state"), dir.path().join("c.key"));
        let old = SecretKey::generate().unwrap();
        write(&configured, &old);
        let id = identity(&configured);
        let open = || open_effective(&id, &state, dir.path()).unwrap().address();
        assert_eq!(open(), old.address(), "no record: the configured key");

        let (next, sealed) = prepare(&id, &state, old.address()).unwrap();
        assert!(!sealed);
        assert_eq!(
            open(),
            old.address(),
            "a successor waits: still the configured key"
        );
        assert!(matches!(
            prepare(&id, &state, old.address()),
            Err(RotateError::Pending(a)) if a == next.checksummed()
        ));

        // Promoted: the successor, even with the configured file gone.
        let keys = keys_dir(&state);
        let mut record = Record::load(&keys).unwrap();
        record.current = record.next.take();
        record.save(&keys).unwrap();
        assert_eq!(open(), next);
        std::fs::remove_file(&configured).unwrap();
        assert_eq!(open(), next);

        // The operator configures another key: it wins, the record goes.
        let other = SecretKey::generate().unwrap();
        write(&configured, &other);
        assert_eq!(open(), other.address());
        assert!(Record::load(&keys).is_none());
    }

    #[test]
    fn a_configuration_naming_the_promoted_key_takes_it_over() {
        let dir = tempfile::tempdir().unwrap();
        let (state, configured) = (dir.path().join("state"), dir.path().join("c.key"));
        let old = SecretKey::generate().unwrap();
        write(&configured, &old);
        let id = identity(&configured);
        let (next, _) = prepare(&id, &state, old.address()).unwrap();
        let keys = keys_dir(&state);
        let mut record = Record::load(&keys).unwrap();
        let successor = record.next.take().unwrap();
        record.current = Some(successor.clone());
        record.save(&keys).unwrap();
        // The operator sealed (here: copied) the successor and configures it.
        let Location::File { path } = &successor.location else {
            panic!("{successor:?}")
        };
        std::fs::copy(path, &configured).unwrap();
        assert_eq!(
            open_effective(&id, &state, dir.path()).unwrap().address(),
            next
        );
        let record = Record::load(&keys).unwrap();
        assert_eq!((record.configured, record.current), (next, None));
    }

    #[test]
    fn retiring_unlinks_agent_files_and_keeps_configured_ones() {
        let dir = tempfile::tempdir().unwrap();
        let configured = dir.path().join("c.key");
        write(&configured, &SecretKey::generate().unwrap());
        let agent_file = dir.path().join("a.key");
        write(&agent_file, &SecretKey::generate().unwrap());
        let id = identity(&configured);
        let address = SecretKey::generate().unwrap().address();
        let file = KeyRef {
            address,
            location: Location::File {
                path: agent_file.clone(),
            },
        };
        assert_eq!(retire(&file, &id).unwrap(), None);
        assert!(!agent_file.exists());
        let own = KeyRef {
            address,
            location: Location::Configured,
        };
        assert_eq!(retire(&own, &id).unwrap(), Some(own.clone()));
        assert!(configured.exists());
        assert_eq!(retired_file(&own, &id).as_deref(), configured.to_str());
        let mut keep = id.clone();
        keep.retire_old_key = RetireOldKey::Keep;
        write(&agent_file, &SecretKey::generate().unwrap());
        assert_eq!(retire(&file, &keep).unwrap(), Some(file.clone()));
        assert!(agent_file.exists());
    }
}
