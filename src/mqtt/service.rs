//! The running MQTT interface: one connection for every machine the agent
//! keeps (a robot is the case of one). One task polls rumqttc's event loop
//! and reconnects with backoff (`driver.rs`); the service task here keeps
//! the broker's retained state current, answers requests, and takes
//! machines in and out (`member.rs` is one machine).
//!
//! Nothing here ever waits on the broker while serving: publishes are
//! `try_*` into rumqttc's bounded queue, retained state is a set of "dirty"
//! flags rewritten from the newest status snapshot (so a dead broker can
//! only ever cost one pending copy per machine, never a backlog), and
//! nothing is queued while disconnected: every CONNACK republishes
//! everything. With many machines the queue is shared in turn: machines
//! with something to write wait in a FIFO, and a full queue resumes where
//! it stopped as soon as rumqttc has taken something out of it, so a
//! thousand machines at reconnect cost a thousand turns, not a flood.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::client::{Client, Event, EventLoop, Message, PublishProps};
use super::config::MqttConfig;
use super::discovery::{self, Discovery, Link};
use super::driver::{Polled, drive};
use super::member::{self, Flushed, Key, Member, Running, StatusEvent};
use super::poison::{Poison, Verdict};
use super::topics::{Topics, check_prefix, topic_level};
use super::{MachinePort, Membership};
use crate::backoff::Backoff;
use crate::systemd::Heartbeat;

/// How long a removed machine's retained topics wait before they are
/// cleared: a changed machine file is a Remove then an Add, and the host
/// may yield between the two, so an Add of the same topics within this
/// time cancels the clear instead of racing it (the topics would read
/// empty for a moment, and a dashboard would see the machine vanish).
const CLEAR_GRACE: Duration = Duration::from_secs(1);
/// Events buffered between the polling task and the service.
const EVENT_CAPACITY: usize = 32;
/// Status changes buffered between the machines' watchers and the service.
const CHANGES_CAPACITY: usize = 64;
/// How soon to retry publishing when rumqttc's queue was full (if nothing
/// reported progress before).
const RETRY_FULL_QUEUE: Duration = Duration::from_millis(200);
/// Time allowed at shutdown for `offline`, DISCONNECT and the broker's close
/// of the connection (which it does as soon as it has read DISCONNECT) ...
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);
/// ... plus this for each machine (its final status and `offline`).
const GOODBYE_PER_MACHINE: Duration = Duration::from_millis(2);
/// At shutdown, how long to wait for the registration loops' final
/// `stopping` snapshots, so that the last retained statuses say so.
const FINAL_STATUS_WAIT: Duration = Duration::from_millis(300);
/// After queries were dropped for the rate limit, the retained status (and
/// its `queries` counters) is republished this soon, so that a dashboard
/// sees the limit, not silence. At most one extra publish per this period.
const COUNTERS_REPUBLISH: Duration = Duration::from_secs(1);
/// A rate-limit warning is logged at most this often.
const LIMIT_WARNING_EVERY: Duration = Duration::from_secs(60);

/// What the current broker session has done so far.
#[derive(Debug, Default)]
struct Session {
    /// Subscribed to Home Assistant's status.
    others: bool,
    /// SUBSCRIBEs whose SUBACK has not come yet.
    unacked: usize,
    /// Something was read after the last SUBACK (see [`Poison`]).
    replay_passed: bool,
}

/// The gateway: the connection's own topics, shared by every machine.
#[derive(Debug)]
pub(crate) struct Gateway {
    pub(crate) name: String,
    pub(crate) topics: Topics,
    /// Home Assistant: the gateway's node id (its device) and its
    /// connectivity entity, published while machines are behind it.
    pub(crate) node_id: Option<String>,
    /// Its device identifier, the machines' `via_device`.
    device: String,
    discovery: Option<Discovery>,
    ha_status_topic: Option<String>,
    /// `online` must be (re)written (when no machine is the gateway's own,
    /// which then writes it in its own order).
    availability_dirty: bool,
    discovery_dirty: bool,
}

