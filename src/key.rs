//! Custody of the controller key: loading it (refusing files others can
//! read), generating it, and keeping it out of core dumps.
//!
//! The secret only ever lives in `SecretKey` (which wipes itself) and in
//! `Zeroizing` buffers on its way there; no error here carries key material.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use peaqos_protocol::{SecretKey, SecretKeyError};
use zeroize::Zeroizing;

use crate::keystore::{self, KeystoreError};
use crate::sealed::{self, SealedError, Sealing};
use crate::secrets::{self, SecretError};

/// Why the key could not be loaded or written. Never contains the key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot resolve key file location")]
    Locate(#[source] SecretError),
    #[error("cannot read key file {path}")]
    Metadata { path: PathBuf, source: io::Error },
    #[error(
        "key file {path} can be read by group or others (mode {mode:04o}); \
         fix it with: chmod 600 {path}"
    )]
    LoosePermissions { path: PathBuf, mode: u32 },
    #[error("key file {path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("cannot read key file")]
    Read(#[source] SecretError),
    #[error("key file {path} does not hold a usable secp256k1 key")]
    Format {
        path: PathBuf,
        source: SecretKeyError,
    },
    #[error(
        "key file {path} is an Ethereum keystore (JSON) but no password file is configured \
         ([identity] key_password_file)"
    )]
    KeystoreWithoutPassword { path: PathBuf },
    #[error("cannot read the keystore password")]
    Password(#[source] SecretError),
    #[error("cannot open keystore {path}")]
    Keystore {
        path: PathBuf,
        source: KeystoreError,
    },
    #[error("{path} already exists; refusing to overwrite a key")]
    Exists { path: PathBuf },
    #[error("cannot write key file {path}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot generate a key")]
    Generate(#[source] SecretKeyError),
    #[error("cannot unseal the key credential {path}")]
    Unseal { path: PathBuf, source: SealedError },
    #[error("cannot seal the new key")]
    Seal(#[source] SealedError),
}

/// How the key is held at rest, as `check` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// 64 hex digits in a file.
    Plaintext,
    /// An Ethereum V3 keystore, unlocked with its password file.
    Keystore,
    /// A systemd encrypted credential (`LoadCredentialEncrypted=`).
    Sealed(Sealing),
}

impl std::fmt::Display for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Plaintext => f.write_str("plaintext file: whoever reads it has the key"),
            Self::Keystore => f.write_str("Ethereum keystore (encrypted with its password file)"),
            Self::Sealed(sealing) => write!(f, "systemd credential, {sealing}"),
        }
    }
}

/// Facts about a key file that `check` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFileInfo {
    pub path: PathBuf,
    pub mode: u32,
    pub held: Held,
}

/// Checks that `path` is a regular file that only its owner can read.
pub fn check_permissions(path: &Path) -> Result<KeyFileInfo, KeyError> {
    let info = file_info(path)?;
    refuse_loose(&info)?;
    Ok(info)
}

