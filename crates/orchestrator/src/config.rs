//! Settings: embedded defaults, then an optional TOML file, then environment
//! variables. Every error names the setting it is about (the environment
//! variable, or the key and line of the file), in one line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::store::{Backend, PoolSettings};

/// Whether machine writes need a signed identity proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VerificationMode {
    /// Production: every machine write is bound to a verified proof.
    #[default]
    Required,
    /// Development only: proofs are optional; said loudly at start-up.
    Disabled,
}

impl VerificationMode {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "required" => Some(Self::Required),
            "disabled" => Some(Self::Disabled),
            _ => None,
        }
    }
}

/// The orchestrator's settings. `Config::default()` is the embedded default.
/// `Debug` hides the database password.
#[derive(Clone, PartialEq, Eq)]
pub struct Config {
    pub listen_addr: SocketAddr,
    /// `sqlite://<path>`, `sqlite::memory:` (tests), or
    /// `postgres://user:password@host:port/database` (several replicas).
    pub database_url: String,
    /// PostgreSQL: connections this process opens at most.
    pub db_max_connections: u32,
    /// Longest a request waits for a database connection (including
    /// connecting) before it is answered `503`.
    pub db_acquire_timeout: Duration,
    /// Longest a database statement may run: PostgreSQL's
    /// `statement_timeout`; on SQLite, how long a statement waits for a lock.
    pub db_statement_timeout: Duration,
    /// Base URL of the peaqOS MCR API; when set, controllers come from it.
    pub mcr_api_url: Option<String>,
    /// Total time allowed for one MCR request.
    pub mcr_timeout: Duration,
    /// Local registry file (identity -> controller addresses), hot reloaded.
    pub registry_file: Option<PathBuf>,
    pub verification: VerificationMode,
    pub require_api_auth: bool,
    /// One API key per line; `#` comments and blank lines are skipped.
    pub api_keys_file: Option<PathBuf>,
    pub challenge_ttl: Duration,
    /// Proofs older than this no longer keep a machine active.
    pub proof_max_age: Option<Duration>,
    pub mcr_cache_ttl: Duration,
    /// Named in every challenge message.
    pub orchestrator_name: String,
    /// Challenges a single client address may request per minute.
    pub challenge_rate_per_minute: u32,
    /// Challenges a client address may request at once before the rate applies.
    pub challenge_burst: u32,
    /// Unexpired challenges held at once, over all clients.
    pub max_pending_challenges: u64,
    pub body_limit_bytes: usize,
    pub request_timeout: Duration,
    /// Log filter when `RUST_LOG` is unset (`info` when neither is).
    pub log_level: Option<String>,
}

/// Where systemd's `StateDirectory=` puts state when it does not say
/// (`$STATE_DIRECTORY`).
const DEFAULT_STATE_DIR: &str = "/var/lib/peaqos-orchestrator";

impl Default for Config {
    fn default() -> Self {
        Self {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            database_url: default_database_url(None),
            db_max_connections: PoolSettings::default().max_connections,
            db_acquire_timeout: PoolSettings::default().acquire_timeout,
            db_statement_timeout: PoolSettings::default().statement_timeout,
            mcr_api_url: None,
            mcr_timeout: Duration::from_secs(3),
            registry_file: None,
            verification: VerificationMode::Required,
            require_api_auth: false,
            api_keys_file: None,
            challenge_ttl: Duration::from_secs(300),
            proof_max_age: None,
            mcr_cache_ttl: Duration::from_secs(30),
            orchestrator_name: "peaqos-orchestrator".to_owned(),
            challenge_rate_per_minute: 60,
            challenge_burst: 20,
            max_pending_challenges: 100_000,
            body_limit_bytes: 64 * 1024,
            request_timeout: Duration::from_secs(30),
            log_level: None,
        }
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen_addr", &self.listen_addr)
            .field("database_url", &redact_password(&self.database_url))
            .field("db_max_connections", &self.db_max_connections)
            .field("db_acquire_timeout", &self.db_acquire_timeout)
            .field("db_statement_timeout", &self.db_statement_timeout)
            .field(
                "mcr_api_url",
                &self.mcr_api_url.as_deref().map(redact_password),
            )
            .field("mcr_timeout", &self.mcr_timeout)
            .field("registry_file", &self.registry_file)
            .field("verification", &self.verification)
            .field("require_api_auth", &self.require_api_auth)
            .field("api_keys_file", &self.api_keys_file)
            .field("challenge_ttl", &self.challenge_ttl)
            .field("proof_max_age", &self.proof_max_age)
            .field("mcr_cache_ttl", &self.mcr_cache_ttl)
            .field("orchestrator_name", &self.orchestrator_name)
            .field("challenge_rate_per_minute", &self.challenge_rate_per_minute)
            .field("challenge_burst", &self.challenge_burst)
            .field("max_pending_challenges", &self.max_pending_challenges)
            .field("body_limit_bytes", &self.body_limit_bytes)
            .field("request_timeout", &self.request_timeout)
            .field("log_level", &self.log_level)
            .finish()
    }
}

