//! The live event stream's source: one tail of the audit log per process,
//! fanned out to every subscriber of `GET /api/v1/events`.
//!
//! The tailer reads the log after the last id it has seen, whenever this
//! process wrote an event and at least every [`POLL`], and publishes what
//! it reads on a broadcast channel. Reading the log, not this process's
//! writes, is what carries events across replicas (within [`POLL`] of
//! their commit) and what keeps them in the log's order: ids follow commit
//! order without gaps (see `audit`), so a tail that reads after its last id
//! misses nothing. One query per [`POLL`] per replica, however many
//! subscribers.
//!
//! The channel is a ring of [`CAPACITY`] events shared by all subscribers:
//! a subscriber that falls further behind loses its place (it is told so
//! and disconnected by `http::events`), and memory stays bounded whatever
//! the subscribers do.
//!
//! A stream holds its connection for as long as it is open, so streams
//! have their own cap, below the connection cap (the connections above it
//! are left to probes and ordinary requests), and a cap per client (API
//! key, or address without auth), so that one client cannot take them all.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::audit::{AuditEvent, AuditQuery};
use crate::error_chain::error_chain;

/// Longest an event committed by another replica waits to be read.
pub const POLL: Duration = Duration::from_millis(250);
/// Events a subscriber may be behind the tail before it is dropped.
pub const CAPACITY: usize = 4096;
/// Events read per query.
const PAGE: u32 = 500;

/// How many streams may be open at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    /// Over all clients.
    pub total: usize,
    /// Per API key, or per client address without auth.
    pub per_client: usize,
}

impl StreamLimits {
    /// No limit (tests of other things).
    pub const UNLIMITED: Self = Self {
        total: usize::MAX,
        per_client: usize::MAX,
    };

    /// The limits for a server of `connections` connections: by default
    /// three quarters of them for streams, and a quarter of those per
    /// client. Streams always stay below the connection cap (configured
    /// values are lowered to fit, with a warning), so that probes and
    /// ordinary requests find a slot.
    pub fn derive(connections: usize, total: Option<u32>, per_client: Option<u32>) -> Self {
        let fits = connections.saturating_sub(1);
        let total = match total.map(|n| n as usize) {
            Some(n) if n > fits => {
                tracing::warn!(
                    configured = n,
                    fits,
                    "PEAQOS_MAX_STREAMS is not below the connection cap; using the lower"
                );
                fits
            }
            Some(n) => n,
            None => (connections / 4 * 3 + connections % 4 * 3 / 4).min(fits),
        };
        let per_client = per_client.map_or((total / 4).max(1), |n| n as usize);
        Self { total, per_client }
    }
}

/// Why a stream was not opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamRefused {
    /// Every stream slot is taken.
    Full { limit: usize },
    /// This client holds its share.
    ClientFull { limit: usize },
}

/// Open streams, over all and by client.
#[derive(Debug)]
struct Slots {
    limits: StreamLimits,
    open: Mutex<(usize, HashMap<Arc<str>, usize>)>,
}

/// One open stream's place; dropping it frees the place.
#[derive(Debug)]
pub struct StreamSlot {
    slots: Arc<Slots>,
    client: Arc<str>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self
            .slots
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        open.0 -= 1;
        if let Some(n) = open.1.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.client);
            }
        }
    }
}

/// See the module documentation.
#[derive(Debug)]
pub struct EventHub {
    tx: broadcast::Sender<Arc<AuditEvent>>,
    wake: Notify,
    /// Cancelled when the server shuts down: open streams end.
    closing: CancellationToken,
    slots: Arc<Slots>,
}

impl Default for EventHub {
    fn default() -> Self {
        Self::new(StreamLimits::UNLIMITED)
    }
}

impl EventHub {
    pub fn new(limits: StreamLimits) -> Self {
        Self {
            tx: broadcast::Sender::new(CAPACITY),
            wake: Notify::new(),
            closing: CancellationToken::new(),
            slots: Arc::new(Slots {
                limits,
                open: Mutex::new((0, HashMap::new())),
            }),
        }
    }

