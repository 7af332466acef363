//! `cargo xtask demo`: the quick start. On this machine, with nothing but
//! Rust installed: an orchestrator (SQLite, a registry file), an MQTT broker
//! (Mosquitto if installed, else one built into xtask) and an agent with a
//! fresh controller key that the registry names as the demo identity's
//! controller. Shows the agent's status as it publishes it until `active`,
//! asks it over MQTT (`peaqos-agent status`), then runs until Ctrl-C.
//!
//! Everything lives in one directory (default `target/demo/`): the key,
//! the configurations, the database, the agent's state and every log.

mod config;
mod error;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::Value;

use self::config::{AgentSettings, IDENTITY, TOPIC_PREFIX};
pub(crate) use self::error::DemoError;
use crate::harness::agent::{self, Agent};
use crate::harness::broker::{self, Broker};
use crate::harness::cargo::{AGENT, ORCHESTRATOR};
use crate::harness::events::{Event, Events};
use crate::harness::orchestrator::{self, Orchestrator};
use crate::harness::process::{Managed, STOP_GRACE, child_command};
use crate::harness::workdir::WorkDir;
use crate::harness::{HarnessError, print_tail};

/// Proof lifetime the demo's orchestrator grants, so that the agent is seen
/// renewing its proof (at about two thirds of it) while the demo runs.
const PROOF_LIFETIME_SECS: u64 = 120;

/// Brings up an orchestrator, an MQTT broker and an agent on this machine
/// and shows the agent becoming active; runs until Ctrl-C, which stops all
/// of them. Files (key, configs, database, logs) go to --dir.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask demo")]
struct Options {
    /// Exit 0 as soon as the agent's status answer over MQTT says `active`
    /// (after stopping everything); exit 1 if it does not within --timeout.
    #[arg(long)]
    until_active: bool,
    /// Use the MQTT broker built into xtask even when Mosquitto is
    /// installed (PEAQOS_MOSQUITTO names another Mosquitto).
    #[arg(long)]
    embedded_broker: bool,
    /// Working directory [default: target/demo in the workspace]. What an
    /// earlier demo left in it is removed; a directory that an earlier demo
    /// did not make must be empty.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Seconds the agent may take to become active (with --until-active the
    /// demo then fails; otherwise it says so and keeps running).
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    timeout: u64,
    /// Take the binaries from `cargo test --workspace --no-run` (for the
    /// test suite, which has just built them that way).
    #[arg(long, hide = true)]
    test_build: bool,
}

pub(crate) fn run(args: &[String]) -> Result<(), DemoError> {
    let options = Options::try_parse_from(
        std::iter::once("cargo xtask demo").chain(args.iter().map(String::as_str)),
    )
    .unwrap_or_else(|e| e.exit());
    #[cfg(not(feature = "embedded-broker"))]
    if broker::wants_embedded(options.embedded_broker) {
        return Err(HarnessError::Spawn {
            program: "cargo (building xtask with its embedded broker)".into(),
            source: crate::with_embedded_broker("demo", args),
        }
        .into());
    }
    let root = crate::workspace_root();
    let binaries = build(&root, options.test_build)?;
    let dir = options
        .dir
        .clone()
        .unwrap_or_else(|| root.join("target").join("demo"));
    let (work, leftovers) = WorkDir::prepare(&dir, "demo")?;
    for (name, pid) in leftovers {
        say(&format!(
            "stopped {name} (pid {pid}), left running by an earlier demo that was killed"
        ));
    }
    say(&format!("working directory {}", work.path().display()));
    let result = serve(&options, &binaries, &work);
    if matches!(&result, Err(e) if !matches!(e, DemoError::Harness(HarnessError::Interrupted(_)))) {
        // Everything has stopped by now; the logs say why it went wrong.
        for log in ["orchestrator.log", "agent.log", "mosquitto.log"] {
            print_tail(&work.file(log), 15);
        }
    }
    result
}

/// The two executables the demo runs.
#[derive(Debug)]
struct Binaries {
    agent: PathBuf,
    orchestrator: PathBuf,
}