/// A URL with its password, if any, replaced by `***` (for logs and Debug).
pub fn redact_password(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        // Not a URL we could parse: it may still hold a secret.
        Err(_) if url.contains('@') => "(unparsable URL, hidden)".to_owned(),
        Ok(_) | Err(_) => url.to_owned(),
    }
}

impl Config {
    /// The database pool settings.
    pub fn pool_settings(&self) -> PoolSettings {
        PoolSettings {
            max_connections: self.db_max_connections,
            acquire_timeout: self.db_acquire_timeout,
            statement_timeout: self.db_statement_timeout,
        }
    }
}

fn default_database_url(state_directory: Option<&str>) -> String {
    // systemd may list several directories separated by `:`; the first is ours.
    let dir = state_directory
        .and_then(|s| s.split(':').next())
        .filter(|s| !s.is_empty())
        .unwrap_or(DEFAULT_STATE_DIR);
    format!("sqlite://{dir}/orchestrator.db")
}

/// Why the settings cannot be used. Display is the whole single line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {reason}")]
    ReadFile { path: PathBuf, reason: String },
    #[error("config file {path} line {line}: {message}")]
    FileSyntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{setting}: {message}")]
    Invalid { setting: String, message: String },
}

/// The TOML file: the same settings, snake_case, without the `PEAQOS_` prefix.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen_addr: Option<toml::Spanned<String>>,
    database_url: Option<toml::Spanned<String>>,
    db_max_connections: Option<toml::Spanned<u32>>,
    db_acquire_timeout_ms: Option<toml::Spanned<u64>>,
    db_statement_timeout_ms: Option<toml::Spanned<u64>>,
    mcr_api_url: Option<toml::Spanned<String>>,
    mcr_timeout_ms: Option<toml::Spanned<u64>>,
    mcr_registry_file: Option<toml::Spanned<PathBuf>>,
    mcr_cache_ttl_secs: Option<toml::Spanned<u64>>,
    machine_identity_verification: Option<toml::Spanned<String>>,
    require_api_auth: Option<toml::Spanned<bool>>,
    api_keys_file: Option<toml::Spanned<PathBuf>>,
    challenge_ttl_secs: Option<toml::Spanned<u64>>,
    proof_max_age_secs: Option<toml::Spanned<u64>>,
    orchestrator_name: Option<toml::Spanned<String>>,
    challenge_rate_per_minute: Option<toml::Spanned<u32>>,
    challenge_burst: Option<toml::Spanned<u32>>,
    max_pending_challenges: Option<toml::Spanned<u64>>,
    body_limit_bytes: Option<toml::Spanned<u64>>,
    request_timeout_secs: Option<toml::Spanned<u64>>,
    log_level: Option<toml::Spanned<String>>,
}

/// One setting's two names: environment variable and file key.
#[derive(Clone, Copy)]
struct Setting {
    env: &'static str,
    key: &'static str,
}

macro_rules! settings {
    ($($name:ident = $env:literal, $key:literal;)*) => {
        $(const $name: Setting = Setting { env: $env, key: $key };)*
        /// Every environment variable read, for documentation and tests.
        pub const ENV_VARS: &[&str] = &[$($env,)*];
    };
}

