//! Reading the configuration: the files in order, their spans moved into one
//! virtual text so that every error names file, line, column and key, the
//! merge of drop-ins, and the checks across keys.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;
use toml::de::{DeArray, DeTable, DeValue};

use super::Config;
use crate::duration;

/// The name of a gateway that is no machine itself.
const GATEWAY_NAME: &str = "gateway";

/// A position in one of the configuration files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot list drop-in directory {path}")]
    DropIns {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot list the machines directory {path}")]
    MachinesDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: no machine to keep: set [identity] and [machine] in it (a robot), or put \
         machine files (<name>.toml, each with [identity] and [machine]) in {dir} (a gateway)"
    )]
    NoMachine { path: PathBuf, dir: PathBuf },
    #[error("{location}: TOML syntax error: {message}")]
    Syntax { location: Location, message: String },
    /// A key that is unknown, missing, of the wrong type or with a bad value.
    #[error("{location}: `{key}`: {message}")]
    Invalid {
        location: Location,
        key: String,
        message: String,
    },
}

/// One loaded file and where its text sits in the virtual concatenation.
struct SourceFile {
    path: PathBuf,
    text: String,
    base: usize,
}

struct Sources(Vec<SourceFile>);

impl Sources {
    fn locate(&self, offset: usize) -> Location {
        let file = self
            .0
            .iter()
            .rev()
            .find(|f| f.base <= offset)
            .unwrap_or(&self.0[0]);
        let local = (offset - file.base).min(file.text.len());
        let before = &file.text.as_bytes()[..local];
        let line = before.split(|b| *b == b'\n').count();
        let line_start = before
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |p| p + 1);
        let column = String::from_utf8_lossy(&before[line_start..])
            .chars()
            .count()
            + 1;
        Location {
            file: file.path.clone(),
            line,
            column,
        }
    }
}

/// The drop-in directory beside a main config file: `<dir>/agent.d`.
pub fn drop_in_dir(main: &Path) -> PathBuf {
    main.parent()
        .unwrap_or_else(|| Path::new("."))
        .join("agent.d")
}

/// `agent.d/*.toml` in lexical order; none when the directory is absent.
pub fn drop_in_files(main: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let dir = drop_in_dir(main);
    toml_files(&dir, false).map_err(|source| ConfigError::DropIns { path: dir, source })
}

/// `<dir>/*.toml` in lexical order (with `skip_hidden`, those whose name
/// starts with a dot left out); none when the directory is absent.
pub(super) fn toml_files(dir: &Path, skip_hidden: bool) -> std::io::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        let hidden = skip_hidden && entry.file_name().to_string_lossy().starts_with('.');
        if !hidden && path.extension().is_some_and(|e| e == "toml") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

