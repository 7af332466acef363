//! The agent's configuration: `agent.toml` plus drop-ins in `agent.d/*.toml`
//! (merged in lexical order, later files win, tables merge key by key,
//! arrays are replaced whole).
//!
//! Every bad key or value is refused at start with the file, line, column and
//! key named. To get there from one merged document, each file is parsed with
//! its spans moved into one virtual text (all files one after the other); an
//! error's span then says which file it came from.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use peaqos_protocol::IdentityRef;
use serde::Deserialize;
use serde::de::{self, Deserializer};
use toml::Spanned;
use toml::de::{DeArray, DeTable, DeValue};

use crate::duration;
use crate::mqtt::MqttConfig;
use crate::registration::challenge::{self, ChallengePolicy, EffectivePolicy};

/// Where `peaqos-agent run` looks without `--config`.
pub const DEFAULT_PATH: &str = "/etc/peaqos-agent/agent.toml";
/// Default `[state] dir`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/peaqos-agent";

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub identity: IdentityConfig,
    pub orchestrator: OrchestratorConfig,
    pub machine: MachineConfig,
    #[serde(default)]
    pub mqtt: MqttConfig,
    #[serde(default)]
    pub state: StateConfig,
    #[serde(default)]
    pub renewal: RenewalConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// The files this configuration was read from, main file first.
    #[serde(skip)]
    pub files: Vec<PathBuf>,
}

/// `[identity]`: which identity this machine proves, with which key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// Any accepted form; kept canonical.
    #[serde(rename = "ref")]
    pub identity_ref: IdentityRef,
    /// Path of the controller key, or `credential:NAME`.
    #[serde(deserialize_with = "non_empty")]
    pub key_file: String,
    /// For a key file that is an Ethereum V3 keystore: the file holding
    /// its password, or `credential:NAME`.
    #[serde(default, deserialize_with = "non_empty_option")]
    pub key_password_file: Option<String>,
}

/// `[orchestrator]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrchestratorConfig {
    #[serde(deserialize_with = "orchestrator_url")]
    pub url: reqwest::Url,
    /// Path of a file holding the platform API key, or `credential:NAME`.
    #[serde(default, deserialize_with = "non_empty_option")]
    pub api_key_file: Option<String>,
    #[serde(default = "default_connect_timeout", deserialize_with = "positive")]
    pub connect_timeout: Duration,
    /// Whole request, connect included.
    #[serde(default = "default_request_timeout", deserialize_with = "positive")]
    pub request_timeout: Duration,
    /// PEM CA certificate(s) an `https://` orchestrator's certificate must
    /// chain to. They replace the system's roots: an orchestrator behind a
    /// private CA is then trusted through that CA alone, and no public CA
    /// can vouch for an impostor.
    #[serde(default, deserialize_with = "non_empty_path")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) for orchestrators that require one.
    #[serde(default, deserialize_with = "non_empty_path")]
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of `client_cert_file`: a path or `credential:NAME`.
    #[serde(default, deserialize_with = "non_empty_option")]
    pub client_key_file: Option<String>,
    /// Which challenges the key signs; unset means the default, `standard`.
    #[serde(default)]
    pub challenge_policy: Option<ChallengePolicy>,
    /// Lets `standard` sign server-chosen text over plain `http://` to a
    /// host that is not loopback (otherwise `strict` applies there).
    #[serde(default)]
    pub standard_over_plain_http: bool,
}

impl OrchestratorConfig {
    /// The signing policy in effect for this orchestrator, and why.
    pub fn effective_policy(&self) -> EffectivePolicy {
        challenge::effective(
            self.challenge_policy,
            &self.url,
            self.standard_over_plain_http,
        )
    }

    /// Rules across the TLS keys. The files themselves are read when the
    /// client is built, at start, where a missing or bad one stops the
    /// agent with the file named.
    fn check(&self) -> Result<(), CheckError> {
        let invalid = |key: &str, message: &str| CheckError {
            key: format!("orchestrator.{key}"),
            message: message.to_owned(),
        };
        let keys = [
            ("ca_file", self.ca_file.is_some()),
            ("client_cert_file", self.client_cert_file.is_some()),
            ("client_key_file", self.client_key_file.is_some()),
        ];
        for (key, set) in keys {
            if !set {
                continue;
            }
            if !cfg!(feature = "tls") {
                return Err(invalid(
                    key,
                    "needs TLS, but this build of peaqos-agent has no TLS support \
                     (built without the `tls` feature)",
                ));
            }
            if self.url.scheme() != "https" {
                return Err(invalid(
                    key,
                    "only used with an https:// url (this url is plain http://)",
                ));
            }
        }
        match (&self.client_cert_file, &self.client_key_file) {
            (Some(_), None) => {
                return Err(invalid(
                    "client_key_file",
                    "client_cert_file is set, so client_key_file is needed too",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "client_cert_file",
                    "client_key_file is set, so client_cert_file is needed too",
                ));
            }
            _ => {}
        }
        if self.client_cert_file.is_some() && self.ca_file.is_none() {
            return Err(invalid(
                "ca_file",
                "a client certificate needs ca_file too (the CA certificate(s) of the \
                 orchestrator; for a public certificate use /etc/ssl/certs/ca-certificates.crt)",
            ));
        }
        Ok(())
    }
}

