//! Secrets (controller key, API key, broker password) come from files, never
//! from the TOML itself. Under systemd they arrive as credentials
//! (`LoadCredential=` puts them in `$CREDENTIALS_DIRECTORY`, readable only
//! by the service).
//!
//! Outside systemd (`sudo peaqos-agent check`, `address`, `status`, a
//! manual `run`), `credential:NAME` reads what the shipped unit would pass
//! as NAME ([`unit_source`]), so that a first check on a correct install
//! does not fail for want of `$CREDENTIALS_DIRECTORY`. A source the unit
//! loads with `LoadCredentialEncrypted=` is a sealed credential
//! ([`sealed_name`], [`crate::sealed`]).

use std::io;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// Prefix of a config value that names a systemd credential instead of a path.
pub const CREDENTIAL_PREFIX: &str = "credential:";

/// The shipped unit: its `LoadCredential=` lines say where each credential
/// comes from.
const UNIT: &str = include_str!("../systemd/peaqos-agent.service");
/// The shipped unit's name, whose effective credentials systemd reports.
const UNIT_NAME: &str = "peaqos-agent.service";
/// The unit's configuration directory, where its key source lives.
pub const UNIT_CONFIG_DIR: &str = "/etc/peaqos-agent";
/// systemd's credential store, searched in this order for a
/// `LoadCredential=` source that is a name rather than a path.
const CREDSTORE: [&str; 3] = ["/etc/credstore", "/run/credstore", "/usr/lib/credstore"];

/// Why a secret could not be read. Never contains the secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read secret file {path}")]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "secret {name:?} names a systemd credential, $CREDENTIALS_DIRECTORY is not set (not \
         running under systemd) and the unit has no LoadCredential={name}: line; name the file \
         itself in the configuration, or run the command with the credential, e.g. `sudo \
         systemd-run --pipe --wait -p LoadCredential={name}:/path/to/file -p \
         User=peaqos-agent peaqos-agent check`"
    )]
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

/// Where the unit's `LoadCredential=` takes credential `name` from, as
/// seen by a process outside systemd whose configuration was read from
/// `config_dir`: a path in the unit's configuration directory
/// (`/etc/peaqos-agent`) is taken in `config_dir` (the same directory for
/// the installed configuration), and a bare name is looked up in systemd's
/// credential store (the first that exists, else `/etc/credstore`).
///
/// The unit's lines are its effective ones, drop-ins included, as systemd
/// reports them (`systemctl show -p LoadCredential -p
/// LoadCredentialEncrypted`, else `systemctl cat`) when systemd runs and
/// knows the unit; else the shipped unit's followed by its drop-ins' (in
/// [`DROP_IN_DIRS`], in file-name order, as systemd reads them: a sandbox
/// or a chroot without systemd can still read those files).
pub fn unit_source(name: &str, config_dir: &Path) -> Option<PathBuf> {
    source_in(unit_lines(), name, config_dir)
}

/// The credential name the unit gives `path` when it loads that file with
/// `LoadCredentialEncrypted=` (seen, as by [`unit_source`], from any
/// configuration directory); `None` when the unit does not load it sealed.
pub fn sealed_name(path: &Path) -> Option<String> {
    sealed_name_in(unit_lines(), path)
}

/// Whether the unit loads credential `name` with
/// `LoadCredentialEncrypted=` (under systemd it arrives decrypted, so the
/// file alone does not say that it was sealed at rest).
pub fn loaded_sealed(name: &str) -> bool {
    unit_lines().iter().any(|c| c.encrypted && c.name == name)
}

fn sealed_name_in(lines: &[Credential], path: &Path) -> Option<String> {
    lines
        .iter()
        .filter(|c| c.encrypted)
        .find(|c| {
            let source = Path::new(&c.source);
            source == path
                || source
                    .strip_prefix(UNIT_CONFIG_DIR)
                    .is_ok_and(|rest| path.ends_with(rest))
        })
        .map(|c| c.name.clone())
}

/// The unit's effective credentials (see [`unit_source`]), read once.
fn unit_lines() -> &'static [Credential] {
    static LINES: std::sync::OnceLock<Vec<Credential>> = std::sync::OnceLock::new();
    LINES.get_or_init(|| {
        systemd_credentials()
            .unwrap_or_else(|| credential_lines(&with_drop_ins(UNIT, &DROP_IN_DIRS.map(Path::new))))
    })
}