settings! {
    LISTEN_ADDR = "PEAQOS_LISTEN_ADDR", "listen_addr";
    DATABASE_URL = "DATABASE_URL", "database_url";
    DB_MAX_CONNECTIONS = "PEAQOS_DB_MAX_CONNECTIONS", "db_max_connections";
    DB_ACQUIRE_TIMEOUT = "PEAQOS_DB_ACQUIRE_TIMEOUT_MS", "db_acquire_timeout_ms";
    DB_STATEMENT_TIMEOUT = "PEAQOS_DB_STATEMENT_TIMEOUT_MS", "db_statement_timeout_ms";
    MCR_API_URL = "PEAQOS_MCR_API_URL", "mcr_api_url";
    MCR_TIMEOUT = "PEAQOS_MCR_TIMEOUT_MS", "mcr_timeout_ms";
    REGISTRY_FILE = "PEAQOS_MCR_REGISTRY_FILE", "mcr_registry_file";
    MCR_CACHE_TTL = "PEAQOS_MCR_CACHE_TTL_SECS", "mcr_cache_ttl_secs";
    VERIFICATION = "PEAQOS_MACHINE_IDENTITY_VERIFICATION", "machine_identity_verification";
    REQUIRE_API_AUTH = "PEAQOS_REQUIRE_API_AUTH", "require_api_auth";
    API_KEYS_FILE = "PEAQOS_API_KEYS_FILE", "api_keys_file";
    CHALLENGE_TTL = "PEAQOS_CHALLENGE_TTL_SECS", "challenge_ttl_secs";
    PROOF_MAX_AGE = "PEAQOS_PROOF_MAX_AGE_SECS", "proof_max_age_secs";
    ORCHESTRATOR_NAME = "PEAQOS_ORCHESTRATOR_NAME", "orchestrator_name";
    CHALLENGE_RATE = "PEAQOS_CHALLENGE_RATE_PER_MINUTE", "challenge_rate_per_minute";
    CHALLENGE_BURST = "PEAQOS_CHALLENGE_BURST", "challenge_burst";
    MAX_PENDING = "PEAQOS_MAX_PENDING_CHALLENGES", "max_pending_challenges";
    BODY_LIMIT = "PEAQOS_BODY_LIMIT_BYTES", "body_limit_bytes";
    REQUEST_TIMEOUT = "PEAQOS_REQUEST_TIMEOUT_SECS", "request_timeout_secs";
    LOG_LEVEL = "PEAQOS_LOG_LEVEL", "log_level";
}

/// Upper bounds that keep obviously wrong values (a TTL in milliseconds
/// typed as seconds, say) from starting a server that behaves strangely.
const MAX_CHALLENGE_TTL: Duration = Duration::from_secs(3600);
const MAX_CACHE_TTL: Duration = Duration::from_secs(3600);
const MAX_BODY_LIMIT: usize = 16 * 1024 * 1024;
const MIN_BODY_LIMIT: usize = 1024;
const MAX_NAME_LEN: usize = 200;
const MAX_DB_CONNECTIONS: u32 = 1000;
const MAX_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_STATEMENT_TIMEOUT: Duration = Duration::from_secs(600);

impl Config {
    /// Defaults, then the TOML file if given, then the process environment.
    pub fn from_env(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::from_sources(file, |name| std::env::var(name).ok())
    }

    /// Like [`Config::from_env`] with an explicit environment (for tests).
    /// Empty variables count as unset.
    pub fn from_sources(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        let mut config = Self {
            database_url: default_database_url(env("STATE_DIRECTORY").as_deref()),
            ..Self::default()
        };
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::ReadFile {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
            config.apply_file(path, &text)?;
        }
        config.apply_env(&env)?;
        config.check()?;
        Ok(config)
    }

