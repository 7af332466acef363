//! Short-lived clients for the CLI: `peaqos-agent status` (one `status/get`
//! query) and `peaqos-agent check` (can we connect at all).

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use super::MqttError;
use super::client::{self, ConnectSettings, ConnectionError, Event, EventLoop, PublishProps};
use super::config::Protocol;
use super::random;
use super::topics::Topics;

/// After a retained `offline`, how long to still wait for an answer (the
/// agent may be reconnecting at this very moment).
const OFFLINE_GRACE: Duration = Duration::from_secs(1);
/// Time allowed for a polite DISCONNECT before dropping the connection.
const CLOSE_TIMEOUT: Duration = Duration::from_millis(500);

pub(super) async fn query_status(
    settings: &ConnectSettings,
    topics: &Topics,
    timeout: Duration,
) -> Result<Value, MqttError> {
    let url = settings.url.to_string();
    let (client, mut eventloop) = client::new(settings);
    let nonce = random::nonce();
    let reply_topic = format!("{}status-{nonce}", topics.reply_prefix);
    let (body, props) = match settings.protocol {
        Protocol::V5 => (
            Vec::new(),
            Some(PublishProps {
                response_topic: Some(reply_topic.clone()),
                correlation_data: Some(nonce.as_bytes().to_vec()),
                message_expiry: u32::try_from(timeout.as_secs().max(1)).ok(),
                json: false,
            }),
        ),
        Protocol::V311 => (
            serde_json::to_vec(&serde_json::json!({
                "replyTo": reply_topic,
                "correlationId": nonce,
            }))
            .unwrap_or_default(),
            None,
        ),
    };
    // Queued before connecting: rumqttc sends them in order after CONNACK,
    // and a broker handles one client's packets in order, so our
    // subscription exists before the agent can see the query.
    let queued = client
        .try_subscribe(&[reply_topic.clone(), topics.availability.clone()])
        .and_then(|()| client.try_publish(&topics.status_get, body, false, props.as_ref()));
    debug_assert!(
        queued.is_ok(),
        "a fresh request queue has room for two requests"
    );

    let deadline = Instant::now() + timeout;
    let mut offline_since: Option<Instant> = None;
    loop {
        let until = offline_since.map_or(deadline, |at| (at + OFFLINE_GRACE).min(deadline));
        let Ok(polled) = tokio::time::timeout_at(until, eventloop.poll()).await else {
            return Err(if offline_since.is_some() {
                MqttError::AgentOffline {
                    topic: topics.availability.clone(),
                }
            } else {
                MqttError::Timeout { url, timeout }
            });
        };
        match polled.map_err(|e| connect_error(&url, e))? {
            Event::SubscribeRefused => {
                return Err(MqttError::SubscribeRefused { topic: reply_topic });
            }
            Event::Message(m) if m.topic == reply_topic => {
                let matches = match settings.protocol {
                    Protocol::V5 => m.correlation_data.as_deref() == Some(nonce.as_bytes()),
                    Protocol::V311 => true,
                };
                let mut answer: Value =
                    serde_json::from_slice(&m.payload).map_err(|e| MqttError::BadReply {
                        topic: reply_topic.clone(),
                        source: Some(e),
                    })?;
                let Some(object) = answer.as_object_mut() else {
                    return Err(MqttError::BadReply {
                        topic: reply_topic,
                        source: None,
                    });
                };
                let id = object.remove("correlationId");
                if matches
                    && (settings.protocol == Protocol::V5
                        || id == Some(Value::from(nonce.as_str())))
                {
                    close(&client, &mut eventloop).await;
                    return Ok(answer);
                }
            }
            Event::Message(m) if m.topic == topics.availability => {
                offline_since = (m.payload == b"offline").then(Instant::now);
            }
            _ => {}
        }
    }
}

pub(super) async fn check_broker(
    settings: &ConnectSettings,
    timeout: Duration,
) -> Result<String, MqttError> {
    let url = settings.url.to_string();
    let (client, mut eventloop) = client::new(settings);
    let deadline = Instant::now() + timeout;
    loop {
        let Ok(polled) = tokio::time::timeout_at(deadline, eventloop.poll()).await else {
            return Err(MqttError::ConnectTimeout { url, timeout });
        };
        if let Event::Connected = polled.map_err(|e| connect_error(&url, e))? {
            break;
        }
    }
    close(&client, &mut eventloop).await;
    let mut found = format!("connected to {url} with MQTT {}", settings.protocol);
    if settings.url.tls {
        found.push_str(" over TLS");
    }
    if let Some(user) = &settings.username {
        let _ = write!(found, " as user {user:?}");
    }
    Ok(found)
}

fn connect_error(url: &str, error: ConnectionError) -> MqttError {
    match error.refusal() {
        Some(reason) => MqttError::Refused {
            url: url.to_owned(),
            reason,
        },
        None => MqttError::Connect {
            url: url.to_owned(),
            source: Box::new(error),
        },
    }
}

/// A polite DISCONNECT, bounded in time; dropping the connection is the
/// fallback and harmless (these clients have no last will).
async fn close(client: &client::Client, eventloop: &mut EventLoop) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        if client.disconnect().await.is_err() {
            return;
        }
        while let Ok(event) = eventloop.poll().await {
            if matches!(event, Event::DisconnectSent) {
                eventloop.until_closed().await;
                return;
            }
        }
    })
    .await;
}

/// Filters per SUBSCRIBE when reading many machines' retained topics.
const FILTERS_PER_SUBSCRIBE: usize = 100;

/// The retained messages on `topics` (a fresh reader's view), with one
/// client. The broker replays a subscription's retained messages as it
/// grants it, and handles one client's packets in order: a marker
/// published after the last SUBSCRIBE comes back after every replay. If the
/// marker never comes (an ACL refused it), what arrived by `timeout` is the
/// answer.
pub(super) async fn read_retained(
    settings: &ConnectSettings,
    topics: &[String],
    marker: &str,
    timeout: Duration,
) -> Result<std::collections::HashMap<String, Vec<u8>>, MqttError> {
    let url = settings.url.to_string();
    let (client, mut eventloop) = client::new(settings);
    let per_packet = FILTERS_PER_SUBSCRIBE.max(topics.len().div_ceil(client::REQUEST_CAPACITY - 4));
    let mut pending: std::collections::VecDeque<Vec<String>> = topics
        .chunks(per_packet)
        .map(<[String]>::to_vec)
        .chain(std::iter::once(vec![marker.to_owned()]))
        .collect();
    // Queued before connecting, in order (see `query_status`).
    while let Some(filters) = pending.front() {
        if client.try_subscribe(filters).is_err() {
            break;
        }
        pending.pop_front();
    }
    debug_assert!(pending.is_empty(), "a fresh request queue has room");
    let _ = client.try_publish(marker, b"end".to_vec(), false, None);
    let deadline = Instant::now() + timeout;
    let mut seen = std::collections::HashMap::new();
    let mut connected = false;
    loop {
        let Ok(polled) = tokio::time::timeout_at(deadline, eventloop.poll()).await else {
            if connected {
                break;
            }
            return Err(MqttError::ConnectTimeout { url, timeout });
        };
        match polled.map_err(|e| connect_error(&url, e))? {
            Event::Connected => connected = true,
            Event::Message(m) if m.topic == marker => break,
            Event::Message(m) if m.retain => {
                seen.insert(m.topic, m.payload);
            }
            _ => {}
        }
    }
    close(&client, &mut eventloop).await;
    Ok(seen)
}