/// One `LoadCredential=` or `LoadCredentialEncrypted=` of the unit.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Credential {
    name: String,
    source: String,
    /// `LoadCredentialEncrypted=`: systemd decrypts it for the service.
    encrypted: bool,
}

/// Where systemd reads the unit's drop-ins, lowest precedence first.
const DROP_IN_DIRS: [&str; 3] = [
    "/usr/lib/systemd/system/peaqos-agent.service.d",
    "/run/systemd/system/peaqos-agent.service.d",
    "/etc/systemd/system/peaqos-agent.service.d",
];

/// `unit` followed by the `*.conf` drop-ins of `dirs` in file-name order;
/// a file name in a later directory replaces the same name in an earlier.
fn with_drop_ins(unit: &str, dirs: &[&Path]) -> String {
    let mut files = std::collections::BTreeMap::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if Path::new(&name).extension().is_some_and(|e| e == "conf") {
                files.insert(name, entry.path());
            }
        }
    }
    let mut text = unit.to_owned();
    for path in files.values() {
        if let Ok(drop_in) = std::fs::read_to_string(path) {
            text.push('\n');
            text.push_str(&drop_in);
        }
    }
    text
}

fn source_in(lines: &[Credential], name: &str, config_dir: &Path) -> Option<PathBuf> {
    let source = lines
        .iter()
        .find(|c| c.name == name)
        .map(|c| Path::new(&c.source))?;
    if source.is_absolute() {
        return Some(match source.strip_prefix(UNIT_CONFIG_DIR) {
            Ok(rest) => config_dir.join(rest),
            Err(_) => source.to_owned(),
        });
    }
    let candidates: Vec<PathBuf> = CREDSTORE
        .iter()
        .map(|d| Path::new(d).join(source))
        .collect();
    candidates
        .iter()
        .find(|p| p.exists())
        .or(candidates.first())
        .cloned()
}

/// Each `LoadCredential=name:source` and `LoadCredentialEncrypted=` line
/// of `text` (a unit file, or `systemctl show`'s output), as systemd reads
/// them: both kinds share one list by name, a later line for a name
/// replaces the earlier one (so a drop-in's one
/// `LoadCredentialEncrypted=controller-key:...` replaces the unit's
/// `LoadCredential=controller-key:...`), and an empty value of either
/// clears the whole list.
fn credential_lines(text: &str) -> Vec<Credential> {
    let mut lines: Vec<Credential> = Vec::new();
    for line in text.lines().map(str::trim) {
        let (value, encrypted) = if let Some(v) = line.strip_prefix("LoadCredential=") {
            (v, false)
        } else if let Some(v) = line.strip_prefix("LoadCredentialEncrypted=") {
            (v, true)
        } else {
            continue;
        };
        match value.split_once(':') {
            Some((name, source)) => {
                lines.retain(|c| c.name != name);
                lines.push(Credential {
                    name: name.to_owned(),
                    source: source.to_owned(),
                    encrypted,
                });
            }
            None if value.trim().is_empty() => lines.clear(),
            None => {}
        }
    }
    lines
}

