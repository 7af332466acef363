//! A thin layer over rumqttc's two clients (MQTT 3.1.1 in the crate root,
//! MQTT 5 in `rumqttc::v5`), chosen at run time from the config. It only
//! evens out what the agent uses: connect options, publish, subscribe,
//! disconnect and the events of the event loop.

use std::time::Duration;

use rumqttc::v5;
use rumqttc::v5::mqttbytes::QoS as Qos5;
use rumqttc::v5::mqttbytes::v5 as p5;
use zeroize::Zeroizing;

use super::broker_url::BrokerUrl;
use super::config::Protocol;

/// Capacity of rumqttc's request channel. Publishing uses `try_*` calls, so
/// a dead or slow broker makes publishes fail fast instead of queueing.
pub(crate) const REQUEST_CAPACITY: usize = 32;
/// QoS 1 publishes awaiting their PUBACK. The agent publishes a handful of
/// messages at a time (status, availability, replies); more wait in the
/// request queue above.
const MAX_INFLIGHT: u16 = 32;

/// Everything needed to open one MQTT session.
pub(crate) struct ConnectSettings {
    pub(crate) url: BrokerUrl,
    pub(crate) protocol: Protocol,
    pub(crate) client_id: String,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<Zeroizing<String>>,
    pub(crate) keep_alive: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) max_packet_size: u32,
    /// Retained at-least-once last will: (topic, payload).
    pub(crate) will: Option<(String, &'static str)>,
    #[cfg(feature = "tls")]
    pub(crate) tls: Option<std::sync::Arc<rumqttc::tokio_rustls::rustls::ClientConfig>>,
}

impl std::fmt::Debug for ConnectSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectSettings")
            .field("url", &self.url)
            .field("protocol", &self.protocol)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// Extra publish properties; only MQTT 5 carries them.
#[derive(Debug, Clone, Default)]
pub(crate) struct PublishProps {
    /// Where the receiver should answer (requests only).
    pub(crate) response_topic: Option<String>,
    pub(crate) correlation_data: Option<Vec<u8>>,
    /// Seconds after which the broker drops an undelivered message.
    pub(crate) message_expiry: Option<u32>,
    pub(crate) json: bool,
}

/// An incoming application message, the same for both protocol versions.
#[derive(Debug, Clone)]
pub(crate) struct Message {
    pub(crate) topic: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) retain: bool,
    /// MQTT 5 Response Topic.
    pub(crate) response_topic: Option<String>,
    /// MQTT 5 Correlation Data.
    pub(crate) correlation_data: Option<Vec<u8>>,
}

/// What the event loop reported.
#[derive(Debug)]
pub(crate) enum Event {
    /// CONNACK with success: a new session (the agent always asks for a
    /// clean one), so subscriptions and retained state must be redone.
    Connected,
    Message(Message),
    /// A SUBACK granted every filter.
    Subscribed,
    /// A SUBACK refused some filters (usually the broker's ACL).
    SubscribeRefused,
    /// Our DISCONNECT has been written: the session is over once the broker
    /// closes the connection.
    DisconnectSent,
    /// Another packet from the broker (acks, pings): progress, no action
    /// needed.
    Received,
    /// Something we sent: no action needed.
    Other,
}

/// A broken connection or a failed attempt to make one (rumqttc's error
/// for the protocol version in use).
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error(transparent)]
    V311(#[from] rumqttc::ConnectionError),
    #[error(transparent)]
    V5(#[from] v5::ConnectionError),
}

impl ConnectionError {
    /// An incoming packet was over `max_packet_size` (refused from its
    /// header, which ends the connection).
    pub(crate) fn oversized(&self) -> bool {
        use rumqttc::mqttbytes::Error as E4;
        use rumqttc::v5::mqttbytes::Error as E5;
        matches!(
            self,
            Self::V311(rumqttc::ConnectionError::MqttState(
                rumqttc::StateError::Deserialization(E4::PayloadSizeLimitExceeded(_))
            )) | Self::V5(v5::ConnectionError::MqttState(
                v5::StateError::Deserialization(E5::PayloadSizeLimitExceeded { .. })
            ))
        )
    }

    /// The broker answered CONNECT with a refusal (bad credentials, not
    /// authorised, ...), as opposed to a network failure.
    pub(crate) fn refusal(&self) -> Option<String> {
        match self {
            Self::V311(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                Some(format!("{code:?}"))
            }
            Self::V5(v5::ConnectionError::ConnectionRefused(code)) => Some(format!("{code:?}")),
            _ => None,
        }
    }
}

/// The request channel is full or closed: the message was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the MQTT request queue is full or closed")]
pub(crate) struct NotQueued;

/// Sends requests to the event loop. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) enum Client {
    V311(rumqttc::AsyncClient),
    V5(v5::AsyncClient),
}

