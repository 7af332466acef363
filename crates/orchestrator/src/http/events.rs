//! `GET /api/v1/events`: the audit trail as Server-Sent Events, as changes
//! happen (the SDK's planned `stream_events`: `machine_id`, `cursor`).
//!
//! Each event is `id: <event id>`, `event: <type>`, `data: <the event as
//! in /audit-events>`. A client resumes after the last id it received with
//! `Last-Event-ID` (what `EventSource` sends when it reconnects) or
//! `cursor`: it first gets what it missed, read from the database, then the
//! live tail (`stream`), duplicates between the two dropped by id. Ids
//! follow commit order without gaps, so nothing falls between. A cursor
//! past the last committed event (read from the database: another replica
//! may be ahead of this one's tail) is refused with `400` before the
//! stream starts: accepted, it would skip the events written up to it,
//! and an `EventSource` stops on a `400` where it would reconnect after an
//! in-stream error event with the same `Last-Event-ID`, for ever.
//!
//! A comment every [`KEEP_ALIVE`] keeps idle connections (and proxies) open.
//! A subscriber that falls more than `stream::CAPACITY` events behind the
//! tail, or whose socket took nothing for the write timeout (`serve`), gets
//! a final `too_slow` event naming the cursor to resume from (if its socket
//! still takes it), and the stream ends; the server holds nothing more for
//! it.
//!
//! Streams past their cap are refused before they start, with
//! `Connection: close` so that the refusal does not hold a slot either:
//! `503 SERVICE_UNAVAILABLE` when every stream slot is taken, `429
//! RATE_LIMITED` when this client (API key, or address without auth)
//! holds its share; both with `Retry-After`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use std::net::SocketAddr;

use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use peaqos_protocol::ErrorCode;
use serde::Deserialize;
use tokio::sync::broadcast::{Receiver, error::RecvError};

use super::audit::{WireEvent, parse_cursor, refuse_past_head};
use super::{ApiError, AppState};
use crate::audit::{AuditEvent, AuditQuery, Caller};
use crate::error_chain::error_chain;
use crate::ids;
use crate::serve::WriteStall;
use crate::stream::{StreamRefused, StreamSlot};

pub const EVENTS: &str = "/api/v1/events";
/// Idle time after which a comment is sent.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Events read from the database per query while catching up.
const CATCH_UP_PAGE: u32 = 500;
/// The kernel's send buffer of a stream's connection: what a subscriber
/// that stops reading can leave unsent in the kernel (Linux books twice
/// this) before writes block and the write deadline starts. At 100 ms of
/// round trip it still carries some 600 KiB a second, thousands of events.
const STREAM_SEND_BUFFER: usize = 64 * 1024;
/// Seconds a refused subscriber should wait before trying again.
const STREAMS_RETRY_AFTER_SECS: u64 = 5;

pub fn router() -> Router<AppState> {
    Router::new().route(EVENTS, get(stream))
}

#[derive(Debug, Deserialize)]
struct StreamQuery {
    cursor: Option<String>,
    machine_id: Option<String>,
    #[serde(rename = "machineId")]
    machine_id_camel: Option<String>,
}

/// One subscriber's position.
struct Subscriber {
    app: AppState,
    live: Receiver<Arc<AuditEvent>>,
    machine_id: Option<String>,
    /// The last id sent (or the resume cursor).
    sent: i64,
    /// Read from the database, not yet sent.
    backlog: VecDeque<AuditEvent>,
    caught_up: bool,
    done: bool,
    /// Cancelled when the connection's socket stopped taking writes.
    stall: WriteStall,
    /// Held until the stream ends.
    _slot: Option<StreamSlot>,
}

fn sse_event(e: &AuditEvent) -> Event {
    let wire = WireEvent::from(e.clone());
    Event::default()
        .id(e.id.to_string())
        .event(e.kind.clone())
        .json_data(wire)
        .unwrap_or_else(|_| Event::default().comment("unencodable event"))
}

impl Subscriber {
    /// The final event of a subscriber that does not keep up.
    fn too_slow(&mut self) -> Event {
        self.done = true;
        Event::default()
            .event("too_slow")
            .json_data(serde_json::json!({
                "message": "this subscriber fell too far behind and is disconnected; resume from cursor",
                "cursor": self.sent.to_string(),
            }))
            .unwrap_or_default()
    }

    fn wants(&self, e: &AuditEvent) -> bool {
        self.machine_id.as_ref().is_none_or(|m| *m == e.resource_id)
    }

