//! Shared helpers for the MQTT tests: the agent's MQTT interface running on
//! its own thread (a stand-in for the registration loop feeds it status and
//! answers commands), and Mosquitto's own command-line clients as the
//! independent peers that observe it.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc as std_mpsc};
use std::thread;
use std::time::{Duration, Instant};

use peaqos_agent::mqtt::{self, MqttConfig, Protocol};
use peaqos_agent::status::{AgentState, Command as AgentCommand, StatusSnapshot};
use peaqos_agent::systemd::Heartbeat;
use peaqos_testkit::{Mosquitto, Service, available_or_skip, find_program};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Every wait in these tests is bounded by this.
pub(crate) const WAIT: Duration = Duration::from_secs(10);
/// Separates fields in `mosquitto_sub -F` output.
const SEP: char = '\u{1f}';

/// Mosquitto's command-line clients.
#[derive(Debug, Clone)]
pub(crate) struct Tools {
    pub(crate) sub: PathBuf,
    pub(crate) publish: PathBuf,
    pub(crate) rr: PathBuf,
    /// `-u USER -P PASSWORD`, when the broker wants them.
    pub(crate) auth: Vec<String>,
}

impl Tools {
    /// The same tools, connecting as `user`.
    pub(crate) fn as_user(&self, user: &str, password: &str) -> Self {
        Self {
            auth: vec!["-u".into(), user.into(), "-P".into(), password.into()],
            ..self.clone()
        }
    }
}

/// A private broker plus its clients, or `None` (one skip line) when
/// Mosquitto is not installed.
pub(crate) fn broker(test: &str, extra_config: &str) -> Option<(Mosquitto, Tools)> {
    let broker = Mosquitto::start(test, extra_config)?;
    let tools = available_or_skip(
        Service::Mosquitto,
        test,
        (|| {
            Some(Tools {
                sub: find_program("mosquitto_sub")?,
                publish: find_program("mosquitto_pub")?,
                rr: find_program("mosquitto_rr")?,
                auth: Vec::new(),
            })
        })(),
        "mosquitto_sub, mosquitto_pub or mosquitto_rr missing (Debian: mosquitto-clients)",
    )?;
    Some((broker, tools))
}

/// An enabled config for `broker` with test-friendly timings.
pub(crate) fn config(broker: &Mosquitto, protocol: Protocol) -> MqttConfig {
    let mut config: MqttConfig = toml::from_str(&format!(
        r#"
        enabled = true
        url = "{}"
        keep_alive = "5s"
        connect_timeout = "2s"
        reconnect_min = "100ms"
        reconnect_max = "500ms"
        "#,
        broker.url()
    ))
    .unwrap();
    config.protocol = protocol;
    config
}

/// A snapshot such as the registration loop publishes.
pub(crate) fn snapshot() -> StatusSnapshot {
    let mut s = StatusSnapshot::new(
        "did:peaq:4242".to_owned(),
        "0x8fd379246834eac74B8419FfdA202CF8051F7A03".to_owned(),
        "3f1c2a4e-0000-4000-8000-000000000001".to_owned(),
    );
    s.state = AgentState::Registering;
    s
}

/// How the stand-in registration loop answers `Reregister`.
#[derive(Debug, Clone)]
pub(crate) enum Answer {
    Ok,
    Err(&'static str),
    /// Keep the command without answering (to see the timeout).
    Never,
}

/// The agent's MQTT interface on a thread of its own, as `run` starts it.
#[derive(Debug)]
pub(crate) struct Agent {
    pub(crate) status: watch::Sender<StatusSnapshot>,
    pub(crate) commands_received: Arc<AtomicUsize>,
    shutdown: CancellationToken,
    thread: Option<thread::JoinHandle<()>>,
}

impl Agent {
    pub(crate) fn start(config: &MqttConfig, machine_name: &str, answer: Answer) -> Self {
        Self::try_start(config, machine_name, answer).unwrap()
    }

