//! One machine on the shared MQTT connection: its topics, its retained
//! state (what still needs writing), its query rate limit, its command gate
//! and its counters. The connection, the polling and the order in which
//! machines get the queue are the service's (`service.rs`).

use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::client::{Client, Message, PublishProps};
use super::commands::{self, Decision, Gate, Outcome};
use super::config::{CommandName, MqttConfig};
use super::discovery::Discovery;
use super::poison::Poison;
use super::rate::TokenBucket;
use super::request;
use super::topics::Topics;
use crate::status::{AgentState, Command, QueryCounters, StatusPayload, StatusSnapshot};

/// A machine's key in the service's tables (names can be reused after a
/// removal; keys are not).
pub(crate) type Key = u64;

/// Retained state of one machine that must be (re)written to the broker.
// Four independent "needs writing" marks, not a state machine in disguise.
#[allow(clippy::struct_excessive_bools)]
#[derive(Debug, Default)]
pub(crate) struct Dirty {
    pub(crate) subscriptions: bool,
    pub(crate) availability: bool,
    pub(crate) discovery: bool,
    pub(crate) status: bool,
}

impl Dirty {
    pub(crate) fn any(&self) -> bool {
        self.subscriptions || self.availability || self.discovery || self.status
    }
}

/// Counts of what was refused or dropped: queries in the status payload,
/// commands in the log at shutdown.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) queries: QueryCounters,
    pub(crate) commands_refused: u64,
    pub(crate) results_dropped: u64,
}

/// What one flush of a machine achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flushed {
    /// Nothing left to write.
    Done,
    /// rumqttc's queue is full: the rest stays dirty.
    Full,
}

/// A command handed to the registration loop, awaiting its answer.
pub(crate) type Running = (Key, commands::Request, Outcome, Option<String>);

/// One machine on the shared connection.
// Independent facts about one machine (which machine it is, where its
// session stands, what awaits its turn), not a state machine in disguise.
#[allow(clippy::struct_excessive_bools)]
pub(crate) struct Member {
    pub(crate) key: Key,
    pub(crate) name: String,
    pub(crate) topics: Topics,
    pub(crate) discovery: Option<Discovery>,
    /// The gateway's own machine (a robot is one): its availability topic
    /// is the gateway's, the last will, which a removal must not clear.
    pub(crate) is_gateway: bool,
    pub(crate) status: watch::Receiver<StatusSnapshot>,
    pub(crate) status_open: bool,
    commands: Option<mpsc::Sender<Command>>,
    pub(crate) command_topics: Vec<String>,
    gate: Option<Gate>,
    result_timeout: Duration,
    queries: TokenBucket,
    pub(crate) counters: Counters,
    pub(crate) dirty: Dirty,
    /// Subscribed to its request topics in this session.
    pub(crate) subscribed: bool,
    /// In the service's queue of machines with something to write.
    pub(crate) queued: bool,
    /// Its status is to be republished for its query counters.
    pub(crate) counters_due: bool,
    /// Forwards its status changes to the service (see `watch_status`).
    watcher: JoinHandle<()>,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("name", &self.name)
            .field("topics", &self.topics)
            .finish_non_exhaustive()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

/// What a machine's status watcher reports to the service.
#[derive(Debug, Clone, Copy)]
pub(crate) enum StatusEvent {
    Changed(Key),
    /// Its registration loop is gone: keep serving the last snapshot.
    Closed(Key),
}

/// What a member is made of.
#[derive(Debug)]
pub(crate) struct Parts {
    pub(crate) key: Key,
    pub(crate) name: String,
    pub(crate) topics: Topics,
    pub(crate) discovery: Option<Discovery>,
    pub(crate) is_gateway: bool,
    pub(crate) status: watch::Receiver<StatusSnapshot>,
    pub(crate) commands: Option<mpsc::Sender<Command>>,
}

impl Member {
    pub(crate) fn new(
        config: &MqttConfig,
        parts: Parts,
        changes: mpsc::Sender<StatusEvent>,
    ) -> Self {
        let (command_topics, gate) = if config.commands.enabled {
            let topics = config
                .commands
                .allow
                .iter()
                .map(|name| parts.topics.command(*name))
                .collect();
            (topics, Some(Gate::new(&config.commands)))
        } else {
            (Vec::new(), None)
        };
        let watcher = tokio::spawn(watch_status(parts.key, parts.status.clone(), changes));
        Self {
            key: parts.key,
            name: parts.name,
            topics: parts.topics,
            discovery: parts.discovery,
            is_gateway: parts.is_gateway,
            status: parts.status,
            status_open: true,
            commands: parts.commands,
            command_topics,
            gate,
            result_timeout: config.commands.result_timeout,
            queries: TokenBucket::new(
                config.query_burst,
                Duration::from_secs(1) / config.query_rate.max(1),
            ),
            counters: Counters::default(),
            dirty: Dirty::default(),
            subscribed: false,
            queued: false,
            counters_due: false,
            watcher,
        }
    }

    /// A new broker session: everything must be written again.
    pub(crate) fn reset_session(&mut self) {
        self.subscribed = false;
        self.dirty = Dirty {
            subscriptions: true,
            availability: true,
            discovery: self.discovery.is_some(),
            status: true,
        };
    }