/// `cargo build -p peaqos-agent -p peaqos-orchestrator` (what a user
/// needs, and no more), or with `test_build` `cargo test --workspace
/// --no-run`: the binaries as the test suite builds them. The suite's own
/// run of the demo uses the latter: the test build has other features
/// (dev-dependencies unify into it), so `cargo build` would compile about
/// a hundred crates a second time (measured: 74 s in a fresh CI run),
/// while this is a no-op there.
fn build(root: &Path, test_build: bool) -> Result<Binaries, DemoError> {
    let args: &[&str] = if test_build {
        &["test", "--workspace", "--no-run"]
    } else {
        &["build", "-p", AGENT, "-p", ORCHESTRATOR]
    };
    say(&format!(
        "building peaqos-agent and peaqos-orchestrator (cargo {})",
        args.join(" ")
    ));
    let built = crate::harness::cargo::cargo(root, args)?;
    Ok(Binaries {
        agent: built.executable(AGENT, "bin")?,
        orchestrator: built.executable(ORCHESTRATOR, "bin")?,
    })
}

fn serve(options: &Options, binaries: &Binaries, work: &WorkDir) -> Result<(), DemoError> {
    let events = Events::start()?;
    let mut stack = Stack::start(options, binaries, work, &events)?;
    let ending = stack.watch(options, &binaries.agent, work, &events)?;
    let why = ending.map_or_else(String::new, |signal| format!("{signal}: "));
    say(&format!(
        "{why}stopping the agent, the orchestrator and the broker"
    ));
    // Another Ctrl-C skips the grace period.
    let signals = events.signal_count();
    for (name, outcome) in stack.stop(&|| events.signal_count() > signals) {
        println!("  {name}: {outcome}");
    }
    let _ = std::fs::remove_file(work.file("pids"));
    Ok(())
}

/// Everything the demo started. Dropped (on an error) field by field in
/// this order: the agent first.
#[derive(Debug)]
struct Stack {
    agent: Managed,
    orchestrator: Orchestrator,
    broker: Broker,
    /// The controller address of the fresh key.
    address: String,
    orchestrator_url: String,
    /// The agent's configuration file.
    config: PathBuf,
}

impl Stack {
    fn start(
        options: &Options,
        binaries: &Binaries,
        work: &WorkDir,
        events: &Events,
    ) -> Result<Self, DemoError> {
        let interrupted = || events.interrupted();
        let key_file = work.file("controller.key");
        let address = Agent::native(&binaries.agent).keygen(&key_file)?;
        say(&format!(
            "controller key {} (fresh), address {address}",
            key_file.display()
        ));
        let registry = work.write("registry.toml", &config::registry_toml(&address))?;
        say(&format!(
            "registry {}: {IDENTITY} is controlled by {address}",
            registry.display()
        ));

        let orchestrator =
            start_orchestrator(&binaries.orchestrator, work, &registry, &interrupted)?;
        let orchestrator_url = orchestrator.url();
        say(&format!(
            "orchestrator {orchestrator_url} (pid {}; SQLite {}; log {})",
            orchestrator.child.pid(),
            work.file("orchestrator.db").display(),
            orchestrator.child.log.display()
        ));

        let broker = broker::start(work, options.embedded_broker, &interrupted)?;
        say(&format!(
            "MQTT broker {}: {}",
            broker.url(),
            broker.describe()
        ));

        let state_dir = work.create_dir("agent-state")?;
        let config = work.write(
            "agent.toml",
            &config::agent_toml(&AgentSettings {
                key_file: &key_file,
                state_dir: &state_dir,
                orchestrator_url: &orchestrator_url,
                broker_url: &broker.url(),
            }),
        )?;
        // Subscribed before the agent starts; the status is retained anyway.
        events.watch_agent(broker.port(), TOPIC_PREFIX);
        let mut command = child_command(&binaries.agent);
        command.arg("run").arg("--config").arg(&config);
        let agent = Managed::spawn("agent", command, &work.file("agent.log"), &work.pids())?;
        say(&format!(
            "agent started (pid {}; config {}; log {})",
            agent.pid(),
            config.display(),
            agent.log.display()
        ));
        Ok(Self {
            agent,
            orchestrator,
            broker,
            address,
            orchestrator_url,
            config,
        })
    }

