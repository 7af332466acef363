//! The running MQTT interface: one task polls rumqttc's event loop and
//! reconnects with backoff (`driver.rs`); the service task here keeps the
//! broker's retained state current and answers requests.
//!
//! Nothing here ever waits on the broker while serving: publishes are
//! `try_*` into rumqttc's bounded queue, retained state is a set of "dirty"
//! flags rewritten from the newest status snapshot (so a dead broker can
//! only ever cost one pending copy, never a backlog), and nothing is
//! queued while disconnected: every CONNACK republishes everything.
//!
//! Why this file is somewhat over 600 lines: the service task is one select
//! loop whose handlers (connection, requests, commands, status, the poison
//! and rate-limit bookkeeping) all read and write the same `Session`,
//! `Dirty` and `Counters`; what stands alone (polling, requests, commands,
//! poison, the token bucket) already has its own module.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::client::{Client, Event, EventLoop, Message, PublishProps};
use super::commands::{self, Decision, Gate, Outcome};
use super::config::MqttConfig;
use super::discovery::Discovery;
use super::driver::{Polled, drive};
use super::poison::{Poison, Verdict};
use super::rate::TokenBucket;
use super::request;
use super::topics::Topics;
use crate::backoff::Backoff;
use crate::status::{AgentState, Command, QueryCounters, StatusPayload, StatusSnapshot};
use crate::systemd::Heartbeat;

/// Events buffered between the polling task and the service.
const EVENT_CAPACITY: usize = 32;
/// How soon to retry publishing when rumqttc's queue was full.
const RETRY_FULL_QUEUE: Duration = Duration::from_millis(200);
/// Time allowed at shutdown for `offline`, DISCONNECT and the broker's close
/// of the connection (which it does as soon as it has read DISCONNECT).
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);
/// At shutdown, how long to wait for the registration loop's final
/// `stopping` snapshot, so that the last retained status says so.
const FINAL_STATUS_WAIT: Duration = Duration::from_millis(300);
/// After queries were dropped for the rate limit, the retained status (and
/// its `queries` counters) is republished this soon, so that a dashboard
/// sees the limit, not silence. At most one extra publish per this period.
const COUNTERS_REPUBLISH: Duration = Duration::from_secs(1);
/// A rate-limit warning is logged at most this often.
const LIMIT_WARNING_EVERY: Duration = Duration::from_secs(60);

/// Retained state that must be (re)written to the broker.
// Four independent "needs writing" marks, not a state machine in disguise.
#[allow(clippy::struct_excessive_bools)]
#[derive(Debug, Default)]
struct Dirty {
    subscriptions: bool,
    availability: bool,
    discovery: bool,
    status: bool,
}

/// What the current broker session has done so far.
#[derive(Debug, Default)]
struct Session {
    /// Subscribed to the request topics (`status/get`, commands).
    requests: bool,
    /// Subscribed to the others (Home Assistant's status).
    others: bool,
    /// Something was read after the last SUBACK (see [`Poison`]).
    replay_passed: bool,
}

/// Counts of what was refused or dropped: queries in the status payload,
/// commands in the log at shutdown.
#[derive(Debug, Default)]
struct Counters {
    queries: QueryCounters,
    commands_refused: u64,
    results_dropped: u64,
}

/// Everything the service task owns.
pub(crate) struct Service {
    client: Client,
    topics: Topics,
    discovery: Option<Discovery>,
    status: watch::Receiver<StatusSnapshot>,
    status_open: bool,
    commands: mpsc::Sender<Command>,
    command_topics: Vec<String>,
    gate: Option<Gate>,
    result_timeout: Duration,
    running: JoinSet<(commands::Request, Outcome, Option<String>)>,
    queries: TokenBucket,
    connected: bool,
    session: Session,
    poison: Poison,
    dirty: Dirty,
    retry_at: Option<Instant>,
    /// When to republish the status for its counters (see
    /// [`COUNTERS_REPUBLISH`]).
    counters_at: Option<Instant>,
    limit_warned_at: Option<Instant>,
    counters: Counters,
    last_error: Option<String>,
    url: String,
    heartbeat: Heartbeat,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("topics", &self.topics)
            .field("connected", &self.connected)
            .finish_non_exhaustive()
    }
}