    /// The topics this machine's requests arrive on.
    pub(crate) fn request_topics(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.topics.status_get).chain(self.command_topics.iter())
    }

    /// The retained topics it writes, to be cleared when it is removed.
    pub(crate) fn retained_topics(&self) -> Vec<String> {
        let mut topics = vec![self.topics.status.clone()];
        if !self.is_gateway {
            topics.push(self.topics.availability.clone());
        }
        if let Some(d) = &self.discovery {
            topics.push(d.config_topic.clone());
        }
        topics
    }

    /// Writes whatever is dirty, in contract order (subscriptions,
    /// `online`, discovery, status). `requests_allowed` is false while the
    /// request topics are in quarantine (see [`Poison`]). Returns whether it
    /// subscribed its request topics (the service then watches the
    /// replay).
    pub(crate) fn flush(
        &mut self,
        client: &Client,
        poison: &Poison,
        requests_allowed: bool,
    ) -> (Flushed, bool) {
        let mut subscribed_now = false;
        if self.dirty.subscriptions {
            match self.subscribe(client, poison, requests_allowed) {
                Some(now) => subscribed_now = now,
                None => return (Flushed::Full, false),
            }
            self.dirty.subscriptions = false;
        }
        if self.dirty.availability {
            if client
                .try_publish(&self.topics.availability, b"online".to_vec(), true, None)
                .is_err()
            {
                return (Flushed::Full, subscribed_now);
            }
            self.dirty.availability = false;
        }
        if self.dirty.discovery {
            if let Some(d) = &self.discovery
                && client
                    .try_publish(&d.config_topic, d.payload.clone(), true, Some(&json()))
                    .is_err()
            {
                return (Flushed::Full, subscribed_now);
            }
            self.dirty.discovery = false;
        }
        if self.dirty.status {
            if !self.publish_status(client) {
                return (Flushed::Full, subscribed_now);
            }
            self.dirty.status = false;
        }
        (Flushed::Done, subscribed_now)
    }

    /// Subscribes to its request topics unless already done or in
    /// quarantine. `None` when the queue was full; `Some(true)` when it
    /// subscribed now.
    fn subscribe(
        &mut self,
        client: &Client,
        poison: &Poison,
        requests_allowed: bool,
    ) -> Option<bool> {
        if self.subscribed || !requests_allowed {
            return Some(false);
        }
        let topics: Vec<String> = self.request_topics().cloned().collect();
        if poison.clear_first() {
            // An empty retained message deletes the retained one, before
            // SUBSCRIBE could make the broker replay it (MQTT keeps the
            // order of one client's packets).
            for topic in &topics {
                client.try_publish(topic, Vec::new(), true, None).ok()?;
            }
        }
        client.try_subscribe(&topics).ok()?;
        self.subscribed = true;
        Some(true)
    }

    /// The status payload as published: the snapshot and the counters.
    pub(crate) fn status_payload(&self) -> Vec<u8> {
        serde_json::to_vec(&StatusPayload {
            snapshot: &self.status.borrow(),
            queries: self.counters.queries,
        })
        .unwrap_or_default()
    }

    pub(crate) fn publish_status(&self, client: &Client) -> bool {
        client
            .try_publish(
                &self.topics.status,
                self.status_payload(),
                true,
                Some(&json()),
            )
            .is_ok()
    }

    /// Answers a `status/get` query. False when it was rate-limited (the
    /// service then makes the limit visible).
    pub(crate) fn on_query(&mut self, msg: &Message, client: &Client, connected: bool) -> bool {
        let reply = match request::parse_query(msg, &self.topics) {
            Ok(reply) => reply,
            Err(refusal) => {
                self.counters.queries.refused += 1;
                debug!(machine = %self.name, topic = %msg.topic, %refusal, "refused an MQTT query");
                return true;
            }
        };
        if !self.queries.try_take() {
            self.counters.queries.rate_limited += 1;
            return false;
        }
        let body = reply.body(self.status_payload());
        if connected
            && client
                .try_publish(&reply.topic, body, false, Some(&reply.props()))
                .is_ok()
        {
            self.counters.queries.answered += 1;
        } else {
            self.counters.queries.dropped += 1;
            debug!(machine = %self.name, topic = %reply.topic, "dropped a status reply: MQTT queue full");
        }
        true
    }

    /// A command message: refused, rejected, or handed to this machine's
    /// registration loop (its answer is awaited in `running`).
    pub(crate) fn on_command(
        &mut self,
        msg: &Message,
        client: &Client,
        connected: bool,
        running: &mut tokio::task::JoinSet<Running>,
    ) {
        let Some(gate) = self.gate.as_mut() else {
            return;
        };
        match gate.decide(msg, &self.topics) {
            Decision::Ignore(refusal) => {
                self.counters.commands_refused += 1;
                debug!(machine = %self.name, topic = %msg.topic, %refusal, "refused an MQTT command");
            }
            Decision::Duplicate(id) => {
                self.counters.commands_refused += 1;
                debug!(machine = %self.name, %id, "ignoring a repeated command id");
            }
            Decision::Reject(req, reason) => {
                info!(machine = %self.name, id = %req.id, command = req.name.as_str(), reason, "rejected an MQTT command");
                self.publish_result(client, connected, &req, Outcome::Rejected, Some(reason));
            }
            Decision::Run(req) => self.run_command(req, client, connected, running),
        }
    }