    /// Shows the agent's status as published until a signal (returned) or,
    /// with --until-active, until the status answer says `active` (`None`).
    fn watch(
        &mut self,
        options: &Options,
        agent: &Path,
        work: &WorkDir,
        events: &Events,
    ) -> Result<Option<&'static str>, DemoError> {
        say(&format!(
            "the agent's status as it publishes it on {TOPIC_PREFIX}/status (times UTC):"
        ));
        let timeout = Duration::from_secs(options.timeout);
        let started = Instant::now();
        let mut shown = StatusLines::default();
        let mut active = false;
        let mut warned = false;
        loop {
            match events.next(Duration::from_millis(200)) {
                Some(Event::Signal(name)) => return Ok(Some(name)),
                Some(Event::Status(_, status)) => {
                    for line in shown.lines(&status) {
                        println!("{line}");
                    }
                    if !active && status["state"] == "active" {
                        active = true;
                        if options.until_active {
                            check_status_answer(agent, &self.config, &self.address)?;
                            say("the agent is active: done (--until-active)");
                            return Ok(None);
                        }
                        if let Err(e) = show_status_answer(agent, &self.config) {
                            // The status as published is there; keep running.
                            say(&format!("{e}; the demo keeps running"));
                        }
                        show_hints(agent, work, &self.orchestrator_url, &self.broker);
                    }
                }
                Some(Event::Availability(text)) => {
                    if let Some(line) = shown.availability(&text) {
                        println!("{line}");
                    }
                }
                None => {}
            }
            self.check_running()?;
            if !active && started.elapsed() > timeout {
                if options.until_active {
                    return Err(DemoError::NotActive {
                        timeout,
                        last: shown
                            .state
                            .clone()
                            .unwrap_or_else(|| "none published".into()),
                        log: self.agent.log.clone(),
                    });
                }
                if !warned {
                    warned = true;
                    say(&format!(
                        "the agent is not active after {timeout:?}; it keeps trying (see {})",
                        self.agent.log.display()
                    ));
                }
            }
        }
    }

    /// An error if any child has exited: none of them should on its own.
    fn check_running(&mut self) -> Result<(), DemoError> {
        let mosquitto = match &mut self.broker {
            Broker::Mosquitto { child, .. } => Some(child),
            Broker::Embedded { .. } => None,
        };
        for child in [
            Some(&mut self.agent),
            Some(&mut self.orchestrator.child),
            mosquitto,
        ]
        .into_iter()
        .flatten()
        {
            if let Some(status) = child.exited() {
                return Err(HarnessError::Exited {
                    what: child.name,
                    status,
                    log: child.log.clone(),
                }
                .into());
            }
        }
        Ok(())
    }

    /// Stops everything, the agent first: it publishes its final status and
    /// `offline` while the broker is still there.
    fn stop(mut self, hurry: &dyn Fn() -> bool) -> Vec<(&'static str, String)> {
        let mut stopped = vec![
            (
                self.agent.name,
                self.agent.stop(STOP_GRACE, hurry).to_string(),
            ),
            (
                self.orchestrator.child.name,
                self.orchestrator.child.stop(STOP_GRACE, hurry).to_string(),
            ),
        ];
        match &mut self.broker {
            Broker::Mosquitto { child, .. } => {
                stopped.push((child.name, child.stop(STOP_GRACE, hurry).to_string()));
            }
            Broker::Embedded { .. } => {
                stopped.push(("embedded broker", "ends with this process".into()));
            }
        }
        stopped
    }
}

/// The orchestrator with its SQLite database in the demo directory and
/// the registry naming the fresh key.
fn start_orchestrator(
    binary: &Path,
    work: &WorkDir,
    registry: &Path,
    interrupted: &dyn Fn() -> Option<&'static str>,
) -> Result<Orchestrator, HarnessError> {
    let database = format!("sqlite://{}", work.file("orchestrator.db").display());
    let mut command = child_command(binary);
    command
        .env("DATABASE_URL", &database)
        .env("PEAQOS_MCR_REGISTRY_FILE", registry)
        // Registry edits take effect within seconds.
        .env("PEAQOS_MCR_CACHE_TTL_SECS", "2")
        .env("PEAQOS_PROOF_MAX_AGE_SECS", PROOF_LIFETIME_SECS.to_string());
    orchestrator::start(
        command,
        &work.file("orchestrator.log"),
        &work.pids(),
        interrupted,
    )
}

