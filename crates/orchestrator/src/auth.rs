//! Platform API keys (`x-api-key`), when `PEAQOS_REQUIRE_API_AUTH` is on.
//!
//! Keys come from a file, one per line (`#` comments and blank lines
//! skipped): `NAME KEY`, or the key alone as files before names had it.
//! Only their keccak-256 digests are kept, and a presented key is compared
//! digest to digest in constant time against every key, so neither timing
//! nor a memory dump gives a key away.
//!
//! A key's name is who the audit trail says made a change. A key without
//! one is named `key-` and the first 8 hex digits of its digest: stable,
//! and 32 bits of a hash say nothing usable about a 16+ character key.
//!
//! A named key may end with its [`Role`] (`NAME KEY ROLE`); a key without
//! one (`NAME KEY`, or the key alone) is an `operator`, which may do
//! everything, as every key could before roles.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha3::{Digest, Keccak256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::audit::Caller;
pub use crate::roles::Role;

/// Keys shorter than this are refused at start-up: they can be guessed.
pub const MIN_KEY_LEN: usize = 16;
/// Longest key name.
pub const MAX_NAME_LEN: usize = 64;

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyCheck {
    /// A known key, and who it names.
    Accepted(Caller),
    Missing,
    Invalid,
}

/// The accepted keys, as digests, with their names.
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
    names: Vec<Arc<str>>,
    roles: Vec<Role>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeys")
            .field("count", &self.digests.len())
            .field("names", &self.names)
            .field("roles", &self.roles)
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
        let mut names: Vec<Arc<str>> = Vec::new();
        let mut roles = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |message: String| ApiKeysError::Line {
                path: path.to_owned(),
                line: index + 1,
                message,
            };
            let mut words = line.split_whitespace();
            let (name, key, role) = match (words.next(), words.next(), words.next(), words.next()) {
                (Some(key), None, ..) => (None, key, None),
                (Some(name), Some(key), None, _) => (Some(name), key, None),
                (Some(name), Some(key), Some(role), None) => (Some(name), key, Some(role)),
                _ => {
                    return Err(bad("expected `NAME KEY ROLE`, `NAME KEY` or a key alone \
                             (a key has no spaces)"
                        .to_owned()));
                }
            };
            // The third word is not echoed: a key pasted there by mistake
            // must not reach a log.
            let role = match role {
                None => Role::Operator,
                Some(word) => Role::parse(word).ok_or_else(|| {
                    bad(format!(
                        "the third word is not a role (one of {})",
                        Role::NAMES.join(", ")
                    ))
                })?,
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
            let digest = digest(key.as_bytes());
            let name: Arc<str> = match name {
                Some(name) => {
                    check_name(name).map_err(bad)?;
                    if names.iter().any(|n| &**n == name) {
                        return Err(bad(format!("the name {name:?} is given twice")));
                    }
                    name.into()
                }
                None => format!("key-{}", hex::encode(&digest[..4])).into(),
            };
            digests.push(digest);
            names.push(name);
            roles.push(role);
        }
        if digests.is_empty() {
            return Err(ApiKeysError::Empty {
                path: path.to_owned(),
            });
        }
        Ok(Self {
            digests,
            names,
            roles,
        })
    }

    /// Checks a presented header value.
    pub fn check(&self, presented: Option<&[u8]>) -> KeyCheck {
        let Some(presented) = presented else {
            return KeyCheck::Missing;
        };
        let presented = digest(presented);
        // Every key is compared and the match selected without a branch:
        // no early exit reveals which one matched.
        let mut found = u32::MAX;
        for (i, d) in self.digests.iter().enumerate() {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            found = u32::conditional_select(&found, &i, d.ct_eq(&presented));
        }
        let found = usize::try_from(found).ok();
        match found.and_then(|i| Some((self.names.get(i)?, self.roles.get(i)?))) {
            Some((name, role)) => KeyCheck::Accepted(Caller {
                key_name: Arc::clone(name),
                role: *role,
            }),
            None => KeyCheck::Invalid,
        }
    }
}

