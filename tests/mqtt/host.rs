//! The MQTT interface of a gateway (`mqtt::spawn_host`) on a thread of its
//! own, driven as the host of machines drives it: machines added and
//! removed through `Membership`, each with a stand-in registration loop
//! that counts its commands. It can stop cleanly, or die as a process
//! killed with SIGKILL would (its runtime dropped: sockets closed with no
//! DISCONNECT, so the broker publishes the last will).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::thread;

use peaqos_agent::mqtt::{self, MachinePort, Membership, MqttConfig};
use peaqos_agent::status::{AgentState, Command as AgentCommand, StatusSnapshot};
use peaqos_agent::systemd::Heartbeat;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::support::{WAIT, error_chain, snapshot};

/// One machine's stand-in registration loop.
#[derive(Debug)]
pub(crate) struct Machine {
    pub(crate) status: watch::Sender<StatusSnapshot>,
    pub(crate) commands: Arc<AtomicUsize>,
}

/// A running gateway MQTT interface.
#[derive(Debug)]
pub(crate) struct Host {
    members: mpsc::UnboundedSender<Membership>,
    pub(crate) machines: HashMap<String, Machine>,
    runtime: tokio::runtime::Handle,
    shutdown: CancellationToken,
    crash: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

/// An active machine's snapshot, its machine id derived from its name.
pub(crate) fn active(name: &str) -> StatusSnapshot {
    let mut s = snapshot();
    s.state = AgentState::Active;
    s.machine_id = Some(format!("mach_{name}"));
    s.seq = 1;
    s
}

impl Host {
    pub(crate) fn start(config: &MqttConfig, gateway_name: &str) -> Self {
        let (members_tx, members_rx) = mpsc::unbounded_channel();
        let shutdown = CancellationToken::new();
        let (crash_tx, crash_rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let config = config.clone();
        let name = gateway_name.to_owned();
        let token = shutdown.clone();
        let thread = thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let handle = rt.handle().clone();
            rt.block_on(async move {
                let task = match mqtt::spawn_host(
                    &config,
                    &name,
                    members_rx,
                    Heartbeat::new("mqtt"),
                    token,
                ) {
                    Ok(task) => task,
                    Err(e) => {
                        let _ = ready_tx.send(Err(error_chain(&e)));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(handle));
                tokio::select! {
                    _ = task => {}
                    // Dropping the runtime below drops every task and closes
                    // the socket without a DISCONNECT.
                    _ = crash_rx => {}
                }
            });
        });
        let runtime = ready_rx
            .recv_timeout(WAIT)
            .expect("spawn_host did not return")
            .unwrap_or_else(|e| panic!("spawn_host failed: {e}"));
        Self {
            members: members_tx,
            machines: HashMap::new(),
            runtime,
            shutdown,
            crash: Some(crash_tx),
            thread: Some(thread),
        }
    }

    /// Adds a machine (as a new file in machines.d), active.
    pub(crate) fn add(&mut self, name: &str, topic_prefix: Option<&str>) {
        let (status_tx, status_rx) = watch::channel(active(name));
        let (cmd_tx, mut cmd_rx) = mpsc::channel::<AgentCommand>(4);
        let count = Arc::new(AtomicUsize::new(0));
        let counter = count.clone();
        self.runtime.spawn(async move {
            while let Some(AgentCommand::Reregister { reply }) = cmd_rx.recv().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let _ = reply.send(Ok(()));
            }
        });
        self.members
            .send(Membership::Add(MachinePort {
                name: name.to_owned(),
                topic_prefix: topic_prefix.map(str::to_owned),
                status: status_rx,
                commands: Some(cmd_tx),
            }))
            .unwrap();
        self.machines.insert(
            name.to_owned(),
            Machine {
                status: status_tx,
                commands: count,
            },
        );
    }

    /// Removes a machine (its file deleted).
    pub(crate) fn remove(&mut self, name: &str) {
        self.members
            .send(Membership::Remove {
                name: name.to_owned(),
            })
            .unwrap();
        self.machines.remove(name);
    }

    pub(crate) fn commands(&self, name: &str) -> usize {
        self.machines[name].commands.load(Ordering::SeqCst)
    }

    /// A clean stop: every loop says `stopping`, then the interface ends.
    pub(crate) fn stop(&mut self) {
        for m in self.machines.values() {
            m.status.send_modify(|s| {
                s.state = AgentState::Stopping;
                s.seq += 1;
            });
        }
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }

    /// Dies without a goodbye, as under SIGKILL.
    pub(crate) fn crash(&mut self) {
        if let Some(crash) = self.crash.take() {
            let _ = crash.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
