//! What a task waits for, as one stream of events: SIGINT/SIGTERM, and
//! the agents' status and availability as published on the broker (read
//! by MQTT 5 clients of our own, as any dashboard on the robot would).
//!
//! A small tokio runtime (one worker thread) runs the signal handlers and
//! the MQTT clients; the task itself stays synchronous and reads the events
//! from a channel.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event as MqttEvent, MqttOptions};
use tokio::signal::unix::{SignalKind, signal};

use super::error::HarnessError;

#[derive(Debug)]
pub(crate) enum Event {
    /// SIGINT (Ctrl-C) or SIGTERM.
    Signal(&'static str),
    /// A `<prefix>/status` payload (the agent's status JSON), with the
    /// prefix (several agents may be watched).
    Status(String, serde_json::Value),
    /// A `<prefix>/availability` payload: `online` or `offline`.
    Availability(String),
}

#[derive(Debug)]
pub(crate) struct Events {
    runtime: tokio::runtime::Runtime,
    tx: Sender<Event>,
    rx: Receiver<Event>,
    signals: Arc<AtomicUsize>,
    /// Watchers started so far: each MQTT client needs an id of its own.
    watchers: AtomicUsize,
    last_signal: Arc<std::sync::Mutex<Option<&'static str>>>,
}

impl Events {
    /// Starts the runtime and catches SIGINT and SIGTERM from now on.
    pub(crate) fn start() -> Result<Self, HarnessError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(HarnessError::Runtime)?;
        let (tx, rx) = channel();
        let signals = Arc::new(AtomicUsize::new(0));
        let last_signal = Arc::new(std::sync::Mutex::new(None));
        for (kind, name) in [
            (SignalKind::interrupt(), "SIGINT"),
            (SignalKind::terminate(), "SIGTERM"),
        ] {
            let mut stream = runtime.block_on(async { signal(kind) }).map_err(|source| {
                HarnessError::Signal {
                    signal: name,
                    source,
                }
            })?;
            let tx = tx.clone();
            let signals = Arc::clone(&signals);
            let last = Arc::clone(&last_signal);
            runtime.spawn(async move {
                while stream.recv().await.is_some() {
                    *last
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(name);
                    signals.fetch_add(1, Ordering::SeqCst);
                    let _ = tx.send(Event::Signal(name));
                }
            });
        }
        Ok(Self {
            runtime,
            tx,
            rx,
            signals,
            watchers: AtomicUsize::new(0),
            last_signal,
        })
    }

    /// The signal that arrived, if one did.
    pub(crate) fn interrupted(&self) -> Option<&'static str> {
        *self
            .last_signal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How many signals arrived so far (a second Ctrl-C hurries the stop).
    pub(crate) fn signal_count(&self) -> usize {
        self.signals.load(Ordering::SeqCst)
    }

    /// Subscribes to the agent's status and availability on the broker at
    /// `127.0.0.1:port`, reconnecting until the task ends.
    pub(crate) fn watch_agent(&self, port: u16, prefix: &str) {
        let id = format!(
            "peaqos-xtask-watch-{}-{}",
            std::process::id(),
            self.watchers.fetch_add(1, Ordering::SeqCst)
        );
        self.runtime
            .spawn(watch(port, id, prefix.to_owned(), self.tx.clone()));
    }

    /// The next event, or `None` after `timeout`.
    pub(crate) fn next(&self, timeout: Duration) -> Option<Event> {
        self.rx.recv_timeout(timeout).ok()
    }
}

async fn watch(port: u16, id: String, prefix: String, tx: Sender<Event>) {
    let status = format!("{prefix}/status");
    let availability = format!("{prefix}/availability");
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_start(true)
        .set_max_packet_size(Some(1 << 20));
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    loop {
        match eventloop.poll().await {
            // A clean session each time: subscribe again; the broker then
            // sends the retained status and availability.
            Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                for topic in [&status, &availability] {
                    let _ = client.try_subscribe(topic.clone(), QoS::AtLeastOnce);
                }
            }
            Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                let event = if *p.topic == *status.as_bytes() {
                    serde_json::from_slice(&p.payload)
                        .ok()
                        .map(|status| Event::Status(prefix.clone(), status))
                } else if *p.topic == *availability.as_bytes() {
                    Some(Event::Availability(
                        String::from_utf8_lossy(&p.payload).into_owned(),
                    ))
                } else {
                    None
                };
                if let Some(event) = event
                    && tx.send(event).is_err()
                {
                    return;
                }
            }
            Ok(_) => {}
            // The broker is gone (the task is stopping) or not there yet;
            // the next poll reconnects.
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