/// Drives the connection; must be polled for anything to happen.
pub(crate) enum EventLoop {
    V311(Box<rumqttc::EventLoop>),
    V5(Box<v5::EventLoop>),
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::V311(_) => "EventLoop(3.1.1)",
            Self::V5(_) => "EventLoop(5)",
        })
    }
}

/// Creates a client and its event loop; nothing touches the network until
/// the event loop is polled.
pub(crate) fn new(settings: &ConnectSettings) -> (Client, EventLoop) {
    let host = settings.url.host.clone();
    let port = settings.url.port;
    let timeout_secs = settings.connect_timeout.as_secs().max(1);
    match settings.protocol {
        Protocol::V311 => {
            let mut o = rumqttc::MqttOptions::new(settings.client_id.clone(), host, port);
            o.set_keep_alive(settings.keep_alive)
                .set_clean_session(true)
                .set_max_packet_size(
                    settings.max_packet_size as usize,
                    settings.max_packet_size as usize,
                )
                .set_inflight(MAX_INFLIGHT);
            if let Some(user) = &settings.username {
                o.set_credentials(user.clone(), password_text(settings));
            }
            if let Some((topic, payload)) = &settings.will {
                o.set_last_will(rumqttc::LastWill::new(
                    topic.clone(),
                    payload.as_bytes(),
                    rumqttc::QoS::AtLeastOnce,
                    true,
                ));
            }
            #[cfg(feature = "tls")]
            if let Some(tls) = &settings.tls {
                o.set_transport(rumqttc::Transport::tls_with_config(
                    rumqttc::TlsConfiguration::Rustls(tls.clone()),
                ));
            }
            let (client, mut eventloop) = rumqttc::AsyncClient::new(o, REQUEST_CAPACITY);
            unreserve_events(&mut eventloop.state.events);
            let mut network = rumqttc::NetworkOptions::new();
            network.set_connection_timeout(timeout_secs);
            eventloop.set_network_options(network);
            (Client::V311(client), EventLoop::V311(Box::new(eventloop)))
        }
        Protocol::V5 => {
            let mut o = v5::MqttOptions::new(settings.client_id.clone(), host, port);
            o.set_keep_alive(settings.keep_alive)
                .set_clean_start(true)
                .set_connection_timeout(timeout_secs)
                // Also tells the broker not to send us anything larger, so an
                // oversized message is dropped there instead of breaking our
                // connection.
                .set_max_packet_size(Some(settings.max_packet_size))
                // Without a limit rumqttc's v5 state keeps a slot for each of
                // the 65,536 packet ids (about 13.5 MiB, all written at
                // start): more than twice the agent's whole footprint.
                .set_outgoing_inflight_upper_limit(MAX_INFLIGHT);
            if let Some(user) = &settings.username {
                o.set_credentials(user.clone(), password_text(settings));
            }
            if let Some((topic, payload)) = &settings.will {
                o.set_last_will(p5::LastWill::new(
                    topic.clone(),
                    payload.as_bytes(),
                    Qos5::AtLeastOnce,
                    true,
                    None,
                ));
            }
            #[cfg(feature = "tls")]
            if let Some(tls) = &settings.tls {
                o.set_transport(rumqttc::Transport::tls_with_config(
                    rumqttc::TlsConfiguration::Rustls(tls.clone()),
                ));
            }
            let (client, mut eventloop) = v5::AsyncClient::new(o, REQUEST_CAPACITY);
            unreserve_events(&mut eventloop.state.events);
            (Client::V5(client), EventLoop::V5(Box::new(eventloop)))
        }
    }
}

