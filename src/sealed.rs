//! Keys sealed at rest: the controller key as a systemd encrypted credential
//! (`systemd-creds encrypt`, loaded by the unit with
//! `LoadCredentialEncrypted=`), sealed with the host key
//! (`/var/lib/systemd/credential.secret`), the TPM 2.0, or both.
//!
//! The agent shells out to `systemd-creds` rather than carrying AES-GCM and
//! TPM code of its own: systemd already does it, and the binary stays small.
//! The key travels through pipes only: stdin when sealing, stdout when a
//! command run by hand (`check`, `address`) unseals it; no plaintext copy
//! touches the disk.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use zeroize::Zeroizing;

/// The credential name the shipped unit and drop-in use for the key.
pub const KEY_CREDENTIAL: &str = "controller-key";

const SYSTEMD_CREDS: &str = "systemd-creds";

/// What a credential is sealed with, as its header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sealing {
    Host,
    Tpm2,
    HostAndTpm2,
    /// Sealed with neither (systemd's "null" key, for a system with
    /// neither): integrity only, no secrecy.
    Null,
    /// A header this build does not know (a newer systemd).
    Unknown,
}

impl std::fmt::Display for Sealing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Host => "sealed with the host key (/var/lib/systemd/credential.secret)",
            Self::Tpm2 => "sealed to the TPM 2.0",
            Self::HostAndTpm2 => "sealed with the host key and the TPM 2.0",
            Self::Null => "NOT sealed (systemd's null key: integrity only)",
            Self::Unknown => "sealed (systemd-creds)",
        })
    }
}

/// The first 15 bytes of each key id systemd writes at the start of an
/// encrypted credential, base64 (systemd's `creds-util.h`), so that the
/// file's first 20 characters tell what sealed it without decrypting it.
const HEADERS: [(&str, Sealing); 8] = [
    ("Whxqht+dQJax1aZeCGLx", Sealing::Host),
    ("VbntHThZTUOoMZ0uuzMq", Sealing::Host),
    ("DHzAexF2RZGcSwvqCLwg", Sealing::Tpm2),
    ("+vfrk0HjQSyhpDb5Wik2", Sealing::Tpm2),
    ("k6iUCUh0RJCQyvL8k8q1", Sealing::HostAndTpm2),
    ("70rBNnmpSA6n22iJf58W", Sealing::HostAndTpm2),
    ("r0lQqEkTTrGnOEYwT/MM", Sealing::HostAndTpm2),
    ("BYRp2vb1QySABUnaD46i", Sealing::Null),
];

/// What sealed `text` (a file's contents), if it is a systemd encrypted
/// credential this build recognises.
pub fn sealing_of(text: &str) -> Option<Sealing> {
    let text = text.trim_start();
    HEADERS
        .iter()
        .find(|(prefix, _)| text.starts_with(prefix))
        .map(|(_, sealing)| *sealing)
}

/// `systemd-creds encrypt --with-key=`: what to seal a new key with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WithKey {
    /// The TPM 2.0 when present, else the host key (systemd's `auto`).
    Auto,
    /// The host key only (`/var/lib/systemd/credential.secret`).
    Host,
    /// The TPM 2.0 only.
    Tpm2,
    /// Both: the card and this machine's TPM 2.0 are needed.
    #[value(name = "host+tpm2")]
    HostAndTpm2,
}

impl WithKey {
    fn arg(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Host => "host",
            Self::Tpm2 => "tpm2",
            Self::HostAndTpm2 => "host+tpm2",
        }
    }
}

/// Why sealing or unsealing failed. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum SealedError {
    #[error("{path} already exists; refusing to overwrite a key")]
    Exists { path: PathBuf },
    #[error("cannot write {path}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot run systemd-creds (part of systemd 250 and later)")]
    Spawn(#[source] io::Error),
    #[error(
        "no TPM 2.0 on this machine (`systemd-creds has-tpm2` says: {said}); seal with \
         --with-key=host (the host key, kept on the same disk) or --with-key=auto"
    )]
    NoTpm2 { said: String },
    #[error("`systemd-creds {action}` failed: {stderr}")]
    Failed {
        action: &'static str,
        stderr: String,
    },
}

/// Whether this machine has a usable TPM 2.0, with `systemd-creds
/// has-tpm2`'s own words when it has not.
pub fn tpm2_present() -> Result<(), SealedError> {
    let out = Command::new(SYSTEMD_CREDS)
        .arg("has-tpm2")
        .stdin(Stdio::null())
        .output()
        .map_err(SealedError::Spawn)?;
    if out.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(", ");
    Err(SealedError::NoTpm2 { said })
}

