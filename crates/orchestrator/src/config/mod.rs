//! Settings: embedded defaults, then an optional TOML file, then environment
//! variables. Every error names the setting it is about (the environment
//! variable, or the key and line of the file), in one line.
//!
//! Each setting is one row of the `settings!` table below: its field,
//! kind, default, environment variable and file key. The struct, its
//! defaults and `Debug`, the file's schema, and both overlays are generated
//! from that row; adding a setting is adding a row (and, if its values are
//! bounded, a line in `check.rs`). Tests then ask for its row in
//! docs/orchestrator.md and its line in config/orchestrator.example.toml.

mod check;
mod env_files;
mod kinds;
#[cfg(test)]
mod tests;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use self::kinds::{
    Addr, Bytes, ExactText, File, Flag, Kind, Millis, Num, SecretUrl, Secs, Shown, Text,
    Verification,
};
use crate::store::PoolSettings;

/// Whether machine writes need a signed identity proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VerificationMode {
    /// Production: every machine write is bound to a verified proof.
    #[default]
    Required,
    /// Development only: proofs are optional; said loudly at start-up.
    Disabled,
}

/// One setting's two names: environment variable and file key.
#[derive(Debug, Clone, Copy)]
struct Setting {
    env: &'static str,
    key: &'static str,
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

macro_rules! settings {
    ($(
        $(#[$doc:meta])*
        $field:ident: $type:ty as $kind:ty = $default:expr, env $env:literal, file $key:literal;
    )*) => {
        /// The orchestrator's settings. `Config::default()` is the embedded
        /// default. `Debug` hides passwords.
        #[derive(Clone, PartialEq, Eq)]
        pub struct Config {
            $($(#[$doc])* pub $field: $type,)*
        }

        impl Default for Config {
            fn default() -> Self {
                Self { $($field: $default,)* }
            }
        }

        impl fmt::Debug for Config {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct("Config")
                    $(.field(stringify!($field), &Shown::<$kind>(&self.$field)))*
                    .finish()
            }
        }

        /// The TOML file: the same settings under their file keys.
        #[derive(Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct FileConfig {
            $(#[serde(rename = $key)] $field: Option<toml::Spanned<<$kind as Kind>::File>>,)*
        }

        /// Every setting's names, by field.
        struct Names {
            $($field: Setting,)*
        }

        const NAMES: Names = Names {
            $($field: Setting { env: $env, key: $key },)*
        };

        /// Every setting's names, in table order.
        #[cfg(test)]
        const ALL: &[Setting] = &[$(Setting { env: $env, key: $key },)*];

        /// Every environment variable read, for documentation and tests.
        pub const ENV_VARS: &[&str] = &[$($env,)*];

        impl Config {
            /// Overlays the settings `file` gives.
            fn overlay_file(
                &mut self,
                file: FileConfig,
                bad: impl Fn(std::ops::Range<usize>, Setting, String) -> ConfigError,
            ) -> Result<(), ConfigError> {
                $(if let Some(v) = file.$field {
                    let span = v.span();
                    self.$field = <$kind as Kind>::from_file(v.into_inner())
                        .map_err(|m| bad(span, NAMES.$field, m))?;
                })*
                Ok(())
            }

            /// Overlays the settings the environment gives (empty counts
            /// as unset).
            fn overlay_env(
                &mut self,
                env: &impl Fn(&str) -> Option<String>,
            ) -> Result<(), ConfigError> {
                $(if let Some(v) = env($env) {
                    let text = if <$kind as Kind>::TRIM { v.trim() } else { v.as_str() };
                    self.$field = <$kind as Kind>::from_env(text).map_err(|message| {
                        ConfigError::Invalid { setting: $env.to_owned(), message }
                    })?;
                })*
                Ok(())
            }
        }
    };
}

settings! {
    listen_addr: SocketAddr as Addr = SocketAddr::from(([127, 0, 0, 1], 8080)),
        env "PEAQOS_LISTEN_ADDR", file "listen_addr";
    /// `sqlite://<path>`, `sqlite::memory:` (tests), or
    /// `postgres://user:password@host:port/database` (several replicas).
    database_url: String as SecretUrl = default_database_url(None),
        env "DATABASE_URL", file "database_url";
    /// PostgreSQL: connections this process opens at most.
    db_max_connections: u32 as Num<u32> = PoolSettings::default().max_connections,
        env "PEAQOS_DB_MAX_CONNECTIONS", file "db_max_connections";
    /// Longest a request waits for a database connection (including
    /// connecting) before it is answered `503`.
    db_acquire_timeout: Duration as Millis = PoolSettings::default().acquire_timeout,
        env "PEAQOS_DB_ACQUIRE_TIMEOUT_MS", file "db_acquire_timeout_ms";
    /// Longest a database statement may run: PostgreSQL's
    /// `statement_timeout`; on SQLite, how long a statement waits for a lock.
    db_statement_timeout: Duration as Millis = PoolSettings::default().statement_timeout,
        env "PEAQOS_DB_STATEMENT_TIMEOUT_MS", file "db_statement_timeout_ms";
    /// Base URL of the peaqOS MCR API; when set, controllers come from it.
    mcr_api_url: Option<String> as Option<SecretUrl> = None,
        env "PEAQOS_MCR_API_URL", file "mcr_api_url";
    /// Total time allowed for one MCR request.
    mcr_timeout: Duration as Millis = Duration::from_secs(3),
        env "PEAQOS_MCR_TIMEOUT_MS", file "mcr_timeout_ms";
    /// Local registry file (identity -> controller addresses), hot reloaded.
    registry_file: Option<PathBuf> as Option<File> = None,
        env "PEAQOS_MCR_REGISTRY_FILE", file "mcr_registry_file";
    mcr_cache_ttl: Duration as Secs = Duration::from_secs(30),
        env "PEAQOS_MCR_CACHE_TTL_SECS", file "mcr_cache_ttl_secs";
    verification: VerificationMode as Verification = VerificationMode::Required,
        env "PEAQOS_MACHINE_IDENTITY_VERIFICATION", file "machine_identity_verification";
    require_api_auth: bool as Flag = false,
        env "PEAQOS_REQUIRE_API_AUTH", file "require_api_auth";
    /// One API key per line; `#` comments and blank lines are skipped.
    api_keys_file: Option<PathBuf> as Option<File> = None,
        env "PEAQOS_API_KEYS_FILE", file "api_keys_file";
    challenge_ttl: Duration as Secs = Duration::from_mins(5),
        env "PEAQOS_CHALLENGE_TTL_SECS", file "challenge_ttl_secs";
    /// Proofs older than this no longer keep a machine active.
    proof_max_age: Option<Duration> as Option<Secs> = None,
        env "PEAQOS_PROOF_MAX_AGE_SECS", file "proof_max_age_secs";
    /// Named in every challenge message.
    orchestrator_name: String as ExactText = "peaqos-orchestrator".to_owned(),
        env "PEAQOS_ORCHESTRATOR_NAME", file "orchestrator_name";
    /// Challenges a single client address may request per minute.
    challenge_rate_per_minute: u32 as Num<u32> = 60,
        env "PEAQOS_CHALLENGE_RATE_PER_MINUTE", file "challenge_rate_per_minute";
    /// Challenges a client address may request at once before the rate applies.
    challenge_burst: u32 as Num<u32> = 20,
        env "PEAQOS_CHALLENGE_BURST", file "challenge_burst";
    /// No effect since challenges are no longer stored when issued
    /// (`challenge_key`); still accepted so that existing settings load.
    max_pending_challenges: u64 as Num<u64> = 100_000,
        env "PEAQOS_MAX_PENDING_CHALLENGES", file "max_pending_challenges";
    body_limit_bytes: usize as Bytes = 64 * 1024,
        env "PEAQOS_BODY_LIMIT_BYTES", file "body_limit_bytes";
    request_timeout: Duration as Secs = Duration::from_secs(30),
        env "PEAQOS_REQUEST_TIMEOUT_SECS", file "request_timeout_secs";
    /// Longest a connection may take to send a request's headers, idle
    /// keep-alive time included; then it is closed.
    header_timeout: Duration as Secs = Duration::from_secs(10),
        env "PEAQOS_HEADER_TIMEOUT_SECS", file "header_timeout_secs";
    /// Connections served at once; by default as many as the open-file
    /// limit allows, less 128 for the database, the MCR client and the log.
    max_connections: Option<u32> as Option<Num<u32>> = None,
        env "PEAQOS_MAX_CONNECTIONS", file "max_connections";
    /// Event streams (`GET /api/v1/events`) open at once, below the
    /// connection cap; by default three quarters of it, the rest being
    /// left to probes and ordinary requests.
    max_streams: Option<u32> as Option<Num<u32>> = None,
        env "PEAQOS_MAX_STREAMS", file "max_streams";
    /// Event streams one API key (or one client address, without auth)
    /// may hold at once; by default a quarter of the stream cap.
    max_streams_per_client: Option<u32> as Option<Num<u32>> = None,
        env "PEAQOS_MAX_STREAMS_PER_CLIENT", file "max_streams_per_client";
    /// Longest a connection's socket may take nothing while an answer
    /// waits to be written (a client that stopped reading); then an event
    /// stream gets `too_slow` and the connection is closed.
    write_timeout: Duration as Secs = Duration::from_secs(30),
        env "PEAQOS_WRITE_TIMEOUT_SECS", file "write_timeout_secs";
    /// Record every machine change as an audit event, in the change's
    /// transaction. Off only to measure what the trail costs.
    audit_trail: bool as Flag = true,
        env "PEAQOS_AUDIT_TRAIL", file "audit_trail";
    /// PostgreSQL: machine records each replica keeps in memory for reads
    /// (0: none). Kept only with the audit trail on, which tells a replica
    /// what the others changed.
    pg_row_cache: u32 as Num<u32> = 131_072,
        env "PEAQOS_PG_ROW_CACHE", file "pg_row_cache";
    /// Audit events older than this are deleted, in batches; unset keeps
    /// them all.
    audit_retention: Option<Duration> as Option<Secs> = None,
        env "PEAQOS_AUDIT_RETENTION_SECS", file "audit_retention_secs";
    /// Log filter when `RUST_LOG` is unset (`info` when neither is).
    log_level: Option<String> as Option<Text> = None,
        env "PEAQOS_LOG_LEVEL", file "log_level";
}

/// Where systemd's `StateDirectory=` puts state when it does not say
/// (`$STATE_DIRECTORY`).
const DEFAULT_STATE_DIR: &str = "/var/lib/peaqos-orchestrator";

fn default_database_url(state_directory: Option<&str>) -> String {
    // systemd may list several directories separated by `:`; the first is ours.
    let dir = state_directory
        .and_then(|s| s.split(':').next())
        .filter(|s| !s.is_empty())
        .unwrap_or(DEFAULT_STATE_DIR);
    format!("sqlite://{dir}/orchestrator.db")
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

    /// Machine records a PostgreSQL store keeps in memory: none without
    /// the audit trail, the feed of other replicas' changes.
    pub fn pg_row_cache_entries(&self) -> usize {
        if self.audit_trail {
            self.pg_row_cache as usize
        } else {
            0
        }
    }

    /// Defaults, then the TOML file if given, then the process environment.
    pub fn from_env(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::from_sources(file, |name| std::env::var(name).ok())
    }

    /// Like [`Config::from_env`] with an explicit environment (for tests).
    /// Empty variables count as unset; `NAME_FILE` gives `NAME` from a file
    /// (`env_files.rs`).
    pub fn from_sources(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        let from_files = env_files::read(&env)?;
        let env = |name: &str| from_files.get(name).cloned().or_else(|| env(name));
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
        config.overlay_env(&env)?;
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
        self.overlay_file(file, |span, setting, message| ConfigError::FileSyntax {
            path: path.to_owned(),
            line: line_of(span.start),
            message: format!("{}: {message}", setting.key),
        })
    }
}