    /// The next thing to send; `None` ends the stream.
    async fn next(&mut self) -> Option<Event> {
        loop {
            if self.done {
                return None;
            }
            if self.stall.token().is_cancelled() {
                return Some(self.too_slow());
            }
            if let Some(e) = self.backlog.pop_front() {
                self.sent = e.id;
                return Some(sse_event(&e));
            }
            if !self.caught_up {
                if let Err(event) = self.catch_up().await {
                    self.done = true;
                    return Some(event);
                }
                continue;
            }
            let received = tokio::select! {
                () = self.app.events.closing().cancelled() => return None,
                () = self.stall.token().cancelled() => None,
                received = self.live.recv() => Some(received),
            };
            let Some(received) = received else {
                return Some(self.too_slow());
            };
            match received {
                Ok(e) if e.id > self.sent && self.wants(&e) => {
                    self.sent = e.id;
                    return Some(sse_event(&e));
                }
                // Sent already (read while catching up), or not asked for.
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => return Some(self.too_slow()),
                Err(RecvError::Closed) => return None,
            }
        }
    }

    /// Reads one page of what this subscriber missed. Events committed
    /// after the subscription started reach it live too; those read here
    /// are dropped there by id.
    async fn catch_up(&mut self) -> Result<(), Event> {
        let query = AuditQuery {
            machine_id: self.machine_id.clone(),
            resource_type: None,
            after: self.sent,
            limit: CATCH_UP_PAGE,
        };
        match self.app.list_audit_events(&query).await {
            Ok(page) => {
                let page = page.items;
                self.caught_up = page.len() < CATCH_UP_PAGE as usize;
                self.backlog.extend(page);
                // The live ring overflowed while the backlog was long: what
                // it lost is in the database, which is read until caught up.
                if !self.caught_up {
                    self.live = self.live.resubscribe();
                }
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "event stream: cannot read the log");
                Err(Event::default()
                    .event("unavailable")
                    .json_data(serde_json::json!({
                        "message": "the database is not answering; resume from cursor",
                        "cursor": self.sent.to_string(),
                    }))
                    .unwrap_or_default())
            }
        }
    }
}

/// Who a stream counts against: the API key, or the address without auth.
fn client_of(caller: Option<&Caller>, addr: SocketAddr) -> String {
    match caller {
        Some(c) => format!("key:{}", c.key_name),
        None => format!("addr:{}", addr.ip()),
    }
}