/// What the service is made of, besides the config.
#[derive(Debug)]
pub(crate) struct Parts {
    pub(crate) url: String,
    pub(crate) topics: Topics,
    pub(crate) discovery: Option<Discovery>,
    pub(crate) connection: (Client, EventLoop),
    pub(crate) status: watch::Receiver<StatusSnapshot>,
    pub(crate) commands: mpsc::Sender<Command>,
    pub(crate) heartbeat: Heartbeat,
}

/// Starts the polling and service tasks; returns the service task.
pub(crate) fn start(
    config: &MqttConfig,
    parts: Parts,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let Parts {
        url,
        topics,
        discovery,
        connection: (client, eventloop),
        status,
        commands,
        heartbeat,
    } = parts;
    let (events_tx, events_rx) = mpsc::channel(EVENT_CAPACITY);
    let stop = CancellationToken::new();
    let backoff = Backoff::new(config.reconnect_min, config.reconnect_max);
    let poller = tokio::spawn(drive(eventloop, events_tx, backoff, stop.clone()));
    let (command_topics, gate) = if config.commands.enabled {
        let topics = config
            .commands
            .allow
            .iter()
            .map(|name| topics.command(*name))
            .collect();
        (topics, Some(Gate::new(&config.commands)))
    } else {
        (Vec::new(), None)
    };
    let service = Service {
        client,
        topics,
        discovery,
        status,
        status_open: true,
        commands,
        command_topics,
        gate,
        result_timeout: config.commands.result_timeout,
        running: JoinSet::new(),
        queries: TokenBucket::new(
            config.query_burst,
            Duration::from_secs(1) / config.query_rate.max(1),
        ),
        connected: false,
        session: Session::default(),
        poison: Poison::default(),
        dirty: Dirty::default(),
        retry_at: None,
        counters_at: None,
        limit_warned_at: None,
        counters: Counters::default(),
        last_error: None,
        url,
        heartbeat,
    };
    let interval = config.status_interval;
    tokio::spawn(async move {
        service.run(events_rx, interval, shutdown).await;
        stop.cancel();
        let _ = poller.await;
    })
}