    /// Starts and reports how long `mqtt::spawn` took to return.
    pub(crate) fn try_start(
        config: &MqttConfig,
        machine_name: &str,
        answer: Answer,
    ) -> Result<Self, String> {
        let (status_tx, status_rx) = watch::channel(snapshot());
        let (cmd_tx, mut cmd_rx) = mpsc::channel::<AgentCommand>(4);
        let shutdown = CancellationToken::new();
        let commands_received = Arc::new(AtomicUsize::new(0));
        let (ready_tx, ready_rx) = std_mpsc::channel::<Result<(), String>>();
        let config = config.clone();
        let name = machine_name.to_owned();
        let token = shutdown.clone();
        let counter = commands_received.clone();
        let thread = thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let handle = match mqtt::spawn(
                    &config,
                    &name,
                    status_rx,
                    cmd_tx,
                    Heartbeat::new("mqtt"),
                    token,
                ) {
                    Ok(h) => h,
                    Err(e) => {
                        let _ = ready_tx.send(Err(error_chain(&e)));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                tokio::spawn(async move {
                    let mut held = Vec::new();
                    while let Some(AgentCommand::Reregister { reply }) = cmd_rx.recv().await {
                        counter.fetch_add(1, Ordering::SeqCst);
                        match &answer {
                            Answer::Ok => drop(reply.send(Ok(()))),
                            Answer::Err(m) => drop(reply.send(Err((*m).to_owned()))),
                            Answer::Never => held.push(reply),
                        }
                    }
                });
                let _ = handle.await;
            });
        });
        ready_rx
            .recv_timeout(WAIT)
            .map_err(|_| "mqtt::spawn did not return".to_owned())??;
        Ok(Self {
            status: status_tx,
            commands_received,
            shutdown,
            thread: Some(thread),
        })
    }

    /// Changes the status as the registration loop does (bumping `seq`).
    pub(crate) fn update(&self, change: impl FnOnce(&mut StatusSnapshot)) {
        self.status.send_modify(|s| {
            change(s);
            s.seq += 1;
        });
    }

    pub(crate) fn seq(&self) -> u64 {
        self.status.borrow().seq
    }

    /// Cancels the interface and waits for its task to end; returns how
    /// long that took.
    pub(crate) fn stop(&mut self) -> Duration {
        let started = Instant::now();
        // As the registration loop does when it winds down.
        self.update(|s| s.state = AgentState::Stopping);
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
        started.elapsed()
    }

    pub(crate) fn commands(&self) -> usize {
        self.commands_received.load(Ordering::SeqCst)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

pub(crate) use peaqos_logging::error_chain;

/// One message seen by `mosquitto_sub`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Seen {
    pub(crate) retain: bool,
    pub(crate) topic: String,
    /// MQTT 5 correlation data (as text), empty if none.
    pub(crate) correlation: String,
    pub(crate) payload: String,
}

impl Seen {
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.payload)
            .unwrap_or_else(|e| panic!("{} is not JSON ({e}): {}", self.topic, self.payload))
    }
}

/// A running `mosquitto_sub` (MQTT 5, Retain As Published) whose output is
/// collected on a thread.
#[derive(Debug)]
pub(crate) struct Watch {
    child: Child,
    rx: std_mpsc::Receiver<Seen>,
    /// Everything received (sync markers aside), in order.
    pub(crate) seen: Vec<Seen>,
    /// Received but not yet returned by [`Watch::wait`].
    pending: std::collections::VecDeque<Seen>,
    port: u16,
    tools: Tools,
    syncs: u32,
}