    fn apply_file(&mut self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::FileSyntax {
            path: path.to_owned(),
            line: e.span().map_or(1, |s| line_of(s.start)),
            message: e.message().trim().to_owned(),
        })?;
        let bad = |span: std::ops::Range<usize>, setting: Setting, message: String| {
            ConfigError::FileSyntax {
                path: path.to_owned(),
                line: line_of(span.start),
                message: format!("{}: {message}", setting.key),
            }
        };
        if let Some(v) = file.listen_addr {
            self.listen_addr =
                parse_addr(v.get_ref()).map_err(|m| bad(v.span(), LISTEN_ADDR, m))?;
        }
        if let Some(v) = file.database_url {
            self.database_url = v.into_inner();
        }
        if let Some(v) = file.db_max_connections {
            self.db_max_connections = *v.get_ref();
        }
        if let Some(v) = file.db_acquire_timeout_ms {
            self.db_acquire_timeout = Duration::from_millis(*v.get_ref());
        }
        if let Some(v) = file.db_statement_timeout_ms {
            self.db_statement_timeout = Duration::from_millis(*v.get_ref());
        }
        if let Some(v) = file.mcr_api_url {
            self.mcr_api_url = Some(v.into_inner());
        }
        if let Some(v) = file.mcr_timeout_ms {
            self.mcr_timeout = Duration::from_millis(*v.get_ref());
        }
        if let Some(v) = file.mcr_registry_file {
            self.registry_file = Some(v.into_inner());
        }
        if let Some(v) = file.mcr_cache_ttl_secs {
            self.mcr_cache_ttl = Duration::from_secs(*v.get_ref());
        }
        if let Some(v) = file.machine_identity_verification {
            self.verification =
                parse_verification(v.get_ref()).map_err(|m| bad(v.span(), VERIFICATION, m))?;
        }
        if let Some(v) = file.require_api_auth {
            self.require_api_auth = *v.get_ref();
        }
        if let Some(v) = file.api_keys_file {
            self.api_keys_file = Some(v.into_inner());
        }
        if let Some(v) = file.challenge_ttl_secs {
            self.challenge_ttl = Duration::from_secs(*v.get_ref());
        }
        if let Some(v) = file.proof_max_age_secs {
            self.proof_max_age = Some(Duration::from_secs(*v.get_ref()));
        }
        if let Some(v) = file.orchestrator_name {
            self.orchestrator_name = v.into_inner();
        }
        if let Some(v) = file.challenge_rate_per_minute {
            self.challenge_rate_per_minute = *v.get_ref();
        }
        if let Some(v) = file.challenge_burst {
            self.challenge_burst = *v.get_ref();
        }
        if let Some(v) = file.max_pending_challenges {
            self.max_pending_challenges = *v.get_ref();
        }
        if let Some(v) = file.body_limit_bytes {
            self.body_limit_bytes = usize::try_from(*v.get_ref())
                .map_err(|_| bad(v.span(), BODY_LIMIT, "too large".to_owned()))?;
        }
        if let Some(v) = file.request_timeout_secs {
            self.request_timeout = Duration::from_secs(*v.get_ref());
        }
        if let Some(v) = file.log_level {
            self.log_level = Some(v.into_inner());
        }
        Ok(())
    }

    fn apply_env(&mut self, env: &impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let invalid = |setting: Setting, message: String| ConfigError::Invalid {
            setting: setting.env.to_owned(),
            message,
        };
        let get = |s: Setting| env(s.env).map(|v| v.trim().to_owned());
        if let Some(v) = get(LISTEN_ADDR) {
            self.listen_addr = parse_addr(&v).map_err(|m| invalid(LISTEN_ADDR, m))?;
        }
        if let Some(v) = get(DATABASE_URL) {
            self.database_url = v;
        }
        if let Some(v) = get(DB_MAX_CONNECTIONS) {
            self.db_max_connections = parse_num(&v).map_err(|m| invalid(DB_MAX_CONNECTIONS, m))?;
        }
        if let Some(v) = get(DB_ACQUIRE_TIMEOUT) {
            self.db_acquire_timeout =
                Duration::from_millis(parse_num(&v).map_err(|m| invalid(DB_ACQUIRE_TIMEOUT, m))?);
        }
        if let Some(v) = get(DB_STATEMENT_TIMEOUT) {
            self.db_statement_timeout =
                Duration::from_millis(parse_num(&v).map_err(|m| invalid(DB_STATEMENT_TIMEOUT, m))?);
        }
        if let Some(v) = get(MCR_API_URL) {
            self.mcr_api_url = Some(v);
        }
        if let Some(v) = get(MCR_TIMEOUT) {
            self.mcr_timeout =
                Duration::from_millis(parse_num(&v).map_err(|m| invalid(MCR_TIMEOUT, m))?);
        }
        if let Some(v) = get(REGISTRY_FILE) {
            self.registry_file = Some(PathBuf::from(v));
        }
        if let Some(v) = get(MCR_CACHE_TTL) {
            self.mcr_cache_ttl = secs(&v).map_err(|m| invalid(MCR_CACHE_TTL, m))?;
        }
        if let Some(v) = get(VERIFICATION) {
            self.verification = parse_verification(&v).map_err(|m| invalid(VERIFICATION, m))?;
        }
        if let Some(v) = get(REQUIRE_API_AUTH) {
            self.require_api_auth = parse_bool(&v).map_err(|m| invalid(REQUIRE_API_AUTH, m))?;
        }
        if let Some(v) = get(API_KEYS_FILE) {
            self.api_keys_file = Some(PathBuf::from(v));
        }
        if let Some(v) = get(CHALLENGE_TTL) {
            self.challenge_ttl = secs(&v).map_err(|m| invalid(CHALLENGE_TTL, m))?;
        }
        if let Some(v) = get(PROOF_MAX_AGE) {
            self.proof_max_age = Some(secs(&v).map_err(|m| invalid(PROOF_MAX_AGE, m))?);
        }
        if let Some(v) = env(ORCHESTRATOR_NAME.env) {
            self.orchestrator_name = v;
        }
        if let Some(v) = get(CHALLENGE_RATE) {
            self.challenge_rate_per_minute =
                parse_num(&v).map_err(|m| invalid(CHALLENGE_RATE, m))?;
        }
        if let Some(v) = get(CHALLENGE_BURST) {
            self.challenge_burst = parse_num(&v).map_err(|m| invalid(CHALLENGE_BURST, m))?;
        }
        if let Some(v) = get(MAX_PENDING) {
            self.max_pending_challenges = parse_num(&v).map_err(|m| invalid(MAX_PENDING, m))?;
        }
        if let Some(v) = get(BODY_LIMIT) {
            self.body_limit_bytes = parse_num(&v).map_err(|m| invalid(BODY_LIMIT, m))?;
        }
        if let Some(v) = get(REQUEST_TIMEOUT) {
            self.request_timeout = secs(&v).map_err(|m| invalid(REQUEST_TIMEOUT, m))?;
        }
        if let Some(v) = get(LOG_LEVEL) {
            self.log_level = Some(v);
        }
        Ok(())
    }

    /// Checks values and their combinations. Errors name the environment
    /// variable (the file key is the same name in lower case without
    /// `PEAQOS_`).
    pub fn check(&self) -> Result<(), ConfigError> {
        let invalid = |setting: Setting, message: &str| {
            Err(ConfigError::Invalid {
                setting: setting.env.to_owned(),
                message: message.to_owned(),
            })
        };
        match Backend::of(&self.database_url) {
            None => {
                return invalid(
                    DATABASE_URL,
                    "must be sqlite://<path>, sqlite::memory: or postgres://[user[:password]@]host[:port]/database",
                );
            }
            Some(Backend::Postgres) => {
                // The parser's message may quote the URL, password included.
                if sqlx::postgres::PgConnectOptions::from_str(&self.database_url).is_err() {
                    return invalid(DATABASE_URL, "is not a valid postgres:// URL");
                }
            }
            Some(Backend::Sqlite) => {}
        }
        if !(1..=MAX_DB_CONNECTIONS).contains(&self.db_max_connections) {
            return invalid(DB_MAX_CONNECTIONS, "must be between 1 and 1000");
        }
        if self.db_acquire_timeout.is_zero() || self.db_acquire_timeout > MAX_ACQUIRE_TIMEOUT {
            return invalid(
                DB_ACQUIRE_TIMEOUT,
                "must be between 1 and 60000 milliseconds",
            );
        }
        if self.db_acquire_timeout >= self.request_timeout {
            return invalid(
                DB_ACQUIRE_TIMEOUT,
                "must be shorter than PEAQOS_REQUEST_TIMEOUT_SECS (a request waiting for a connection must get its own 503)",
            );
        }
        if self.db_statement_timeout.is_zero() || self.db_statement_timeout > MAX_STATEMENT_TIMEOUT
        {
            return invalid(
                DB_STATEMENT_TIMEOUT,
                "must be between 1 and 600000 milliseconds",
            );
        }
        if let Some(url) = &self.mcr_api_url {
            match reqwest::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => {}
                _ => return invalid(MCR_API_URL, "must be an http:// or https:// URL"),
            }
            if self.registry_file.is_some() {
                return invalid(
                    MCR_API_URL,
                    "set either PEAQOS_MCR_API_URL or PEAQOS_MCR_REGISTRY_FILE, not both",
                );
            }
        }
        if self.mcr_timeout.is_zero() || self.mcr_timeout > Duration::from_secs(60) {
            return invalid(MCR_TIMEOUT, "must be between 1 and 60000 milliseconds");
        }
        if self.mcr_cache_ttl > MAX_CACHE_TTL {
            return invalid(MCR_CACHE_TTL, "must be at most 3600 seconds");
        }
        if self.require_api_auth && self.api_keys_file.is_none() {
            return invalid(
                API_KEYS_FILE,
                "must be set when PEAQOS_REQUIRE_API_AUTH is true",
            );
        }
        if self.challenge_ttl.is_zero() || self.challenge_ttl > MAX_CHALLENGE_TTL {
            return invalid(CHALLENGE_TTL, "must be between 1 and 3600 seconds");
        }
        if self.proof_max_age.is_some_and(|d| d.is_zero()) {
            return invalid(
                PROOF_MAX_AGE,
                "must be at least 1 second (leave it unset for no limit)",
            );
        }
        let name = &self.orchestrator_name;
        if name.trim().is_empty() || name.len() > MAX_NAME_LEN || name.chars().any(char::is_control)
        {
            return invalid(
                ORCHESTRATOR_NAME,
                "must be 1 to 200 characters without control characters (it is part of every challenge message)",
            );
        }
        if self.challenge_rate_per_minute == 0 {
            return invalid(CHALLENGE_RATE, "must be at least 1");
        }
        if self.challenge_burst == 0 {
            return invalid(CHALLENGE_BURST, "must be at least 1");
        }
        if self.max_pending_challenges == 0 {
            return invalid(MAX_PENDING, "must be at least 1");
        }
        if !(MIN_BODY_LIMIT..=MAX_BODY_LIMIT).contains(&self.body_limit_bytes) {
            return invalid(BODY_LIMIT, "must be between 1024 and 16777216 bytes");
        }
        if self.request_timeout.is_zero() {
            return invalid(REQUEST_TIMEOUT, "must be at least 1 second");
        }
        Ok(())
    }
}

fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    text.trim()
        .parse()
        .map_err(|_| format!("{text:?} is not an address:port such as 127.0.0.1:8080"))
}

fn parse_verification(text: &str) -> Result<VerificationMode, String> {
    VerificationMode::parse(text.trim())
        .ok_or_else(|| format!("{text:?} is not one of `required`, `disabled`"))
}

fn parse_bool(text: &str) -> Result<bool, String> {
    match text.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("{text:?} is not true or false")),
    }
}

fn parse_num<T: std::str::FromStr>(text: &str) -> Result<T, String> {
    text.parse()
        .map_err(|_| format!("{text:?} is not a whole number in range"))
}

fn secs(text: &str) -> Result<Duration, String> {
    parse_num(text).map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::io::Write;

    use super::*;

    fn from(file: Option<&Path>, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::from_sources(file, |k| map.get(k).cloned())
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = from(None, &[]).unwrap();
        assert_eq!(c.listen_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.challenge_ttl, Duration::from_secs(300));
        assert_eq!(c.proof_max_age, None);
        assert_eq!(c.verification, VerificationMode::Required);
        assert!(!c.require_api_auth);
        assert_eq!(
            c.database_url,
            "sqlite:///var/lib/peaqos-orchestrator/orchestrator.db"
        );
        let c = from(None, &[("STATE_DIRECTORY", "/run/x:/run/y")]).unwrap();
        assert_eq!(c.database_url, "sqlite:///run/x/orchestrator.db");
    }

    #[test]
    fn environment_overrides_the_file() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            f,
            "challenge_ttl_secs = 60\nproof_max_age_secs = 86400\nlisten_addr = \"0.0.0.0:9000\""
        )
        .unwrap();
        let c = from(Some(f.path()), &[("PEAQOS_CHALLENGE_TTL_SECS", "120")]).unwrap();
        assert_eq!(c.challenge_ttl, Duration::from_secs(120));
        assert_eq!(c.proof_max_age, Some(Duration::from_secs(86400)));
        assert_eq!(c.listen_addr.port(), 9000);
    }

    #[test]
    fn bad_values_name_the_setting_in_one_line() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("PEAQOS_CHALLENGE_TTL_SECS", "5m")],
                "PEAQOS_CHALLENGE_TTL_SECS",
            ),
            (
                &[("PEAQOS_CHALLENGE_TTL_SECS", "0")],
                "PEAQOS_CHALLENGE_TTL_SECS",
            ),
            (&[("PEAQOS_LISTEN_ADDR", "localhost")], "PEAQOS_LISTEN_ADDR"),
            (
                &[("PEAQOS_MACHINE_IDENTITY_VERIFICATION", "maybe")],
                "PEAQOS_MACHINE_IDENTITY_VERIFICATION",
            ),
            (
                &[("PEAQOS_REQUIRE_API_AUTH", "true")],
                "PEAQOS_API_KEYS_FILE",
            ),
            (
                &[("PEAQOS_REQUIRE_API_AUTH", "yes please")],
                "PEAQOS_REQUIRE_API_AUTH",
            ),
            (&[("PEAQOS_MCR_API_URL", "ftp://x")], "PEAQOS_MCR_API_URL"),
            (&[("DATABASE_URL", "mysql://x")], "DATABASE_URL"),
            (
                &[("DATABASE_URL", "postgres://u:secret@h:99999/db")],
                "DATABASE_URL",
            ),
            (
                &[("PEAQOS_DB_MAX_CONNECTIONS", "0")],
                "PEAQOS_DB_MAX_CONNECTIONS",
            ),
            (
                &[("PEAQOS_DB_MAX_CONNECTIONS", "many")],
                "PEAQOS_DB_MAX_CONNECTIONS",
            ),
            (
                &[("PEAQOS_DB_ACQUIRE_TIMEOUT_MS", "0")],
                "PEAQOS_DB_ACQUIRE_TIMEOUT_MS",
            ),
            (
                &[
                    ("PEAQOS_DB_ACQUIRE_TIMEOUT_MS", "5000"),
                    ("PEAQOS_REQUEST_TIMEOUT_SECS", "5"),
                ],
                "PEAQOS_DB_ACQUIRE_TIMEOUT_MS",
            ),
            (
                &[("PEAQOS_DB_STATEMENT_TIMEOUT_MS", "5s")],
                "PEAQOS_DB_STATEMENT_TIMEOUT_MS",
            ),
            (
                &[("PEAQOS_DB_STATEMENT_TIMEOUT_MS", "0")],
                "PEAQOS_DB_STATEMENT_TIMEOUT_MS",
            ),
            (
                &[("PEAQOS_PROOF_MAX_AGE_SECS", "0")],
                "PEAQOS_PROOF_MAX_AGE_SECS",
            ),
            (
                &[("PEAQOS_ORCHESTRATOR_NAME", "a\nb")],
                "PEAQOS_ORCHESTRATOR_NAME",
            ),
            (
                &[
                    ("PEAQOS_MCR_API_URL", "https://mcr.example"),
                    ("PEAQOS_MCR_REGISTRY_FILE", "/etc/r.toml"),
                ],
                "PEAQOS_MCR_API_URL",
            ),
        ];
        for (vars, setting) in cases {
            let err = from(None, vars).unwrap_err().to_string();
            assert!(err.starts_with(setting), "{vars:?}: {err}");
            assert!(!err.contains('\n'), "{err}");
            assert!(!err.contains("secret"), "{err}");
        }
    }

    #[test]
    fn postgres_settings_and_a_password_that_never_shows() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            f,
            "database_url = \"postgres://fleet:s3cret@db.internal:5432/fleet?sslmode=require\"\n\
             db_max_connections = 40\ndb_acquire_timeout_ms = 2000\ndb_statement_timeout_ms = 8000"
        )
        .unwrap();
        let c = from(Some(f.path()), &[("PEAQOS_DB_MAX_CONNECTIONS", "24")]).unwrap();
        assert_eq!(
            c.pool_settings(),
            PoolSettings {
                max_connections: 24,
                acquire_timeout: Duration::from_secs(2),
                statement_timeout: Duration::from_secs(8),
            }
        );
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("postgres://fleet:***@db.internal:5432/fleet"),
            "{shown}"
        );
        for url in ["postgresql://db/fleet", "postgres://u@127.0.0.1/test"] {
            assert!(from(None, &[("DATABASE_URL", url)]).is_ok(), "{url}");
        }
        assert_eq!(
            redact_password("postgres://u:p@h/d"),
            "postgres://u:***@h/d"
        );
        assert_eq!(
            redact_password("sqlite:///var/lib/o.db"),
            "sqlite:///var/lib/o.db"
        );
    }

    #[test]
    fn file_errors_name_file_line_and_key() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        write!(
            f,
            "# comment\nchallenge_ttl_secs = 60\nlisten_adr = \"x\"\n"
        )
        .unwrap();
        let err = from(Some(f.path()), &[]).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, ConfigError::FileSyntax { line: 3, .. }),
            "{text}"
        );
        assert!(text.contains("listen_adr"), "{text}");

        let mut f = tempfile::NamedTempFile::new().unwrap();
        write!(f, "\n\nmachine_identity_verification = \"off\"\n").unwrap();
        let text = from(Some(f.path()), &[]).unwrap_err().to_string();
        assert!(
            text.contains("line 3: machine_identity_verification"),
            "{text}"
        );

        let err = from(Some(Path::new("/nonexistent/x.toml")), &[]).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/x.toml"), "{err}");
    }

    #[test]
    fn every_setting_has_an_env_var_and_a_file_key() {
        // The documented list; a new setting must be added here and to docs/orchestrator.md.
        assert_eq!(ENV_VARS.len(), 21);
        assert!(ENV_VARS.contains(&"PEAQOS_DB_STATEMENT_TIMEOUT_MS"));
        assert!(ENV_VARS.contains(&"PEAQOS_PROOF_MAX_AGE_SECS"));
    }

    #[test]
    fn the_readme_documents_every_setting() {
        const DOC: &str = include_str!("../../../docs/orchestrator.md");
        for var in ENV_VARS {
            assert!(
                DOC.contains(&format!("| `{var}` |")),
                "docs/orchestrator.md has no configuration row for {var}"
            );
        }
    }
}

