//! Platform API keys (`x-api-key`), when `PEAQOS_REQUIRE_API_AUTH` is on.
//!
//! Keys come from a file, one per line (`#` comments and blank lines
//! skipped). Only their keccak-256 digests are kept, and a presented key is
//! compared digest to digest in constant time against every key, so neither
//! timing nor a memory dump gives a key away.

use std::path::{Path, PathBuf};

use sha3::{Digest, Keccak256};
use subtle::{Choice, ConstantTimeEq};

/// Keys shorter than this are refused at start-up: they can be guessed.
pub const MIN_KEY_LEN: usize = 16;

/// Why the keys file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiKeysError {
    #[error("cannot read API keys file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("API keys file {path} line {line}: {message}")]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("API keys file {path} has no keys")]
    Empty { path: PathBuf },
}

/// Outcome of checking a request's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyCheck {
    Accepted,
    Missing,
    Invalid,
}

/// The accepted keys, as digests.
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeys")
            .field("count", &self.digests.len())
            .finish()
    }
}

fn digest(key: &[u8]) -> [u8; 32] {
    Keccak256::digest(key).into()
}

impl ApiKeys {
    pub fn load(path: &Path) -> Result<Self, ApiKeysError> {
        let text = std::fs::read_to_string(path).map_err(|e| ApiKeysError::Read {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        Self::parse(path, &text)
    }

    /// Parses key-file text; errors name the line, never the key.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ApiKeysError> {
        let mut digests = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let key = line.trim();
            if key.is_empty() || key.starts_with('#') {
                continue;
            }
            let bad = |message: String| ApiKeysError::Line {
                path: path.to_owned(),
                line: index + 1,
                message,
            };
            if key.len() < MIN_KEY_LEN {
                return Err(bad(format!("key is shorter than {MIN_KEY_LEN} characters")));
            }
            if !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(bad(
                    "key must be printable ASCII without spaces (it travels in an HTTP header)"
                        .to_owned(),
                ));
            }
            digests.push(digest(key.as_bytes()));
        }
        if digests.is_empty() {
            return Err(ApiKeysError::Empty {
                path: path.to_owned(),
            });
        }
        Ok(Self { digests })
    }

    /// Checks a presented header value.
    pub fn check(&self, presented: Option<&[u8]>) -> KeyCheck {
        let Some(presented) = presented else {
            return KeyCheck::Missing;
        };
        let presented = digest(presented);
        // Every key is compared; no early exit reveals which one matched.
        let mut found = Choice::from(0);
        for d in &self.digests {
            found |= d.ct_eq(&presented);
        }
        if bool::from(found) {
            KeyCheck::Accepted
        } else {
            KeyCheck::Invalid
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "/etc/peaqos/api-keys";

    #[test]
    fn keys_file_format() {
        let keys = ApiKeys::parse(
            Path::new(PATH),
            "# fleet A\nkey-aaaaaaaaaaaaaaaa\n\n  key-bbbbbbbbbbbbbbbb  \n",
        )
        .unwrap();
        assert_eq!(
            keys.check(Some(b"key-aaaaaaaaaaaaaaaa")),
            KeyCheck::Accepted
        );
        assert_eq!(
            keys.check(Some(b"key-bbbbbbbbbbbbbbbb")),
            KeyCheck::Accepted
        );
        assert_eq!(keys.check(Some(b"key-cccccccccccccccc")), KeyCheck::Invalid);
        assert_eq!(keys.check(Some(b"")), KeyCheck::Invalid);
        assert_eq!(keys.check(None), KeyCheck::Missing);
        assert!(!format!("{keys:?}").contains("aaaa"));
    }

    #[test]
    fn bad_files_name_the_line_not_the_key() {
        let err =
            ApiKeys::parse(Path::new(PATH), "key-aaaaaaaaaaaaaaaa\nshortsecret\n").unwrap_err();
        let shown = err.to_string();
        assert!(shown.contains("line 2"), "{shown}");
        assert!(!shown.contains("shortsecret"), "{shown}");
        assert!(matches!(
            ApiKeys::parse(Path::new(PATH), "# nothing\n"),
            Err(ApiKeysError::Empty { .. })
        ));
    }
}