impl Watch {
    /// Subscribes to `filters` (plus a private sync topic) and returns once
    /// the subscription provably works.
    pub(crate) fn start(broker: &Mosquitto, tools: &Tools, filters: &[&str]) -> Self {
        let mut cmd = Command::new(&tools.sub);
        cmd.args(["-h", "127.0.0.1", "-p", &broker.port().to_string()])
            .args(&tools.auth)
            .args([
                "-V",
                "5",
                "-q",
                "1",
                "--retain-as-published",
                "-t",
                "test-sync/#",
            ])
            .args(["-F", &format!("%r{SEP}%t{SEP}%D{SEP}%p")]);
        for f in filters {
            cmd.args(["-t", f]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std_mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut parts = line.splitn(4, SEP);
                let seen = Seen {
                    retain: parts.next() == Some("1"),
                    topic: parts.next().unwrap_or_default().to_owned(),
                    correlation: parts.next().unwrap_or_default().to_owned(),
                    payload: parts.next().unwrap_or_default().to_owned(),
                };
                if tx.send(seen).is_err() {
                    break;
                }
            }
        });
        let mut watch = Self {
            child,
            rx,
            seen: Vec::new(),
            pending: std::collections::VecDeque::new(),
            port: broker.port(),
            tools: tools.clone(),
            syncs: 0,
        };
        watch.sync();
        watch
    }

    /// Publishes a marker and waits until it comes back: everything the
    /// broker accepted before now has been delivered to this subscriber.
    pub(crate) fn sync(&mut self) {
        let deadline = Instant::now() + WAIT;
        self.syncs += 1;
        let marker = format!("test-sync/{}", self.syncs);
        while Instant::now() < deadline {
            publish(self.port, &self.tools, &["-t", &marker, "-m", "x"]);
            let until = Instant::now() + Duration::from_millis(300);
            if self.next_until(until, |s| s.topic == marker).is_some() {
                return;
            }
        }
        panic!("mosquitto_sub never received {marker}");
    }

    fn next_until(&mut self, until: Instant, pred: impl Fn(&Seen) -> bool) -> Option<Seen> {
        if let Some(i) = self.pending.iter().position(&pred) {
            return self.pending.remove(i);
        }
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let seen = self.rx.recv_timeout(left).ok()?;
            if pred(&seen) {
                if !seen.topic.starts_with("test-sync/") {
                    self.seen.push(seen.clone());
                }
                return Some(seen);
            }
            if !seen.topic.starts_with("test-sync/") {
                self.seen.push(seen.clone());
                self.pending.push_back(seen);
            }
        }
    }

    /// The next message matching `pred`, within [`WAIT`].
    pub(crate) fn wait(&mut self, what: &str, pred: impl Fn(&Seen) -> bool) -> Seen {
        self.next_until(Instant::now() + WAIT, pred)
            .unwrap_or_else(|| panic!("timed out waiting for {what}; seen: {:#?}", self.seen))
    }

    /// Everything seen so far on `topic`.
    pub(crate) fn on(&self, topic: &str) -> Vec<&Seen> {
        self.seen.iter().filter(|s| s.topic == topic).collect()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `mosquitto_pub` at QoS 1 (it returns once the broker has the message).
pub(crate) fn publish(port: u16, tools: &Tools, args: &[&str]) {
    let status = Command::new(&tools.publish)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .args(&tools.auth)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "mosquitto_pub {args:?} failed: {status}");
}

/// The retained message on `topic` once it satisfies `pred` (polling a
/// fresh subscriber, as a reader that connects later would see it).
pub(crate) fn wait_retained(
    broker: &Mosquitto,
    tools: &Tools,
    topic: &str,
    pred: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + WAIT;
    let mut last = None;
    while Instant::now() < deadline {
        let out = Command::new(&tools.sub)
            .args(["-h", "127.0.0.1", "-p", &broker.port().to_string()])
            .args(&tools.auth)
            .args([
                "-t",
                topic,
                "-C",
                "1",
                "-W",
                "1",
                "--retained-only",
                "-F",
                "%p",
            ])
            .stderr(Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).trim_end().to_owned();
        if out.status.success() && pred(&text) {
            return text;
        }
        last = Some(text);
        thread::sleep(Duration::from_millis(50));
    }
    panic!("retained {topic} never matched; last: {last:?}");
}

/// `mosquitto_rr` (MQTT 5 request/response): the answer, or `None` when
/// nothing came within `secs`.
pub(crate) fn request(
    port: u16,
    tools: &Tools,
    topic: &str,
    response_topic: &str,
    extra: &[&str],
    secs: u32,
) -> Option<String> {
    let out = Command::new(&tools.rr)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .args(&tools.auth)
        .args(["-t", topic, "-e", response_topic, "-W", &secs.to_string()])
        .args(extra)
        .stderr(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).trim_end().to_owned();
    (out.status.success() && !text.is_empty()).then_some(text)
}
