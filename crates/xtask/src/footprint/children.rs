//! The children of a footprint run: the orchestrator (once it answers
//! `/ready`), the baseline, and each agent variant, started and waited for
//! until the milestone the figures are taken from.

use super::*;

/// The registry: both identities controlled by the run's fresh key.
pub(super) fn registry_toml(address: &str) -> String {
    format!(
        "# Written by `cargo xtask footprint`: which addresses control which identity.\n\
         [identities]\n\
         {} = [{address}]\n\
         {} = [{address}]\n",
        toml_string(IDENTITY),
        toml_string(IDENTITY_MQTT),
        address = toml_string(address),
    )
}

/// The run's orchestrator (its database and registry in `dir`), once it
/// answers `/ready`.
pub(super) fn start_orchestrator(
    binary: &Path,
    dir: &Path,
    registry: &Path,
    work: &WorkDir,
    events: &Events,
) -> Result<Orchestrator, FootprintError> {
    let database = format!("sqlite://{}", dir.join("orchestrator.db").display());
    let mut command = child_command(binary);
    command
        .env("DATABASE_URL", &database)
        .env("PEAQOS_MCR_REGISTRY_FILE", registry)
        // Its CPU is not measured, but it shares the machine with the
        // agent it serves.
        .env("RUST_LOG", "warn");
    let mut orchestrator = orchestrator::start(
        command,
        &dir.join("orchestrator.log"),
        &work.pids(),
        &|| events.interrupted(),
    )?;
    let port = orchestrator.addr.port();
    wait_ready(&mut orchestrator.child, port, ORCHESTRATOR_READY, events)?;
    Ok(orchestrator)
}