impl Config {
    /// Reads `path` and its drop-ins, and validates the result.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut texts = Vec::new();
        for file in std::iter::once(path.to_owned()).chain(drop_in_files(path)?) {
            let text = std::fs::read_to_string(&file).map_err(|source| ConfigError::Read {
                path: file.clone(),
                source,
            })?;
            texts.push((file, text));
        }
        let mut config = Self::from_texts(texts)?;
        if config.identity.is_none() && super::machines::list(&config.machines_dir)?.is_empty() {
            return Err(ConfigError::NoMachine {
                path: path.to_owned(),
                dir: config.machines_dir,
            });
        }
        if std::env::var_os("CREDENTIALS_DIRECTORY").is_none() {
            let dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            config.use_unit_credentials(dir);
        }
        Ok(config)
    }

    /// Outside systemd: every `credential:NAME` the unit knows becomes the
    /// file the unit would pass (see [`crate::secrets::unit_source`]).
    fn use_unit_credentials(&mut self, config_dir: &Path) {
        let mut values = vec![
            &mut self.orchestrator.api_key_file,
            &mut self.orchestrator.client_key_file,
            &mut self.mqtt.password_file,
            &mut self.mqtt.client_key_file,
        ];
        if let Some(identity) = &mut self.identity {
            values.extend(identity.secret_locations());
        }
        self.credentials_outside_systemd = use_unit_credentials(values, config_dir);
    }

    /// Parses already-read files (main file first), as [`Config::load`].
    pub fn from_texts(files: Vec<(PathBuf, String)>) -> Result<Self, ConfigError> {
        let (mut config, files) = parse::<Self>(files, Self::check)?;
        let main_dir = files
            .first()
            .and_then(|f| f.parent())
            .unwrap_or_else(|| Path::new(""));
        config.machines_dir = main_dir.join(
            config
                .gateway
                .machines_dir
                .as_deref()
                .unwrap_or_else(|| Path::new(super::DEFAULT_MACHINES_DIR)),
        );
        config.files = files;
        Ok(config)
    }

    /// Rules that involve more than one key.
    pub fn check(&self) -> Result<(), CheckError> {
        // A machine of its own needs both tables; a gateway only may have
        // neither.
        let missing = |key: &str, set: &str| CheckError {
            key: key.to_owned(),
            message: format!(
                "missing: [{set}] is set, so the agent is a machine itself and needs [{key}] \
                 too (or leave both out on a gateway whose machines are in machines.d)"
            ),
        };
        match (&self.identity, &self.machine) {
            (Some(identity), Some(_)) => identity.check()?,
            (Some(_), None) => return Err(missing("machine", "identity")),
            (None, Some(_)) => return Err(missing("identity", "machine")),
            (None, None) => {}
        }
        self.orchestrator.check()?;
        self.mqtt.check().map_err(|e| CheckError {
            key: format!("mqtt.{}", e.key),
            message: e.problem,
        })?;
        let r = &self.renewal;
        if r.backoff_initial > r.backoff_max {
            return Err(CheckError {
                key: "renewal.backoff_initial".into(),
                message: format!(
                    "must not be longer than renewal.backoff_max ({})",
                    duration::display(r.backoff_max)
                ),
            });
        }
        Ok(())
    }

    /// The agent's name on the MQTT interface and in logs: its own
    /// machine's display name, or `gateway` for a gateway that is no
    /// machine itself.
    pub fn machine_name(&self) -> &str {
        self.machine
            .as_ref()
            .map_or(GATEWAY_NAME, |m| m.display_name.as_str())
    }
}

/// Parses already-read files (main file first) into `T`, merged in order,
/// and runs `check` on the result; every error names file, line, column
/// and key. Returns the value and the files' paths. Only the call to
/// `T::deserialize` depends on `T`: the rest is in functions of their own,
/// so that the config and the machine files share one copy of it.
pub(super) fn parse<T: serde::de::DeserializeOwned>(
    files: Vec<(PathBuf, String)>,
    check: impl FnOnce(&T) -> Result<(), CheckError>,
) -> Result<(T, Vec<PathBuf>), ConfigError> {
    let sources = Sources::new(files);
    let merged = sources.merge()?;
    let root_start = merged.span().start;
    let paths = Paths::of(&merged);
    let value = T::deserialize(super::deserializer::Value::table(merged))
        .map_err(|e| sources.invalid(&paths, e, root_start))?;
    if let Err(e) = check(&value) {
        return Err(sources.check_failed(&paths, e, root_start));
    }
    Ok((value, sources.0.into_iter().map(|f| f.path).collect()))
}

impl Sources {
    fn new(files: Vec<(PathBuf, String)>) -> Self {
        let mut base = 0;
        Self(
            files
                .into_iter()
                .map(|(path, text)| {
                    let file = SourceFile { path, text, base };
                    // One byte of gap keeps an end-of-file span inside its file.
                    base += file.text.len() + 1;
                    file
                })
                .collect(),
        )
    }

    /// The files' tables, merged in order, their spans in the virtual
    /// concatenation.
    fn merge(&self) -> Result<Spanned<DeTable<'_>>, ConfigError> {
        let mut merged: Option<Spanned<DeTable<'_>>> = None;
        for file in &self.0 {
            let table = DeTable::parse(&file.text).map_err(|e| ConfigError::Syntax {
                location: self.locate(file.base + e.span().map_or(0, |s| s.start)),
                message: e.message().to_owned(),
            })?;
            let table = shift_table(table, file.base);
            merged = Some(match merged {
                None => table,
                Some(mut into) => {
                    merge(into.get_mut(), table.into_inner());
                    into
                }
            });
        }
        Ok(merged.unwrap_or_else(|| Spanned::new(0..0, DeTable::default())))
    }

    fn invalid(
        &self,
        paths: &Paths,
        e: super::deserializer::Error,
        root_start: usize,
    ) -> ConfigError {
        let span = e.span.unwrap_or(root_start..root_start);
        ConfigError::Invalid {
            location: self.locate(span.start),
            key: paths.at(&span).to_owned(),
            message: e.message,
        }
    }

    fn check_failed(&self, paths: &Paths, e: CheckError, root_start: usize) -> ConfigError {
        // A missing key is reported at its table.
        let offset = paths
            .keys
            .get(&e.key)
            .or_else(|| {
                e.key
                    .rsplit_once('.')
                    .and_then(|(table, _)| paths.keys.get(table))
            })
            .copied()
            .unwrap_or(root_start);
        ConfigError::Invalid {
            location: self.locate(offset),
            key: e.key,
            message: e.message,
        }
    }
}

