//! The agent's configuration: `agent.toml` plus drop-ins in `agent.d/*.toml`
//! (merged in lexical order, later files win, tables merge key by key,
//! arrays are replaced whole).
//!
//! Every bad key or value is refused at start with the file, line, column and
//! key named. To get there from one merged document, each file is parsed with
//! its spans moved into one virtual text (all files one after the other); an
//! error's span then says which file it came from.
//!
//! A gateway's machines are files of their own, `machines.d/*.toml`
//! ([`machines`]): each holds one machine's `[identity]` and `[machine]`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use peaqos_protocol::IdentityRef;
use serde::Deserialize;
use serde::de::{self, Deserializer};

use crate::duration;
use crate::mqtt::MqttConfig;
use crate::pkcs11::Pkcs11Uri;
use crate::registration::challenge::{self, ChallengePolicy, EffectivePolicy};

mod deserializer;
mod load;
pub mod machines;
#[cfg(test)]
mod tests;

pub use load::{CheckError, ConfigError, Location, drop_in_dir, drop_in_files};
pub use machines::{MachineEntry, MachineFile, MachineFileError, MachineSpec, NameError};

/// Where `peaqos-agent run` looks without `--config`.
pub const DEFAULT_PATH: &str = "/etc/peaqos-agent/agent.toml";
/// Default `[state] dir`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/peaqos-agent";

/// Default `[gateway] machines_dir`, beside `agent.toml`.
pub const DEFAULT_MACHINES_DIR: &str = "machines.d";

/// The whole configuration of `agent.toml` (and `agent.d/`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The agent's own machine (a robot, or a gateway that is a machine
    /// too); both or neither with `machine`.
    #[serde(default)]
    pub identity: Option<IdentityConfig>,
    pub orchestrator: OrchestratorConfig,
    #[serde(default)]
    pub machine: Option<MachineConfig>,
    #[serde(default)]
    pub mqtt: MqttConfig,
    #[serde(default)]
    pub state: StateConfig,
    #[serde(default)]
    pub renewal: RenewalConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub gateway: GatewayConfig,
    /// `[gateway] machines_dir`, resolved against the main file's
    /// directory.
    #[serde(skip)]
    pub machines_dir: PathBuf,
    /// The files this configuration was read from, main file first.
    #[serde(skip)]
    pub files: Vec<PathBuf>,
    /// `credential:NAME` values replaced by the unit's source because
    /// `$CREDENTIALS_DIRECTORY` is not set: (value as configured, file).
    #[serde(skip)]
    pub credentials_outside_systemd: Vec<(String, PathBuf)>,
}

/// `[identity]`: which identity this machine proves, with which key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// Any accepted form; kept canonical.
    #[serde(rename = "ref")]
    pub identity_ref: IdentityRef,
    /// Path of the controller key, or `credential:NAME`.
    #[serde(default, deserialize_with = "non_empty_option")]
    pub key_file: Option<String>,
    /// For a key file that is an Ethereum V3 keystore: the file holding
    /// its password, or `credential:NAME`.
    #[serde(default, deserialize_with = "non_empty_option")]
    pub key_password_file: Option<String>,
    /// The controller key in a PKCS#11 token, as an RFC 7512 URI. When set
    /// it wins over `key_file` (so that a drop-in can move a packaged
    /// configuration to a token), and the agent never falls back to the
    /// file.
    #[serde(default, deserialize_with = "pkcs11_uri")]
    pub key: Option<Pkcs11Uri>,
    /// The file holding the token's user PIN, or `credential:NAME`; instead
    /// of the URI's `pin-source`.
    #[serde(default, deserialize_with = "non_empty_option")]
    pub key_pin_file: Option<String>,
    /// What key rotation does with the old key once its successor is
    /// promoted (`peaqos-agent key rotate`): destroy it (the default), or
    /// keep it. Either way it never signs again.
    #[serde(default)]
    pub retire_old_key: RetireOldKey,
}

/// `[identity] retire_old_key`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetireOldKey {
    /// Unlink an agent-written key file, destroy a token's key pair.
    #[default]
    Destroy,
    /// Leave it where it is.
    Keep,
}