/// Polls the orchestrator's `GET /ready` (its store and controller source
/// answer) until it says 200: the first request of the baseline or of an
/// agent then does not meet a server still opening its database, which
/// made whichever came first about 1.5 ms slower.
pub(super) fn wait_ready(
    child: &mut Managed,
    port: u16,
    timeout: Duration,
    events: &Events,
) -> Result<(), FootprintError> {
    let url = format!("http://127.0.0.1:{port}/ready");
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(signal) = events.interrupted() {
            return Err(FootprintError::Interrupted(signal));
        }
        if let Some(status) = child.exited() {
            return Err(FootprintError::Exited {
                what: child.name,
                status,
                when: "while starting",
                log: child.log.clone(),
            });
        }
        let last = match get_status(port, "/ready") {
            Ok(200) => return Ok(()),
            Ok(status) => std::io::Error::other(format!("the last answer was HTTP {status}")),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(FootprintError::NotReady {
                url,
                timeout,
                source: last,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The status code of `GET path` on 127.0.0.1:`port` (HTTP/1.1, each step
/// bounded).
pub(super) fn get_status(port: u16, path: &str) -> std::io::Result<u16> {
    use std::io::{Read as _, Write as _};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    http_status(&answer).ok_or_else(|| {
        let first = String::from_utf8_lossy(&answer);
        std::io::Error::other(format!(
            "not an HTTP answer: {:?}",
            first.lines().next().unwrap_or("")
        ))
    })
}

/// The status code of an HTTP/1.x answer.
pub(super) fn http_status(answer: &[u8]) -> Option<u16> {
    let line = answer.split(|&b| b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split(' ');
    words.next()?.strip_prefix("HTTP/1.")?;
    let code = words.next()?;
    (code.len() == 3).then(|| code.parse().ok()).flatten()
}

/// Starts the baseline and waits until `/health` has answered it: the time
/// from exec to that answer.
pub(super) fn start_baseline(
    binary: &Path,
    dir: &Path,
    orchestrator_url: &str,
    work: &WorkDir,
    events: &Events,
) -> Result<(Managed, Duration), FootprintError> {
    let mut command = child_command(binary);
    command.arg(format!("{orchestrator_url}/health"));
    let log = dir.join("baseline.log");
    let reference = Reference::now();
    let mut child = Managed::spawn("baseline", command, &log, &work.pids())?;
    let answered = wait_for_line(
        &mut child,
        BASELINE_START,
        events,
        "that /health answered",
        |line, seen| {
            if !line.starts_with(BASELINE_READY) {
                return Ok(None);
            }
            elapsed(&reference, milestones::answered_at(line), line, seen, &log).map(Some)
        },
    )?;
    Ok((child, answered))
}

/// From `reference` to a line's `stamp` (read by `seen`).
pub(super) fn elapsed(
    reference: &Reference,
    stamp: Option<Duration>,
    line: &str,
    seen: Instant,
    log: &Path,
) -> Result<Duration, FootprintError> {
    let stamp = stamp.ok_or_else(|| FootprintError::Unstamped {
        log: log.to_owned(),
        line: line.to_owned(),
    })?;
    reference
        .elapsed(stamp, seen)
        .ok_or_else(|| FootprintError::ClockStepped {
            log: log.to_owned(),
            line: line.to_owned(),
        })
}

/// Which agent: MQTT off, or on against a broker.
#[derive(Debug)]
pub(super) struct Variant {
    name: &'static str,
    /// The stem of its files in the run's directory.
    file: &'static str,
    identity: &'static str,
    broker_url: Option<String>,
}

impl Variant {
    pub(super) fn plain() -> Self {
        Self {
            name: "agent",
            file: "agent",
            identity: IDENTITY,
            broker_url: None,
        }
    }

    pub(super) fn mqtt(broker_url: String) -> Self {
        Self {
            name: "agent-mqtt",
            file: "agent-mqtt",
            identity: IDENTITY_MQTT,
            broker_url: Some(broker_url),
        }
    }
}

#[derive(Debug)]
pub(super) struct AgentSettings<'a> {
    pub(super) dir: &'a Path,
    pub(super) key_file: &'a Path,
    pub(super) orchestrator_url: &'a str,
}

/// The agent's configuration: everything at its defaults (the intervals
/// of a real deployment) but what it must be told, and the log filter
/// that shows the milestones.
fn agent_toml(variant: &Variant, s: &AgentSettings<'_>, state_dir: &Path) -> String {
    AgentConfig {
        written_by: "cargo xtask footprint",
        identity: variant.identity,
        key_file: s.key_file,
        orchestrator_url: s.orchestrator_url,
        timeouts: None,
        display_name: &format!("footprint-{}", variant.file),
        owner_id: "footprint",
        runtime_profile: "ros2",
        state_dir,
        renewal: "",
        mqtt: variant
            .broker_url
            .as_deref()
            .map(|url| (url, "peaqos/footprint")),
        fast_reconnect: false,
        log_level: Some(milestones::LOG_LEVEL),
    }
    .render()
}

/// Starts the agent and waits until it is active: the times from exec to
/// its first signature and to `active`, from its log stamps.
pub(super) fn start_agent(
    variant: &Variant,
    binary: &Path,
    s: &AgentSettings<'_>,
    timeout: Duration,
    work: &WorkDir,
    events: &Events,
) -> Result<(Managed, StartTimes), FootprintError> {
    let state_dir = s.dir.join(format!("{}-state", variant.file));
    std::fs::create_dir(&state_dir).map_err(|source| FootprintError::Io {
        action: "create",
        path: state_dir.clone(),
        source,
    })?;
    let config = write(
        &s.dir.join(format!("{}.toml", variant.file)),
        &agent_toml(variant, s, &state_dir),
    )?;
    let mut command = child_command(binary);
    // The filter is in the configuration; `RUST_LOG` would win over it.
    command
        .env_remove("RUST_LOG")
        .arg("run")
        .arg("--config")
        .arg(&config);
    let log = s.dir.join(format!("{}.log", variant.file));
    let reference = Reference::now();
    let mut child = Managed::spawn(variant.name, command, &log, &work.pids())?;
    let mut first_signature = None;
    let start = wait_for_line(
        &mut child,
        timeout,
        events,
        "`signed identity challenge` and `state=active`",
        |line, seen| {
            let Some(milestone) = milestones::milestone(line) else {
                return Ok(None);
            };
            let elapsed = elapsed(&reference, milestones::time_of_day(line), line, seen, &log)?;
            match milestone {
                Milestone::FirstSignature => {
                    first_signature.get_or_insert(elapsed);
                    Ok(None)
                }
                Milestone::Active => {
                    let first_signature = first_signature
                        .ok_or_else(|| FootprintError::ActiveUnsigned { log: log.clone() })?;
                    Ok(Some(StartTimes {
                        first_signature,
                        active: elapsed,
                    }))
                }
            }
        },
    )?;
    Ok((child, start))
}

/// Reads `child`'s log as it grows until `found` returns a value for a line
/// (given the moment the line had been read by); fails when the child
/// exits, a signal arrives, or after `timeout`.
pub(super) fn wait_for_line<T>(
    child: &mut Managed,
    timeout: Duration,
    events: &Events,
    expected: &'static str,
    mut found: impl FnMut(&str, Instant) -> Result<Option<T>, FootprintError>,
) -> Result<T, FootprintError> {
    let mut tail = Tail::new(&child.log);
    let deadline = Instant::now() + timeout;
    loop {
        let lines = tail.lines().map_err(|source| FootprintError::Io {
            action: "read",
            path: tail.path().to_owned(),
            source,
        })?;
        let seen = Instant::now();
        for line in lines {
            if let Some(value) = found(&line, seen)? {
                return Ok(value);
            }
        }
        if let Some(signal) = events.interrupted() {
            return Err(FootprintError::Interrupted(signal));
        }
        if let Some(status) = child.exited() {
            return Err(FootprintError::Exited {
                what: child.name,
                status,
                when: "while starting",
                log: child.log.clone(),
            });
        }
        if Instant::now() > deadline {
            return Err(FootprintError::Timeout {
                what: child.name,
                expected,
                timeout,
                log: child.log.clone(),
            });
        }
        std::thread::sleep(POLL);
    }
}
