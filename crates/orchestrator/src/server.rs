//! Start-up and shutdown: opening the store and the controller source,
//! serving until told to stop, and the background collection of expired
//! challenges and of audit events past their retention.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::admission::{self, Admission};
use crate::app::App;
use crate::auth::{ApiKeys, ApiKeysError};
use crate::challenge_key::ChallengeKey;
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, ConfigError, VerificationMode};
use crate::controllers::address::NoSource;
use crate::controllers::mcr_http::McrClientError;
use crate::controllers::{
    ControllerCache, ControllerSource, McrHttpSource, RegistryError, RegistrySource, Resolver,
};
use crate::error_chain::error_chain;
use crate::metrics::Metrics;
use crate::rate_limit::RateLimiter;
use crate::store::{self, StoreError};
use crate::stream::{EventHub, StreamLimits};
use crate::{http, serve};

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration")]
    Config(#[from] ConfigError),
    #[error("cannot open the database (DATABASE_URL)")]
    Store(#[source] StoreError),
    #[error("cannot use the controller registry (PEAQOS_MCR_REGISTRY_FILE)")]
    Registry(#[from] RegistryError),
    #[error("cannot use the API keys (PEAQOS_API_KEYS_FILE)")]
    ApiKeys(#[from] ApiKeysError),
    #[error("cannot set up the MCR client (PEAQOS_MCR_API_URL)")]
    McrClient(#[from] McrClientError),
    #[error("cannot read the listening address")]
    LocalAddr(#[source] std::io::Error),
    #[error("cannot draw the challenge key")]
    Random(#[source] crate::ids::RandomError),
}

/// Serves the API on `listener` until `shutdown` completes, then lets
/// in-flight requests finish.
pub async fn run(
    listener: tokio::net::TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    Server::new(config).run(listener, shutdown).await
}

/// Called once the server is ready to answer, with its address.
pub type ReadyHook = Box<dyn FnOnce(SocketAddr) + Send>;

/// [`run`] with more control: the clock (tests, benchmarks) and a hook
/// called when the server is ready (systemd's `READY=1`).
pub struct Server {
    config: Config,
    clock: Arc<dyn Clock>,
    on_ready: Option<ReadyHook>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.config)
            .field("clock", &self.clock)
            .finish_non_exhaustive()
    }
}

impl Server {
    pub fn new(config: Config) -> Self {
        Self {
            config,
            clock: Arc::new(SystemClock),
            on_ready: None,
        }
    }

    /// Calls `hook` once the store is open and the server accepts requests.
    #[must_use]
    pub fn on_ready(mut self, hook: impl FnOnce(SocketAddr) + Send + 'static) -> Self {
        self.on_ready = Some(Box::new(hook));
        self
    }

    /// Reads time from `clock` instead of the system clock.
    #[must_use]
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    pub async fn run(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let Self {
            config,
            clock,
            on_ready,
        } = self;
        config.check()?;
        let store = open_store(&config).await.map_err(Error::Store)?;
        let challenge_key = shared_challenge_key(&*store).await?;
        let source: Arc<dyn ControllerSource> = match (&config.mcr_api_url, &config.registry_file) {
            (Some(url), _) => Arc::new(McrHttpSource::new(url, config.mcr_timeout)?),
            (None, Some(path)) => Arc::new(RegistrySource::open(path)?),
            (None, None) => {
                tracing::warn!(
                    "neither PEAQOS_MCR_API_URL nor PEAQOS_MCR_REGISTRY_FILE is set: \
                     only address-form identities (did:peaq:0x...) resolve"
                );
                Arc::new(NoSource)
            }
        };
        let api_keys = match (&config.require_api_auth, &config.api_keys_file) {
            (true, Some(path)) => Some(ApiKeys::load(path)?),
            _ => None,
        };
        warn_about_unsafe_settings(&config, api_keys.is_none());
        let metrics = Arc::new(Metrics::new());
        let cache = ControllerCache::new(
            Arc::clone(&source),
            config.mcr_cache_ttl,
            Arc::clone(&clock),
            Arc::clone(&metrics),
        );
        let (limits, streams) = limits(&config);
        let app = Arc::new(App {
            limiter: RateLimiter::new(
                config.challenge_rate_per_minute,
                config.challenge_burst,
                Arc::clone(&clock),
            ),
            admission: Admission::new(
                usize::try_from(config.db_max_connections).unwrap_or(usize::MAX),
                admission::max_wait_within(config.request_timeout),
            ),
            challenge_key,
            store: Arc::clone(&store),
            resolver: Arc::new(Resolver::new(cache)),
            clock,
            metrics,
            api_keys,
            events: Arc::new(EventHub::new(streams)),
            console: crate::console::ConsoleState::default(),
            config,
        });
        let local = listener.local_addr().map_err(Error::LocalAddr)?;
        tracing::info!(
            addr = %local,
            max_connections = limits.max_connections,
            max_streams = streams.total,
            max_streams_per_client = streams.per_client,
            controllers = source.name(),
            database = store.backend().name(),
            verification = ?app.config.verification,
            "peaqos-orchestrator listening"
        );
        if let Some(hook) = on_ready {
            hook(local);
        }
        let stop = CancellationToken::new();
        let collector = tokio::spawn(collect_expired_challenges(Arc::clone(&app), stop.clone()));
        let pruner = app
            .config
            .audit_retention
            .map(|keep| tokio::spawn(prune_audit_events(Arc::clone(&app), keep, stop.clone())));
        let tailer = app
            .config
            .audit_trail
            .then(|| tokio::spawn(crate::stream::tail(Arc::clone(&app), stop.clone())));
        // Event streams never end by themselves: they end when shutdown
        // begins, so that the connections they hold can close.
        let hub = Arc::clone(&app.events);
        let shutdown = async move {
            shutdown.await;
            hub.close();
        };
        serve::serve(listener, http::router(Arc::clone(&app)), limits, shutdown).await;
        stop.cancel();
        let _ = collector.await;
        if let Some(tailer) = tailer {
            let _ = tailer.await;
        }
        if let Some(pruner) = pruner {
            let _ = pruner.await;
        }
        store.close().await;
        tracing::info!("peaqos-orchestrator stopped");
        Ok(())
    }
}

/// Says loudly what makes this server unfit for production.
fn warn_about_unsafe_settings(config: &Config, public: bool) {
    if config.verification == VerificationMode::Disabled {
        tracing::warn!(
            "!!! PEAQOS_MACHINE_IDENTITY_VERIFICATION=disabled: machine writes are accepted \
             WITHOUT identity proofs. Development only; never run this in production. !!!"
        );
    }
    if public {
        tracing::warn!("API-key auth is off (PEAQOS_REQUIRE_API_AUTH): the API is public");
    }
}

/// The challenge key every replica of the store shares (the first one
/// offered).
async fn shared_challenge_key(store: &dyn store::Store) -> Result<ChallengeKey, Error> {
    let offered = ChallengeKey::random_bytes().map_err(Error::Random)?;
    let stored = store.challenge_key(offered).await.map_err(Error::Store)?;
    Ok(ChallengeKey::from_bytes(stored))
}

/// The database, with PostgreSQL's row cache when the configuration keeps one.
async fn open_store(config: &Config) -> Result<Arc<dyn store::Store>, StoreError> {
    store::open_cached(
        &config.database_url,
        &config.pool_settings(),
        config.pg_row_cache_entries(),
    )
    .await
}

/// The connection limits, and the event streams' within them.
fn limits(config: &Config) -> (serve::Limits, StreamLimits) {
    let limits = serve::Limits {
        header_timeout: config.header_timeout,
        max_connections: serve::connection_cap(config.max_connections),
        write_timeout: config.write_timeout,
    };
    let streams = StreamLimits::derive(
        limits.max_connections,
        config.max_streams,
        config.max_streams_per_client,
    );
    (limits, streams)
}

/// Forgets redemptions of expired challenges periodically, so that storage
/// stays bounded by the challenges redeemed within two TTLs.
///
/// A redemption is kept for one more TTL after its challenge expired: a
/// replica whose clock lags by less than that still finds it. An expired
/// challenge is refused (`MACHINE_IDENTITY_PROOF_EXPIRED`) before the store
/// is asked, so forgetting its redemption does not make it usable again.
async fn collect_expired_challenges(app: Arc<App>, stop: CancellationToken) {
    let period = app
        .config
        .challenge_ttl
        .clamp(Duration::from_secs(1), Duration::from_mins(1));
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let grace = i64::try_from(app.config.challenge_ttl.as_millis()).unwrap_or(i64::MAX);
        let now = app.now();
        let cutoff =
            peaqos_protocol::Timestamp::from_unix_millis(now.unix_millis().saturating_sub(grace))
                .unwrap_or(now);
        match app.store.delete_expired_redemptions(cutoff).await {
            Ok(0) => {}
            Ok(n) => {
                app.metrics.challenges_collected.inc_by(n);
                tracing::debug!(deleted = n, "expired challenges collected");
            }
            Err(e) => tracing::warn!(error = %error_chain(&e), "challenge collection failed"),
        }
    }
}

/// Audit events deleted per statement: small enough that a prune never
/// holds locks or a transaction long, whatever the backlog.
const PRUNE_BATCH: u32 = 1000;

/// Deletes audit events older than `keep`, in batches of [`PRUNE_BATCH`]
/// with a pause between batches (writers go first), every minute at most
/// (a tenth of the retention when shorter).
async fn prune_audit_events(app: Arc<App>, keep: Duration, stop: CancellationToken) {
    let period = (keep / 10).clamp(Duration::from_secs(1), Duration::from_mins(1));
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let keep_ms = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
        let now = app.now();
        let Some(cutoff) =
            peaqos_protocol::Timestamp::from_unix_millis(now.unix_millis().saturating_sub(keep_ms))
        else {
            continue;
        };
        loop {
            match app.store.prune_audit_events(cutoff, PRUNE_BATCH).await {
                Ok(n) => {
                    app.metrics.audit_events_pruned.inc_by(n);
                    if n < u64::from(PRUNE_BATCH) {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %error_chain(&e), "audit event pruning failed");
                    break;
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
    }
}