fn refused(r: StreamRefused) -> Response {
    let error = match r {
        StreamRefused::Full { limit } => ApiError::new(
            ErrorCode::ServiceUnavailable,
            "every event-stream slot of this server is taken; retry later",
        )
        .with_details(serde_json::json!({ "limit": limit })),
        StreamRefused::ClientFull { limit } => ApiError::new(
            ErrorCode::RateLimited,
            format!(
                "this client has {limit} event streams open, its limit; close one or retry later"
            ),
        )
        .with_details(serde_json::json!({ "limit": limit })),
    };
    let mut response = error.retry_after(STREAMS_RETRY_AFTER_SECS).into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

async fn stream(
    State(app): State<AppState>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    caller: Option<Extension<Caller>>,
    stall: Option<Extension<WriteStall>>,
    headers: HeaderMap,
    query: Result<Query<StreamQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) =
        query.map_err(|_| ApiError::validation("query", "the query string is malformed"))?;
    // A reconnecting EventSource sends Last-Event-ID; it wins over the
    // cursor of the URL it reconnects to.
    let last_event_id = headers
        .get("last-event-id")
        .map(|v| v.to_str().unwrap_or("\u{0}").to_owned());
    // Each is checked, used or not: a malformed one is the client's
    // mistake either way.
    let parse = |field: &'static str, value: Option<String>| match value {
        None => Ok(None),
        Some(c) => parse_cursor(&c)
            .map(|id| Some((id, field)))
            .ok_or_else(|| ApiError::validation(field, format!("{field} is not an event id"))),
    };
    let from_url = parse("cursor", q.cursor)?;
    let (sent, field) = match (parse("Last-Event-ID", last_event_id)?, from_url) {
        (Some((id, field)), _) | (None, Some((id, field))) => (Some(id), field),
        (None, None) => (None, "cursor"),
    };
    let machine_id = match (q.machine_id, q.machine_id_camel) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::validation(
                "machine_id",
                "machine_id is given twice with different values",
            ));
        }
        (a, b) => a.or(b),
    };
    if let Some(id) = &machine_id
        && !ids::looks_like(ids::MACHINE_PREFIX, id)
    {
        return Err(ApiError::validation(
            "machine_id",
            "machine_id is not a machine id (mach_...)",
        ));
    }
    let slot = match app
        .events
        .open_slot(&client_of(caller.as_ref().map(|c| &c.0), addr))
    {
        Ok(slot) => slot,
        Err(r) => return Ok(refused(r)),
    };
    if let Some(after) = sent {
        refuse_past_head(&app, field, after).await?;
    }
    let live = app.events.subscribe();
    // Without a cursor, the stream starts now: at the end of the log.
    let (sent, caught_up) = match sent {
        Some(after) => (after, false),
        None => (app.audit_head().await?, true),
    };
    let stall = stall.map(|s| s.0).unwrap_or_default();
    stall.limit_send_buffer(STREAM_SEND_BUFFER);
    let subscriber = Subscriber {
        app,
        live,
        machine_id,
        sent,
        backlog: VecDeque::new(),
        caught_up,
        done: false,
        stall,
        _slot: Some(slot),
    };
    let events = futures_util::stream::unfold(subscriber, |mut s| async move {
        s.next().await.map(|e| (Ok::<_, Infallible>(e), s))
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE).text("keep-alive"))
        .into_response())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use peaqos_protocol::Timestamp;

    use super::*;
    use crate::stream::CAPACITY;

    fn event(id: i64) -> AuditEvent {
        AuditEvent {
            id,
            actor: "a".into(),
            kind: "machine.updated".into(),
            resource_type: "machine".into(),
            resource_id: "mach_x".into(),
            payload: serde_json::json!({}),
            created_at: Timestamp::from_unix_millis(1).unwrap(),
        }
    }

    async fn app() -> AppState {
        crate::app::test_app(crate::admission::Admission::new(
            1,
            crate::admission::MAX_QUEUE_WAIT,
        ))
        .await
    }

    fn subscriber(app: &AppState) -> Subscriber {
        Subscriber {
            app: Arc::clone(app),
            live: app.events.subscribe(),
            machine_id: None,
            sent: 0,
            backlog: VecDeque::new(),
            caught_up: true,
            done: false,
            stall: WriteStall::default(),
            _slot: None,
        }
    }

    /// What an event frame carries (its buffer, escaped).
    fn text(e: &Event) -> String {
        format!("{e:?}")
    }

    /// A connection whose socket stopped taking writes (`serve`) ends its
    /// stream with `too_slow` and the cursor of the last event handed to it,
    /// waiting or not for the next event.
    #[tokio::test]
    async fn a_stalled_connection_ends_its_stream_with_too_slow_and_the_cursor() {
        let app = app().await;
        let mut waiting = subscriber(&app);
        app.events.publish(event(1));
        assert!(waiting.next().await.is_some());
        let stall = waiting.stall.clone();
        let next = tokio::spawn(async move {
            let last = waiting.next().await;
            (last, waiting.next().await.is_none(), waiting.sent)
        });
        tokio::task::yield_now().await;
        stall.token().cancel();
        let (last, ended, sent) = tokio::time::timeout(Duration::from_secs(5), next)
            .await
            .expect("the stall wakes a waiting stream")
            .unwrap();
        let last = text(&last.expect("the final event"));
        assert!(
            last.contains("too_slow") && last.contains(r#"\"cursor\":\"1\""#),
            "{last}"
        );
        assert!(ended, "then the stream ends");
        assert_eq!(sent, 1);

        // Stalled with events queued: the events wait, `too_slow` goes first.
        let mut behind = subscriber(&app);
        app.events.publish(event(2));
        behind.stall.token().cancel();
        let last = text(&behind.next().await.unwrap());
        assert!(
            last.contains("too_slow") && last.contains(r#"\"cursor\":\"0\""#),
            "{last}"
        );
    }

    /// A subscriber that does not take what is published until the ring
    /// has overwritten its place gets one final event and nothing more;
    /// one that keeps up gets every event once.
    #[tokio::test]
    async fn a_subscriber_left_behind_by_the_ring_is_dropped() {
        let app = app().await;
        let mut keeping_up = subscriber(&app);
        let mut slow = subscriber(&app);
        for id in 1..=3 {
            app.events.publish(event(id));
            assert!(keeping_up.next().await.is_some());
            assert_eq!(keeping_up.sent, id);
        }
        for id in 4..=i64::try_from(CAPACITY).unwrap() + 10 {
            app.events.publish(event(id));
        }
        let last = slow.next().await;
        assert!(last.is_some(), "the final too_slow event");
        assert!(slow.done);
        assert_eq!(slow.sent, 0, "its cursor: nothing was sent");
        assert!(slow.next().await.is_none(), "then the stream ends");
        assert_eq!(app.events.subscribers(), 2, "until the stream is dropped");
        drop(slow);
        assert_eq!(app.events.subscribers(), 1);
    }
}