impl Gateway {
    pub(crate) fn new(config: &MqttConfig, name: &str, topics: Topics) -> Self {
        let ha = &config.home_assistant;
        let node_id = ha.enabled.then(|| {
            discovery::node_id(ha, name).unwrap_or_else(|| node_from_prefix(&topics.prefix))
        });
        let discovery = node_id
            .as_deref()
            .map(|node| Discovery::gateway(ha, node, &topics.availability, name));
        Self {
            name: name.to_owned(),
            device: node_id
                .as_deref()
                .map(discovery::device_id)
                .unwrap_or_default(),
            ha_status_topic: discovery.as_ref().map(|d| d.ha_status_topic.clone()),
            topics,
            node_id,
            discovery,
            availability_dirty: false,
            discovery_dirty: false,
        }
    }
}

/// A Home Assistant node id from a topic prefix (`peaqos/dock-7` gives
/// `dock-7`, `site/a/b` gives `site_a_b`).
fn node_from_prefix(prefix: &str) -> String {
    topic_level(prefix.strip_prefix("peaqos/").unwrap_or(prefix))
        .map_or_else(|| "machine".to_owned(), |level| level.replace('.', "_"))
}

/// Everything the service task owns.
pub(crate) struct Service {
    config: MqttConfig,
    client: Client,
    gateway: Gateway,
    /// Boxed: a member is several hundred bytes, and a table of a
    /// thousand keeps room for up to twice as many (docs/performance.md).
    members: HashMap<Key, Box<Member>>,
    names: HashMap<String, Key>,
    /// Request topic -> the machine it belongs to.
    routes: HashMap<String, Key>,
    /// The machine whose prefix is the gateway's (a robot's only machine).
    self_key: Option<Key>,
    /// Machines behind the gateway (not its own): while there are any, the
    /// gateway's Home Assistant device is published.
    behind: usize,
    next_key: Key,
    /// Machines with something to write, in turn.
    queue: VecDeque<Key>,
    /// Retained topics of removed machines still to be cleared, each with
    /// when it may be (see [`CLEAR_GRACE`]), oldest first.
    clears: VecDeque<(Instant, String)>,
    changes: mpsc::Sender<StatusEvent>,
    running: JoinSet<Running>,
    connected: bool,
    session: Session,
    poison: Poison,
    retry_at: Option<Instant>,
    /// When to republish the statuses of rate-limited machines for their
    /// counters (see [`COUNTERS_REPUBLISH`]).
    counters_at: Option<Instant>,
    limit_warned_at: Option<Instant>,
    last_error: Option<String>,
    url: String,
    heartbeat: Heartbeat,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("gateway", &self.gateway.name)
            .field("machines", &self.members.len())
            .field("connected", &self.connected)
            .finish_non_exhaustive()
    }
}

/// What the service is made of, besides the config.
#[derive(Debug)]
pub(crate) struct Parts {
    pub(crate) url: String,
    pub(crate) gateway: Gateway,
    pub(crate) connection: (Client, EventLoop),
    pub(crate) members: mpsc::UnboundedReceiver<Membership>,
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
        gateway,
        connection: (client, eventloop),
        members,
        heartbeat,
    } = parts;
    let (events_tx, events_rx) = mpsc::channel(EVENT_CAPACITY);
    let (changes_tx, changes_rx) = mpsc::channel(CHANGES_CAPACITY);
    let progress = Arc::new(Notify::new());
    let stop = CancellationToken::new();
    let backoff = Backoff::new(config.reconnect_min, config.reconnect_max);
    let poller = tokio::spawn(drive(
        eventloop,
        events_tx,
        progress.clone(),
        backoff,
        stop.clone(),
    ));
    let service = Service {
        config: config.clone(),
        client,
        gateway,
        members: HashMap::new(),
        names: HashMap::new(),
        routes: HashMap::new(),
        self_key: None,
        behind: 0,
        next_key: 0,
        queue: VecDeque::new(),
        clears: VecDeque::new(),
        changes: changes_tx,
        running: JoinSet::new(),
        connected: false,
        session: Session::default(),
        poison: Poison::default(),
        retry_at: None,
        counters_at: None,
        limit_warned_at: None,
        last_error: None,
        url,
        heartbeat,
    };
    let interval = config.status_interval;
    tokio::spawn(async move {
        let inputs = Inputs {
            events: events_rx,
            changes: changes_rx,
            members,
            progress,
        };
        service.run(inputs, interval, shutdown).await;
        stop.cancel();
        let _ = poller.await;
    })
}

