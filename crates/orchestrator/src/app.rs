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
