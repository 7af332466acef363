//! `check`'s lines about the controller key: how it is held at rest
//! (plaintext file, keystore, sealed credential, PKCS#11 token), the key
//! file (path, mode, address), or the token (which token and key, whether
//! the token promises that the key cannot be read out, and a test signature
//! that verifies).

use std::path::Path;

use peaqos_logging::error_chain;
use peaqos_protocol::Address;

use super::{Outcome, Report};
use crate::config::{IdentityConfig, KeySource};
use crate::key;

/// The names of the lines `check_key` may print, for the skips of a
/// configuration that did not load.
pub(super) const LINES: [&str; 2] = ["key", "key file"];

/// Pushes the key's lines and returns its address if the key is usable.
pub(super) fn check_key(
    r: &mut Report,
    identity: &IdentityConfig,
    state_root: &Path,
) -> Option<Address> {
    match identity.key_source() {
        KeySource::File { location, password } => match key::load(location, password) {
            Ok((key, info)) => {
                r.push(Outcome::Ok, "key", info.held.to_string());
                if matches!(info.held, key::Held::Sealed(_)) {
                    plaintext_beside(r, &info.path, key.address());
                }
                r.push(
                    Outcome::Ok,
                    "key file",
                    format!(
                        "{}: mode {:04o}, controller address {}",
                        info.path.display(),
                        info.mode,
                        key.address().checksummed()
                    ),
                );
                Some(key.address())
            }
            Err(e) => {
                r.push(Outcome::Fail, "key file", error_chain(&e));
                None
            }
        },
        #[cfg(feature = "pkcs11")]
        KeySource::Token { .. } => check_token(r, identity, state_root),
        #[cfg(not(feature = "pkcs11"))]
        KeySource::Token { .. } => unreachable!("Config::check refuses it in this build"),
    }
}

/// A sealed key defeats its purpose while the plaintext it was made from
/// stays beside it (`controller.key` next to `controller.key.cred`).
fn plaintext_beside(r: &mut Report, sealed: &Path, address: Address) {
    let Some(plain) = sealed
        .to_str()
        .and_then(|s| s.strip_suffix(".cred"))
        .map(Path::new)
    else {
        return;
    };
    if !plain.exists() {
        return;
    }
    let same = match key::load_path(plain, None) {
        Ok((other, info)) if info.held == key::Held::Plaintext => {
            if other.address() == address {
                "the same key, "
            } else {
                "another key, "
            }
        }
        // Sealed itself, or not a key: nothing in the clear to warn about.
        Ok(_) => return,
        Err(_) => "",
    };
    r.push(
        Outcome::Warn,
        "key plaintext",
        format!(
            "{} is still on disk beside the sealed {} ({same}readable by whoever copies the \
             disk); once the address above is the controller, remove it: shred -u {}",
            plain.display(),
            sealed.display(),
            plain.display()
        ),
    );
}

#[cfg(feature = "pkcs11")]
fn check_token(r: &mut Report, identity: &IdentityConfig, state_root: &Path) -> Option<Address> {
    use crate::pkcs11;
    use crate::signer::Signer;

    let signer = match Signer::open(identity, Some(state_root)) {
        Ok(s) => s,
        Err(e) => {
            r.push(Outcome::Fail, "key token", error_chain(&e));
            r.push(Outcome::Skip, "key guarded", "needs the token");
            r.push(Outcome::Skip, "key signature", "needs the token");
            return None;
        }
    };
    let Signer::Token(token) = &signer else {
        unreachable!("a pkcs11 key source opens a token")
    };
    if let Some(file) = &identity.key_file {
        r.push(
            Outcome::Ok,
            "key file",
            format!("{file}: not used ([identity] key names a token; never a fallback)"),
        );
    }
    let address = token.address();
    r.push(Outcome::Ok, "key", "PKCS#11 token: the key never leaves it");
    match pkcs11::inspect(token) {
        Ok(report) => {
            r.push(
                Outcome::Ok,
                "key token",
                format!(
                    "token {:?} ({} {}, serial {}), {}: controller address {}",
                    report.token_label,
                    report.manufacturer,
                    report.model,
                    report.serial,
                    report.key,
                    address.checksummed()
                ),
            );
            let flags = format!(
                "CKA_SENSITIVE={}, CKA_EXTRACTABLE={}, CKA_ALWAYS_SENSITIVE={}, \
                 CKA_NEVER_EXTRACTABLE={}",
                show(report.sensitive),
                show(report.extractable),
                show(report.always_sensitive),
                show(report.never_extractable)
            );
            if report.key_is_protected() {
                r.push(
                    Outcome::Ok,
                    "key guarded",
                    format!("{flags}: the token never hands the key out"),
                );
            } else {
                r.push(
                    Outcome::Fail,
                    "key guarded",
                    format!(
                        "{flags}: the token may hand the key out; generate a new key with \
                         `peaqos-agent keygen --pkcs11 URI` and make it the controller"
                    ),
                );
            }
        }
        Err(e) => {
            r.push(Outcome::Fail, "key token", error_chain(&e));
            r.push(Outcome::Skip, "key guarded", "needs the token");
        }
    }
    match pkcs11::test_signature(token) {
        Ok(()) => r.push(
            Outcome::Ok,
            "key signature",
            format!(
                "the token signed a test text; it recovers to {}",
                address.checksummed()
            ),
        ),
        Err(e) => {
            r.push(Outcome::Fail, "key signature", error_chain(&e));
            return None;
        }
    }
    Some(address)
}

#[cfg(feature = "pkcs11")]
fn show(flag: Option<bool>) -> &'static str {
    match flag {
        Some(true) => "true",
        Some(false) => "false",
        None => "(not reported)",
    }
}
