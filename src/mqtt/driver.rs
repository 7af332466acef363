//! The polling task: drives rumqttc's event loop, reconnects with backoff,
//! and reports to the service task what happened, including the two facts
//! only the reading side can see: a retained replay that did not break the
//! connection, and the broker closing after our DISCONNECT.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::client::{ConnectionError, Event, EventLoop};
use crate::backoff::Backoff;

/// A connection that lasted this long resets the reconnect backoff; a
/// broker that accepts and then drops us at once keeps backing off.
const STABLE_CONNECTION: Duration = Duration::from_secs(30);

/// What the polling task reports.
#[derive(Debug)]
pub(super) enum Polled {
    Event(Event),
    Lost {
        error: ConnectionError,
        retry_in: Duration,
    },
    /// Something was read after a SUBACK: the retained messages the
    /// subscription made the broker replay did not break the connection.
    ReplayPassed,
    /// After our DISCONNECT, the broker closed the connection: the clean
    /// end of the session (no last will).
    Closed,
}

/// Polls the event loop until `stop`, backing off between failed attempts.
/// `progress` is notified whenever rumqttc sent or received a packet: its
/// request queue may have room again (notifications coalesce, so this costs
/// the service at most one wake-up per batch).
pub(super) async fn drive(
    mut eventloop: EventLoop,
    events: mpsc::Sender<Polled>,
    progress: Arc<Notify>,
    mut backoff: Backoff,
    stop: CancellationToken,
) {
    let mut connected_at: Option<Instant> = None;
    // A SUBACK was the last thing read: the broker's replay of retained
    // messages (if any) comes next.
    let mut after_suback = false;
    loop {
        let polled = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            polled = eventloop.poll() => polled,
        };
        let received = matches!(
            polled,
            Ok(Event::Received | Event::Message(_) | Event::Subscribed | Event::SubscribeRefused)
        );
        if received && std::mem::take(&mut after_suback) {
            // Anything read after the SUBACK (a PUBACK of `online` at the
            // latest) comes after the replay: the replay passed. What we
            // send meanwhile proves nothing.
            if events.send(Polled::ReplayPassed).await.is_err() {
                return;
            }
        }
        let error = match polled {
            Ok(Event::Other | Event::Received) => {
                progress.notify_one();
                continue;
            }
            Ok(Event::DisconnectSent) => {
                // The goodbye waits for `Closed`; `stop` ends this early if
                // the broker takes too long.
                tokio::select! {
                    biased;
                    () = stop.cancelled() => {}
                    () = eventloop.until_closed() => {
                        let _ = events.send(Polled::Closed).await;
                    }
                }
                return;
            }
            Ok(event) => {
                match event {
                    Event::Connected => connected_at = Some(Instant::now()),
                    Event::Subscribed | Event::SubscribeRefused => after_suback = true,
                    _ => {}
                }
                if events.send(Polled::Event(event)).await.is_err() {
                    return;
                }
                continue;
            }
            Err(error) => error,
        };
        if connected_at
            .take()
            .is_some_and(|at| at.elapsed() >= STABLE_CONNECTION)
        {
            backoff.reset();
        }
        let retry_in = backoff.next_delay(None);
        if events.send(Polled::Lost { error, retry_in }).await.is_err() {
            return;
        }
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = tokio::time::sleep(retry_in) => {}
        }
    }
}
