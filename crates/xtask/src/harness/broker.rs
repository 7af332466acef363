//! The tasks' MQTT broker: a private Mosquitto when it is installed (as on
//! a robot), otherwise rumqttd inside the xtask process, so that nothing
//! has to be installed. Either listens on 127.0.0.1 only. rumqttd is built
//! only with the `embedded-broker` feature; the tasks ask for it up front
//! ([`wants_embedded`], `crate::with_embedded_broker`).
//!
//! Unlike the orchestrator, neither can be started on port 0 and asked
//! which port it got: Mosquitto's `listener 0` means a unix socket, and
//! rumqttd reports nothing. So the broker gets a port that was free a
//! moment ago, and Mosquitto, which exits at once if another process took
//! it meanwhile, is started again on another (at most three times).

#[cfg(feature = "embedded-broker")]
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use super::error::HarnessError;
use super::process::Managed;
use super::workdir::WorkDir;

/// How long a broker may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The running broker.
#[derive(Debug)]
pub(crate) enum Broker {
    Mosquitto {
        binary: PathBuf,
        port: u16,
        child: Managed,
    },
    /// rumqttd's threads; they end with the xtask process (rumqttd has no
    /// way to stop a broker).
    #[cfg_attr(
        not(feature = "embedded-broker"),
        expect(
            dead_code,
            reason = "rumqttd is built only with the embedded-broker feature"
        )
    )]
    Embedded { port: u16, why: &'static str },
}

impl Broker {
    pub(crate) fn port(&self) -> u16 {
        match self {
            Self::Mosquitto { port, .. } | Self::Embedded { port, .. } => *port,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port())
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Mosquitto { binary, child, .. } => {
                format!(
                    "Mosquitto ({}; log {})",
                    binary.display(),
                    child.log.display()
                )
            }
            Self::Embedded { why, .. } => {
                format!("embedded rumqttd in this process, MQTT 5 only ({why})")
            }
        }
    }
}

/// The Mosquitto to use, if any: `PEAQOS_MOSQUITTO` or the one on `PATH`
/// or in the sbin directories; a path that is not a file counts as none
/// (`PEAQOS_MOSQUITTO=/nonexistent` hides an installed one).
fn mosquitto() -> Option<PathBuf> {
    peaqos_testkit::mosquitto_binary().filter(|p| p.is_file())
}

/// Whether [`start`] will run the embedded broker.
#[cfg(not(feature = "embedded-broker"))]
pub(crate) fn wants_embedded(force_embedded: bool) -> bool {
    force_embedded || mosquitto().is_none()
}

/// Starts the broker. `interrupted` is polled while waiting for it.
pub(crate) fn start(
    work: &WorkDir,
    force_embedded: bool,
    interrupted: &dyn Fn() -> Option<&'static str>,
) -> Result<Broker, HarnessError> {
    let binary = if force_embedded { None } else { mosquitto() };
    let Some(binary) = binary else {
        let why = if force_embedded {
            "--embedded-broker"
        } else {
            "no mosquitto on PATH or in /usr/sbin"
        };
        return start_embedded(why, interrupted);
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let port = free_port();
        let conf = work.write(
            "mosquitto.conf",
            &format!(
                "# Written by `cargo xtask`: a private broker on the loopback interface.\n\
                 listener {port} 127.0.0.1\n\
                 allow_anonymous true\n\
                 persistence false\n\
                 log_dest stderr\n\
                 log_type error\nlog_type warning\nlog_type notice\nlog_type information\n\
                 connection_messages true\n"
            ),
        )?;
        let mut command = Command::new(&binary);
        command.arg("-c").arg(&conf);
        let mut child = Managed::spawn(
            "mosquitto",
            command,
            &work.file("mosquitto.log"),
            &work.pids(),
        )?;
        match wait_listening(&mut child, port, START_TIMEOUT, interrupted) {
            Ok(()) => {
                return Ok(Broker::Mosquitto {
                    binary,
                    port,
                    child,
                });
            }
            Err(HarnessError::Exited { .. }) if attempt < 3 => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(not(feature = "embedded-broker"))]
fn start_embedded(
    why: &'static str,
    _interrupted: &dyn Fn() -> Option<&'static str>,
) -> Result<Broker, HarnessError> {
    Err(HarnessError::NoEmbeddedBroker(why))
}

#[cfg(feature = "embedded-broker")]
fn start_embedded(
    why: &'static str,
    interrupted: &dyn Fn() -> Option<&'static str>,
) -> Result<Broker, HarnessError> {
    let port = free_port();
    let mut broker = rumqttd::Broker::new(embedded_config(port));
    let thread = std::thread::Builder::new()
        .name("rumqttd".into())
        // Its error is large and only ever shown as text.
        .spawn(move || broker.start().map_err(|e| e.to_string()))
        .map_err(|source| HarnessError::Spawn {
            program: "the embedded broker's thread".into(),
            source,
        })?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = std::time::Instant::now() + START_TIMEOUT;
    loop {
        if let Some(signal) = interrupted() {
            return Err(HarnessError::Interrupted(signal));
        }
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(Broker::Embedded { port, why });
        }
        // A server that cannot bind ends its thread (and rumqttd logs why
        // through `tracing`, which nobody collects here); start() returns.
        if thread.is_finished() || std::time::Instant::now() > deadline {
            let why = match thread.is_finished().then(|| thread.join()) {
                Some(Ok(Err(e))) => format!("none; rumqttd: {e}"),
                Some(_) => "none; rumqttd stopped".into(),
                None => "none".into(),
            };
            return Err(HarnessError::NotListening {
                what: "the embedded MQTT broker".into(),
                port,
                timeout: START_TIMEOUT,
                log: why,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One MQTT 5 listener (the agent and `peaqos-agent status` speak MQTT 5 by
/// default); limits well above what a task's few clients need.
#[cfg(feature = "embedded-broker")]
fn embedded_config(port: u16) -> rumqttd::Config {
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: 1 << 20,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: "demo-v5".into(),
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 100,
            max_outgoing_packet_count: 200,
            max_segment_size: 1 << 20,
            max_segment_count: 10,
            ..rumqttd::RouterConfig::default()
        },
        v5: Some(HashMap::from([("demo".to_owned(), server)])),
        ..rumqttd::Config::default()
    }
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    peaqos_testkit::free_port()
}

/// Waits until `child` accepts connections on `127.0.0.1:port`; fails as
/// soon as it exits, on a signal, or after `timeout`.
fn wait_listening(
    child: &mut Managed,
    port: u16,
    timeout: Duration,
    interrupted: &dyn Fn() -> Option<&'static str>,
) -> Result<(), HarnessError> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(signal) = interrupted() {
            return Err(HarnessError::Interrupted(signal));
        }
        if let Some(status) = child.exited() {
            return Err(HarnessError::Exited {
                what: child.name,
                status,
                log: child.log.clone(),
            });
        }
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(HarnessError::NotListening {
                what: child.name.to_owned(),
                port,
                timeout,
                log: child.log.display().to_string(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