/// rumqttc reserves its queue of incoming events for 100 at the start (for
/// MQTT 5, 100 packets of about 390 bytes: 39 KB, the largest block of the
/// agent's start). The loop drains it on every poll, so it rarely holds more
/// than a few; it grows on demand instead, and the start's heap peak, which
/// glibc keeps resident, is that much lower.
fn unreserve_events<T>(events: &mut std::collections::VecDeque<T>) {
    *events = std::collections::VecDeque::new();
}

/// rumqttc keeps the password as a plain `String` inside its options (it
/// must resend it on every reconnect); our copy is still wiped on drop.
fn password_text(settings: &ConnectSettings) -> String {
    settings
        .password
        .as_ref()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default()
}

impl Client {
    /// Queues a QoS 1 publish without waiting.
    pub(crate) fn try_publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
        props: Option<&PublishProps>,
    ) -> Result<(), NotQueued> {
        match self {
            Self::V311(c) => c
                .try_publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload)
                .map_err(|_| NotQueued),
            Self::V5(c) => {
                let qos = Qos5::AtLeastOnce;
                match props {
                    None => c.try_publish(topic, qos, retain, payload),
                    Some(props) => c.try_publish_with_properties(
                        topic,
                        qos,
                        retain,
                        payload,
                        v5_properties(props),
                    ),
                }
                .map_err(|_| NotQueued)
            }
        }
    }

    /// Queues a QoS 1 publish, waiting for room in the queue (for short-lived
    /// clients whose event loop runs in another task).
    pub(crate) async fn publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
        props: Option<&PublishProps>,
    ) -> Result<(), NotQueued> {
        match self {
            Self::V311(c) => c
                .publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload)
                .await
                .map_err(|_| NotQueued),
            Self::V5(c) => {
                let qos = Qos5::AtLeastOnce;
                match props {
                    None => c.publish(topic, qos, retain, payload).await,
                    Some(props) => {
                        c.publish_with_properties(topic, qos, retain, payload, v5_properties(props))
                            .await
                    }
                }
                .map_err(|_| NotQueued)
            }
        }
    }

    /// Queues one SUBSCRIBE for all `filters` (QoS 1). With MQTT 5 the
    /// broker is asked to keep the retain flag of forwarded messages
    /// (Retain As Published), so that retained requests can be told apart.
    pub(crate) fn try_subscribe(&self, filters: &[String]) -> Result<(), NotQueued> {
        match self {
            Self::V311(c) => c
                .try_subscribe_many(
                    filters.iter().map(|f| {
                        rumqttc::SubscribeFilter::new(f.clone(), rumqttc::QoS::AtLeastOnce)
                    }),
                )
                .map_err(|_| NotQueued),
            Self::V5(c) => c
                .try_subscribe_many(filters.iter().map(|f| {
                    let mut filter = p5::Filter::new(f.clone(), Qos5::AtLeastOnce);
                    filter.preserve_retain = true;
                    filter
                }))
                .map_err(|_| NotQueued),
        }
    }

    /// Queues an UNSUBSCRIBE for each of `filters`, without waiting.
    pub(crate) fn try_unsubscribe(&self, filters: &[String]) -> Result<(), NotQueued> {
        for filter in filters {
            match self {
                Self::V311(c) => c.try_unsubscribe(filter.clone()).map_err(|_| NotQueued)?,
                Self::V5(c) => c.try_unsubscribe(filter.clone()).map_err(|_| NotQueued)?,
            }
        }
        Ok(())
    }

    pub(crate) async fn disconnect(&self) -> Result<(), NotQueued> {
        match self {
            Self::V311(c) => c.disconnect().await.map_err(|_| NotQueued),
            Self::V5(c) => c.disconnect().await.map_err(|_| NotQueued),
        }
    }
}

fn v5_properties(props: &PublishProps) -> p5::PublishProperties {
    p5::PublishProperties {
        response_topic: props.response_topic.clone(),
        correlation_data: props.correlation_data.clone().map(Into::into),
        message_expiry_interval: props.message_expiry,
        content_type: props.json.then(|| "application/json".to_owned()),
        payload_format_indicator: props.json.then_some(1),
        ..p5::PublishProperties::default()
    }
}

