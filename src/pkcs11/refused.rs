//! A PIN the token refused, remembered across restarts, so that a wrong PIN
//! is offered to the token once and then not again until its file changes.
//! In memory alone the guard was lost at every exit 78, and the shipped
//! unit (`Restart=on-failure`) restarted the agent into another wrong login
//! every 20 s: three a minute, enough to lock a smart card or an HSM.
//!
//! What is remembered is the PIN file's identity (device, inode, size,
//! modification and change times), never anything computed from its
//! content: a PIN has so few possible values that any digest of it, keyed
//! or not, gives it away to whoever reads the digest and its key. Editing
//! the file, replacing it, or even `touch` changes the identity; the agent
//! then offers the PIN once more.
//!
//! For a systemd credential the file in `$CREDENTIALS_DIRECTORY` is a fresh
//! copy at every start, so the identity is taken from the credential's
//! source (the unit's effective `LoadCredential=`, [`secrets::unit_source`]).
//! When the source cannot be found, the copy's size is all that can be
//! compared, and it is only trusted while the token itself still reports
//! failed logins (`CKF_USER_PIN_COUNT_LOW`).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use peaqos_protocol::Timestamp;
use serde::{Deserialize, Serialize};

use crate::secrets;

/// File name inside the state directory. It holds no secret (mode 0644, so
/// that a marker written by `sudo peaqos-agent check` is read by the
/// service's user too).
pub(crate) const FILE_NAME: &str = "pkcs11-refused-pins.json";

/// Where a PIN came from, as far as telling a changed file apart goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PinFileIdentity {
    pub(crate) path: PathBuf,
    pub(crate) device: u64,
    pub(crate) inode: u64,
    pub(crate) size: u64,
    pub(crate) modified_ns: i64,
    pub(crate) changed_ns: i64,
    /// False for a credential copy whose source was not found: only its
    /// size means anything then.
    pub(crate) stable: bool,
}

impl PinFileIdentity {
    /// The identity of the file the PIN at `location` comes from.
    pub(crate) fn of(location: &str) -> Option<Self> {
        let (path, stable) = match location.strip_prefix(secrets::CREDENTIAL_PREFIX) {
            Some(name) => match secrets::unit_source(name, Path::new(secrets::UNIT_CONFIG_DIR))
                .filter(|p| p.metadata().is_ok())
            {
                Some(source) => (source, true),
                None => (secrets::resolve(location).ok()?, false),
            },
            None => (PathBuf::from(location), true),
        };
        let meta = path.metadata().ok()?;
        Some(Self {
            device: meta.dev(),
            inode: meta.ino(),
            size: meta.size(),
            modified_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            changed_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
            path,
            stable,
        })
    }

    /// Whether `self` (now) is the file that was refused as `then`.
    fn same_as(&self, then: &Self, count_low: bool) -> bool {
        if self.stable && then.stable {
            self == then
        } else {
            self.path == then.path && self.size == then.size && count_low
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Entry {
    /// The token's URI as configured (never holds a PIN: `pin-value` is
    /// refused by the parser).
    token: String,
    pin_file: PinFileIdentity,
    refused_at: Timestamp,
}

/// The refusals recorded in a state directory.
#[derive(Debug, Clone)]
pub(crate) struct RefusedPins {
    dir: PathBuf,
}

/// A refusal on record for the PIN file as it is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) refused_at: Timestamp,
    pub(crate) record: PathBuf,
}

impl RefusedPins {
    pub(crate) fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.to_owned(),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    fn entries(&self) -> Vec<Entry> {
        std::fs::read(self.path())
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    /// The refusal on record for `token` with the PIN file as it is now.
    pub(crate) fn find(
        &self,
        token: &str,
        now: &PinFileIdentity,
        count_low: bool,
    ) -> Option<Refusal> {
        self.entries()
            .into_iter()
            .find(|e| e.token == token && now.same_as(&e.pin_file, count_low))
            .map(|e| Refusal {
                refused_at: e.refused_at,
                record: self.path(),
            })
    }

    /// Records that `token` refused the PIN read from `pin_file`. A failure
    /// to record is logged: the login already happened, and the in-memory
    /// guard still holds for this process.
    pub(crate) fn remember(&self, token: &str, pin_file: PinFileIdentity) {
        let mut entries = self.entries();
        entries.retain(|e| e.token != token);
        entries.push(Entry {
            token: token.to_owned(),
            pin_file,
            refused_at: Timestamp::now(),
        });
        self.store(&entries);
    }

    /// Forgets the refusals of `token` (its PIN was accepted).
    pub(crate) fn forget(&self, token: &str) {
        let mut entries = self.entries();
        let before = entries.len();
        entries.retain(|e| e.token != token);
        if entries.len() != before {
            self.store(&entries);
        }
    }

    fn store(&self, entries: &[Entry]) {
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(&self.dir)?;
            let json = serde_json::to_vec_pretty(entries).map_err(std::io::Error::other)?;
            crate::state::write_atomically(&self.dir, FILE_NAME, &json, 0o644)
        };
        if let Err(e) = write() {
            tracing::warn!(
                file = %self.path().display(),
                "cannot record the refused PIN; a restart may offer it to the token again: {e}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "pkcs11:token=robot;object=controller?module-path=/m.so";

    #[test]
    fn a_refusal_holds_until_the_pin_file_changes_and_records_no_pin() {
        let dir = tempfile::tempdir().unwrap();
        let pin = dir.path().join("pin");
        std::fs::write(&pin, "0000\n").unwrap();
        let location = pin.to_str().unwrap();
        let refused = RefusedPins::new(&dir.path().join("state"));
        let now = PinFileIdentity::of(location).unwrap();
        assert_eq!(refused.find(TOKEN, &now, false), None);
        refused.remember(TOKEN, now.clone());
        // A restart: a new reader of the same directory finds it.
        let again = RefusedPins::new(&dir.path().join("state"));
        assert!(
            again
                .find(TOKEN, &PinFileIdentity::of(location).unwrap(), false)
                .is_some()
        );
        assert_eq!(again.find("pkcs11:token=other", &now, false), None);
        let record = std::fs::read_to_string(again.path()).unwrap();
        assert!(!record.contains("0000"), "{record}");

        // Rewritten with the same content (an editor's save): changed.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&pin, "0000\n").unwrap();
        assert_eq!(
            again.find(TOKEN, &PinFileIdentity::of(location).unwrap(), false),
            None
        );

        refused.remember(TOKEN, PinFileIdentity::of(location).unwrap());
        refused.forget(TOKEN);
        assert_eq!(
            refused.find(TOKEN, &PinFileIdentity::of(location).unwrap(), false),
            None
        );
    }

    #[test]
    fn a_credential_copy_without_its_source_counts_only_while_the_token_says_so() {
        let then = PinFileIdentity {
            path: "/run/credentials/peaqos-agent.service/token-pin".into(),
            device: 1,
            inode: 7,
            size: 5,
            modified_ns: 1,
            changed_ns: 1,
            stable: false,
        };
        let now = PinFileIdentity {
            inode: 9,
            modified_ns: 2,
            changed_ns: 2,
            ..then.clone()
        };
        assert!(now.same_as(&then, true));
        assert!(!now.same_as(&then, false));
        assert!(
            !PinFileIdentity {
                size: 6,
                ..now.clone()
            }
            .same_as(&then, true)
        );
    }
}
