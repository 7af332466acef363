//! Secrets (controller key, API key, broker password) come from files, never
//! from the TOML itself. Under systemd they arrive as credentials
//! (`LoadCredential=` puts them in `$CREDENTIALS_DIRECTORY`, readable only
//! by the service).

use std::io;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// Prefix of a config value that names a systemd credential instead of a path.
pub const CREDENTIAL_PREFIX: &str = "credential:";

/// Why a secret could not be read. Never contains the secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read secret file {path}")]
    Read { path: PathBuf, source: io::Error },
    #[error("secret {name:?} names a systemd credential but $CREDENTIALS_DIRECTORY is not set")]
    NoCredentialsDirectory { name: String },
    #[error("secret file {path} is empty")]
    Empty { path: PathBuf },
}

/// Resolves a configured secret location: `credential:<name>` means
/// `$CREDENTIALS_DIRECTORY/<name>`; anything else is a path.
pub fn resolve(location: &str) -> Result<PathBuf, SecretError> {
    match location.strip_prefix(CREDENTIAL_PREFIX) {
        Some(name) => std::env::var_os("CREDENTIALS_DIRECTORY")
            .map(|dir| Path::new(&dir).join(name))
            .ok_or_else(|| SecretError::NoCredentialsDirectory {
                name: name.to_owned(),
            }),
        None => Ok(PathBuf::from(location)),
    }
}

/// Reads a secret file, trimming the trailing newline editors add. The
/// returned buffer is wiped when dropped.
pub fn read(path: &Path) -> Result<Zeroizing<String>, SecretError> {
    let text =
        Zeroizing::new(
            std::fs::read_to_string(path).map_err(|source| SecretError::Read {
                path: path.to_owned(),
                source,
            })?,
        );
    let trimmed = Zeroizing::new(text.trim_end_matches(['\n', '\r']).to_owned());
    if trimmed.is_empty() {
        return Err(SecretError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(trimmed)
}