/// Names are for logs and the audit trail: short, plain, and never an
/// address (an actor that looks like one would pass for a signer).
fn check_name(name: &str) -> Result<(), String> {
    if name.len() > MAX_NAME_LEN {
        return Err(format!("key name is longer than {MAX_NAME_LEN} characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b))
    {
        return Err("key name may hold only letters, digits and . _ - @".to_owned());
    }
    if name.starts_with("0x") || name == "anonymous" {
        return Err(format!(
            "{name:?} cannot name a key (it reads as another actor)"
        ));
    }
    Ok(())
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
        let name = |k: &[u8]| match keys.check(Some(k)) {
            KeyCheck::Accepted(c) => c.key_name.to_string(),
            other => panic!("{other:?}"),
        };
        let unnamed = name(b"key-aaaaaaaaaaaaaaaa");
        assert!(
            unnamed.starts_with("key-") && unnamed.len() == 12,
            "{unnamed}"
        );
        assert_eq!(unnamed, name(b"key-aaaaaaaaaaaaaaaa"), "stable");
        assert_ne!(unnamed, name(b"key-bbbbbbbbbbbbbbbb"));
        assert_eq!(keys.check(Some(b"key-cccccccccccccccc")), KeyCheck::Invalid);
        assert_eq!(keys.check(Some(b"")), KeyCheck::Invalid);
        assert_eq!(keys.check(None), KeyCheck::Missing);
        assert!(!format!("{keys:?}").contains("aaaa"));
    }

    #[test]
    fn keys_can_be_named_beside_unnamed_ones() {
        let keys = ApiKeys::parse(
            Path::new(PATH),
            "fleet-a key-aaaaaaaaaaaaaaaa\nkey-bbbbbbbbbbbbbbbb\n  ops@example  key-cccccccccccccccc\n",
        )
        .unwrap();
        let name = |k: &[u8]| match keys.check(Some(k)) {
            KeyCheck::Accepted(c) => c.key_name.to_string(),
            other => panic!("{other:?}"),
        };
        assert_eq!(name(b"key-aaaaaaaaaaaaaaaa"), "fleet-a");
        assert_eq!(name(b"key-cccccccccccccccc"), "ops@example");
        assert!(name(b"key-bbbbbbbbbbbbbbbb").starts_with("key-"));
        // The name is not a key.
        assert_eq!(keys.check(Some(b"fleet-a")), KeyCheck::Invalid);
        for (text, says) in [
            ("a b key-aaaaaaaaaaaaaaaa c\n", "NAME KEY"),
            ("0xabc key-aaaaaaaaaaaaaaaa\n", "cannot name"),
            ("fleet/a key-aaaaaaaaaaaaaaaa\n", "only letters"),
            ("x key-aaaaaaaaaaaaaaaa\nx key-bbbbbbbbbbbbbbbb\n", "twice"),
        ] {
            let shown = ApiKeys::parse(Path::new(PATH), text)
                .unwrap_err()
                .to_string();
            assert!(shown.contains(says), "{text:?}: {shown}");
            assert!(!shown.contains("key-aaaa"), "{shown}");
        }
    }

    #[test]
    fn named_keys_may_carry_a_role_and_keys_without_one_may_do_everything() {
        let keys = ApiKeys::parse(
            Path::new(PATH),
            "dash key-aaaaaaaaaaaaaaaa read\nrobots key-bbbbbbbbbbbbbbbb agent\n\
             ops key-cccccccccccccccc operator\nold key-dddddddddddddddd\nkey-eeeeeeeeeeeeeeee\n",
        )
        .unwrap();
        let role = |k: &[u8]| match keys.check(Some(k)) {
            KeyCheck::Accepted(c) => c.role,
            other => panic!("{other:?}"),
        };
        assert_eq!(role(b"key-aaaaaaaaaaaaaaaa"), Role::Read);
        assert_eq!(role(b"key-bbbbbbbbbbbbbbbb"), Role::Agent);
        assert_eq!(role(b"key-cccccccccccccccc"), Role::Operator);
        assert_eq!(role(b"key-dddddddddddddddd"), Role::Operator);
        assert_eq!(role(b"key-eeeeeeeeeeeeeeee"), Role::Operator);
        for text in [
            "x key-aaaaaaaaaaaaaaaa admin\n",
            "x key-aaaaaaaaaaaaaaaa key-bbbbbbbbbbbbbbbb\n",
            "x key-aaaaaaaaaaaaaaaa read extra\n",
        ] {
            let shown = ApiKeys::parse(Path::new(PATH), text)
                .unwrap_err()
                .to_string();
            assert!(shown.contains("line 1"), "{shown}");
            assert!(
                !shown.contains("key-bbbb") && !shown.contains("admin"),
                "{shown}"
            );
        }
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