    /// A place for one more stream of `client`, if the limits allow.
    pub fn open_slot(&self, client: &str) -> Result<StreamSlot, StreamRefused> {
        let limits = self.slots.limits;
        let mut open = self
            .slots
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if open.0 >= limits.total {
            return Err(StreamRefused::Full {
                limit: limits.total,
            });
        }
        let client: Arc<str> = Arc::from(client);
        let mine = open.1.entry(Arc::clone(&client)).or_insert(0);
        if *mine >= limits.per_client {
            return Err(StreamRefused::ClientFull {
                limit: limits.per_client,
            });
        }
        *mine += 1;
        open.0 += 1;
        Ok(StreamSlot {
            slots: Arc::clone(&self.slots),
            client,
        })
    }

    /// Streams open now.
    pub fn open_streams(&self) -> usize {
        self.slots
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
    }

    /// Events published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<AuditEvent>> {
        self.tx.subscribe()
    }

    /// This process committed an event: read the log now.
    pub fn written(&self) {
        self.wake.notify_one();
    }

    /// Hands an event read from the log to every subscriber.
    pub(crate) fn publish(&self, event: AuditEvent) {
        // No subscriber is not an error.
        let _ = self.tx.send(Arc::new(event));
    }

    /// Subscribers now.
    pub fn subscribers(&self) -> usize {
        self.tx.receiver_count()
    }

    /// Ends every open stream (shutdown waits for connections to close).
    pub fn close(&self) {
        self.closing.cancel();
    }

    pub fn closing(&self) -> &CancellationToken {
        &self.closing
    }
}

/// Tails the log until `stop`; see the module documentation.
pub async fn tail(app: Arc<App>, stop: CancellationToken) {
    let hub = &app.events;
    // Start at the end: a subscriber reads what came before from the store.
    let mut after = loop {
        match app.store.audit_head().await {
            Ok(head) => break head,
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "event stream: cannot read the log's end");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = hub.wake.notified() => {}
            () = tokio::time::sleep(POLL) => {}
        }
        loop {
            let query = AuditQuery {
                after,
                limit: PAGE,
                ..AuditQuery::default()
            };
            match app.store.list_audit_events(&query).await {
                Ok(page) => {
                    let full = page.len() >= PAGE as usize;
                    for event in page {
                        after = event.id;
                        hub.publish(event);
                    }
                    if !full {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %error_chain(&e), "event stream: cannot read the log");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_stay_below_the_connection_cap() {
        let derived = |c, total, per| StreamLimits::derive(c, total, per);
        assert_eq!(
            derived(300, None, None),
            StreamLimits {
                total: 225,
                per_client: 56
            }
        );
        assert_eq!(
            derived(8, None, None),
            StreamLimits {
                total: 6,
                per_client: 1
            }
        );
        assert_eq!(derived(2, None, None).total, 1);
        assert_eq!(derived(1, None, None).total, 0, "one connection: no stream");
        assert_eq!(derived(100, Some(500), None).total, 99, "lowered to fit");
        assert_eq!(
            derived(100, Some(10), Some(7)),
            StreamLimits {
                total: 10,
                per_client: 7
            }
        );
    }

    #[test]
    fn slots_are_counted_over_all_and_per_client_and_freed_on_drop() {
        let hub = EventHub::new(StreamLimits {
            total: 3,
            per_client: 2,
        });
        let a1 = hub.open_slot("a").unwrap();
        let _a2 = hub.open_slot("a").unwrap();
        assert_eq!(
            hub.open_slot("a").unwrap_err(),
            StreamRefused::ClientFull { limit: 2 }
        );
        let _b1 = hub.open_slot("b").unwrap();
        assert_eq!(
            hub.open_slot("c").unwrap_err(),
            StreamRefused::Full { limit: 3 }
        );
        assert_eq!(hub.open_streams(), 3);
        drop(a1);
        assert_eq!(hub.open_streams(), 2);
        let _c1 = hub.open_slot("c").unwrap();
    }
}
