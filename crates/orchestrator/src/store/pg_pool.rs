//! PostgreSQL connections, pooled without a round trip per use.
//!
//! sqlx's own pool pings every connection it takes back (a `Sync` and its
//! `ReadyForQuery`), which doubles the round trips of a one-statement
//! operation and with them the database's wake-ups: measured on this
//! project's 2-core machine, 16 tasks ran 40,000 single-row selects a second
//! on connections of their own and 20,000 through sqlx's pool. Here a
//! connection goes back to the pool as it is, and is pinged when it is
//! taken again only if it may be unusable: its last operation did not
//! finish (cancelled, or failed on the way), or it sat idle long enough to
//! have been cut (a database restart, a fail-over).
//!
//! The pool is bounded (`max_connections`), and taking a connection,
//! including connecting, is bounded by the acquire timeout: past it the
//! operation fails as [`StoreError::Unavailable`]. A database that refuses
//! connections fails operations at once, and every later operation tries
//! again, so the pool recovers by itself.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{Connection as _, Error};

use super::{PoolSettings, StoreError};

/// A connection idle for longer than this is pinged before use.
const PING_IDLE_AFTER: Duration = Duration::from_secs(1);
/// Connections are replaced after this long, so that the server can free
/// what a session accumulates (as sqlx's pool does by default).
const MAX_LIFETIME: Duration = Duration::from_mins(30);

/// What an operation on a connection returns.
pub type BoxFuture<'c, T> = Pin<Box<dyn Future<Output = T> + Send + 'c>>;

/// A pooled connection, and whether its last operation finished.
#[derive(Debug)]
pub struct PooledConnection {
    conn: PgConnection,
    settled: bool,
}

#[derive(Debug)]
struct Manager {
    options: PgConnectOptions,
}

impl managed::Manager for Manager {
    type Type = PooledConnection;
    type Error = Error;

    async fn create(&self) -> Result<PooledConnection, Error> {
        Ok(PooledConnection {
            conn: PgConnection::connect_with(&self.options).await?,
            settled: true,
        })
    }

    async fn recycle(&self, c: &mut PooledConnection, metrics: &Metrics) -> RecycleResult<Error> {
        if metrics.age() > MAX_LIFETIME {
            return Err(RecycleError::message("connection retired"));
        }
        // A ping also reads whatever an interrupted operation left unread.
        if !c.settled || metrics.last_used() >= PING_IDLE_AFTER {
            c.conn.ping().await?;
            c.settled = true;
        }
        Ok(())
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct PgPool {
    pool: managed::Pool<Manager>,
    acquire_timeout: Duration,
}

impl std::fmt::Debug for PgPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgPool")
            .field("status", &self.pool.status())
            .field("acquire_timeout", &self.acquire_timeout)
            .finish()
    }
}

/// A connection taken from the pool until dropped.
#[derive(Debug)]
pub struct Lease(managed::Object<Manager>);

impl std::ops::Deref for Lease {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        &self.0.conn
    }
}

impl std::ops::DerefMut for Lease {
    fn deref_mut(&mut self) -> &mut PgConnection {
        // What the holder does with it is unknown: check it when it is
        // taken again.
        self.0.settled = false;
        &mut self.0.conn
    }
}

impl PgPool {
    /// A pool that connects on demand.
    pub fn new(options: PgConnectOptions, settings: &PoolSettings) -> Self {
        let timeout = Some(settings.acquire_timeout);
        let pool = managed::Pool::builder(Manager { options })
            .max_size(usize::try_from(settings.max_connections).unwrap_or(usize::MAX))
            .runtime(deadpool::Runtime::Tokio1)
            .wait_timeout(timeout)
            .create_timeout(timeout)
            .recycle_timeout(timeout)
            .build();
        Self {
            // Only a missing runtime fails the build, and one is set.
            pool: pool.expect("a pool with a runtime"),
            acquire_timeout: settings.acquire_timeout,
        }
    }

    /// A connection, waiting (and connecting) for the acquire timeout at
    /// most, all steps together.
    pub async fn acquire(&self) -> Result<Lease, StoreError> {
        match tokio::time::timeout(self.acquire_timeout, self.pool.get()).await {
            Ok(Ok(object)) => Ok(Lease(object)),
            Ok(Err(managed::PoolError::Backend(e))) => Err(e.into()),
            Ok(Err(managed::PoolError::Closed)) => Err(StoreError::Unavailable(Error::PoolClosed)),
            Ok(Err(_)) | Err(_) => Err(StoreError::Unavailable(Error::PoolTimedOut)),
        }
    }

    /// Runs `operation` on a pooled connection. The connection is marked
    /// settled only if the operation ran to the end without losing the
    /// connection: one dropped half-way is pinged (or replaced) before its
    /// next use.
    pub async fn run<T>(
        &self,
        operation: impl for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, Result<T, Error>>,
    ) -> Result<T, StoreError> {
        let mut lease = self.acquire().await?;
        let result = operation(&mut lease).await;
        // An error the server sent (a constraint, a timeout) leaves the
        // connection in step; one from the wire (I/O, protocol) does not.
        lease.0.settled = matches!(result, Ok(_) | Err(Error::Database(_)));
        Ok(result?)
    }

    /// Connections open now.
    pub fn size(&self) -> usize {
        self.pool.status().size
    }

    /// Refuses new operations and closes the idle connections politely.
    pub(crate) async fn close(&self) {
        let idle = self.pool.retain(|_, _| false);
        self.pool.close();
        for c in idle.removed {
            let _ = c.conn.close().await;
        }
    }
}