impl EventLoop {
    /// After our DISCONNECT: reads until the broker closes the connection.
    ///
    /// Closing our end at once is not a clean goodbye: anything still unread
    /// on the socket (the PUBACK of `offline`, a retained message) makes
    /// the kernel answer with a reset instead of a FIN, and a reset can
    /// destroy the DISCONNECT before the broker has read it. The broker
    /// then counts an abnormal end and publishes the last will. The broker
    /// closes as soon as it has read DISCONNECT, so this is quick; callers
    /// bound it in time. (rumqttc keeps the socket to itself, so a
    /// half-close is not available; reading to the end serves the same
    /// purpose.)
    pub(crate) async fn until_closed(&mut self) {
        // The first error is the close; polling again would reconnect.
        while self.poll().await.is_ok() {}
    }

    /// Polls until the next event. After an error the next call reconnects
    /// at once: callers wait (back off) between failed polls.
    pub(crate) async fn poll(&mut self) -> Result<Event, ConnectionError> {
        match self {
            Self::V311(el) => {
                let event = el.poll().await?;
                Ok(match event {
                    rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) => Event::Connected,
                    rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                        Event::Message(Message {
                            topic: p.topic,
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                            response_topic: None,
                            correlation_data: None,
                        })
                    }
                    rumqttc::Event::Incoming(rumqttc::Packet::SubAck(ack)) => {
                        if ack
                            .return_codes
                            .iter()
                            .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                        {
                            Event::SubscribeRefused
                        } else {
                            Event::Subscribed
                        }
                    }
                    rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect) => {
                        Event::DisconnectSent
                    }
                    rumqttc::Event::Incoming(_) => Event::Received,
                    rumqttc::Event::Outgoing(_) => Event::Other,
                })
            }
            Self::V5(el) => {
                let event = el.poll().await?;
                Ok(match event {
                    v5::Event::Incoming(p5::Packet::ConnAck(_)) => Event::Connected,
                    v5::Event::Incoming(p5::Packet::Publish(p)) => {
                        // MQTT 5 requires UTF-8 topics; a broker that sends
                        // anything else is ignored rather than trusted.
                        let Ok(topic) = String::from_utf8(p.topic.to_vec()) else {
                            return Ok(Event::Received);
                        };
                        let (response_topic, correlation_data) = p
                            .properties
                            .map(|props| {
                                (
                                    props.response_topic,
                                    props.correlation_data.map(|b| b.to_vec()),
                                )
                            })
                            .unwrap_or_default();
                        Event::Message(Message {
                            topic,
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                            response_topic,
                            correlation_data,
                        })
                    }
                    v5::Event::Incoming(p5::Packet::SubAck(ack)) => {
                        if ack
                            .return_codes
                            .iter()
                            .all(|c| matches!(c, p5::SubscribeReasonCode::Success(_)))
                        {
                            Event::Subscribed
                        } else {
                            Event::SubscribeRefused
                        }
                    }
                    v5::Event::Outgoing(rumqttc::Outgoing::Disconnect) => Event::DisconnectSent,
                    v5::Event::Incoming(_) => Event::Received,
                    v5::Event::Outgoing(_) => Event::Other,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(protocol: Protocol) -> ConnectSettings {
        ConnectSettings {
            url: BrokerUrl::parse("mqtt://127.0.0.1:1883").unwrap(),
            protocol,
            client_id: "footprint".to_owned(),
            username: None,
            password: None,
            keep_alive: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            max_packet_size: 64 * 1024,
            will: None,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    /// rumqttc's own reservation (100 events, 39 KB for MQTT 5) is the
    /// largest block of the agent's start; it must not come back with a
    /// rumqttc upgrade unnoticed.
    #[test]
    fn the_event_queue_reserves_nothing_before_the_first_event() {
        let (_, EventLoop::V5(v5)) = new(&settings(Protocol::V5)) else {
            panic!("asked for MQTT 5")
        };
        assert_eq!(v5.state.events.capacity(), 0);
        let (_, EventLoop::V311(v311)) = new(&settings(Protocol::V311)) else {
            panic!("asked for MQTT 3.1.1")
        };
        assert_eq!(v311.state.events.capacity(), 0);
    }
}
