//! A short-TTL cache of controller resolutions with single flight: while one
//! look-up of an identity is in progress, every other request for it waits
//! for that one instead of asking the source again (the public MCR API is
//! rate limited).
//!
//! The look-up runs in its own task, so a client that disconnects does not
//! cancel it for the others waiting. Answers (found or not found) are cached
//! for the TTL; failures are not cached, but are shared by everyone who was
//! waiting for that look-up.
//!
//! Hand-written rather than `moka` (weighed for issue #14, measured on
//! 2026-12-02). `moka::future::Cache` has a TTL, a bound and single flight
//! (`try_get_with`), but its TTL runs on moka's own clock, which our
//! [`Clock`] cannot drive, so the tests that move time past the TTL (here
//! and in tests/http/{mcr,contract}.rs) would have to sleep; it adds 5
//! crates to Cargo.lock (moka, async-lock, event-listener-strategy,
//! crossbeam-channel, tagptr); and a warm look-up, the path of every read
//! and list page, took moka/this = 4.9 times as long (4.1 with 8
//! concurrent tasks; 1.5 for a cold one). Medians of 5 rounds over 10,000
//! identities, both in one release-build run of a scratch benchmark
//! holding a copy of this file and moka 0.12.16 (`get`, then
//! `try_get_with`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use peaqos_protocol::IdentityRef;
use tokio::sync::watch;

use super::{ControllerSource, Resolution, Unavailable};
use crate::clock::{self, Clock};
use crate::metrics::{Metrics, SourceLabels};

/// Stale entries are swept out (one pass over the map) when the map has
/// doubled since the last sweep, and never below this size: each pass is
/// paid for by as many inserts as it scans. (A sweep on every insert past a
/// fixed size made each look-up of a fleet larger than that a pass over the
/// whole map.)
const SWEEP_FROM: usize = 100_000;
/// Entries held at most: past this even fresh answers are
/// dropped, so that a flood of distinct identities cannot exhaust memory.
const MAX_ENTRIES: usize = 1_000_000;

type Outcome = Option<Result<Resolution, Unavailable>>;

#[derive(Debug)]
enum Entry {
    Ready { value: Resolution, at: SystemTime },
    Pending(watch::Receiver<Outcome>),
}

#[derive(Debug)]
struct Entries {
    map: HashMap<IdentityRef, Entry>,
    /// The size at which the next sweep happens.
    sweep_at: usize,
    sweeps: usize,
}

/// When to sweep, and the most to hold.
#[derive(Debug, Clone, Copy)]
struct Limits {
    sweep_from: usize,
    max_entries: usize,
}

#[derive(Debug)]
struct Inner {
    source: Arc<dyn ControllerSource>,
    ttl: Duration,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    limits: Limits,
    entries: Mutex<Entries>,
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct ControllerCache(Arc<Inner>);

impl ControllerCache {
    pub fn new(
        source: Arc<dyn ControllerSource>,
        ttl: Duration,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let limits = Limits {
            sweep_from: SWEEP_FROM,
            max_entries: MAX_ENTRIES,
        };
        Self::with_limits(source, ttl, clock, metrics, limits)
    }

    fn with_limits(
        source: Arc<dyn ControllerSource>,
        ttl: Duration,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        limits: Limits,
    ) -> Self {
        Self(Arc::new(Inner {
            source,
            ttl,
            clock,
            metrics,
            limits,
            entries: Mutex::new(Entries {
                map: HashMap::new(),
                sweep_at: limits.sweep_from,
                sweeps: 0,
            }),
        }))
    }

    pub fn source(&self) -> &dyn ControllerSource {
        &*self.0.source
    }

    /// The cached answer if it is fresh.
    pub fn cached(&self, identity: &IdentityRef) -> Option<Resolution> {
        let now = self.0.clock.now();
        match self.0.lock().map.get(identity) {
            Some(Entry::Ready { value, at }) if self.0.fresh(now, *at) => {
                self.0.metrics.cache_hits.inc();
                Some(value.clone())
            }
            _ => None,
        }
    }