fn show_status_answer(agent: &Path, config: &Path) -> Result<(), DemoError> {
    say(&format!(
        "the agent's answer over MQTT (peaqos-agent status --config {}):",
        config.display()
    ));
    for line in Agent::native(agent).status(config, false)?.lines() {
        println!("  {line}");
    }
    Ok(())
}

/// The JSON answer must say `active`, for our identity and key.
fn check_status_answer(agent: &Path, config: &Path, address: &str) -> Result<(), DemoError> {
    say(&format!(
        "the agent's answer over MQTT (peaqos-agent status --json --config {}):",
        config.display()
    ));
    let text = Agent::native(agent).status(config, true)?;
    print!("{text}");
    agent::expect_active(&text, IDENTITY, address)?;
    Ok(())
}

fn show_hints(agent: &Path, work: &WorkDir, orchestrator_url: &str, broker: &Broker) {
    let agent = agent.display();
    let config = work.file("agent.toml");
    let config = config.display();
    say("all up. Meanwhile, in another terminal:");
    println!("  {agent} status --config {config}\n      the agent's status, asked over MQTT");
    println!("  {agent} check --config {config}\n      the agent's own checks");
    println!(
        "  curl -s {orchestrator_url}/api/v1/machines\n      the machine record at the orchestrator"
    );
    println!(
        "  mosquitto_sub -V 5 -p {} -t '{TOPIC_PREFIX}/#' -v\n      every topic of the agent (Mosquitto's clients)",
        broker.port()
    );
    println!(
        "  remove the address from {}\n      the agent reports not_controller within half a minute; put it back and it recovers",
        work.file("registry.toml").display()
    );
    say(&format!(
        "proofs last {PROOF_LIFETIME_SECS} s here: the agent renews its proof about every {} s",
        PROOF_LIFETIME_SECS * 2 / 3
    ));
    say("running; Ctrl-C stops the agent, the orchestrator and the broker");
}

/// The lines shown for the agent's published status: one per change that
/// matters to a person watching, not one per republish or retry. The
/// in-between states (`registering`, `activating`, `renewing`) are held
/// back until the agent settles: shown (with their own times) when it
/// settles somewhere new, dropped when a retry changed nothing (a
/// `not_controller` retried every few seconds prints nothing new).
#[derive(Debug, Default)]
struct StatusLines {
    /// The last state published.
    state: Option<String>,
    /// The last settled state and its detail, as shown.
    settled: Option<String>,
    /// In-between states not shown yet: (state and detail, line).
    held: Vec<(String, String)>,
    availability: Option<String>,
}

impl StatusLines {
    fn lines(&mut self, status: &Value) -> Vec<String> {
        let state = status["state"].as_str().unwrap_or("?").to_owned();
        let text = |v: &Value| v.as_str().map(str::to_owned);
        // Times of day (UTC) are enough to follow the demo.
        let clock = |v: &Value, len: usize| {
            v.as_str()
                .and_then(|t| t.get(11..11 + len))
                .map(str::to_owned)
        };
        let mut detail = String::new();
        if let Some(id) = text(&status["machineId"]) {
            let _ = write!(detail, "machine {id}");
        }
        match &status["lastError"] {
            Value::Object(e) if !matches!(state.as_str(), "active" | "renewing") => {
                let code = e.get("code").and_then(Value::as_str).unwrap_or("?");
                let message = e.get("message").and_then(Value::as_str).unwrap_or("");
                let sep = if detail.is_empty() { "" } else { ": " };
                if message.contains(code) {
                    let _ = write!(detail, "{sep}{message}");
                } else {
                    let _ = write!(detail, "{sep}{code}: {message}");
                }
            }
            _ => {
                if let Some(at) = clock(&status["proofVerifiedAt"], 8) {
                    let _ = write!(detail, ", proof verified {at}");
                }
                if let Some(at) = clock(&status["proofExpiresAt"], 8) {
                    let _ = write!(detail, ", expires {at}");
                }
            }
        }
        let key = format!("{state:<14} {detail}");
        if let Some(at) = clock(&status["nextAttemptAt"], 8)
            && !matches!(state.as_str(), "active" | "renewing")
        {
            let _ = write!(detail, "; retry at {at}");
        }
        let time = clock(&status["timestamp"], 12).unwrap_or_default();
        let line = format!("  {time:<12}  {state:<14} {detail}")
            .trim_end()
            .to_owned();
        self.state = Some(state.clone());
        if matches!(state.as_str(), "registering" | "activating" | "renewing") {
            if self.held.last().is_none_or(|(held, _)| *held != key) {
                self.held.push((key, line));
            }
            return Vec::new();
        }
        if self.settled.as_deref() == Some(key.as_str()) {
            self.held.clear();
            return Vec::new();
        }
        self.settled = Some(key);
        let mut lines: Vec<String> = self.held.drain(..).map(|(_, line)| line).collect();
        lines.push(line);
        lines
    }

