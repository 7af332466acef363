//! The local registry file: controller addresses of identities, for
//! self-hosted fleets without MCR access.
//!
//! ```toml
//! [identities]
//! "did:peaq:4242" = ["0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"]
//! "peaqos:machine:7" = ["0x...", "did:peaq:0x..."]
//! ```
//!
//! The file is re-read when its size, modification time or inode changes
//! (checked on each look-up, which the cache in front makes rare). A file
//! that fails to parse keeps the last good content and logs one error naming
//! the file and line; an identity absent from the file is not activated.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use peaqos_protocol::{Address, IdentityRef};
use serde::Deserialize;

use super::{ControllerSource, Resolution, SourceFuture, Unavailable};

/// Why a registry file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot read registry file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("registry file {path} line {line}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    #[serde(default)]
    identities: BTreeMap<toml::Spanned<String>, Vec<toml::Spanned<String>>>,
}

type Table = HashMap<IdentityRef, Arc<[Address]>>;

/// Parses registry text. Keys are any accepted identity form; values are
/// controller addresses, `0x...` or `did:peaq:0x...`.
pub fn parse(path: &Path, text: &str) -> Result<Table, RegistryError> {
    let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let error = |offset: usize, message: String| RegistryError::Parse {
        path: path.to_owned(),
        line: line_of(offset),
        message,
    };
    let file: RegistryFile = toml::from_str(text).map_err(|e| {
        error(
            e.span().map_or(0, |s| s.start),
            e.message().trim().to_owned(),
        )
    })?;
    let mut table = Table::new();
    let mut first_seen: HashMap<IdentityRef, String> = HashMap::new();
    for (key, values) in file.identities {
        let identity = IdentityRef::parse(key.get_ref()).map_err(|e| {
            error(
                key.span().start,
                format!("identity {:?}: {e}", key.get_ref()),
            )
        })?;
        if let Some(earlier) = first_seen.get(&identity) {
            return Err(error(
                key.span().start,
                format!(
                    "identity {:?} is listed twice (also as {earlier:?})",
                    key.get_ref()
                ),
            ));
        }
        first_seen.insert(identity.clone(), key.get_ref().clone());
        let mut controllers: Vec<Address> = Vec::with_capacity(values.len());
        for value in values {
            let text = value.get_ref();
            let hex = text.strip_prefix("did:peaq:").unwrap_or(text);
            let address = Address::parse(hex).map_err(|e| {
                error(
                    value.span().start,
                    format!("controller {text:?} of {:?}: {e}", key.get_ref()),
                )
            })?;
            if !controllers.contains(&address) {
                controllers.push(address);
            }
        }
        table.insert(identity, controllers.into());
    }
    Ok(table)
}

/// What identifies one version of the file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

impl Fingerprint {
    fn of(meta: &std::fs::Metadata) -> Self {
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(meta);
        #[cfg(not(unix))]
        let inode = 0;
        Self {
            len: meta.len(),
            modified: meta.modified().ok(),
            inode,
        }
    }
}

#[derive(Debug)]
struct State {
    table: Arc<Table>,
    /// The version the table was read from.
    loaded: Fingerprint,
    /// The last version that failed, so that it is reported once.
    failed: Option<Fingerprint>,
}

/// The registry file as a [`ControllerSource`].
#[derive(Debug)]
pub struct RegistrySource {
    path: PathBuf,
    state: Mutex<State>,
}