impl Service {
    async fn run(
        mut self,
        mut events: mpsc::Receiver<Polled>,
        status_interval: Duration,
        shutdown: CancellationToken,
    ) {
        let periodic = !status_interval.is_zero();
        let mut republish = tokio::time::interval_at(
            Instant::now() + status_interval.max(Duration::from_secs(1)),
            status_interval.max(Duration::from_secs(1)),
        );
        republish.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The systemd watchdog is fed only while this loop keeps turning.
        let beat_every = crate::systemd::beat_interval();
        let mut beats = tokio::time::interval(beat_every.unwrap_or(Duration::from_secs(3600)));
        loop {
            let retry_at = self.retry_at;
            let counters_at = self.counters_at;
            let resume_at = self
                .poison
                .suspended_until()
                .filter(|_| self.connected && !self.session.requests);
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                polled = events.recv() => match polled {
                    Some(polled) => self.on_polled(polled),
                    // The polling task only ends when told to.
                    None => return,
                },
                changed = self.status.changed(), if self.status_open => {
                    if changed.is_ok() {
                        self.status.borrow_and_update();
                        self.dirty.status = true;
                    } else {
                        // The registration loop is gone (shutting down):
                        // keep serving its last snapshot.
                        self.status_open = false;
                    }
                }
                _ = republish.tick(), if periodic => self.dirty.status = true,
                _ = beats.tick(), if beat_every.is_some() => self.heartbeat.beat(),
                Some(done) = self.running.join_next(), if !self.running.is_empty() => {
                    if let Ok((req, outcome, message)) = done {
                        self.finish_command(&req, outcome, message.as_deref());
                    }
                }
                () = sleep_until(retry_at), if retry_at.is_some() => self.retry_at = None,
                () = sleep_until(counters_at), if counters_at.is_some() => {
                    self.counters_at = None;
                    self.dirty.status = true;
                }
                () = sleep_until(resume_at), if resume_at.is_some() => {
                    info!("resuming the MQTT request subscriptions after the quarantine");
                    self.dirty.subscriptions = true;
                }
            }
            self.flush();
        }
        self.goodbye(&mut events).await;
        info!(
            queries = ?self.counters.queries,
            commands_refused = self.counters.commands_refused,
            results_dropped = self.counters.results_dropped,
            "MQTT interface stopped"
        );
    }

    fn on_polled(&mut self, polled: Polled) {
        match polled {
            Polled::Event(Event::Connected) => {
                info!(url = %self.url, "connected to the MQTT broker");
                self.connected = true;
                self.session = Session::default();
                self.last_error = None;
                self.dirty = Dirty {
                    subscriptions: true,
                    availability: true,
                    discovery: self.discovery.is_some(),
                    status: true,
                };
            }
            Polled::Event(Event::Message(msg)) => self.on_message(&msg),
            Polled::Event(Event::SubscribeRefused) => warn!(
                "the MQTT broker refused a subscription (check its ACL): \
                 queries or commands will not arrive"
            ),
            Polled::ReplayPassed => self.session.replay_passed = true,
            Polled::Event(
                Event::Subscribed | Event::DisconnectSent | Event::Other | Event::Received,
            )
            | Polled::Closed => {}
            Polled::Lost { error, retry_in } => {
                self.connected = false;
                self.session.requests = false;
                let replay_passed = std::mem::take(&mut self.session.replay_passed);
                match self.poison.on_lost(error.oversized(), replay_passed) {
                    Verdict::Quarantine(pause) => warn!(
                        ?pause,
                        "MQTT messages over max_packet_size keep breaking the connection \
                         (a 3.1.1 broker cannot be told our limit): not subscribing to \
                         status/get and commands for a while; clear the retained message, \
                         and set the broker's max_packet_size (docs/mqtt.md)"
                    ),
                    Verdict::Carry if error.oversized() => warn!(
                        "an MQTT message over max_packet_size broke the connection; \
                         clearing retained requests before subscribing again"
                    ),
                    Verdict::Carry => {}
                }
                let text = error.to_string();
                if self.last_error.as_deref() == Some(text.as_str()) {
                    debug!(url = %self.url, error = %text, ?retry_in, "MQTT broker still unreachable");
                } else {
                    warn!(url = %self.url, error = %text, ?retry_in, "MQTT connection lost or refused; retrying");
                    self.last_error = Some(text);
                }
            }
        }
    }

    fn on_message(&mut self, msg: &Message) {
        if msg.topic == self.topics.status_get {
            self.on_query(msg);
        } else if self.command_topics.contains(&msg.topic) {
            self.on_command(msg);
        } else if self
            .discovery
            .as_ref()
            .is_some_and(|d| d.ha_status_topic == msg.topic)
        {
            if msg.payload == b"online" {
                debug!("Home Assistant came online: republishing discovery");
                self.dirty.discovery = true;
            }
        } else {
            debug!(topic = %msg.topic, "ignoring a message on an unexpected topic");
        }
    }

    fn on_query(&mut self, msg: &Message) {
        let reply = match request::parse_query(msg, &self.topics) {
            Ok(reply) => reply,
            Err(refusal) => {
                self.counters.queries.refused += 1;
                debug!(topic = %msg.topic, %refusal, "refused an MQTT query");
                return;
            }
        };
        if !self.queries.try_take() {
            return self.rate_limited();
        }
        let body = reply.body(self.status_payload());
        if self.connected
            && self
                .client
                .try_publish(&reply.topic, body, false, Some(&reply.props()))
                .is_ok()
        {
            self.counters.queries.answered += 1;
        } else {
            self.counters.queries.dropped += 1;
            debug!(topic = %reply.topic, "dropped a status reply: MQTT queue full");
        }
    }

    /// A query over the rate limit: dropped, counted, and made visible (the
    /// status with its counters soon, a warning now and then).
    fn rate_limited(&mut self) {
        self.counters.queries.rate_limited += 1;
        if self.counters_at.is_none() {
            self.counters_at = Some(Instant::now() + COUNTERS_REPUBLISH);
        }
        if self
            .limit_warned_at
            .is_none_or(|at| at.elapsed() >= LIMIT_WARNING_EVERY)
        {
            self.limit_warned_at = Some(Instant::now());
            warn!(
                rate_limited = self.counters.queries.rate_limited,
                "MQTT status queries over the rate limit ([mqtt] query_burst, query_rate) \
                 are being dropped"
            );
        }
    }

    /// The status payload as published: the snapshot and the counters.
    fn status_payload(&self) -> Vec<u8> {
        serde_json::to_vec(&StatusPayload {
            snapshot: &self.status.borrow(),
            queries: self.counters.queries,
        })
        .unwrap_or_default()
    }

    fn on_command(&mut self, msg: &Message) {
        let Some(gate) = self.gate.as_mut() else {
            return;
        };
        match gate.decide(msg, &self.topics) {
            Decision::Ignore(refusal) => {
                self.counters.commands_refused += 1;
                debug!(topic = %msg.topic, %refusal, "refused an MQTT command");
            }
            Decision::Duplicate(id) => {
                self.counters.commands_refused += 1;
                debug!(%id, "ignoring a repeated command id");
            }
            Decision::Reject(req, reason) => {
                info!(id = %req.id, command = req.name.as_str(), reason, "rejected an MQTT command");
                self.publish_result(&req, Outcome::Rejected, Some(reason));
            }
            Decision::Run(req) => self.run_command(req),
        }
    }

    fn run_command(&mut self, req: commands::Request) {
        let (reply_tx, reply_rx) = oneshot::channel();
        // The registration loop's queue is small and it may be busy: a full
        // queue is a rejection, never a wait.
        if let Err(e) = self
            .commands
            .try_send(Command::Reregister { reply: reply_tx })
        {
            if let Some(gate) = self.gate.as_mut() {
                gate.finished();
            }
            let reason = match e {
                mpsc::error::TrySendError::Full(_) => "busy: the registration loop is occupied",
                mpsc::error::TrySendError::Closed(_) => "unavailable: the agent is stopping",
            };
            self.publish_result(&req, Outcome::Rejected, Some(reason));
            return;
        }
        info!(id = %req.id, command = req.name.as_str(), requester = ?req.requester, "running an MQTT command");
        self.publish_result(&req, Outcome::Accepted, None);
        let timeout = self.result_timeout;
        self.running.spawn(async move {
            match tokio::time::timeout(timeout, reply_rx).await {
                Ok(Ok(Ok(()))) => (req, Outcome::Ok, None),
                Ok(Ok(Err(message))) => (req, Outcome::Error, Some(message)),
                Ok(Err(_)) => (
                    req,
                    Outcome::Error,
                    Some("the registration loop dropped the command".to_owned()),
                ),
                Err(_) => (req, Outcome::Timeout, None),
            }
        });
    }

    fn finish_command(&mut self, req: &commands::Request, outcome: Outcome, message: Option<&str>) {
        if let Some(gate) = self.gate.as_mut() {
            gate.finished();
        }
        info!(id = %req.id, command = req.name.as_str(), ?outcome, message, "MQTT command finished");
        self.publish_result(req, outcome, message);
    }

    fn publish_result(&mut self, req: &commands::Request, outcome: Outcome, message: Option<&str>) {
        if !self.connected {
            self.counters.results_dropped += 1;
            return;
        }
        let result = serde_json::to_vec(&req.result(outcome, message)).unwrap_or_default();
        let props = PublishProps {
            json: true,
            ..PublishProps::default()
        };
        let mut ok = self
            .client
            .try_publish(
                &self.topics.command_result,
                result.clone(),
                false,
                Some(&props),
            )
            .is_ok();
        if let Some(reply) = &req.reply {
            ok &= self
                .client
                .try_publish(
                    &reply.topic,
                    reply.body(result),
                    false,
                    Some(&reply.props()),
                )
                .is_ok();
        }
        if !ok {
            self.counters.results_dropped += 1;
            warn!(id = %req.id, "dropped an MQTT command result: MQTT queue full");
        }
    }

    /// Writes whatever retained state is dirty, in contract order
    /// (subscriptions, `online`, discovery, status). A full queue leaves the
    /// rest dirty and schedules a retry.
    fn flush(&mut self) {
        if !self.connected {
            return;
        }
        let mut full = false;
        if self.dirty.subscriptions {
            full = !self.subscribe();
            self.dirty.subscriptions = full;
        }
        if self.dirty.availability && !full {
            full = self
                .client
                .try_publish(&self.topics.availability, b"online".to_vec(), true, None)
                .is_err();
            self.dirty.availability = full;
        }
        if self.dirty.discovery && !full {
            if let Some(d) = &self.discovery {
                let props = PublishProps {
                    json: true,
                    ..PublishProps::default()
                };
                full = self
                    .client
                    .try_publish(&d.config_topic, d.payload.clone(), true, Some(&props))
                    .is_err();
            }
            self.dirty.discovery = full;
        }
        if self.dirty.status && !full {
            full = !self.publish_status();
            self.dirty.status = full;
        }
        if full && self.retry_at.is_none() {
            self.retry_at = Some(Instant::now() + RETRY_FULL_QUEUE);
        }
    }

    /// Subscribes to what this session lacks: the request topics (unless in
    /// quarantine, see [`Poison`]) and Home Assistant's status. False when
    /// the queue was full.
    fn subscribe(&mut self) -> bool {
        let requests = !self.session.requests && self.poison.suspended_until().is_none();
        let mut filters = Vec::new();
        if requests {
            let mut topics = vec![self.topics.status_get.clone()];
            topics.extend(self.command_topics.iter().cloned());
            if self.poison.clear_first() {
                // An empty retained message deletes the retained one, before
                // SUBSCRIBE could make the broker replay it (MQTT keeps the
                // order of one client's packets).
                for topic in &topics {
                    if self
                        .client
                        .try_publish(topic, Vec::new(), true, None)
                        .is_err()
                    {
                        return false;
                    }
                }
            }
            filters = topics;
        }
        if !self.session.others {
            if let Some(d) = &self.discovery {
                filters.push(d.ha_status_topic.clone());
            }
        }
        if !filters.is_empty() && self.client.try_subscribe(&filters).is_err() {
            return false;
        }
        if requests {
            self.session.requests = true;
            self.session.replay_passed = false;
        }
        self.session.others = true;
        true
    }

    fn publish_status(&self) -> bool {
        let payload = self.status_payload();
        let props = PublishProps {
            json: true,
            ..PublishProps::default()
        };
        self.client
            .try_publish(&self.topics.status, payload, true, Some(&props))
            .is_ok()
    }

    /// At shutdown: the final status, retained `offline`, then DISCONNECT
    /// (which makes the broker drop the last will), and the broker's close
    /// of the connection (see [`EventLoop::until_closed`]), within
    /// [`FINAL_STATUS_WAIT`] + [`GOODBYE_TIMEOUT`].
    async fn goodbye(&mut self, events: &mut mpsc::Receiver<Polled>) {
        if !self.connected {
            return;
        }
        if self.status_open {
            let status = &mut self.status;
            let _ = tokio::time::timeout(FINAL_STATUS_WAIT, async {
                while status.borrow_and_update().state != AgentState::Stopping {
                    if status.changed().await.is_err() {
                        return;
                    }
                }
            })
            .await;
        }
        self.publish_status();
        let client = self.client.clone();
        let availability = self.topics.availability.clone();
        let done = tokio::time::timeout(GOODBYE_TIMEOUT, async {
            let goodbye = async {
                client
                    .publish(&availability, b"offline".to_vec(), true, None)
                    .await?;
                client.disconnect().await
            };
            tokio::pin!(goodbye);
            let mut sent = false;
            // Events are drained while sending, so that the polling task is
            // never stuck on a full event channel.
            loop {
                tokio::select! {
                    result = &mut goodbye, if !sent => {
                        if result.is_err() {
                            return;
                        }
                        sent = true;
                    }
                    polled = events.recv() => match polled {
                        None | Some(Polled::Closed | Polled::Lost { .. }) => return,
                        Some(Polled::Event(_) | Polled::ReplayPassed) => {}
                    },
                }
            }
        })
        .await;
        if done.is_err() {
            warn!("MQTT broker did not take the goodbye in time; the last will reports offline");
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
