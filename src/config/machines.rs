//! A gateway's machines: `machines.d/<name>.toml`, one machine each, with
//! the `[identity]` and `[machine]` tables `agent.toml` holds for a robot,
//! and optionally `[mqtt] topic_prefix`. The file's stem names the machine:
//! its state directory (`<state dir>/machines/<name>/`), its default topic
//! level, its name in the journal (`MACHINE_NAME=`), `status` and `check`.
//!
//! Each file is read on its own: a bad one is that machine's problem,
//! reported with the file named, and never stops the others.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::load::{CheckError, ConfigError, parse, use_unit_credentials};
use super::{Config, IdentityConfig, MachineConfig};
use crate::mqtt::MqttConfig;

/// Where a file's machine keeps its state, under `[state] dir`.
pub const STATE_SUBDIR: &str = "machines";
/// The longest machine name: it becomes a directory, a topic level and a
/// journal field.
pub const MAX_NAME_LEN: usize = 64;

/// One machine file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineFile {
    pub identity: IdentityConfig,
    pub machine: MachineConfig,
    #[serde(default)]
    pub mqtt: MachineMqtt,
}

/// `[mqtt]` in a machine file: only where its topics are.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineMqtt {
    /// Default: `peaqos/<machine name>`.
    #[serde(default)]
    pub topic_prefix: Option<String>,
}

impl MachineFile {
    fn check(&self) -> Result<(), CheckError> {
        self.identity.check()?;
        if let Some(prefix) = &self.mqtt.topic_prefix {
            // The same rules as agent.toml's [mqtt] topic_prefix.
            let probe = MqttConfig {
                topic_prefix: Some(prefix.clone()),
                ..MqttConfig::default()
            };
            probe.check().map_err(|e| CheckError {
                key: format!("mqtt.{}", e.key),
                message: e.problem,
            })?;
        }
        Ok(())
    }
}

/// Everything one machine needs from the configuration, whether it comes
/// from `agent.toml` (the agent's own machine) or from a machine file.
#[derive(Debug, Clone)]
pub struct MachineSpec {
    /// The file's stem, or the own machine's display name.
    pub name: String,
    pub identity: IdentityConfig,
    pub machine: MachineConfig,
    pub topic_prefix: Option<String>,
    /// Where its `state.json` lives.
    pub state_dir: PathBuf,
    /// The file that describes it (`agent.toml` for the own machine).
    pub source: PathBuf,
    /// `credential:NAME` values read from the unit's sources (outside
    /// systemd): (value as configured, file).
    pub credentials_outside_systemd: Vec<(String, PathBuf)>,
    /// The agent's own machine: what goes wrong with it stops the agent,
    /// as it always did for a robot.
    pub own: bool,
}

impl MachineSpec {
    /// The machine `agent.toml` describes, if it describes one.
    pub fn own(config: &Config) -> Option<Self> {
        let (identity, machine) = (config.identity.clone()?, config.machine.clone()?);
        Some(Self {
            name: machine.display_name.clone(),
            identity,
            machine,
            topic_prefix: config.mqtt.topic_prefix.clone(),
            state_dir: config.state.dir.clone(),
            source: config.files.first().cloned().unwrap_or_default(),
            // All of agent.toml's, logged at start as they always were.
            credentials_outside_systemd: config.credentials_outside_systemd.clone(),
            own: true,
        })
    }
}

/// One file of the machines directory as last read: its text (what a
/// reload compares) and the machine it describes, or why it does not.
#[derive(Debug)]
pub struct MachineEntry {
    pub name: String,
    pub path: PathBuf,
    /// The file's bytes; `None` when it could not be read.
    pub text: Option<String>,
    pub spec: Result<MachineSpec, MachineFileError>,
}

/// Why a machine file describes no usable machine. Its `Display` names
/// the file.
#[derive(Debug, thiserror::Error)]
pub enum MachineFileError {
    #[error("{path}: the file name is not a usable machine name")]
    Name {
        path: PathBuf,
        #[source]
        source: NameError,
    },
    #[error("cannot read machine file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The location in the source names the file, line and key.
    #[error("invalid machine file")]
    Invalid(#[source] ConfigError),
    #[error(
        "{path}: identity {identity} is already kept by machine {other:?} ({other_path}); \
         one identity, one machine"
    )]
    DuplicateIdentity {
        path: PathBuf,
        identity: String,
        other: String,
        other_path: PathBuf,
    },
}

/// The rule a machine name breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("it is empty")]
    Empty,
    #[error("it is longer than {MAX_NAME_LEN} characters")]
    TooLong,
    #[error("it must start with an ASCII letter or digit")]
    Start,
    #[error("only ASCII letters, digits, '-' and '_' may be used, not {0:?}")]
    Char(char),
}