fn file_info(path: &Path) -> Result<KeyFileInfo, KeyError> {
    let meta = std::fs::metadata(path).map_err(|source| KeyError::Metadata {
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_file() {
        return Err(KeyError::NotAFile {
            path: path.to_owned(),
        });
    }
    Ok(KeyFileInfo {
        path: path.to_owned(),
        mode: meta.mode() & 0o7777,
        held: Held::Plaintext,
    })
}

fn refuse_loose(info: &KeyFileInfo) -> Result<(), KeyError> {
    if info.mode & 0o077 != 0 {
        return Err(KeyError::LoosePermissions {
            path: info.path.clone(),
            mode: info.mode,
        });
    }
    Ok(())
}

/// Loads the controller key from a configured location (a path or
/// `credential:NAME`), with the keystore password's location if the key is
/// an Ethereum V3 keystore.
pub fn load(location: &str, password: Option<&str>) -> Result<(SecretKey, KeyFileInfo), KeyError> {
    let path = secrets::resolve(location).map_err(KeyError::Locate)?;
    let password = password
        .map(secrets::resolve)
        .transpose()
        .map_err(KeyError::Password)?;
    load_path(&path, password.as_deref())
}

/// Loads the controller key from a file: 64 hex digits, or a V3 keystore
/// unlocked with the password in `password_file`, or either of these
/// sealed as a systemd credential (a file the unit loads with
/// `LoadCredentialEncrypted=`, or one whose header says so), unsealed by
/// `systemd-creds` into this process.
pub fn load_path(
    path: &Path,
    password_file: Option<&Path>,
) -> Result<(SecretKey, KeyFileInfo), KeyError> {
    let mut info = file_info(path)?;
    let mut text = secrets::read(path).map_err(KeyError::Read)?;
    // Under systemd the unit's credentials arrive decrypted; only a
    // command run by hand looks the file up among the unit's sealed ones
    // (which may ask systemctl).
    let name = std::env::var_os("CREDENTIALS_DIRECTORY")
        .is_none()
        .then(|| secrets::sealed_name(path))
        .flatten();
    let sealing = sealed::sealing_of(&text);
    if name.is_some() || sealing.is_some() {
        let plain = sealed::unseal(path, name.as_deref()).map_err(|source| KeyError::Unseal {
            path: path.to_owned(),
            source,
        })?;
        text = Zeroizing::new(plain.trim_end_matches(['\n', '\r']).to_owned());
        info.held = Held::Sealed(sealing.unwrap_or(Sealing::Unknown));
    } else {
        // A sealed credential may be world-readable (systemd-creds writes
        // 0644): it opens only with the host key or the TPM. Plaintext may
        // not.
        refuse_loose(&info)?;
    }
    if keystore::looks_like_keystore(&text) {
        if info.held == Held::Plaintext {
            info.held = Held::Keystore;
        }
        let Some(password_file) = password_file else {
            return Err(KeyError::KeystoreWithoutPassword {
                path: path.to_owned(),
            });
        };
        let password = secrets::read(password_file).map_err(KeyError::Password)?;
        let key =
            keystore::decrypt(&text, password.as_bytes()).map_err(|source| KeyError::Keystore {
                path: path.to_owned(),
                source,
            })?;
        return Ok((key, info));
    }
    let key = SecretKey::from_hex(&text).map_err(|source| KeyError::Format {
        path: path.to_owned(),
        source,
    })?;
    Ok((key, info))
}

/// Generates a key into a new file with mode 0600 (never overwriting one),
/// flushed to disk before returning.
pub fn generate(path: &Path) -> Result<SecretKey, KeyError> {
    let key = SecretKey::generate().map_err(KeyError::Generate)?;
    let write_err = |source| KeyError::Write {
        path: path.to_owned(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                KeyError::Exists {
                    path: path.to_owned(),
                }
            } else {
                write_err(source)
            }
        })?;
    let hex = key.to_hex();
    let written = file
        .write_all(hex.as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all());
    if let Err(source) = written {
        // A half-written key file must not be mistaken for a key later.
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(write_err(source));
    }
    sync_parent(path).map_err(write_err)?;
    Ok(key)
}

/// Generates a key and seals it as the systemd credential `controller-key`
/// into the new file `out` (never overwriting one); the key reaches
/// `systemd-creds` on its stdin only. Returns the key and what sealed it.
pub fn generate_sealed(
    out: &Path,
    with: sealed::WithKey,
) -> Result<(SecretKey, Sealing), KeyError> {
    let key = SecretKey::generate().map_err(KeyError::Generate)?;
    let hex = key.to_hex();
    let sealing =
        sealed::seal(hex.as_bytes(), sealed::KEY_CREDENTIAL, with, out).map_err(|e| match e {
            SealedError::Exists { path } => KeyError::Exists { path },
            e => KeyError::Seal(e),
        })?;
    Ok((key, sealing))
}

/// fsyncs the directory holding `path`, so that a new name survives power loss.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// Keeps the key out of core dumps and away from same-user debuggers: core
/// size limit 0 and the process marked not dumpable. Best effort: returns
/// what failed so that the caller can log it.
pub fn harden_process() -> Result<(), io::Error> {
    use rustix::process::{DumpableBehavior, Resource, Rlimit, set_dumpable_behavior, setrlimit};
    setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )?;
    set_dumpable_behavior(DumpableBehavior::NotDumpable)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const DOC_KEY: &str = "b25c7db31feed9122727bf0939dc769a96564b2de4c4726d035b36ecf1e5b364";

    fn write_key(dir: &Path, text: &str, mode: u32) -> PathBuf {
        let path = dir.join("controller.key");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn loads_hex_with_or_without_prefix_and_newline() {
        let dir = tempfile::tempdir().unwrap();
        for text in [DOC_KEY.to_owned(), format!("0x{DOC_KEY}\n")] {
            let path = write_key(dir.path(), &text, 0o600);
            let (key, info) = load_path(&path, None).unwrap();
            assert_eq!(
                key.address().checksummed(),
                "0x5ce9454909639D2D17A3F753ce7d93fa0b9aB12E"
            );
            assert_eq!(info.mode, 0o600);
        }
    }

    #[test]
    fn refuses_group_or_other_readable_files_and_says_how_to_fix() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o640, 0o604, 0o644, 0o660] {
            let path = write_key(dir.path(), DOC_KEY, mode);
            let err = load_path(&path, None).unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, KeyError::LoosePermissions { .. }), "{text}");
            assert!(
                text.contains(&format!("chmod 600 {}", path.display())),
                "{text}"
            );
        }
        let path = write_key(dir.path(), DOC_KEY, 0o400);
        assert!(load_path(&path, None).is_ok(), "owner read-only is fine");
    }

    #[test]
    fn bad_contents_are_refused_without_echoing_them() {
        let dir = tempfile::tempdir().unwrap();
        let secretish = "deadbeef".repeat(7);
        let path = write_key(dir.path(), &secretish, 0o600);
        let err = load_path(&path, None).unwrap_err();
        let chain = format!("{err} {:?}", std::error::Error::source(&err));
        assert!(!chain.contains("deadbeef"), "{chain}");
        let path = write_key(dir.path(), "{\"crypto\": {}}", 0o600);
        assert!(matches!(
            load_path(&path, None).unwrap_err(),
            KeyError::KeystoreWithoutPassword { .. }
        ));
        let password = dir.path().join("password");
        std::fs::write(&password, "pw\n").unwrap();
        assert!(matches!(
            load_path(&path, Some(&password)).unwrap_err(),
            KeyError::Keystore { .. }
        ));
    }

    #[test]
    fn generate_writes_0600_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.key");
        let key = generate(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        let (loaded, _) = load_path(&path, None).unwrap();
        assert_eq!(loaded.address(), key.address());
        let before = std::fs::read(&path).unwrap();
        assert!(matches!(generate(&path), Err(KeyError::Exists { .. })));
        assert_eq!(std::fs::read(&path).unwrap(), before, "file untouched");
    }
}