/// A rule across keys that the configuration breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{key}`: {message}")]
pub struct CheckError {
    /// The dotted key the problem is reported against.
    pub key: String,
    pub message: String,
}

/// Outside systemd: every `credential:NAME` among `values` that the unit
/// knows becomes the file the unit would pass (see
/// [`crate::secrets::unit_source`]). Returns (value as configured, file).
pub(super) fn use_unit_credentials(
    values: Vec<&mut Option<String>>,
    config_dir: &Path,
) -> Vec<(String, PathBuf)> {
    let mut found = Vec::new();
    for value in values.into_iter().flatten() {
        let Some(name) = value.strip_prefix(crate::secrets::CREDENTIAL_PREFIX) else {
            continue;
        };
        let Some(path) = crate::secrets::unit_source(name, config_dir) else {
            continue;
        };
        let Some(text) = path.to_str() else { continue };
        let text = text.to_owned();
        found.push((std::mem::replace(value, text), path));
    }
    found
}

/// Where the keys and values of the merged tables are, by their dotted
/// path (`orchestrator.url`, `machine.capabilities[0]`, `.` for the root).
/// toml's errors carry the span of the key or value they are about; the
/// path is looked up from it here, rather than tracked through every
/// `Deserialize` call (serde_path_to_error wraps each field's
/// deserializer, which made the config's serde code about 100 KB larger).
#[derive(Default)]
struct Paths {
    /// Dotted key path -> offset of the key, for reporting [`CheckError`]s.
    keys: BTreeMap<String, usize>,
    key_spans: Vec<(Range<usize>, String)>,
    /// Outer values before the values inside them: of two with the same
    /// span (an array of tables and its first table), the inner one is
    /// what an error is about.
    values: Vec<(Range<usize>, String)>,
}

impl Paths {
    fn of(root: &Spanned<DeTable<'_>>) -> Self {
        let mut paths = Self::default();
        paths.values.push((root.span(), ".".to_owned()));
        paths.index(root.get_ref(), "");
        paths
    }

    fn index(&mut self, table: &DeTable<'_>, prefix: &str) {
        for (key, value) in table {
            let path = if prefix.is_empty() {
                key.get_ref().to_string()
            } else {
                format!("{prefix}.{}", key.get_ref())
            };
            self.keys.insert(path.clone(), key.span().start);
            self.key_spans.push((key.span(), path.clone()));
            self.value(value, &path);
        }
    }

    fn value(&mut self, value: &Spanned<DeValue<'_>>, path: &str) {
        self.values.push((value.span(), path.to_owned()));
        match value.get_ref() {
            DeValue::Table(inner) => self.index(inner, path),
            DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.value(item, &format!("{path}[{i}]"));
                }
            }
            _ => {}
        }
    }

    /// The path of what an error's span covers: a key (an unknown field),
    /// a value (a bad one, or a table missing a field), else the innermost
    /// value around it.
    fn at(&self, span: &Range<usize>) -> &str {
        fn exact<'a>(
            spans: &'a [(Range<usize>, String)],
            span: &Range<usize>,
        ) -> Option<&'a String> {
            spans.iter().rev().find(|(s, _)| s == span).map(|(_, p)| p)
        }
        exact(&self.key_spans, span)
            .or_else(|| exact(&self.values, span))
            .or_else(|| {
                self.values
                    .iter()
                    .filter(|(s, _)| s.start <= span.start && span.end <= s.end)
                    .min_by_key(|(s, _)| s.len())
                    .map(|(_, p)| p)
            })
            .map_or(".", String::as_str)
    }
}