/// Where the controller key is, as the configuration says.
#[derive(Debug, Clone)]
pub enum KeySource<'a> {
    /// A key file (hex or V3 keystore) and its keystore password file.
    File {
        location: &'a str,
        password: Option<&'a str>,
    },
    /// A key in a PKCS#11 token and the location of its PIN (a path or
    /// `credential:NAME`: a `file:` URI in `pin-source` is already its
    /// path, by [`Pkcs11Uri::pin_location`], the one parser of it).
    Token {
        uri: &'a Pkcs11Uri,
        pin: Option<String>,
    },
}

impl IdentityConfig {
    /// The key to use: the token when `key` is set, else the key file.
    pub fn key_source(&self) -> KeySource<'_> {
        match (&self.key, &self.key_file) {
            (Some(uri), _) => KeySource::Token {
                uri,
                pin: self.key_pin_file.clone().or_else(|| uri.pin_location()),
            },
            (None, Some(location)) => KeySource::File {
                location,
                password: self.key_password_file.as_deref(),
            },
            (None, None) => unreachable!("Config::check requires key or key_file"),
        }
    }

    /// The values that may name a `credential:NAME`.
    fn secret_locations(&mut self) -> Vec<&mut Option<String>> {
        let mut locations = vec![
            &mut self.key_file,
            &mut self.key_password_file,
            &mut self.key_pin_file,
        ];
        // A PKCS#11 URI's pin-source may name a credential too.
        if let Some(uri) = &mut self.key {
            locations.push(&mut uri.pin_source);
        }
        locations
    }

    fn check(&self) -> Result<(), CheckError> {
        let invalid = |key: &str, message: &str| CheckError {
            key: format!("identity.{key}"),
            message: message.to_owned(),
        };
        if let Some(file) = &self.key_file
            && file.starts_with("pkcs11:")
        {
            return Err(invalid(
                "key_file",
                "is a PKCS#11 URI; a key in a token goes in [identity] key",
            ));
        }
        let Some(uri) = &self.key else {
            if self.key_file.is_none() {
                return Err(invalid(
                    "key_file",
                    "missing: set key_file (a key file or credential:NAME) or key (a pkcs11: URI)",
                ));
            }
            if self.key_pin_file.is_some() {
                return Err(invalid(
                    "key_pin_file",
                    "only used with a key in a token ([identity] key = \"pkcs11:...\")",
                ));
            }
            return Ok(());
        };
        if !cfg!(feature = "pkcs11") {
            return Err(invalid(
                "key",
                "this build of peaqos-agent has no PKCS#11 support (built without the \
                 `pkcs11` feature)",
            ));
        }
        match (&self.key_pin_file, &uri.pin_source) {
            (Some(_), Some(_)) => Err(invalid(
                "key_pin_file",
                "the URI names a pin-source too; keep one of them",
            )),
            (None, None) => Err(invalid(
                "key",
                "the token needs a PIN: add pin-source=/path/to/pin-file to the URI or set \
                 [identity] key_pin_file (a file or credential:NAME; never the PIN itself)",
            )),
            _ => Ok(()),
        }
    }
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
    /// While backing off from an orchestrator it could not reach, the agent
    /// asks `GET /api/v1/readiness` about this often (jittered), and tries
    /// again as soon as it answers. `0`: wait out the backoff.
    #[serde(
        default = "default_probe_interval",
        deserialize_with = "duration::deserialize"
    )]
    pub probe_interval: Duration,
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
            probe_interval: default_probe_interval(),
            slow_retry: default_slow_retry(),
        }
    }
}

/// `[gateway]`: where the machines of a gateway are.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// The folder of machine files (`<stem>.toml`, one machine each);
    /// relative paths are read from `agent.toml`'s directory. Default:
    /// `machines.d` beside `agent.toml`.
    #[serde(default, deserialize_with = "non_empty_path")]
    pub machines_dir: Option<PathBuf>,
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
fn default_probe_interval() -> Duration {
    Duration::from_secs(10)
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

fn pkcs11_uri<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Pkcs11Uri>, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map(Some).map_err(de::Error::custom)
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