    fn run_command(
        &mut self,
        req: commands::Request,
        client: &Client,
        connected: bool,
        running: &mut tokio::task::JoinSet<Running>,
    ) {
        // What the loop answers, as the result's message: a rotation's
        // answer is the successor's address.
        type Answer = Result<Result<Option<String>, String>, oneshot::error::RecvError>;
        let (command, reply_rx): (
            Command,
            std::pin::Pin<Box<dyn Future<Output = Answer> + Send>>,
        ) = match req.name {
            CommandName::Reregister => {
                let (tx, rx) = oneshot::channel::<Result<(), String>>();
                let answer = async move { rx.await.map(|r| r.map(|()| None)) };
                (Command::Reregister { reply: tx }, Box::pin(answer))
            }
            CommandName::RotateKey => {
                let (tx, rx) = oneshot::channel::<Result<String, String>>();
                let answer = async move { rx.await.map(|r| r.map(Some)) };
                (Command::RotateKey { reply: tx }, Box::pin(answer))
            }
        };
        // The registration loop's queue is small and it may be busy: a full
        // queue is a rejection, never a wait.
        let sent = match &self.commands {
            Some(queue) => queue.try_send(command),
            None => Err(mpsc::error::TrySendError::Closed(command)),
        };
        if let Err(e) = sent {
            if let Some(gate) = self.gate.as_mut() {
                gate.finished();
            }
            let reason = match e {
                mpsc::error::TrySendError::Full(_) => "busy: the registration loop is occupied",
                mpsc::error::TrySendError::Closed(_) => "unavailable: the agent is stopping",
            };
            self.publish_result(client, connected, &req, Outcome::Rejected, Some(reason));
            return;
        }
        info!(machine = %self.name, id = %req.id, command = req.name.as_str(), requester = ?req.requester, "running an MQTT command");
        self.publish_result(client, connected, &req, Outcome::Accepted, None);
        let timeout = self.result_timeout;
        let key = self.key;
        running.spawn(async move {
            match tokio::time::timeout(timeout, reply_rx).await {
                Ok(Ok(Ok(message))) => (key, req, Outcome::Ok, message),
                Ok(Ok(Err(message))) => (key, req, Outcome::Error, Some(message)),
                Ok(Err(_)) => (
                    key,
                    req,
                    Outcome::Error,
                    Some("the registration loop dropped the command".to_owned()),
                ),
                Err(_) => (key, req, Outcome::Timeout, None),
            }
        });
    }

    pub(crate) fn finish_command(
        &mut self,
        client: &Client,
        connected: bool,
        req: &commands::Request,
        outcome: Outcome,
        message: Option<&str>,
    ) {
        if let Some(gate) = self.gate.as_mut() {
            gate.finished();
        }
        info!(machine = %self.name, id = %req.id, command = req.name.as_str(), ?outcome, message, "MQTT command finished");
        self.publish_result(client, connected, req, outcome, message);
    }

    fn publish_result(
        &mut self,
        client: &Client,
        connected: bool,
        req: &commands::Request,
        outcome: Outcome,
        message: Option<&str>,
    ) {
        if !connected {
            self.counters.results_dropped += 1;
            return;
        }
        let result = serde_json::to_vec(&req.result(outcome, message)).unwrap_or_default();
        let mut ok = client
            .try_publish(
                &self.topics.command_result,
                result.clone(),
                false,
                Some(&json()),
            )
            .is_ok();
        if let Some(reply) = &req.reply {
            ok &= client
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
            warn!(machine = %self.name, id = %req.id, "dropped an MQTT command result: MQTT queue full");
        }
    }

    /// Until the registration loop's final `stopping` snapshot (or its
    /// end), so that the last retained status says so.
    pub(crate) async fn until_stopping(&mut self) {
        if !self.status_open {
            return;
        }
        while self.status.borrow_and_update().state != AgentState::Stopping {
            if self.status.changed().await.is_err() {
                return;
            }
        }
    }
}

/// Publish properties of a JSON payload.
fn json() -> PublishProps {
    PublishProps {
        json: true,
        ..PublishProps::default()
    }
}

/// Tells the service each time a machine's status changes. A task per
/// machine (a few hundred bytes) rather than one select over a thousand
/// receivers; `watch` keeps only the newest snapshot, so a slow service
/// never builds a backlog here.
async fn watch_status(
    key: Key,
    mut status: watch::Receiver<StatusSnapshot>,
    changes: mpsc::Sender<StatusEvent>,
) {
    loop {
        let event = match status.changed().await {
            Ok(()) => StatusEvent::Changed(key),
            Err(_) => StatusEvent::Closed(key),
        };
        let closed = matches!(event, StatusEvent::Closed(_));
        if changes.send(event).await.is_err() || closed {
            return;
        }
    }
}
