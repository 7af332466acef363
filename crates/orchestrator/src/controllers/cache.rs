//! A short-TTL cache of controller resolutions with single flight: while one
//! look-up of an identity is in progress, every other request for it waits
//! for that one instead of asking the source again (the public MCR API is
//! rate limited).
//!
//! The look-up runs in its own task, so a client that disconnects does not
//! cancel it for the others waiting. Answers (found or not found) are cached
//! for the TTL; failures are not cached, but are shared by everyone who was
//! waiting for that look-up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use peaqos_protocol::IdentityRef;
use tokio::sync::watch;

use super::{ControllerSource, Resolution, Unavailable};
use crate::clock::{self, Clock};
use crate::metrics::{Metrics, SourceLabels};

/// Past this many entries, stale ones are dropped on the next insert.
const MAX_ENTRIES: usize = 100_000;

type Outcome = Option<Result<Resolution, Unavailable>>;

#[derive(Debug)]
enum Entry {
    Ready { value: Resolution, at: SystemTime },
    Pending(watch::Receiver<Outcome>),
}

#[derive(Debug)]
struct Inner {
    source: Arc<dyn ControllerSource>,
    ttl: Duration,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    entries: Mutex<HashMap<IdentityRef, Entry>>,
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
        Self(Arc::new(Inner {
            source,
            ttl,
            clock,
            metrics,
            entries: Mutex::new(HashMap::new()),
        }))
    }

    pub fn source(&self) -> &dyn ControllerSource {
        &*self.0.source
    }

    /// The cached answer if it is fresh.
    pub fn cached(&self, identity: &IdentityRef) -> Option<Resolution> {
        let now = self.0.clock.now();
        match self.0.lock().get(identity) {
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
            match entries.get(identity) {
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
                    if entries.len() >= MAX_ENTRIES {
                        self.0.evict_stale(&mut entries, now);
                    }
                    entries.insert(identity.clone(), Entry::Pending(rx.clone()));
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
    fn lock(&self) -> MutexGuard<'_, HashMap<IdentityRef, Entry>> {
        // The map holds plain data; a panic elsewhere cannot leave it half
        // updated in a way that matters, so poisoning is ignored.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn fresh(&self, now: SystemTime, at: SystemTime) -> bool {
        clock::elapsed(now, at).is_some_and(|age| age < self.ttl)
    }

    fn evict_stale(&self, entries: &mut HashMap<IdentityRef, Entry>, now: SystemTime) {
        entries.retain(|_, e| match e {
            Entry::Ready { at, .. } => self.fresh(now, *at),
            Entry::Pending(_) => true,
        });
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, e| matches!(e, Entry::Pending(_)));
        }
    }

    async fn look_up(&self, identity: IdentityRef, tx: watch::Sender<Outcome>) {
        let result = self.source.resolve(&identity).await;
        {
            let mut entries = self.lock();
            match &result {
                Ok(value) => {
                    entries.insert(
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
                    entries.remove(&identity);
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