/// Whether `name` can name a machine: 1 to 64 ASCII letters, digits, `-`
/// and `_`, starting with a letter or digit. It becomes a directory, an
/// MQTT topic level and a journal field value, and must be all three as
/// it is.
pub fn check_name(name: &str) -> Result<(), NameError> {
    let first = name.chars().next().ok_or(NameError::Empty)?;
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    if !first.is_ascii_alphanumeric() {
        return Err(NameError::Start);
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        Some(c) => Err(NameError::Char(c)),
        None => Ok(()),
    }
}

/// `<dir>/*.toml` in lexical order, hidden files (an editor's) left out;
/// none when the directory does not exist.
pub fn list(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ConfigError::MachinesDir {
                path: dir.to_owned(),
                source,
            });
        }
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| ConfigError::MachinesDir {
            path: dir.to_owned(),
            source,
        })?;
        let path = entry.path();
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if !hidden && path.extension().is_some_and(|e| e == "toml") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Reads every machine file of `config`'s machines directory. Only a
/// directory that cannot be listed is an error; each file's own problems
/// are in its entry.
pub fn read_all(config: &Config) -> Result<Vec<MachineEntry>, ConfigError> {
    let config_dir = config
        .files
        .first()
        .and_then(|f| f.parent())
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    let state_root = config.state.dir.join(STATE_SUBDIR);
    let mut entries: Vec<MachineEntry> = list(&config.machines_dir)?
        .into_iter()
        .map(|path| read(&path, &state_root, config_dir))
        .collect();
    // One identity, one machine: two loops proving the same identity would
    // take the record from each other.
    let mut seen: BTreeMap<String, (String, PathBuf)> = BTreeMap::new();
    if let Some(own) = &config.identity {
        seen.insert(
            own.identity_ref.canonical(),
            (
                config.machine_name().to_owned(),
                config.files.first().cloned().unwrap_or_default(),
            ),
        );
    }
    for entry in &mut entries {
        let Ok(spec) = &entry.spec else { continue };
        let identity = spec.identity.identity_ref.canonical();
        if let Some((other, other_path)) = seen.get(&identity) {
            entry.spec = Err(MachineFileError::DuplicateIdentity {
                path: entry.path.clone(),
                identity,
                other: other.clone(),
                other_path: other_path.clone(),
            });
        } else {
            seen.insert(identity, (entry.name.clone(), entry.path.clone()));
        }
    }
    Ok(entries)
}

