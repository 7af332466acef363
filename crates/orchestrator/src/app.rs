//! The state every request shares. The operations on it live in
//! `service` (one file per resource); the rules they apply in `lifecycle`.

use std::sync::Arc;

use peaqos_protocol::Timestamp;

use crate::admission::Admission;
use crate::auth::ApiKeys;
use crate::challenge_key::ChallengeKey;
use crate::clock::Clock;
use crate::config::{Config, VerificationMode};
use crate::console::ConsoleState;
use crate::controllers::Resolver;
use crate::lifecycle::Policy;
use crate::metrics::Metrics;
use crate::rate_limit::RateLimiter;
use crate::store::Store;
use crate::stream::EventHub;

/// Shared by all handlers (behind an `Arc`).
#[derive(Debug)]
pub struct App {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub resolver: Arc<Resolver>,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    pub limiter: RateLimiter,
    /// Issues and checks challenges; shared by every replica of the store.
    pub challenge_key: ChallengeKey,
    /// Bounds the store writes running and queued (`crate::admission`).
    pub admission: Admission,
    pub api_keys: Option<ApiKeys>,
    /// The live event stream's tail of the audit log.
    pub events: Arc<EventHub>,
    /// The fleet console's sessions and counts.
    pub console: ConsoleState,
}

impl App {
    pub fn verification_required(&self) -> bool {
        self.config.verification == VerificationMode::Required
    }

    /// The settings the lifecycle rules depend on.
    pub fn policy(&self) -> Policy {
        Policy {
            verification_required: self.verification_required(),
            proof_max_age: self.config.proof_max_age,
        }
    }

    pub fn now(&self) -> Timestamp {
        self.clock.timestamp()
    }
}

/// An app for the crate's own tests: an in-memory SQLite store, only
/// address-form identities resolving (`did:peaq:0x...`, each its own
/// controller), one challenge a minute per client address, a manual clock.
#[cfg(test)]
pub(crate) async fn test_app(admission: Admission) -> Arc<App> {
    use std::time::Duration;

    use crate::clock::ManualClock;
    use crate::controllers::ControllerCache;
    use crate::controllers::address::NoSource;

    let clock = Arc::new(ManualClock::default());
    let metrics = Arc::new(Metrics::new());
    let cache = ControllerCache::new(
        Arc::new(NoSource),
        Duration::from_secs(1),
        clock.clone(),
        Arc::clone(&metrics),
    );
    Arc::new(App {
        config: Config::default(),
        store: Arc::new(
            crate::store::SqliteStore::open("sqlite::memory:")
                .await
                .unwrap(),
        ),
        resolver: Arc::new(Resolver::new(cache)),
        limiter: RateLimiter::new(1, 1, clock.clone()),
        challenge_key: ChallengeKey::from_bytes([7; 32]),
        admission,
        clock,
        metrics,
        api_keys: None,
        events: Arc::new(EventHub::default()),
        console: ConsoleState::default(),
    })
}