/// The unit's effective credentials when systemd runs and has the unit
/// loaded with at least one; `None` otherwise (no systemd, as in a
/// container or a build machine, or the unit not installed).
///
/// `systemctl show` first; systemd 252's prints both properties as
/// `[unprintable]` (seen under a booted systemd, `tests/system/
/// sealed_boot.rs`), so then `systemctl cat`: the unit file and drop-ins
/// systemd loaded for the unit, in its order.
fn systemd_credentials() -> Option<Vec<Credential>> {
    if !Path::new("/run/systemd/system").is_dir() {
        return None;
    }
    let systemctl = |args: &[&str]| {
        let output = std::process::Command::new("systemctl")
            .args(args)
            .arg(UNIT_NAME)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())?;
        let lines = credential_lines(&String::from_utf8_lossy(&output.stdout));
        (!lines.is_empty()).then_some(lines)
    };
    systemctl(&[
        "show",
        "--property=LoadCredential",
        "--property=LoadCredentialEncrypted",
    ])
    .or_else(|| systemctl(&["cat", "--no-pager"]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_resolve_to_the_units_sources_outside_systemd() {
        let etc = Path::new("/etc/peaqos-agent");
        assert_eq!(
            unit_source("controller-key", etc).unwrap(),
            Path::new("/etc/peaqos-agent/controller.key")
        );
        // A configuration read from elsewhere has its key beside it.
        assert_eq!(
            unit_source("controller-key", Path::new("/tmp/root/etc/peaqos-agent")).unwrap(),
            Path::new("/tmp/root/etc/peaqos-agent/controller.key")
        );
        let mqtt = unit_source("mqtt-password", etc).unwrap();
        assert!(
            mqtt.ends_with("credstore/peaqos-agent.mqtt-password"),
            "{}",
            mqtt.display()
        );
        assert!(unit_source("no-such-credential", etc).is_none());
    }

    #[test]
    fn a_drop_ins_credentials_count_as_systemd_reports_them() {
        // `systemctl show -p LoadCredential` with systemd/examples/pkcs11.conf
        // applied: the drop-in's list replaced the unit's.
        let shown = "LoadCredential=orchestrator-api-key:peaqos-agent.orchestrator-api-key\n\
                     LoadCredential=token-pin:/etc/peaqos-agent/token.pin\n";
        let lines = credential_lines(shown);
        let etc = Path::new("/etc/peaqos-agent");
        assert_eq!(
            source_in(&lines, "token-pin", etc).unwrap(),
            Path::new("/etc/peaqos-agent/token.pin")
        );
        assert!(source_in(&lines, "controller-key", etc).is_none());
        // The drop-in's own text, read as a unit file: the empty line clears.
        let drop_in = include_str!("../systemd/examples/pkcs11.conf");
        let lines = credential_lines(&format!("{UNIT}\n{drop_in}"));
        assert!(source_in(&lines, "controller-key", etc).is_none());
        assert!(source_in(&lines, "token-pin", etc).is_some());
        assert!(source_in(&credential_lines(UNIT), "token-pin", etc).is_none());
    }

    #[test]
    fn the_sealed_key_drop_in_replaces_only_the_keys_source() {
        let drop_in = include_str!("../systemd/examples/sealed-key.conf");
        let etc = Path::new("/etc/peaqos-agent");
        let sealed = Path::new("/etc/peaqos-agent/controller.key.cred");
        // Read as systemd reads the unit and its drop-in: the same name
        // replaces the unit's line; the other credentials stay.
        let lines = credential_lines(&format!("{UNIT}\n{drop_in}"));
        assert_eq!(source_in(&lines, "controller-key", etc).unwrap(), sealed);
        assert!(source_in(&lines, "mqtt-password", etc).is_some());
        assert_eq!(
            sealed_name_in(&lines, sealed).as_deref(),
            Some("controller-key")
        );
        // Seen from a configuration elsewhere (a test's, a chroot's).
        assert_eq!(
            sealed_name_in(&lines, Path::new("/tmp/x/controller.key.cred")).as_deref(),
            Some("controller-key")
        );
        assert!(sealed_name_in(&credential_lines(UNIT), sealed).is_none());
        // As `systemctl show -p LoadCredential -p LoadCredentialEncrypted`
        // prints them.
        let shown = "LoadCredential=mqtt-password:peaqos-agent.mqtt-password\n\
                     LoadCredentialEncrypted=controller-key:/etc/peaqos-agent/controller.key.cred\n";
        let lines = credential_lines(shown);
        assert_eq!(source_in(&lines, "controller-key", etc).unwrap(), sealed);
        assert!(sealed_name_in(&lines, sealed).is_some());
        // An empty value of either kind clears both.
        let lines = credential_lines(&format!("{UNIT}\n{drop_in}\nLoadCredentialEncrypted=\n"));
        assert!(lines.is_empty());
    }

    #[test]
    fn without_systemd_the_drop_ins_are_read_in_systemds_order() {
        let vendor = tempfile::tempdir().unwrap();
        let admin = tempfile::tempdir().unwrap();
        std::fs::write(
            vendor.path().join("50-token.conf"),
            "[Service]\nLoadCredential=token-pin:/usr/share/pin\n",
        )
        .unwrap();
        // The administrator's file of the same name replaces the vendor's.
        std::fs::copy(
            concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/examples/pkcs11.conf"),
            admin.path().join("50-token.conf"),
        )
        .unwrap();
        std::fs::write(admin.path().join("README"), "LoadCredential=x:/y\n").unwrap();
        let text = with_drop_ins(UNIT, &[vendor.path(), admin.path()]);
        let lines = credential_lines(&text);
        let etc = Path::new("/etc/peaqos-agent");
        assert_eq!(
            source_in(&lines, "token-pin", etc).unwrap(),
            Path::new("/etc/peaqos-agent/token.pin")
        );
        assert!(source_in(&lines, "controller-key", etc).is_none());
        assert!(source_in(&lines, "x", etc).is_none());
    }
}