/// `[machine]`: the record's fields. Optional lists and maps left out of
/// the file are not managed by the agent (an operator may set them).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    #[serde(deserialize_with = "non_empty")]
    pub display_name: String,
    #[serde(deserialize_with = "non_empty")]
    pub owner_id: String,
    #[serde(deserialize_with = "non_empty")]
    pub machine_type: String,
    #[serde(deserialize_with = "non_empty")]
    pub runtime_profile: String,
    #[serde(default)]
    pub capabilities: Option<Vec<String>>,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub skill_keys: Option<Vec<String>>,
    #[serde(default)]
    pub policy_ids: Option<Vec<String>>,
}

/// `[state]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    #[serde(default = "default_state_dir")]
    pub dir: PathBuf,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            dir: default_state_dir(),
        }
    }
}

/// `[renewal]`: when to renew, how often to look, how to back off.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewalConfig {
    /// Renew this long before a known proof expiry. Unset: at about two
    /// thirds of the proof's lifetime.
    #[serde(default, deserialize_with = "duration::deserialize_option")]
    pub renew_before: Option<Duration>,
    /// How often to re-read the record while all is well.
    #[serde(default = "default_check_interval", deserialize_with = "positive")]
    pub check_interval: Duration,
    /// First wait after a transient failure; doubles up to `backoff_max`.
    #[serde(default = "default_backoff_initial", deserialize_with = "positive")]
    pub backoff_initial: Duration,
    #[serde(default = "default_backoff_max", deserialize_with = "positive")]
    pub backoff_max: Duration,
    /// Retry interval for what an operator must fix: our key not among the
    /// controllers, a refused API key, a record the server rejects.
    #[serde(default = "default_slow_retry", deserialize_with = "positive")]
    pub slow_retry: Duration,
}

impl Default for RenewalConfig {
    fn default() -> Self {
        Self {
            renew_before: None,
            check_interval: default_check_interval(),
            backoff_initial: default_backoff_initial(),
            backoff_max: default_backoff_max(),
            slow_retry: default_slow_retry(),
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A filter such as `info` or `warn,peaqos_agent=debug`; `RUST_LOG` wins.
    #[serde(default)]
    pub level: Option<String>,
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}
fn default_check_interval() -> Duration {
    Duration::from_secs(300)
}
fn default_backoff_initial() -> Duration {
    Duration::from_secs(1)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(300)
}
fn default_slow_retry() -> Duration {
    Duration::from_secs(600)
}

fn non_empty<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    if s.trim().is_empty() {
        return Err(de::Error::custom("must not be empty"));
    }
    Ok(s)
}

fn non_empty_option<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    non_empty(d).map(Some)
}

fn non_empty_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    non_empty(d).map(|p| Some(PathBuf::from(p)))
}

fn positive<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let value = duration::deserialize(d)?;
    if value.is_zero() {
        return Err(de::Error::custom("must be longer than zero"));
    }
    Ok(value)
}

