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

use std::sync::Arc;
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

/// See the module documentation.
#[derive(Debug)]
pub struct EventHub {
    tx: broadcast::Sender<Arc<AuditEvent>>,
    wake: Notify,
    /// Cancelled when the server shuts down: open streams end.
    closing: CancellationToken,
}

impl Default for EventHub {
    fn default() -> Self {
        Self {
            tx: broadcast::Sender::new(CAPACITY),
            wake: Notify::new(),
            closing: CancellationToken::new(),
        }
    }
}

impl EventHub {
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