fn shift_span(span: Range<usize>, base: usize) -> Range<usize> {
    span.start + base..span.end + base
}

fn shift_table(table: Spanned<DeTable<'_>>, base: usize) -> Spanned<DeTable<'_>> {
    let span = shift_span(table.span(), base);
    Spanned::new(span, shift_entries(table.into_inner(), base))
}

fn shift_entries(table: DeTable<'_>, base: usize) -> DeTable<'_> {
    table
        .into_iter()
        .map(|(k, v)| {
            let key_span = shift_span(k.span(), base);
            (Spanned::new(key_span, k.into_inner()), shift_value(v, base))
        })
        .collect()
}

fn shift_value(value: Spanned<DeValue<'_>>, base: usize) -> Spanned<DeValue<'_>> {
    let span = shift_span(value.span(), base);
    let inner = match value.into_inner() {
        DeValue::Table(t) => DeValue::Table(shift_entries(t, base)),
        DeValue::Array(a) => {
            let mut out = DeArray::new();
            for item in a {
                out.push(shift_value(item, base));
            }
            DeValue::Array(out)
        }
        other => other,
    };
    Spanned::new(span, inner)
}

/// Merges `from` into `into`: tables key by key, anything else replaced.
fn merge<'i>(into: &mut DeTable<'i>, from: DeTable<'i>) {
    for (key, value) in from {
        let existing = into.get_mut(key.get_ref().as_ref());
        match (existing, value) {
            (Some(old), new) if old.get_ref().is_table() && new.get_ref().is_table() => {
                let DeValue::Table(new_table) = new.into_inner() else {
                    unreachable!("checked to be a table")
                };
                if let DeValue::Table(old_table) = old.get_mut() {
                    merge(old_table, new_table);
                }
            }
            (_, new) => {
                // Remove first so the key's span is the new file's.
                into.remove(key.get_ref().as_ref());
                into.insert(key, new);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MachineFile;

    /// The key `parse` names for `text`'s error, beside the path that
    /// serde_path_to_error (which `parse` used to wrap the deserializer
    /// with) tracks for the same error.
    fn both<T: serde::de::DeserializeOwned>(text: &str) -> (String, String) {
        let table = DeTable::parse(text).unwrap();
        let paths = Paths::of(&table);
        let theirs = match serde_path_to_error::deserialize::<_, T>(
            super::super::deserializer::Value::table(table.clone()),
        ) {
            Ok(_) => panic!("{text} was accepted"),
            Err(e) => e.path().to_string(),
        };
        let Err(e) = T::deserialize(super::super::deserializer::Value::table(table)) else {
            unreachable!("refused above")
        };
        let span = e.span.clone().expect("every refusal has a span");
        (paths.at(&span).to_owned(), theirs)
    }

    /// A refusal's message and span.
    type Refusal = (String, Option<Range<usize>>);

    /// The refusal of `text` by the config's deserializer and by toml's
    /// own.
    fn against_toml<T: serde::de::DeserializeOwned>(text: &str) -> (Refusal, Refusal) {
        let table = DeTable::parse(text).unwrap();
        let Err(ours) = T::deserialize(super::super::deserializer::Value::table(table.clone()))
        else {
            panic!("{text} was accepted")
        };
        let Err(toml) = T::deserialize(toml::de::Deserializer::from(table)) else {
            panic!("{text} was accepted by toml")
        };
        (
            (ours.message, ours.span),
            (toml.message().to_owned(), toml.span()),
        )
    }

    #[test]
    fn keys_are_named_as_serde_path_to_error_names_them() {
        // The config tests' file, its labels left out so that cases can
        // set them.
        let base = crate::config::tests::MAIN.replace("labels = { site = \"berlin\" }\n", "");
        let with = |table: &str, line: &str| {
            base.replace(&format!("[{table}]\n"), &format!("[{table}]\n{line}\n"))
        };
        let cases = [
            format!("colour = 1\n{base}"),
            with("machine", "colour = \"red\""),
            with("machine", "capabilities = [\"a\", 2]"),
            with("machine", "labels = { site = 3 }"),
            with("machine", "skill_keys = \"one\""),
            base.replace("display_name = \"robot 7\"\n", ""),
            base.replace("display_name = \"robot 7\"", "display_name = \"\""),
            base.replace("url = \"http://127.0.0.1:8080\"", "url = 5"),
            base.replace("[orchestrator]\nurl = \"http://127.0.0.1:8080\"\n", ""),
            with("identity", "retire_old_key = \"shred\""),
            with("identity", "key = \"not a uri\""),
            base.replace("ref = \"peaqos:machine:4242\"", "ref = \"nobody\""),
            format!("{base}[renewal]\ncheck_interval = \"soon\"\n"),
            format!("{base}[mqtt]\nprotocol = \"7\"\n"),
            format!("{base}[mqtt]\nkeep_alive = true\n"),
            format!("{base}[mqtt.commands]\nallow = [\"reregister\", \"reboot\"]\n"),
            format!("{base}[mqtt.commands]\nburst = -1\n"),
            format!("{base}[mqtt.home_assistant]\nnode = \"x\"\n"),
            format!("mqtt.commands.enabled = \"yes\"\n{base}"),
            format!("mqtt = {{ enabled = \"x\" }}\n{base}"),
            format!("{base}[gateway]\nmachines_dir = \"\"\n"),
            format!("{base}[log]\nlevel = [1]\n"),
            base.replace("display_name = \"robot 7\"", "display_name = 1979-05-27"),
            format!("{base}[mqtt]\nkeep_alive = 1979-05-27T07:32:00Z\n"),
            format!("{base}[mqtt]\nmax_packet_size = 1.5\n"),
            format!("{base}[mqtt]\nmax_packet_size = 99999999999999999999\n"),
            format!("{base}[mqtt]\nmax_packet_size = 300000000000000000000000000000000000000\n"),
            format!("{base}[mqtt]\nmax_packet_size = 999999999999999999999999999999999999999999\n"),
            format!("{base}[mqtt]\nmax_packet_size = -1\n"),
            format!("{base}[[state]]\ndir = \"x\"\n"),
            format!("{base}[[state]]\ndir = \"x\"\n[[state]]\ndir = 1\n"),
            format!("{base}[mqtt.commands]\nallow = [\"reregister\"]\nsurprise = 1\n"),
            base.replace("display_name = \"robot 7\"\n", "")
                .replace("[machine]\n", "[machine.labels]\nsite = \"b\"\n[machine]\n"),
            base.replace("display_name = \"robot 7\"\n", "")
                .replace("[machine]\n", "[machine]\nlabels.site = \"b\"\n"),
            base.replace("[machine]\n", "[machine]\nlabels.site.deeper = \"b\"\n"),
            format!(
                "{}[machine.labels]\nsite = \"b\"\n",
                &base[..base.find("[machine]").unwrap()]
            ),
        ];
        for text in &cases {
            // toml reads a struct from an array positionally; the config's
            // deserializer refuses it (see `deserializer`), at the array.
            if text.contains("[[state]]") {
                let Err(ConfigError::Invalid { key, message, .. }) =
                    Config::from_texts(vec![(PathBuf::from("agent.toml"), text.clone())])
                else {
                    panic!("{text} was not refused as invalid")
                };
                assert_eq!(
                    (key.as_str(), message.as_str()),
                    (
                        "state[0]",
                        "invalid type: sequence, expected struct StateConfig"
                    ),
                    "{text}"
                );
                continue;
            }
            let (ours, theirs) = both::<Config>(text);
            assert_eq!(ours, theirs, "{text}");
            let (ours, toml) = against_toml::<Config>(text);
            assert_eq!(ours, toml, "{text}");
        }
        let file = |extra: &str| {
            format!("{base}{extra}")
                .replace("[orchestrator]\nurl = \"http://127.0.0.1:8080\"\n", "")
        };
        for text in [
            file("[mqtt]\ntopic_prefix = 7\n"),
            file("[mqtt]\nurl = \"mqtt://b\"\n"),
            file("[renewal]\n"),
            base.replace("[orchestrator]\nurl = \"http://127.0.0.1:8080\"\n", "")
                .replace("[identity]\n", "[identity]\nref2 = 1\n"),
        ] {
            let (ours, theirs) = both::<MachineFile>(&text);
            assert_eq!(ours, theirs, "{text}");
            let (ours, toml) = against_toml::<MachineFile>(&text);
            assert_eq!(ours, toml, "{text}");
        }
    }
}