/// Seals `secret` as credential `name` into the new file `out` (mode 0600,
/// never overwriting one) and returns what sealed it, read back from the
/// header systemd wrote.
pub fn seal(secret: &[u8], name: &str, with: WithKey, out: &Path) -> Result<Sealing, SealedError> {
    use std::os::unix::fs::OpenOptionsExt;
    if matches!(with, WithKey::Tpm2 | WithKey::HostAndTpm2) {
        tpm2_present()?;
    }
    let write_err = |source| SealedError::Write {
        path: out.to_owned(),
        source,
    };
    // Created before sealing, so that an existing file is refused before
    // anything runs and nobody can slip one in between.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                SealedError::Exists {
                    path: out.to_owned(),
                }
            } else {
                write_err(source)
            }
        })?;
    let sealed = run_encrypt(secret, name, with);
    let written = sealed.and_then(|cred| {
        file.write_all(&cred)
            .and_then(|()| file.sync_all())
            .map_err(write_err)?;
        Ok(sealing_of(&String::from_utf8_lossy(&cred)).unwrap_or(Sealing::Unknown))
    });
    if written.is_err() {
        // An empty or partial file must not be mistaken for a key later.
        drop(file);
        let _ = std::fs::remove_file(out);
    }
    let sealing = written?;
    crate::key::sync_parent(out).map_err(write_err)?;
    Ok(sealing)
}

fn run_encrypt(secret: &[u8], name: &str, with: WithKey) -> Result<Vec<u8>, SealedError> {
    let mut child = Command::new(SYSTEMD_CREDS)
        .args([
            "encrypt",
            &format!("--name={name}"),
            &format!("--with-key={}", with.arg()),
            "-",
            "-",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(SealedError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        // A write error shows as the command's failure below.
        let _ = stdin.write_all(secret);
    }
    let out = child.wait_with_output().map_err(SealedError::Spawn)?;
    if !out.status.success() || out.stdout.is_empty() {
        return Err(failed("encrypt", &out.stderr));
    }
    Ok(out.stdout)
}

/// Unseals the credential in `path` into this process (a pipe from
/// `systemd-creds decrypt`, never a file). `name` is the credential name
/// the file must carry; `None` skips that check (a file given by hand).
pub fn unseal(path: &Path, name: Option<&str>) -> Result<Zeroizing<String>, SealedError> {
    let mut child = Command::new(SYSTEMD_CREDS)
        .arg("decrypt")
        .arg(format!("--name={}", name.unwrap_or("")))
        .arg(path)
        .arg("-")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(SealedError::Spawn)?;
    let mut plain = Zeroizing::new(Vec::with_capacity(128));
    let read = child
        .stdout
        .take()
        .map(|mut out| out.read_to_end(&mut plain));
    let mut stderr = Vec::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_end(&mut stderr);
    }
    let status = child.wait().map_err(SealedError::Spawn)?;
    if !status.success() || !matches!(read, Some(Ok(_))) {
        return Err(failed("decrypt", &stderr));
    }
    let text = Zeroizing::new(String::from_utf8_lossy(&plain).into_owned());
    Ok(text)
}

fn failed(action: &'static str, stderr: &[u8]) -> SealedError {
    let stderr = String::from_utf8_lossy(stderr).trim().replace('\n', "; ");
    SealedError::Failed {
        action,
        stderr: if stderr.is_empty() {
            "(no message)".to_owned()
        } else {
            stderr
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credentials_header_tells_what_sealed_it() {
        // The start of a credential `systemd-creds encrypt --with-key=host`
        // (systemd 252) wrote.
        let host = "Whxqht+dQJax1aZeCGLxmiAAAAABAAAADAAAABAAAACW0YVUSKKhoXy7OhkA";
        assert_eq!(sealing_of(host), Some(Sealing::Host));
        assert_eq!(sealing_of("DHzAexF2RZGcSwvqCLwg/rest"), Some(Sealing::Tpm2));
        let hex = "b25c7db31feed9122727bf0939dc769a96564b2de4c4726d035b36ecf1e5b364";
        assert_eq!(sealing_of(hex), None);
        assert_eq!(sealing_of("{\"crypto\":{}}"), None);
    }
}