#[cfg(test)]
mod example_file {
    use super::*;

    const EXAMPLE: &str = include_str!("../../../config/orchestrator.example.toml");

    /// The example with every `# key = value` line uncommented.
    fn uncommented() -> String {
        EXAMPLE
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest)
                    if rest.split_once(" = ").is_some_and(|(k, _)| {
                        k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                    }) =>
                {
                    rest
                }
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn the_example_starts_with_defaults_and_documents_real_keys() {
        let mut c = Config::default();
        c.apply_file(Path::new("example"), EXAMPLE).unwrap();
        assert_eq!(
            c,
            Config::default(),
            "everything in the example is commented out"
        );

        let text = uncommented();
        let mut c = Config::default();
        c.apply_file(Path::new("example"), &text).unwrap();
        let d = Config::default();
        // The values shown are the defaults, except where the example shows
        // a typical setting.
        assert_eq!(c.listen_addr, d.listen_addr);
        assert_eq!(c.mcr_timeout, d.mcr_timeout);
        assert_eq!(c.mcr_cache_ttl, d.mcr_cache_ttl);
        assert_eq!(c.verification, d.verification);
        assert_eq!(c.require_api_auth, d.require_api_auth);
        assert_eq!(c.challenge_ttl, d.challenge_ttl);
        assert_eq!(c.challenge_rate_per_minute, d.challenge_rate_per_minute);
        assert_eq!(c.challenge_burst, d.challenge_burst);
        assert_eq!(c.max_pending_challenges, d.max_pending_challenges);
        assert_eq!(c.orchestrator_name, d.orchestrator_name);
        assert_eq!(c.body_limit_bytes, d.body_limit_bytes);
        assert_eq!(c.request_timeout, d.request_timeout);
        assert_eq!(c.db_max_connections, d.db_max_connections);
        assert_eq!(c.db_acquire_timeout, d.db_acquire_timeout);
        assert_eq!(c.db_statement_timeout, d.db_statement_timeout);
        let keys = text
            .lines()
            .filter(|l| l.contains(" = ") && !l.starts_with('#'))
            .count();
        assert_eq!(keys, ENV_VARS.len(), "every setting appears in the example");
    }
}