/// What the service listens to, besides its timers.
struct Inputs {
    events: mpsc::Receiver<Polled>,
    changes: mpsc::Receiver<StatusEvent>,
    members: mpsc::UnboundedReceiver<Membership>,
    /// rumqttc took something out of its queue (see `drive`).
    progress: Arc<Notify>,
}

impl Service {
    async fn run(
        mut self,
        mut inputs: Inputs,
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
        let mut membership_open = true;
        loop {
            let retry_at = self.retry_at;
            let clears_at = self
                .clears
                .front()
                .map(|(due, _)| *due)
                .filter(|_| self.connected);
            let counters_at = self.counters_at;
            let resume_at = self
                .poison
                .suspended_until()
                .filter(|_| self.connected && self.members.values().any(|m| !m.subscribed));
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                polled = inputs.events.recv() => match polled {
                    Some(polled) => self.on_polled(polled),
                    // The polling task only ends when told to.
                    None => return,
                },
                change = inputs.members.recv(), if membership_open => match change {
                    Some(change) => {
                        self.on_membership(change);
                        // A changed machine file comes as Remove then Add:
                        // take both before writing, so that its retained
                        // topics are not cleared only to be written again.
                        while let Ok(change) = inputs.members.try_recv() {
                            self.on_membership(change);
                        }
                    }
                    None => membership_open = false,
                },
                Some(event) = inputs.changes.recv() => self.on_status(event),
                _ = republish.tick(), if periodic => {
                    for key in self.members.keys().copied().collect::<Vec<_>>() {
                        self.mark(key, |d| d.status = true);
                    }
                }
                _ = beats.tick(), if beat_every.is_some() => self.heartbeat.beat(),
                Some(done) = self.running.join_next(), if !self.running.is_empty() => {
                    if let Ok((key, req, outcome, message)) = done {
                        if let Some(m) = self.members.get_mut(&key) {
                            m.finish_command(&self.client, self.connected, &req, outcome, message.as_deref());
                        } else {
                            info!(id = %req.id, ?outcome, "MQTT command finished for a machine that was removed");
                        }
                    }
                }
                () = inputs.progress.notified(), if retry_at.is_some() => self.retry_at = None,
                () = sleep_until(retry_at), if retry_at.is_some() => self.retry_at = None,
                // flush() below writes the clears that are due.
                () = sleep_until(clears_at), if clears_at.is_some() => {}
                () = sleep_until(counters_at), if counters_at.is_some() => self.republish_counters(),
                () = sleep_until(resume_at), if resume_at.is_some() => {
                    info!("resuming the MQTT request subscriptions after the quarantine");
                    for key in self.members.keys().copied().collect::<Vec<_>>() {
                        self.mark(key, |d| d.subscriptions = true);
                    }
                }
            }
            self.flush();
        }
        self.goodbye(&mut inputs.events).await;
        for m in self.members.values() {
            info!(
                machine = %m.name,
                queries = ?m.counters.queries,
                commands_refused = m.counters.commands_refused,
                results_dropped = m.counters.results_dropped,
                "MQTT interface stopped"
            );
        }
    }

    /// Marks some of a machine's retained state dirty and gives it a turn.
    fn mark(&mut self, key: Key, change: impl FnOnce(&mut member::Dirty)) {
        if let Some(m) = self.members.get_mut(&key) {
            change(&mut m.dirty);
            if !m.queued && m.dirty.any() {
                m.queued = true;
                self.queue.push_back(key);
            }
        }
    }

    fn on_status(&mut self, event: StatusEvent) {
        match event {
            StatusEvent::Changed(key) => self.mark(key, |d| d.status = true),
            StatusEvent::Closed(key) => {
                // The registration loop is gone (shutting down): keep
                // serving its last snapshot.
                if let Some(m) = self.members.get_mut(&key) {
                    m.status_open = false;
                }
            }
        }
    }

    fn on_membership(&mut self, change: Membership) {
        match change {
            Membership::Add(port) => self.add(port),
            Membership::Remove { name } => self.remove(&name),
        }
    }

    fn add(&mut self, port: MachinePort) {
        if self.names.contains_key(&port.name) {
            // A changed file comes as Remove then Add; an Add alone replaces.
            self.remove(&port.name);
        }
        let Some(topics) = Topics::for_machine(
            port.topic_prefix.as_deref(),
            &port.name,
            &self.gateway.name,
            &self.gateway.topics,
        ) else {
            error!(machine = %port.name, "the machine's name gives no usable MQTT topic level; set [mqtt] topic_prefix in its file: it is not on MQTT");
            return;
        };
        let prefix = topics.prefix.clone();
        if let Err(problem) = check_prefix(&prefix) {
            error!(machine = %port.name, %problem, "the machine's [mqtt] topic_prefix is not usable: it is not on MQTT");
            return;
        }
        if let Some(other) = self
            .routes
            .get(&topics.status_get)
            .and_then(|key| self.members.get(key))
        {
            error!(machine = %port.name, other = %other.name, %prefix, "two machines cannot share an MQTT topic prefix: this one is not on MQTT");
            return;
        }
        let is_gateway = prefix == self.gateway.topics.prefix;
        let ha = &self.config.home_assistant;
        let discovery = match (&self.gateway.node_id, is_gateway) {
            (None, _) => None,
            (Some(gateway_node), true) => {
                Some(Discovery::own(ha, gateway_node, &topics, &port.name))
            }
            (Some(_), false) => Some(Discovery::behind(
                ha,
                &node_from_prefix(&prefix),
                &topics,
                &port.name,
                self.link(),
            )),
        };
        let key = self.next_key;
        self.next_key += 1;
        let mut m = Member::new(
            &self.config,
            member::Parts {
                key,
                name: port.name.clone(),
                topics,
                discovery,
                is_gateway,
                status: port.status,
                commands: port.commands,
            },
            self.changes.clone(),
        );
        let retained = m.retained_topics();
        self.clears.retain(|(_, t)| !retained.contains(t));
        for topic in m.request_topics() {
            self.routes.insert(topic.clone(), key);
        }
        if is_gateway {
            self.self_key = Some(key);
        } else {
            self.behind += 1;
            if self.behind == 1 {
                self.gateway.discovery_dirty = true;
            }
        }
        debug!(machine = %m.name, prefix = %m.topics.prefix, "machine on MQTT");
        m.reset_session();
        self.names.insert(port.name, key);
        self.members.insert(key, Box::new(m));
        self.mark(key, |_| {});
    }

    fn link(&self) -> Link<'_> {
        Link {
            availability: &self.gateway.topics.availability,
            device: &self.gateway.device,
        }
    }

    /// Stops serving a machine and clears its retained topics (status,
    /// availability, discovery) with empty retained publishes, now or at
    /// the next connection.
    fn remove(&mut self, name: &str) {
        let Some(key) = self.names.remove(name) else {
            debug!(machine = %name, "removing a machine that is not on MQTT");
            return;
        };
        let Some(m) = self.members.remove(&key) else {
            return;
        };
        let requests: Vec<String> = m.request_topics().cloned().collect();
        for topic in &requests {
            self.routes.remove(topic);
        }
        if self.connected && m.subscribed {
            // Best effort: a message that still comes has no route.
            let _ = self.client.try_unsubscribe(&requests);
        }
        if m.is_gateway {
            self.self_key = None;
            self.gateway.availability_dirty = true;
        } else {
            self.behind -= 1;
        }
        self.queue.retain(|k| *k != key);
        let due = Instant::now() + CLEAR_GRACE;
        self.clears
            .extend(m.retained_topics().into_iter().map(|t| (due, t)));
        info!(machine = %name, prefix = %m.topics.prefix, "machine off MQTT: clearing its retained topics");
    }

    fn on_polled(&mut self, polled: Polled) {
        match polled {
            Polled::Event(Event::Connected) => {
                info!(url = %self.url, "connected to the MQTT broker");
                self.connected = true;
                self.session = Session::default();
                self.last_error = None;
                self.gateway.availability_dirty = self.self_key.is_none();
                self.gateway.discovery_dirty = self.behind > 0;
                let keys: Vec<Key> = self.members.keys().copied().collect();
                for key in keys {
                    if let Some(m) = self.members.get_mut(&key) {
                        m.reset_session();
                    }
                    self.mark(key, |_| {});
                }
            }
            Polled::Event(Event::Message(msg)) => self.on_message(&msg),
            Polled::Event(Event::SubscribeRefused) => {
                self.session.unacked = self.session.unacked.saturating_sub(1);
                warn!(
                    "the MQTT broker refused a subscription (check its ACL): \
                     queries or commands will not arrive"
                );
            }
            Polled::Event(Event::Subscribed) => {
                self.session.unacked = self.session.unacked.saturating_sub(1);
            }
            // Only after the last outstanding SUBACK: the replay of every
            // subscription so far passed.
            Polled::ReplayPassed => {
                if self.session.unacked == 0 {
                    self.session.replay_passed = true;
                }
            }
            Polled::Event(Event::DisconnectSent | Event::Other | Event::Received)
            | Polled::Closed => {}
            Polled::Lost { error, retry_in } => self.on_lost(&error, retry_in),
        }
    }

    fn on_lost(&mut self, error: &super::client::ConnectionError, retry_in: Duration) {
        self.connected = false;
        for m in self.members.values_mut() {
            m.subscribed = false;
        }
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

    fn on_message(&mut self, msg: &Message) {
        if let Some(&key) = self.routes.get(&msg.topic) {
            let Some(m) = self.members.get_mut(&key) else {
                return;
            };
            if msg.topic == m.topics.status_get {
                if !m.on_query(msg, &self.client, self.connected) {
                    m.counters_due = true;
                    let (name, count) = (m.name.clone(), m.counters.queries.rate_limited);
                    self.rate_limited(&name, count);
                }
            } else {
                m.on_command(msg, &self.client, self.connected, &mut self.running);
            }
        } else if self.gateway.ha_status_topic.as_deref() == Some(msg.topic.as_str()) {
            if msg.payload == b"online" {
                debug!("Home Assistant came online: republishing discovery");
                self.gateway.discovery_dirty = self.behind > 0;
                for key in self.members.keys().copied().collect::<Vec<_>>() {
                    self.mark(key, |d| d.discovery = true);
                }
            }
        } else {
            debug!(topic = %msg.topic, "ignoring a message on an unexpected topic");
        }
    }

    /// A query over the rate limit was dropped: made visible (the status
    /// with its counters soon, a warning now and then).
    fn rate_limited(&mut self, machine: &str, rate_limited: u64) {
        if self.counters_at.is_none() {
            self.counters_at = Some(Instant::now() + COUNTERS_REPUBLISH);
        }
        if self
            .limit_warned_at
            .is_none_or(|at| at.elapsed() >= LIMIT_WARNING_EVERY)
        {
            self.limit_warned_at = Some(Instant::now());
            warn!(
                machine,
                rate_limited,
                "MQTT status queries over the rate limit ([mqtt] query_burst, query_rate) \
                 are being dropped"
            );
        }
    }

    fn republish_counters(&mut self) {
        self.counters_at = None;
        let due: Vec<Key> = self
            .members
            .values_mut()
            .filter_map(|m| std::mem::take(&mut m.counters_due).then_some(m.key))
            .collect();
        for key in due {
            self.mark(key, |d| d.status = true);
        }
    }

    /// Writes what is dirty: the gateway's subscriptions and `online`, the
    /// clears of removed machines, then each machine in turn. A full queue
    /// leaves the rest for when rumqttc has made room.
    fn flush(&mut self) {
        if !self.connected {
            return;
        }
        let full = !self.flush_gateway() || !self.flush_clears() || !self.flush_members();
        if full && self.retry_at.is_none() {
            self.retry_at = Some(Instant::now() + RETRY_FULL_QUEUE);
        }
    }

    /// False when the queue was full.
    fn flush_gateway(&mut self) -> bool {
        if !self.session.others {
            if let Some(topic) = &self.gateway.ha_status_topic {
                if self
                    .client
                    .try_subscribe(std::slice::from_ref(topic))
                    .is_err()
                {
                    return false;
                }
                self.session.unacked += 1;
                self.session.replay_passed = false;
            }
            self.session.others = true;
        }
        if self.gateway.availability_dirty {
            if self.self_key.is_none()
                && self
                    .client
                    .try_publish(
                        &self.gateway.topics.availability,
                        b"online".to_vec(),
                        true,
                        None,
                    )
                    .is_err()
            {
                return false;
            }
            self.gateway.availability_dirty = false;
        }
        if self.gateway.discovery_dirty {
            if let Some(d) = &self.gateway.discovery {
                let props = PublishProps {
                    json: true,
                    ..PublishProps::default()
                };
                if self
                    .client
                    .try_publish(&d.config_topic, d.payload.clone(), true, Some(&props))
                    .is_err()
                {
                    return false;
                }
            }
            self.gateway.discovery_dirty = false;
        }
        true
    }

    /// Empty retained publishes for removed machines' topics, once their
    /// grace is over.
    fn flush_clears(&mut self) -> bool {
        let now = Instant::now();
        while let Some((due, topic)) = self.clears.front() {
            if *due > now {
                break;
            }
            if self
                .client
                .try_publish(topic, Vec::new(), true, None)
                .is_err()
            {
                return false;
            }
            self.clears.pop_front();
        }
        true
    }

    fn flush_members(&mut self) -> bool {
        let requests_allowed = self.poison.suspended_until().is_none();
        while let Some(key) = self.queue.pop_front() {
            let Some(m) = self.members.get_mut(&key) else {
                continue;
            };
            let (flushed, subscribed) = m.flush(&self.client, &self.poison, requests_allowed);
            if subscribed {
                self.session.unacked += 1;
                self.session.replay_passed = false;
            }
            if flushed == Flushed::Full {
                self.queue.push_front(key);
                return false;
            }
            m.queued = false;
        }
        true
    }

    /// At shutdown: each machine's final status and retained `offline`, the
    /// gateway's `offline` last, then DISCONNECT (which makes the broker
    /// drop the last will), and the broker's close of the connection (see
    /// [`EventLoop::until_closed`]), within [`FINAL_STATUS_WAIT`] +
    /// [`GOODBYE_TIMEOUT`] (+ [`GOODBYE_PER_MACHINE`] each). If that runs
    /// out, the last will still says `offline` for all of them.
    async fn goodbye(&mut self, events: &mut mpsc::Receiver<Polled>) {
        if !self.connected {
            return;
        }
        let deadline = Instant::now() + FINAL_STATUS_WAIT;
        for m in self.members.values_mut() {
            let _ = tokio::time::timeout_at(deadline, m.until_stopping()).await;
        }
        // The gateway's own machine goes last: its `offline` is the
        // gateway's.
        let mut members: Vec<&Member> = self.members.values().map(AsRef::as_ref).collect();
        members.sort_by_key(|m| m.is_gateway);
        let mut last_words: Vec<(String, Vec<u8>, bool)> =
            Vec::with_capacity(members.len() * 2 + 1 + self.clears.len());
        // Removed machines still in their grace are cleared now: no add
        // can come any more.
        for (_, topic) in self.clears.drain(..) {
            last_words.push((topic, Vec::new(), false));
        }
        for m in &members {
            last_words.push((m.topics.status.clone(), m.status_payload(), true));
            last_words.push((m.topics.availability.clone(), b"offline".to_vec(), false));
        }
        if self.self_key.is_none() {
            last_words.push((
                self.gateway.topics.availability.clone(),
                b"offline".to_vec(),
                false,
            ));
        }
        let client = self.client.clone();
        let per_machine = GOODBYE_PER_MACHINE * u32::try_from(members.len()).unwrap_or(u32::MAX);
        let done = tokio::time::timeout(GOODBYE_TIMEOUT + per_machine, async {
            let goodbye = async {
                let json = PublishProps {
                    json: true,
                    ..PublishProps::default()
                };
                for (topic, payload, is_json) in last_words {
                    client
                        .publish(&topic, payload, true, is_json.then_some(&json))
                        .await?;
                }
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