    pub async fn resolve(&self, identity: &IdentityRef) -> Result<Resolution, Unavailable> {
        let now = self.0.clock.now();
        let mut rx = {
            let mut entries = self.0.lock();
            match entries.map.get(identity) {
                Some(Entry::Ready { value, at }) if self.0.fresh(now, *at) => {
                    self.0.metrics.cache_hits.inc();
                    return Ok(value.clone());
                }
                Some(Entry::Pending(rx)) => {
                    self.0.metrics.cache_joined.inc();
                    rx.clone()
                }
                _ => {
                    self.0.metrics.cache_misses.inc();
                    let (tx, rx) = watch::channel(None);
                    if entries.map.len() >= entries.sweep_at {
                        self.0.sweep(&mut entries, now);
                    }
                    entries
                        .map
                        .insert(identity.clone(), Entry::Pending(rx.clone()));
                    drop(entries);
                    let inner = Arc::clone(&self.0);
                    let identity = identity.clone();
                    tokio::spawn(async move { inner.look_up(identity, tx).await });
                    rx
                }
            }
        };
        let outcome = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Unavailable {
                reason: "controller look-up was abandoned".to_owned(),
            })?;
        match &*outcome {
            Some(result) => result.clone(),
            None => Err(Unavailable {
                reason: "controller look-up was abandoned".to_owned(),
            }),
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Entries> {
        // The map holds plain data; a panic elsewhere cannot leave it half
        // updated in a way that matters, so poisoning is ignored.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn fresh(&self, now: SystemTime, at: SystemTime) -> bool {
        clock::elapsed(now, at).is_some_and(|age| age < self.ttl)
    }

    fn sweep(&self, entries: &mut Entries, now: SystemTime) {
        entries.sweeps += 1;
        entries.map.retain(|_, e| match e {
            Entry::Ready { at, .. } => self.fresh(now, *at),
            Entry::Pending(_) => true,
        });
        if entries.map.len() >= self.limits.max_entries {
            entries.map.retain(|_, e| matches!(e, Entry::Pending(_)));
        }
        entries.sweep_at = (2 * entries.map.len())
            .max(self.limits.sweep_from)
            .min(self.limits.max_entries);
    }

    async fn look_up(&self, identity: IdentityRef, tx: watch::Sender<Outcome>) {
        let result = self.source.resolve(&identity).await;
        {
            let mut entries = self.lock();
            match &result {
                Ok(value) => {
                    entries.map.insert(
                        identity.clone(),
                        Entry::Ready {
                            value: value.clone(),
                            at: self.clock.now(),
                        },
                    );
                }
                Err(e) => {
                    self.metrics
                        .source_errors
                        .get_or_create(&SourceLabels {
                            source: self.source.name(),
                        })
                        .inc();
                    tracing::warn!(
                        source = self.source.name(),
                        identity = %identity,
                        reason = %e.reason,
                        "controller look-up failed"
                    );
                    entries.map.remove(&identity);
                }
            }
        }
        // Nobody waiting is fine: the answer is cached all the same.
        let _ = tx.send(Some(result));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use peaqos_protocol::Address;

    use super::*;
    use crate::clock::ManualClock;
    use crate::controllers::SourceFuture;

    #[derive(Debug)]
    struct Counting {
        calls: AtomicUsize,
        fail: bool,
        gate: tokio::sync::Semaphore,
    }

    impl ControllerSource for Counting {
        fn name(&self) -> &'static str {
            "test"
        }
        fn resolve<'a>(&'a self, _: &'a IdentityRef) -> SourceFuture<'a, Resolution> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                let _permit = self.gate.acquire().await;
                if self.fail {
                    Err(Unavailable {
                        reason: "down".into(),
                    })
                } else {
                    Ok(Resolution::Found(Arc::from([Address::from_bytes([7; 20])])))
                }
            })
        }
        fn covers_address_form(&self) -> bool {
            false
        }
        fn ready(&self) -> SourceFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
    }

    fn setup(fail: bool) -> (Arc<Counting>, Arc<ManualClock>, ControllerCache) {
        let source = Arc::new(Counting {
            calls: AtomicUsize::new(0),
            fail,
            gate: tokio::sync::Semaphore::new(0),
        });
        let clock = Arc::new(ManualClock::default());
        let cache = ControllerCache::new(
            source.clone(),
            Duration::from_secs(10),
            clock.clone(),
            Arc::new(Metrics::new()),
        );
        (source, clock, cache)
    }

    #[tokio::test]
    async fn concurrent_lookups_of_one_identity_make_one_request() {
        let (source, clock, cache) = setup(false);
        let id = IdentityRef::parse("did:peaq:1").unwrap();
        let waiters: Vec<_> = (0..50)
            .map(|_| {
                let cache = cache.clone();
                let id = id.clone();
                tokio::spawn(async move { cache.resolve(&id).await })
            })
            .collect();
        // Let every waiter register before the source answers.
        while cache.0.metrics.cache_joined.get() < 49 {
            tokio::task::yield_now().await;
        }
        source.gate.add_permits(1000);
        for w in waiters {
            assert!(w.await.unwrap().unwrap().is_active());
        }
        assert_eq!(source.calls.load(Ordering::SeqCst), 1);

        // Fresh: answered from the cache; stale after the TTL: asked again.
        cache.resolve(&id).await.unwrap();
        assert_eq!(source.calls.load(Ordering::SeqCst), 1);
        clock.advance(Duration::from_secs(11));
        cache.resolve(&id).await.unwrap();
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_large_fleet_is_swept_rarely_and_memory_stays_bounded() {
        let (source, clock, _) = setup(false);
        source.gate.add_permits(10_000);
        let limits = Limits {
            sweep_from: 8,
            max_entries: 64,
        };
        let cache = ControllerCache::with_limits(
            source.clone(),
            Duration::from_secs(10),
            clock.clone(),
            Arc::new(Metrics::new()),
            limits,
        );
        let id = |i: usize| IdentityRef::parse(&format!("did:peaq:{}", i + 1)).unwrap();
        // A fleet of 40 (more than the sweep size, fewer than the bound):
        // every answer stays cached, and sweeps are few, not one per look-up.
        for i in 0..40 {
            cache.resolve(&id(i)).await.unwrap();
        }
        assert!((0..40).all(|i| cache.cached(&id(i)).is_some()));
        let sweeps = cache.0.lock().sweeps;
        assert!(sweeps <= 3, "{sweeps} sweeps for 40 look-ups");
        // Stale answers go at the next sweep.
        clock.advance(Duration::from_secs(11));
        for i in 40..80 {
            cache.resolve(&id(i)).await.unwrap();
        }
        assert!(cache.0.lock().map.len() <= 64);
        assert!(cache.cached(&id(79)).is_some());
        // A flood of distinct identities within the TTL: bounded.
        for i in 80..400 {
            cache.resolve(&id(i)).await.unwrap();
            assert!(cache.0.lock().map.len() <= 64);
        }
    }

    #[tokio::test]
    async fn failures_are_shared_but_not_cached() {
        let (source, _clock, cache) = setup(true);
        source.gate.add_permits(1000);
        let id = IdentityRef::parse("did:peaq:2").unwrap();
        assert!(cache.resolve(&id).await.is_err());
        assert!(cache.resolve(&id).await.is_err());
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
        assert!(cache.cached(&id).is_none());
    }
}