impl RegistrySource {
    /// Reads the file; it must exist and parse (a start-up error otherwise).
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        let read_error = |e: std::io::Error| RegistryError::Read {
            path: path.to_owned(),
            reason: e.to_string(),
        };
        let meta = std::fs::metadata(path).map_err(read_error)?;
        let text = std::fs::read_to_string(path).map_err(read_error)?;
        let table = parse(path, &text)?;
        Ok(Self {
            path: path.to_owned(),
            state: Mutex::new(State {
                table: Arc::new(table),
                loaded: Fingerprint::of(&meta),
                failed: None,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current table, re-read first if the file changed.
    fn table(&self) -> Arc<Table> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let meta = match std::fs::metadata(&self.path) {
            Ok(meta) => meta,
            Err(e) => {
                // A file being replaced may be missing for a moment; the last
                // good content stays in force either way.
                if state.failed.is_none() {
                    tracing::error!(
                        path = %self.path.display(),
                        error = %e,
                        "registry file unreadable; keeping its last good content"
                    );
                    state.failed = Some(state.loaded);
                }
                return Arc::clone(&state.table);
            }
        };
        let now = Fingerprint::of(&meta);
        if now == state.loaded || state.failed == Some(now) {
            return Arc::clone(&state.table);
        }
        let parsed = std::fs::read_to_string(&self.path)
            .map_err(|e| RegistryError::Read {
                path: self.path.clone(),
                reason: e.to_string(),
            })
            .and_then(|text| parse(&self.path, &text));
        match parsed {
            Ok(table) => {
                tracing::info!(
                    path = %self.path.display(),
                    identities = table.len(),
                    "registry file reloaded"
                );
                state.table = Arc::new(table);
                state.loaded = now;
                state.failed = None;
            }
            Err(e) => {
                tracing::error!(error = %e, "registry file not reloaded; keeping its last good content");
                state.failed = Some(now);
            }
        }
        Arc::clone(&state.table)
    }
}

impl ControllerSource for RegistrySource {
    fn name(&self) -> &'static str {
        "registry"
    }

    fn resolve<'a>(&'a self, identity: &'a IdentityRef) -> SourceFuture<'a, Resolution> {
        Box::pin(async move {
            Ok(self
                .table()
                .get(identity)
                .map_or(Resolution::NotFound, |c| Resolution::Found(Arc::clone(c))))
        })
    }

    fn covers_address_form(&self) -> bool {
        true
    }

    fn ready(&self) -> SourceFuture<'_, ()> {
        Box::pin(async move {
            if self.path.exists() {
                Ok(())
            } else {
                // The path is for the log, not for unauthenticated clients.
                tracing::warn!(path = %self.path.display(), "readiness: registry file is missing");
                Err(Unavailable {
                    reason: "registry file is missing".to_owned(),
                })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed";
    const B: &str = "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359";

    fn p(text: &str) -> Result<Table, RegistryError> {
        parse(Path::new("/etc/peaqos/registry.toml"), text)
    }

    #[test]
    fn parses_every_identity_form_and_address_form() {
        let text = format!(
            "[identities]\n\"did:peaq:4242\" = [\"{A}\"]\n\"peaqos:machine:7\" = [\"{A}\", \"did:peaq:{B}\", \"{}\"]\n",
            A.to_lowercase()
        );
        let t = p(&text).unwrap();
        let seven = &t[&IdentityRef::parse("did:peaq:7").unwrap()];
        assert_eq!(seven.len(), 2, "duplicates collapse");
        assert_eq!(seven[1].checksummed(), B);
        assert_eq!(t.len(), 2);
        assert!(p("").unwrap().is_empty());
    }

    #[test]
    fn the_example_file_parses() {
        let t = p(include_str!("../../../../config/registry.example.toml")).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[&IdentityRef::parse("did:peaq:7").unwrap()].len(), 2);
    }

    #[test]
    fn errors_name_file_line_and_entry() {
        let cases = [
            (
                format!("[identities]\n\n\"did:peaq:01\" = [\"{A}\"]\n"),
                3,
                "did:peaq:01",
            ),
            (
                format!("[identities]\n\"did:peaq:1\" = [\"{A}\",\n  \"0x12\"]\n"),
                3,
                "0x12",
            ),
            (
                format!("[identities]\n\"did:peaq:1\" = [\"{A}\"]\n\"peaqos:machine:1\" = []\n"),
                3,
                "twice",
            ),
            ("[identities\n".to_owned(), 1, ""),
            ("[identitees]\n".to_owned(), 1, "identitees"),
            (
                format!(
                    "[identities]\n\"did:peaq:1\" = [\"{}\"]\n",
                    &A[..41].to_owned()
                ),
                2,
                "40 hex",
            ),
        ];
        for (text, line, needle) in cases {
            let err = p(&text).unwrap_err();
            let shown = err.to_string();
            assert!(
                matches!(&err, RegistryError::Parse { line: l, .. } if *l == line),
                "{text:?}: {shown}"
            );
            assert!(shown.contains("/etc/peaqos/registry.toml"), "{shown}");
            assert!(shown.contains(needle), "{text:?}: {shown}");
        }
    }
}
