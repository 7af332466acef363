//! Why a store operation failed, and which failures mean "the database is
//! not answering right now" (a client should retry) rather than a fault.

use std::borrow::Cow;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error")]
    Database(#[source] sqlx::Error),
    /// The database cannot answer now: unreachable, restarting, out of
    /// connections, too slow (statement or pool timeout), busy, or
    /// refusing this role (login, privileges, a table hidden or dropped).
    /// Worth retrying once mended; never a sign that the request was wrong.
    #[error("database unavailable")]
    Unavailable(#[source] sqlx::Error),
    /// The role may connect but lacks privileges requests need (readiness).
    #[error("this database role lacks privileges the orchestrator needs: {missing}")]
    MissingPrivileges { missing: String },
    #[error("database migration failed")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("DATABASE_URL is neither sqlite:... nor postgres://...")]
    UnsupportedUrl,
    #[error("database {path} is in use by another orchestrator process")]
    InUse { path: String },
    #[error("cannot lock the database {path}")]
    Lock {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the database directory {path}")]
    CreateDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the SQLite writer's thread")]
    WriterThread(#[source] std::io::Error),
    /// Another live machine holds this identity.
    #[error("identity already has a machine ({machine_id})")]
    IdentityTaken { machine_id: String },
    /// The challenge to consume is no longer there.
    #[error("challenge was consumed, expired or never issued for this identity")]
    ChallengeGone,
    #[error("stored row {id} is unreadable: {what}")]
    Corrupt { id: String, what: String },
}

impl StoreError {
    /// Whether the database could not answer (a 503 with `Retry-After`),
    /// as opposed to a fault (a 500).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::MissingPrivileges { .. })
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if is_transient(&e) {
            Self::Unavailable(e)
        } else {
            Self::Database(e)
        }
    }
}

/// Failures that say nothing about the request: the database (or the path
/// to it) is down, restarting, overloaded or slow.
fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or(Cow::Borrowed(""));
            if db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some()
            {
                transient_sqlstate(&code)
            } else {
                transient_sqlite(&code)
            }
        }
        _ => false,
    }
}

/// PostgreSQL SQLSTATEs that mean "not now" or "this database cannot be
/// used as configured" rather than "this request is wrong": either way a
/// client is told `503` (retry later), never `500`.
fn transient_sqlstate(code: &str) -> bool {
    // 08: connection exception; 53: insufficient resources (too many
    // connections, out of memory or disk); 57P: the server is shutting
    // down, crashed, not yet accepting connections, or its database was
    // dropped; 28: the role is refused at login (NOLOGIN, a password or
    // pg_hba change).
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57P")
        || code.starts_with("28")
        || matches!(
            code,
            // statement_timeout (or a cancel); lock_timeout
            "57014" | "55P03"
            // serialization failure, deadlock: retrying succeeds
            | "40001" | "40P01"
            // read-only transaction: a fail-over left us on a standby
            | "25006"
            // insufficient_privilege: a grant was revoked
            | "42501"
            // undefined_table, invalid_schema_name, invalid_catalog_name:
            // the migrations made these tables at start-up, so a table
            // that is gone now was dropped or hidden underneath us (a
            // revoked USAGE on the schema hides its tables from
            // search_path); the operator's to mend, not a fault of ours
            | "42P01" | "3F000" | "3D000"
        )
}

/// SQLite result codes (extended) that mean "busy, retry".
fn transient_sqlite(code: &str) -> bool {
    const SQLITE_BUSY: i64 = 5;
    const SQLITE_LOCKED: i64 = 6;
    code.parse::<i64>()
        .is_ok_and(|c| matches!(c & 0xff, SQLITE_BUSY | SQLITE_LOCKED))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailability_is_told_apart_from_faults() {
        assert!(StoreError::from(sqlx::Error::PoolTimedOut).is_unavailable());
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(StoreError::from(sqlx::Error::Io(refused)).is_unavailable());
        assert!(!StoreError::from(sqlx::Error::RowNotFound).is_unavailable());
        for code in [
            "57014", "08006", "53300", "57P01", "57P04", "40001", "25006", "28000", "28P01",
            "42501", "42P01",
        ] {
            assert!(transient_sqlstate(code), "{code}");
        }
        for code in ["23505", "22P02", "42601", "42703"] {
            assert!(!transient_sqlstate(code), "{code}");
        }
        // SQLITE_BUSY, SQLITE_BUSY_SNAPSHOT, SQLITE_LOCKED; not a constraint.
        for code in ["5", "517", "6"] {
            assert!(transient_sqlite(code), "{code}");
        }
        assert!(!transient_sqlite("2067"));
    }
}