    fn availability(&mut self, text: &str) -> Option<String> {
        if self.availability.as_deref() == Some(text) {
            return None;
        }
        self.availability = Some(text.to_owned());
        Some(format!("  {:<12}  (availability: {text})", ""))
    }
}

fn say(text: &str) {
    println!("demo: {text}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(state: &str, verified: Option<&str>, error: Option<(&str, &str)>) -> Value {
        serde_json::json!({
            "state": state,
            "machineId": verified.map(|_| "mach_1"),
            "proofVerifiedAt": verified,
            "proofExpiresAt": null,
            "lastError": error.map(|(code, message)| serde_json::json!({"code": code, "message": message})),
            "nextAttemptAt": error.map(|_| "2026-01-01T10:00:05.000Z"),
            "timestamp": "2026-01-01T10:00:01.250Z",
        })
    }

    #[test]
    fn a_line_per_change_not_per_republish_or_retry() {
        let proof = Some("2026-01-01T10:00:00.000Z");
        let mut lines = StatusLines::default();
        let backoff = status("backoff", None, Some(("NETWORK", "cannot reach")));
        assert_eq!(
            lines.lines(&backoff),
            ["  10:00:01.250  backoff        NETWORK: cannot reach; retry at 10:00:05"]
        );
        assert!(lines.lines(&backoff).is_empty(), "a republish");
        // In-between states wait for where the agent settles.
        assert!(lines.lines(&status("registering", None, None)).is_empty());
        assert!(lines.lines(&status("registering", None, None)).is_empty());
        let shown = lines.lines(&status("active", proof, None));
        assert_eq!(shown.len(), 2, "{shown:?}");
        assert!(shown[0].ends_with("registering"), "{shown:?}");
        assert!(
            shown[1].ends_with("active         machine mach_1, proof verified 10:00:00"),
            "{shown:?}"
        );
        // A retry that ends where it started shows nothing; a change does.
        let refused = status(
            "not_controller",
            proof,
            Some((
                "MACHINE_NOT_ACTIVATED",
                "HTTP 409 MACHINE_NOT_ACTIVATED: no controller",
            )),
        );
        assert_eq!(lines.lines(&refused).len(), 1);
        assert!(lines.lines(&status("activating", proof, None)).is_empty());
        assert!(lines.lines(&refused).is_empty(), "the same refusal again");
        assert!(lines.lines(&status("activating", proof, None)).is_empty());
        let back = lines.lines(&status("active", proof, None));
        assert_eq!(back.len(), 2, "activating, then active again: {back:?}");
        assert_eq!(lines.state.as_deref(), Some("active"));
    }

    #[test]
    fn options_parse_and_reject() {
        let parse = |args: &[&str]| {
            Options::try_parse_from(std::iter::once("cargo xtask demo").chain(args.iter().copied()))
        };
        let o = parse(&["--until-active", "--embedded-broker", "--dir", "/tmp/x"]).unwrap();
        assert!(o.until_active && o.embedded_broker);
        assert_eq!(o.dir.as_deref(), Some(Path::new("/tmp/x")));
        assert_eq!(o.timeout, 60);
        assert!(parse(&["--timeout", "soon"]).is_err());
        assert!(parse(&["--until-activ"]).is_err());
    }
}
