//! Prometheus metrics: requests and latencies per route, verification
//! outcomes, controller-cache hits and source errors, challenge traffic.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    pub(crate) method: &'static str,
    pub(crate) route: &'static str,
    pub(crate) status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RouteLabels {
    pub(crate) method: &'static str,
    pub(crate) route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OutcomeLabels {
    pub(crate) outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct SourceLabels {
    pub(crate) source: &'static str,
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~1.6 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// Every metric the server records, registered once.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub(crate) requests: Family<RequestLabels, Counter>,
    pub(crate) latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
    /// Proof verifications by outcome (`verified`, `invalid`, `expired`, ...).
    pub(crate) verifications: Family<OutcomeLabels, Counter>,
    /// Re-verifications of stored proofs on reads and updates.
    pub(crate) reverifications: Family<OutcomeLabels, Counter>,
    pub(crate) cache_hits: Counter,
    pub(crate) cache_misses: Counter,
    /// Look-ups that joined one already in flight for the same identity.
    pub(crate) cache_joined: Counter,
    pub(crate) source_errors: Family<SourceLabels, Counter>,
    pub(crate) challenges_issued: Counter,
    pub(crate) rate_limited: Counter,
    pub(crate) challenges_collected: Counter,
    pub(crate) audit_events_pruned: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("peaqos_orchestrator");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by method, route and status",
            requests.clone(),
        );
        let latency: Family<RouteLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "http_request_duration_seconds",
            "Time to answer HTTP requests, by method and route",
            latency.clone(),
        );
        let verifications = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "proof_verifications",
            "Submitted identity proofs by outcome",
            verifications.clone(),
        );
        let reverifications = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "proof_reverifications",
            "Re-verifications of stored proofs against controller data, by outcome",
            reverifications.clone(),
        );
        let cache_hits = Counter::default();
        registry.register(
            "controller_cache_hits",
            "Controller look-ups answered from the cache",
            cache_hits.clone(),
        );
        let cache_misses = Counter::default();
        registry.register(
            "controller_cache_misses",
            "Controller look-ups sent to the controller source",
            cache_misses.clone(),
        );
        let cache_joined = Counter::default();
        registry.register(
            "controller_cache_joined",
            "Controller look-ups that waited for one already in flight",
            cache_joined.clone(),
        );
        let source_errors = Family::<SourceLabels, Counter>::default();
        registry.register(
            "controller_source_errors",
            "Controller source failures (MCR down, slow, 5xx or garbage)",
            source_errors.clone(),
        );
        let challenges_issued = Counter::default();
        registry.register(
            "challenges_issued",
            "Identity challenges issued",
            challenges_issued.clone(),
        );
        let rate_limited = Counter::default();
        registry.register(
            "rate_limited",
            "Requests refused by the challenge rate limit or bound",
            rate_limited.clone(),
        );
        let challenges_collected = Counter::default();
        registry.register(
            "challenges_collected",
            "Expired challenges deleted by the garbage collector",
            challenges_collected.clone(),
        );
        let audit_events_pruned = Counter::default();
        registry.register(
            "audit_events_pruned",
            "Audit events deleted after their retention",
            audit_events_pruned.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            verifications,
            reverifications,
            cache_hits,
            cache_misses,
            cache_joined,
            source_errors,
            challenges_issued,
            rate_limited,
            challenges_collected,
            audit_events_pruned,
        }
    }

    pub(crate) fn verification(&self, outcome: &'static str) {
        self.verifications
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub(crate) fn reverification(&self, outcome: &'static str) {
        self.reverifications
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