fn orchestrator_url<'de, D: Deserializer<'de>>(d: D) -> Result<reqwest::Url, D::Error> {
    let text = String::deserialize(d)?;
    let url =
        reqwest::Url::parse(&text).map_err(|e| de::Error::custom(format!("not a URL ({e})")))?;
    match url.scheme() {
        "http" => {}
        "https" if cfg!(feature = "tls") => {}
        "https" => {
            return Err(de::Error::custom(
                "https needs an agent built with the `tls` feature",
            ));
        }
        other => {
            return Err(de::Error::custom(format!(
                "scheme must be http or https, not {other:?}"
            )));
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(de::Error::custom("URL has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(de::Error::custom(
            "credentials do not belong in the URL; use api_key_file",
        ));
    }
    Ok(url)
}

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
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(ConfigError::DropIns { path: dir, source }),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| ConfigError::DropIns {
            path: dir.clone(),
            source,
        })?;
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "toml") && path.is_file() {
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
        Self::from_texts(texts)
    }

    /// Parses already-read files (main file first), as [`Config::load`].
    pub fn from_texts(files: Vec<(PathBuf, String)>) -> Result<Self, ConfigError> {
        let mut base = 0;
        let sources = Sources(
            files
                .into_iter()
                .map(|(path, text)| {
                    let file = SourceFile { path, text, base };
                    // One byte of gap keeps an end-of-file span inside its file.
                    base += file.text.len() + 1;
                    file
                })
                .collect(),
        );

        let mut merged: Option<Spanned<DeTable<'_>>> = None;
        for file in &sources.0 {
            let table = DeTable::parse(&file.text).map_err(|e| ConfigError::Syntax {
                location: sources.locate(file.base + e.span().map_or(0, |s| s.start)),
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
        let merged = merged.unwrap_or_else(|| Spanned::new(0..0, DeTable::default()));
        let root_start = merged.span().start;
        let mut key_offsets = BTreeMap::new();
        index_keys(merged.get_ref(), "", &mut key_offsets);
        let deserializer = toml::de::Deserializer::from(merged);
        let mut config: Self = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            ConfigError::Invalid {
                location: sources.locate(inner.span().map_or(root_start, |s| s.start)),
                key,
                message: inner.message().to_owned(),
            }
        })?;
        if let Err(e) = config.check() {
            let offset = key_offsets.get(&e.key).copied().unwrap_or(root_start);
            return Err(ConfigError::Invalid {
                location: sources.locate(offset),
                key: e.key,
                message: e.message,
            });
        }
        config.files = sources.0.into_iter().map(|f| f.path).collect();
        Ok(config)
    }

    /// Rules that involve more than one key.
    pub fn check(&self) -> Result<(), CheckError> {
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

    /// The agent's name on the MQTT interface and in logs.
    pub fn machine_name(&self) -> &str {
        &self.machine.display_name
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

/// Dotted key path -> offset of the key, for reporting [`CheckError`]s.
fn index_keys(table: &DeTable<'_>, prefix: &str, out: &mut BTreeMap<String, usize>) {
    for (key, value) in table {
        let path = if prefix.is_empty() {
            key.get_ref().to_string()
        } else {
            format!("{prefix}.{}", key.get_ref())
        };
        if let DeValue::Table(inner) = value.get_ref() {
            index_keys(inner, &path, out);
        }
        out.insert(path, key.span().start);
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

    const MAIN: &str = r#"
[identity]
ref = "peaqos:machine:4242"
key_file = "/etc/peaqos-agent/controller.key"

[orchestrator]
url = "http://127.0.0.1:8080"

[machine]
display_name = "robot 7"
owner_id = "owner-1"
machine_type = "robot"
runtime_profile = "ros2"
labels = { site = "berlin" }
"#;

    fn load(files: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_texts(
            files
                .iter()
                .map(|(p, t)| (PathBuf::from(p), (*t).to_owned()))
                .collect(),
        )
    }

    fn invalid(err: ConfigError) -> (Location, String, String) {
        match err {
            ConfigError::Invalid {
                location,
                key,
                message,
            } => (location, key, message),
            other => panic!("expected Invalid, got {other}"),
        }
    }

    #[test]
    fn minimal_file_gets_defaults_and_canonical_identity() {
        let c = load(&[("agent.toml", MAIN)]).unwrap();
        assert_eq!(c.identity.identity_ref.canonical(), "did:peaq:4242");
        assert_eq!(c.state.dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(c.renewal.check_interval, Duration::from_secs(300));
        assert_eq!(c.renewal.renew_before, None);
        assert!(!c.mqtt.enabled);
        assert_eq!(c.machine.capabilities, None);
        assert_eq!(c.files, vec![PathBuf::from("agent.toml")]);
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let text = MAIN.replace("[machine]\n", "[machine]\ncolour = \"red\"\n");
        let (loc, key, message) = invalid(load(&[("agent.toml", &text)]).unwrap_err());
        assert_eq!(loc.file, PathBuf::from("agent.toml"));
        assert_eq!(loc.line, 10, "{loc}");
        assert!(key.starts_with("machine"), "{key}");
        assert!(message.contains("colour"), "{message}");
    }

    #[test]
    fn bad_value_in_a_drop_in_is_reported_against_the_drop_in() {
        let drop_in = "# tune\n[renewal]\ncheck_interval = \"soon\"\n";
        let err = load(&[("agent.toml", MAIN), ("agent.d/10-renew.toml", drop_in)]).unwrap_err();
        let text = err.to_string();
        let (loc, key, message) = invalid(err);
        assert_eq!(loc.file, PathBuf::from("agent.d/10-renew.toml"));
        assert_eq!((loc.line, loc.column), (3, 18), "{text}");
        assert_eq!(key, "renewal.check_interval");
        assert!(message.contains("invalid duration"), "{message}");
        assert!(
            text.starts_with("agent.d/10-renew.toml:3:18: `renewal.check_interval`"),
            "{text}"
        );
    }

    #[test]
    fn drop_ins_merge_tables_and_later_files_win() {
        let a = "[machine]\ndisplay_name = \"renamed\"\nlabels = { zone = \"a\" }\n[renewal]\nbackoff_max = 60\n";
        let b = "[renewal]\nbackoff_max = \"2m\"\nslow_retry = \"90s\"\n";
        let c = load(&[("agent.toml", MAIN), ("a.toml", a), ("b.toml", b)]).unwrap();
        assert_eq!(c.machine.display_name, "renamed");
        assert_eq!(c.machine.owner_id, "owner-1", "untouched keys survive");
        // Maps are tables: merged key by key.
        let labels = c.machine.labels.unwrap();
        assert_eq!(labels.get("site").map(String::as_str), Some("berlin"));
        assert_eq!(labels.get("zone").map(String::as_str), Some("a"));
        assert_eq!(c.renewal.backoff_max, Duration::from_secs(120));
        assert_eq!(c.renewal.slow_retry, Duration::from_secs(90));
        assert_eq!(c.files.len(), 3);
    }

    #[test]
    fn challenge_policy_defaults_to_standard_and_refuses_unknown_names() {
        use crate::registration::challenge::ChallengePolicy;
        let c = load(&[("agent.toml", MAIN)]).unwrap();
        assert_eq!(c.orchestrator.challenge_policy, None);
        assert!(!c.orchestrator.standard_over_plain_http);
        let strict = "[orchestrator]\nchallenge_policy = \"strict\"\n";
        let c = load(&[("agent.toml", MAIN), ("s.toml", strict)]).unwrap();
        assert_eq!(
            c.orchestrator.challenge_policy,
            Some(ChallengePolicy::Strict)
        );
        assert_eq!(
            c.orchestrator.effective_policy().to_string(),
            "strict (configured)"
        );
        let bad = "[orchestrator]\nchallenge_policy = \"lax\"\n";
        let (loc, key, message) =
            invalid(load(&[("agent.toml", MAIN), ("b.toml", bad)]).unwrap_err());
        assert_eq!(
            (loc.line, key.as_str()),
            (2, "orchestrator.challenge_policy")
        );
        assert!(
            message.contains("standard") && message.contains("strict"),
            "{message}"
        );
    }

    #[test]
    fn syntax_error_names_the_line() {
        let err = load(&[("agent.toml", MAIN), ("z.toml", "\n\n[state\n")]).unwrap_err();
        match err {
            ConfigError::Syntax { location, .. } => {
                assert_eq!(location.file, PathBuf::from("z.toml"));
                assert_eq!(location.line, 3);
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn bad_identity_url_and_empty_fields_are_refused_where_they_are() {
        let cases = [
            (
                "ref = \"peaqos:machine:4242\"",
                "ref = \"did:peaq:007\"",
                "identity.ref",
                3,
            ),
            (
                "url = \"http://127.0.0.1:8080\"",
                "url = \"ftp://x\"",
                "orchestrator.url",
                7,
            ),
            (
                "owner_id = \"owner-1\"",
                "owner_id = \" \"",
                "machine.owner_id",
                11,
            ),
            (
                "url = \"http://127.0.0.1:8080\"",
                "url = \"http://u:p@h/\"",
                "orchestrator.url",
                7,
            ),
        ];
        for (from, to, want_key, want_line) in cases {
            let text = MAIN.replace(from, to);
            let (loc, key, message) = invalid(load(&[("agent.toml", &text)]).unwrap_err());
            assert_eq!(key, want_key, "{message}");
            assert_eq!(loc.line, want_line, "{key}: {message}");
        }
    }

    #[test]
    fn missing_section_and_zero_durations_are_refused() {
        let text = MAIN.replace("[orchestrator]\nurl = \"http://127.0.0.1:8080\"\n", "");
        let (_, _, message) = invalid(load(&[("agent.toml", &text)]).unwrap_err());
        assert!(message.contains("orchestrator"), "{message}");
        let text = format!("{MAIN}\n[renewal]\nbackoff_initial = \"0s\"\n");
        let (_, key, message) = invalid(load(&[("agent.toml", &text)]).unwrap_err());
        assert_eq!(key, "renewal.backoff_initial");
        assert!(message.contains("longer than zero"), "{message}");
    }

    #[test]
    fn cross_key_rules_name_the_key_and_its_file() {
        let drop_in = "[renewal]\nbackoff_max = \"1s\"\nbackoff_initial = \"5s\"\n";
        let (loc, key, message) =
            invalid(load(&[("agent.toml", MAIN), ("d.toml", drop_in)]).unwrap_err());
        assert_eq!(key, "renewal.backoff_initial");
        assert_eq!((loc.file.to_str(), loc.line), (Some("d.toml"), 3));
        assert!(message.contains("backoff_max (1s)"), "{message}");
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let text = include_str!("../config/agent.example.toml");
        let c = load(&[("agent.example.toml", text)]).unwrap();
        assert_eq!(c.identity.key_file, "credential:controller-key");
        assert_eq!(c.renewal.backoff_max, Duration::from_secs(300));
        assert!(!c.mqtt.enabled);
    }

    #[test]
    fn orchestrator_tls_files_are_checked_together() {
        let https = MAIN.replace(
            "url = \"http://127.0.0.1:8080\"",
            "url = \"https://orchestrator.fleet.example\"",
        );
        let with = |keys: &str| {
            https.replace(
                "url = \"https://orchestrator.fleet.example\"",
                &format!("url = \"https://orchestrator.fleet.example\"\n{keys}"),
            )
        };
        let ok = load(&[(
            "agent.toml",
            &with(
                "ca_file = \"/etc/peaqos-agent/orchestrator-ca.pem\"\n\
                 client_cert_file = \"/etc/peaqos-agent/client.pem\"\n\
                 client_key_file = \"credential:orchestrator-client-key\"",
            ),
        )]);
        if cfg!(feature = "tls") {
            let c = ok.unwrap();
            let o = &c.orchestrator;
            assert_eq!(
                o.ca_file.as_deref(),
                Some(Path::new("/etc/peaqos-agent/orchestrator-ca.pem"))
            );
            assert_eq!(
                o.client_key_file.as_deref(),
                Some("credential:orchestrator-client-key")
            );
        } else {
            let (_, key, message) = invalid(ok.unwrap_err());
            assert_eq!(key, "orchestrator.url", "{message}");
        }

        let cases = [
            (
                with("client_cert_file = \"/c.pem\"\nca_file = \"/ca.pem\""),
                "orchestrator.client_key_file",
                "client_key_file is needed",
            ),
            (
                with("client_key_file = \"/k.pem\"\nca_file = \"/ca.pem\""),
                "orchestrator.client_cert_file",
                "client_cert_file is needed",
            ),
            (
                with("client_cert_file = \"/c.pem\"\nclient_key_file = \"/k.pem\""),
                "orchestrator.ca_file",
                "needs ca_file",
            ),
            (
                MAIN.replace(
                    "url = \"http://127.0.0.1:8080\"",
                    "url = \"http://127.0.0.1:8080\"\nca_file = \"/ca.pem\"",
                ),
                "orchestrator.ca_file",
                if cfg!(feature = "tls") {
                    "only used with an https:// url"
                } else {
                    "built without the `tls` feature"
                },
            ),
            (
                with("ca_file = \"\""),
                "orchestrator.ca_file",
                "must not be empty",
            ),
        ];
        for (text, want_key, want) in cases {
            if !cfg!(feature = "tls") && text.contains("https://") {
                // Such a build refuses the https url itself first.
                continue;
            }
            let (loc, key, message) = invalid(load(&[("agent.toml", &text)]).unwrap_err());
            assert_eq!(key, want_key, "{message}");
            assert!(message.contains(want), "{key}: {message}");
            assert_eq!(loc.file, PathBuf::from("agent.toml"));
        }
    }

    #[test]
    fn secrets_are_not_accepted_inline() {
        let text = MAIN.replace(
            "url = \"http://127.0.0.1:8080\"",
            "url = \"http://127.0.0.1:8080\"\napi_key = \"hunter2\"",
        );
        let err = load(&[("agent.toml", &text)]).unwrap_err();
        let (_, _, message) = invalid(err);
        assert!(message.contains("api_key"), "{message}");
    }
}
