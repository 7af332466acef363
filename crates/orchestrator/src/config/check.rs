//! Which values, and combinations of values, the orchestrator accepts.
//! Errors name the environment variable (the file key is the same name in
//! lower case without `PEAQOS_`).

use std::str::FromStr;
use std::time::Duration;

use super::{Config, ConfigError, NAMES, Setting};
use crate::store::Backend;

/// Upper bounds that keep obviously wrong values (a TTL in milliseconds
/// typed as seconds, say) from starting a server that behaves strangely.
const MAX_CHALLENGE_TTL: Duration = Duration::from_hours(1);
const MAX_CACHE_TTL: Duration = Duration::from_hours(1);
const MAX_BODY_LIMIT: usize = 16 * 1024 * 1024;
const MIN_BODY_LIMIT: usize = 1024;
const MAX_NAME_LEN: usize = 200;
const MAX_DB_CONNECTIONS: u32 = 1000;
const MAX_ACQUIRE_TIMEOUT: Duration = Duration::from_mins(1);
const MAX_STATEMENT_TIMEOUT: Duration = Duration::from_mins(10);

impl Config {
    /// Checks values and their combinations. Errors name the environment
    /// variable (the file key is the same name in lower case without
    /// `PEAQOS_`).
    pub fn check(&self) -> Result<(), ConfigError> {
        self.check_database()?;
        self.check_service()?;
        self.check_streams()
    }

    /// Event streams and the write deadline.
    fn check_streams(&self) -> Result<(), ConfigError> {
        if self.max_streams == Some(0) {
            return invalid(NAMES.max_streams, "must be at least 1");
        }
        if let (Some(streams), Some(connections)) = (self.max_streams, self.max_connections)
            && streams >= connections
        {
            return invalid(
                NAMES.max_streams,
                "must be below PEAQOS_MAX_CONNECTIONS (a stream holds a connection; probes and ordinary requests need the rest)",
            );
        }
        if self.max_streams_per_client == Some(0) {
            return invalid(NAMES.max_streams_per_client, "must be at least 1");
        }
        if self.write_timeout.is_zero() {
            return invalid(NAMES.write_timeout, "must be at least 1 second");
        }
        Ok(())
    }

    /// `DATABASE_URL` and the pool.
    fn check_database(&self) -> Result<(), ConfigError> {
        match Backend::of(&self.database_url) {
            None => {
                return invalid(
                    NAMES.database_url,
                    "must be sqlite://<path>, sqlite::memory: or postgres://[user[:password]@]host[:port]/database",
                );
            }
            Some(Backend::Postgres) => {
                // The parser's message may quote the URL, password included.
                if sqlx::postgres::PgConnectOptions::from_str(&self.database_url).is_err() {
                    return invalid(NAMES.database_url, "is not a valid postgres:// URL");
                }
            }
            Some(Backend::Sqlite) => {}
        }
        if !(1..=MAX_DB_CONNECTIONS).contains(&self.db_max_connections) {
            return invalid(NAMES.db_max_connections, "must be between 1 and 1000");
        }
        if self.db_acquire_timeout.is_zero() || self.db_acquire_timeout > MAX_ACQUIRE_TIMEOUT {
            return invalid(
                NAMES.db_acquire_timeout,
                "must be between 1 and 60000 milliseconds",
            );
        }
        if self.db_acquire_timeout >= self.request_timeout {
            return invalid(
                NAMES.db_acquire_timeout,
                "must be shorter than PEAQOS_REQUEST_TIMEOUT_SECS (a request waiting for a connection must get its own 503)",
            );
        }
        if self.db_statement_timeout.is_zero() || self.db_statement_timeout > MAX_STATEMENT_TIMEOUT
        {
            return invalid(
                NAMES.db_statement_timeout,
                "must be between 1 and 600000 milliseconds",
            );
        }
        Ok(())
    }

    /// Everything else: controller sources, auth, challenges, requests.
    fn check_service(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.mcr_api_url {
            match reqwest::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => {}
                _ => return invalid(NAMES.mcr_api_url, "must be an http:// or https:// URL"),
            }
            if self.registry_file.is_some() {
                return invalid(
                    NAMES.mcr_api_url,
                    "set either PEAQOS_MCR_API_URL or PEAQOS_MCR_REGISTRY_FILE, not both",
                );
            }
        }
        if self.mcr_timeout.is_zero() || self.mcr_timeout > Duration::from_mins(1) {
            return invalid(
                NAMES.mcr_timeout,
                "must be between 1 and 60000 milliseconds",
            );
        }
        if self.mcr_cache_ttl > MAX_CACHE_TTL {
            return invalid(NAMES.mcr_cache_ttl, "must be at most 3600 seconds");
        }
        if self.require_api_auth && self.api_keys_file.is_none() {
            return invalid(
                NAMES.api_keys_file,
                "must be set when PEAQOS_REQUIRE_API_AUTH is true",
            );
        }
        if self.challenge_ttl.is_zero() || self.challenge_ttl > MAX_CHALLENGE_TTL {
            return invalid(NAMES.challenge_ttl, "must be between 1 and 3600 seconds");
        }
        if self.proof_max_age.is_some_and(|d| d.is_zero()) {
            return invalid(
                NAMES.proof_max_age,
                "must be at least 1 second (leave it unset for no limit)",
            );
        }
        let name = &self.orchestrator_name;
        if name.trim().is_empty() || name.len() > MAX_NAME_LEN || name.chars().any(char::is_control)
        {
            return invalid(
                NAMES.orchestrator_name,
                "must be 1 to 200 characters without control characters (it is part of every challenge message)",
            );
        }
        if self.challenge_rate_per_minute == 0 {
            return invalid(NAMES.challenge_rate_per_minute, "must be at least 1");
        }
        if self.challenge_burst == 0 {
            return invalid(NAMES.challenge_burst, "must be at least 1");
        }
        if self.max_pending_challenges == 0 {
            return invalid(NAMES.max_pending_challenges, "must be at least 1");
        }
        if !(MIN_BODY_LIMIT..=MAX_BODY_LIMIT).contains(&self.body_limit_bytes) {
            return invalid(
                NAMES.body_limit_bytes,
                "must be between 1024 and 16777216 bytes",
            );
        }
        if self.header_timeout.is_zero() {
            return invalid(NAMES.header_timeout, "must be at least 1 second");
        }
        if self.max_connections == Some(0) {
            return invalid(NAMES.max_connections, "must be at least 1");
        }
        if self.request_timeout.is_zero() {
            return invalid(NAMES.request_timeout, "must be at least 1 second");
        }
        if self.audit_retention.is_some_and(|d| d.is_zero()) {
            return invalid(
                NAMES.audit_retention,
                "must be at least 1 second (leave it unset to keep every event)",
            );
        }
        Ok(())
    }
}

fn invalid(setting: Setting, message: &str) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid {
        setting: setting.env.to_owned(),
        message: message.to_owned(),
    })
}