/// Reads one machine file.
fn read(path: &Path, state_root: &Path, config_dir: &Path) -> MachineEntry {
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let text = std::fs::read_to_string(path);
    let spec = match (&text, check_name(&name)) {
        (_, Err(source)) => Err(MachineFileError::Name {
            path: path.to_owned(),
            source,
        }),
        (Err(e), Ok(())) => Err(MachineFileError::Read {
            path: path.to_owned(),
            source: std::io::Error::new(e.kind(), e.to_string()),
        }),
        (Ok(text), Ok(())) => {
            parse::<MachineFile>(vec![(path.to_owned(), text.clone())], MachineFile::check)
                .map_err(MachineFileError::Invalid)
                .map(|(file, _)| {
                    let MachineFile {
                        mut identity,
                        machine,
                        mqtt,
                    } = file;
                    let credentials = if std::env::var_os("CREDENTIALS_DIRECTORY").is_none() {
                        use_unit_credentials(identity.secret_locations(), config_dir)
                    } else {
                        Vec::new()
                    };
                    MachineSpec {
                        state_dir: state_root.join(&name),
                        name: name.clone(),
                        identity,
                        machine,
                        topic_prefix: mqtt.topic_prefix,
                        source: path.to_owned(),
                        credentials_outside_systemd: credentials,
                        own: false,
                    }
                })
        }
    };
    MachineEntry {
        name,
        path: path.to_owned(),
        text: text.ok(),
        spec,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_names_say_which_rule_they_break() {
        for good in ["dock-7", "a", "PLC_cell_2", "0charger"] {
            assert_eq!(check_name(good), Ok(()), "{good}");
        }
        assert_eq!(check_name(""), Err(NameError::Empty));
        assert_eq!(check_name("-x"), Err(NameError::Start));
        assert_eq!(check_name("_x"), Err(NameError::Start));
        assert_eq!(check_name("dock 7"), Err(NameError::Char(' ')));
        assert_eq!(check_name("a.b"), Err(NameError::Char('.')));
        assert_eq!(check_name("a+b"), Err(NameError::Char('+')));
        assert_eq!(check_name("dökk"), Err(NameError::Char('ö')));
        assert_eq!(check_name(&"a".repeat(64)), Ok(()));
        assert_eq!(check_name(&"a".repeat(65)), Err(NameError::TooLong));
        assert!(
            NameError::Char(' ').to_string().contains("' '"),
            "{}",
            NameError::Char(' ')
        );
    }

    const GOOD: &str = r#"
[identity]
ref = "did:peaq:77"
key_file = "/etc/peaqos-agent/machines.d/dock-7.key"

[machine]
display_name = "Dock 7"
owner_id = "site-1"
machine_type = "charger"
runtime_profile = "plc"

[mqtt]
topic_prefix = "site/dock-7"
"#;

    fn gateway(dir: &Path, files: &[(&str, &str)]) -> Config {
        let machines = dir.join("machines.d");
        std::fs::create_dir_all(&machines).unwrap();
        for (name, text) in files {
            std::fs::write(machines.join(name), text).unwrap();
        }
        let main = dir.join("agent.toml");
        std::fs::write(
            &main,
            format!(
                "[orchestrator]\nurl = \"http://127.0.0.1:1\"\n[state]\ndir = \"{}\"\n",
                dir.join("state").display()
            ),
        )
        .unwrap();
        Config::load(&main).unwrap()
    }

    #[test]
    fn each_file_is_one_machine_and_a_bad_one_names_its_file_alone() {
        let dir = tempfile::tempdir().unwrap();
        let bad = GOOD.replace("owner_id = \"site-1\"", "owner_id = \"\"");
        let other = GOOD.replace("did:peaq:77", "did:peaq:78");
        let config = gateway(
            dir.path(),
            &[
                ("dock-7.toml", GOOD),
                ("dock-8.toml", &bad),
                ("dock 9.toml", GOOD),
                ("dock-10.toml", GOOD),
                ("plc-1.toml", &other),
                ("notes.txt", "not a machine"),
                (".dock-7.toml.swp.toml", "editor"),
            ],
        );
        let entries = read_all(&config).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["dock 9", "dock-10", "dock-7", "dock-8", "plc-1"]);
        let error = |name: &str| {
            let e = entries.iter().find(|e| e.name == name).unwrap();
            peaqos_logging::error_chain(e.spec.as_ref().unwrap_err())
        };
        let e = error("dock 9");
        assert!(e.contains("dock 9.toml") && e.contains("' '"), "{e}");
        // Lexical order: dock-10 came first, so dock-7 is the duplicate.
        let e = error("dock-7");
        assert!(
            e.contains("dock-7.toml") && e.contains("dock-10") && e.contains("did:peaq:77"),
            "{e}"
        );
        let e = error("dock-8");
        assert!(
            e.contains("dock-8.toml:8:") && e.contains("machine.owner_id"),
            "{e}"
        );
        let plc = entries.iter().find(|e| e.name == "plc-1").unwrap();
        let spec = plc.spec.as_ref().unwrap();
        assert_eq!(spec.state_dir, dir.path().join("state/machines/plc-1"));
        assert_eq!(spec.topic_prefix.as_deref(), Some("site/dock-7"));
        assert!(!spec.own);
        assert_eq!(plc.text.as_deref(), Some(other.as_str()));
    }

    #[test]
    fn a_machine_file_is_held_to_the_rules_of_its_tables() {
        let dir = tempfile::tempdir().unwrap();
        let unknown = format!("{GOOD}\n[renewal]\ncheck_interval = \"1s\"\n");
        let wildcard = GOOD.replace("site/dock-7", "site/+/x");
        let config = gateway(dir.path(), &[("a.toml", &unknown), ("b.toml", &wildcard)]);
        let entries = read_all(&config).unwrap();
        let a = peaqos_logging::error_chain(entries[0].spec.as_ref().unwrap_err());
        assert!(a.contains("a.toml") && a.contains("renewal"), "{a}");
        let b = peaqos_logging::error_chain(entries[1].spec.as_ref().unwrap_err());
        assert!(
            b.contains("b.toml") && b.contains("mqtt.topic_prefix"),
            "{b}"
        );
    }

    #[test]
    fn a_gateway_without_machines_or_identity_is_refused_with_both_ways_out() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("agent.toml");
        std::fs::write(&main, "[orchestrator]\nurl = \"http://127.0.0.1:1\"\n").unwrap();
        let e = Config::load(&main).unwrap_err().to_string();
        assert!(
            e.contains("[identity]")
                && e.contains(&dir.path().join("machines.d").display().to_string()),
            "{e}"
        );
        std::fs::write(
            &main,
            "[gateway]\nmachines_dir = \"fleet\"\n[orchestrator]\nurl = \"http://127.0.0.1:1\"\n",
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("fleet")).unwrap();
        std::fs::write(dir.path().join("fleet/x.toml"), GOOD).unwrap();
        let c = Config::load(&main).unwrap();
        assert_eq!(c.machines_dir, dir.path().join("fleet"));
        assert!(c.identity.is_none() && c.machine.is_none());
        assert_eq!(c.machine_name(), "gateway");
    }
}
