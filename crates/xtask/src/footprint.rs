//! `cargo xtask footprint`: the agent's footprint on this machine, against a
//! baseline measured in the same run, as a markdown table for the README.
//!
//! Builds `peaqos-agent` and the baseline (`examples/footprint_baseline.rs`:
//! the agent's runtime and client stack doing nothing) with the profile the
//! agent ships with, and `peaqos-orchestrator` with `--release`. Then, per
//! run: a fresh orchestrator (SQLite, a registry file naming a fresh key)
//! on a free loopback port, the baseline, the agent with MQTT off and (with
//! an MQTT broker: Mosquitto when installed, else the demo's embedded one)
//! the agent with MQTT on, each timed from exec to its first signature and
//! to `active` (from the agent's own log stamps), then all of them left
//! idle; at the end of the idle period, resident memory and the CPU time
//! spent idle.
//!
//! Beside the x86-64 sizes, the agent's size for each board (aarch64,
//! armv7), cross-built as `cargo xtask arm` builds it, when this machine
//! has the toolchain (`.ci/install-tools`); the table says what is missing
//! otherwise.
//!
//! Linux only: it reads `/proc/<pid>/stat` and `/proc/<pid>/status`.
//!
//! The sequence (build, start, measure, idle, report) is here; starting
//! and waiting for each child is `children`, and the milestones, /proc, the
//! report and errors have modules of their own.
//! Children run in process groups of their own and are stopped on every
//! way out (the demo's process handling, including its `pids` file for a
//! killed xtask); every wait is bounded. Files go to `target/footprint/`.

mod children;
mod error;
mod milestones;
mod procfs;
pub(crate) mod report;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;

#[cfg(test)]
use self::children::http_status;
use self::children::registry_toml;
use self::children::{AgentSettings, Variant, start_agent, start_baseline, start_orchestrator};
pub(crate) use self::error::FootprintError;
use self::milestones::{Milestone, Reference};
use self::report::{AgentRun, Idle, Report, Run, Sizes, StartTimes};
use crate::arm::{
    self,
    toolchain::{self, BOARDS},
};
use crate::harness::agent::Agent;
use crate::harness::agent_config::AgentConfig;
use crate::harness::broker::{self, Broker};
use crate::harness::cargo::{AGENT, ORCHESTRATOR};
use crate::harness::events::{Event, Events};
use crate::harness::log::Tail;
use crate::harness::orchestrator::{self, Orchestrator};
use crate::harness::print_tail;
use crate::harness::process::{Managed, STOP_GRACE, StopOutcome, child_command};
use crate::harness::workdir::{WorkDir, toml_string};

const BASELINE: &str = "footprint_baseline";
/// What the baseline prints once `/health` has answered
/// (examples/footprint_baseline.rs).
const BASELINE_READY: &str = "footprint_baseline: idle until SIGTERM";
/// The agent's identity; the one of the MQTT-on agent is another, so that
/// the two do not take each other's record. The run's key controls both.
const IDENTITY: &str = "did:peaq:4242";
const IDENTITY_MQTT: &str = "did:peaq:4243";
/// How long the orchestrator may take to answer `/ready` once it listens,
/// and the baseline to get its answer.
const ORCHESTRATOR_READY: Duration = Duration::from_secs(30);
const BASELINE_START: Duration = Duration::from_secs(10);
/// How often logs are read while waiting. The figures come from the
/// agent's log stamps; this only decides when the wait ends.
const POLL: Duration = Duration::from_millis(5);

/// Measures peaqos-agent's footprint (stripped size, resident memory, idle
/// CPU, time from exec to its first signature and to `active`) against a
/// baseline measured in the same run, and prints a markdown table (stdout;
/// progress on stderr). Linux only: it reads /proc. Files (logs, configs,
/// databases) go to target/footprint/.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask footprint")]
struct Options {
    /// How long the agents and the baseline stay idle after the agents are
    /// active, before their memory and CPU time are read (e.g. 60s, 5m).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    idle: Duration,
    /// Runs, each against a fresh orchestrator and database.
    #[arg(long, value_name = "N", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    runs: u32,
    /// How long an agent may take from exec to `active`.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
    /// Leave out the agent with MQTT on (and the broker it needs).
    #[arg(long)]
    no_mqtt: bool,
}

pub(crate) fn run(args: &[String]) -> Result<(), FootprintError> {
    let command = std::iter::once("cargo xtask footprint")
        .chain(args.iter().map(String::as_str))
        .collect::<Vec<_>>();
    let options = Options::try_parse_from(&command).unwrap_or_else(|e| e.exit());
    if !cfg!(target_os = "linux") {
        return Err(FootprintError::NotLinux);
    }
    #[cfg(not(feature = "embedded-broker"))]
    if !options.no_mqtt && broker::wants_embedded(false) {
        return Err(FootprintError::Harness(
            crate::harness::HarnessError::Spawn {
                program: "cargo (building xtask with its embedded broker)".into(),
                source: crate::with_embedded_broker("footprint", args),
            },
        ));
    }
    let root = crate::workspace_root();
    let binaries = build(&root)?;
    let sizes = Sizes {
        agent: file_size(&binaries.agent)?,
        baseline: file_size(&binaries.baseline)?,
        boards: board_sizes(&root)?,
    };
    say(&format!(
        "stripped executables: {} {} B, baseline {} B",
        AGENT,
        report::thousands(sizes.agent as f64, 0),
        report::thousands(sizes.baseline as f64, 0)
    ));
    let (work, leftovers) = WorkDir::prepare(&root.join("target").join("footprint"), "footprint")?;
    for (name, pid) in leftovers {
        say(&format!(
            "stopped {name} (pid {pid}), left running by an earlier run that was killed"
        ));
    }
    say(&format!("working directory {}", work.path().display()));
    let events = Events::start()?;
    let report = match measure(&options, &binaries, sizes, &work, &events) {
        Ok(report) => Report {
            command: command.join(" "),
            ..report
        },
        Err(e) => {
            // Everything has stopped by now; the log says why.
            if let Some(log) = e.log() {
                print_tail(log, 15);
            }
            return Err(e);
        }
    };
    let text = report.markdown();
    print!("{text}");
    let saved = work.write("footprint.md", &text)?;
    let _ = std::fs::remove_file(work.file("pids"));
    say(&format!("the table is also in {}", saved.display()));
    Ok(())
}

fn measure(
    options: &Options,
    binaries: &Binaries,
    sizes: Sizes,
    work: &WorkDir,
    events: &Events,
) -> Result<Report, FootprintError> {
    let broker = if options.no_mqtt {
        None
    } else {
        let broker = broker::start(work, false, &|| events.interrupted())?;
        say(&format!(
            "MQTT broker {}: {}",
            broker.url(),
            broker.describe()
        ));
        Some(broker)
    };
    let machine = machine();
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    if let Some(load) = load_average().filter(|&load| load > cpus as f64 / 2.0) {
        say(&format!(
            "warning: load average {load:.2} on {cpus} CPUs: other work will make the start-up times noisy"
        ));
    }
    let mut runs = Vec::new();
    for n in 1..=options.runs {
        say(&format!("run {n} of {}", options.runs));
        let run = measure_run(n, options, binaries, work, events, broker.as_ref())?;
        say(&summary(&run));
        runs.push(run);
    }
    Ok(Report {
        command: String::new(),
        machine,
        broker: broker.as_ref().map(broker_name),
        idle: options.idle,
        tick: procfs::tick(),
        sizes,
        runs,
    })
}

/// One run. Children are dropped (stopped) in reverse order of start on
/// an error: the agents first, the orchestrator last.
fn measure_run(
    n: u32,
    options: &Options,
    binaries: &Binaries,
    work: &WorkDir,
    events: &Events,
    broker: Option<&Broker>,
) -> Result<Run, FootprintError> {
    let dir = work.create_dir(&format!("run-{n}"))?;
    let key_file = dir.join("controller.key");
    let address = Agent::native(&binaries.agent).keygen(&key_file)?;
    let registry = write(&dir.join("registry.toml"), &registry_toml(&address))?;
    let mut orchestrator =
        start_orchestrator(&binaries.orchestrator, &dir, &registry, work, events)?;
    let url = orchestrator.url();
    let (mut baseline, baseline_answer) =
        start_baseline(&binaries.baseline, &dir, &url, work, events)?;
    let start = |variant: &Variant| -> Result<(Managed, StartTimes), FootprintError> {
        let settings = AgentSettings {
            dir: &dir,
            key_file: &key_file,
            orchestrator_url: &url,
        };
        start_agent(
            variant,
            &binaries.agent,
            &settings,
            options.timeout,
            work,
            events,
        )
    };
    let (mut agent, agent_start) = start(&Variant::plain())?;
    let mut mqtt = broker.map(|b| start(&Variant::mqtt(b.url()))).transpose()?;

    let before_agent = procfs::sample(agent.pid(), "agent")?;
    let before_mqtt = match &mqtt {
        Some((child, _)) => Some(procfs::sample(child.pid(), "agent-mqtt")?),
        None => None,
    };
    let before_baseline = procfs::sample(baseline.pid(), "baseline")?;
    {
        let mut watched = vec![&mut orchestrator.child, &mut baseline, &mut agent];
        if let Some((child, _)) = &mut mqtt {
            watched.push(child);
        }
        idle(options.idle, events, &mut watched)?;
    }
    let idle_of = |child: &Managed, before: procfs::Sample| -> Result<Idle, FootprintError> {
        let end = procfs::sample(child.pid(), child.name)?;
        Ok(Idle {
            end,
            ticks: end.cpu_ticks.saturating_sub(before.cpu_ticks),
        })
    };
    let run = Run {
        agent: AgentRun {
            start: agent_start,
            idle: idle_of(&agent, before_agent)?,
        },
        agent_mqtt: match (&mqtt, before_mqtt) {
            (Some((child, start)), Some(before)) => Some(AgentRun {
                start: *start,
                idle: idle_of(child, before)?,
            }),
            _ => None,
        },
        baseline: idle_of(&baseline, before_baseline)?,
        baseline_answer,
    };

    let signals = events.signal_count();
    let hurry = || events.signal_count() > signals;
    let mut children = Vec::new();
    if let Some((child, _)) = mqtt.as_mut() {
        children.push(child);
    }
    children.extend([&mut agent, &mut baseline, &mut orchestrator.child]);
    for child in children {
        match child.stop(STOP_GRACE, &hurry) {
            StopOutcome::Stopped(status) if status.success() => {}
            outcome => say(&format!("warning: {} {outcome} on SIGTERM", child.name)),
        }
    }
    Ok(run)
}

/// Waits `duration`, failing if a child exits or a signal arrives.
fn idle(
    duration: Duration,
    events: &Events,
    children: &mut [&mut Managed],
) -> Result<(), FootprintError> {
    say(&format!("idle for {}", report::humane(duration)));
    let deadline = Instant::now() + duration;
    loop {
        for child in children.iter_mut() {
            if let Some(status) = child.exited() {
                return Err(FootprintError::Exited {
                    what: child.name,
                    status,
                    when: "during the idle period",
                    log: child.log.clone(),
                });
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        if let Some(Event::Signal(signal)) = events.next(left.min(Duration::from_secs(1))) {
            return Err(FootprintError::Interrupted(signal));
        }
    }
}

/// The executables, as cargo reported them.
#[derive(Debug)]
struct Binaries {
    agent: PathBuf,
    baseline: PathBuf,
    orchestrator: PathBuf,
}

fn build(root: &Path) -> Result<Binaries, FootprintError> {
    say(
        "building peaqos-agent and the baseline (--profile minsize), peaqos-orchestrator (--release)",
    );
    let cargo = |args: &[&str]| crate::harness::cargo::cargo(root, args);
    let agent = cargo(&["build", "--profile", "minsize", "-p", AGENT])?.executable(AGENT, "bin")?;
    // A cargo call of its own: an example builds with the package's
    // dev-dependencies, whose features (tokio's `test-util`, hyper's
    // `server` ...) would otherwise reach the agent's executable too.
    let baseline = cargo(&[
        "build",
        "--profile",
        "minsize",
        "-p",
        AGENT,
        "--example",
        BASELINE,
    ])?
    .executable(BASELINE, "example")?;
    let orchestrator =
        cargo(&["build", "--release", "-p", ORCHESTRATOR])?.executable(ORCHESTRATOR, "bin")?;
    Ok(Binaries {
        agent,
        baseline,
        orchestrator,
    })
}

/// The agent cross-built for each board whose toolchain this machine has
/// (the build `cargo xtask arm` runs); for the others, what is missing.
fn board_sizes(root: &Path) -> Result<Vec<report::BoardSize>, FootprintError> {
    let mut sizes = Vec::new();
    for board in BOARDS {
        let size = match toolchain::find(&[board], false) {
            Ok(_) => {
                say(&format!(
                    "cross-building peaqos-agent (--profile minsize) for {}",
                    board.target
                ));
                Ok(file_size(&arm::build_agent(root, Some(&board))?)?)
            }
            Err(missing) => Err(format!(
                "missing {} (.ci/install-tools installs it)",
                missing.join(", ")
            )),
        };
        sizes.push((board.target, size));
    }
    Ok(sizes)
}

fn file_size(path: &Path) -> Result<u64, FootprintError> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|source| FootprintError::Io {
            action: "read the size of",
            path: path.to_owned(),
            source,
        })
}

fn write(path: &Path, text: &str) -> Result<PathBuf, FootprintError> {
    std::fs::write(path, text).map_err(|source| FootprintError::Io {
        action: "write",
        path: path.to_owned(),
        source,
    })?;
    Ok(path.to_owned())
}

/// A duration such as `60s`, `500ms`, `5m`, `1h`, or whole seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 60s, 500ms or 5m"))?;
    let duration = match unit {
        "" | "s" => Duration::from_secs(number),
        "ms" => Duration::from_millis(number),
        "m" | "min" => Duration::from_secs(number.saturating_mul(60)),
        "h" => Duration::from_secs(number.saturating_mul(3600)),
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (ms, s, m or h)")),
    };
    if duration.is_zero() {
        return Err(format!("{text:?}: must be more than zero"));
    }
    Ok(duration)
}

/// The machine the figures are from, in one line.
fn machine() -> String {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let kernel = read("/proc/sys/kernel/osrelease");
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        matches!(key.trim(), "model name" | "Model" | "Hardware").then(|| value.trim().to_owned())
    });
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let mut text = format!(
        "Linux {} {}, {cpus} CPUs",
        kernel.trim(),
        std::env::consts::ARCH
    );
    if let Some(model) = model {
        let _ = write!(text, " ({model})");
    }
    if let Some(load) = load_average() {
        let _ = write!(text, ", load average {load:.2} at the start");
    }
    text
}

/// The one-minute load average: other work on the machine makes the
/// start-up times noisy (memory and idle CPU much less so).
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn broker_name(broker: &Broker) -> String {
    match broker {
        Broker::Mosquitto { .. } => "a private Mosquitto".to_owned(),
        Broker::Embedded { .. } => {
            "the rumqttd broker embedded in xtask (no Mosquitto installed)".to_owned()
        }
    }
}

/// One line per run, for the progress output.
fn summary(run: &Run) -> String {
    let agent = |name: &str, a: &AgentRun| {
        format!(
            "{name}: first signature {:.1} ms, active {:.1} ms, VmRSS {} KiB, idle CPU {} ticks",
            a.start.first_signature.as_secs_f64() * 1000.0,
            a.start.active.as_secs_f64() * 1000.0,
            a.idle.end.rss_kib,
            a.idle.ticks
        )
    };
    let mut text = agent("agent", &run.agent);
    if let Some(m) = &run.agent_mqtt {
        text.push_str("; ");
        text.push_str(&agent("MQTT on", m));
    }
    let _ = write!(
        text,
        "; baseline: /health answered {:.1} ms, VmRSS {} KiB, idle CPU {} ticks",
        run.baseline_answer.as_secs_f64() * 1000.0,
        run.baseline.end.rss_kib,
        run.baseline.ticks
    );
    text
}

fn say(text: &str) {
    eprintln!("footprint: {text}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_and_reject() {
        let parse = |args: &[&str]| {
            Options::try_parse_from(
                std::iter::once("cargo xtask footprint").chain(args.iter().copied()),
            )
        };
        let o = parse(&[]).unwrap();
        assert_eq!(
            (o.idle, o.runs, o.timeout, o.no_mqtt),
            (Duration::from_secs(60), 5, Duration::from_secs(30), false)
        );
        let o = parse(&["--idle", "5m", "--runs", "1", "--no-mqtt"]).unwrap();
        assert_eq!(
            (o.idle, o.runs, o.no_mqtt),
            (Duration::from_secs(300), 1, true)
        );
        for bad in [
            &["--runs", "0"][..],
            &["--idle", "soon"],
            &["--idle", "0s"],
            &["--idle", "10d"],
            &["--idl", "5s"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn http_status_lines_are_read() {
        assert_eq!(
            http_status(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"),
            Some(200)
        );
        assert_eq!(
            http_status(b"HTTP/1.1 503 Service Unavailable\r\n\r\n"),
            Some(503)
        );
        assert_eq!(http_status(b"HTTP/2 200\r\n"), None);
        assert_eq!(http_status(b"SSH-2.0-OpenSSH_9.2\r\n"), None);
        assert_eq!(http_status(b""), None);
    }

    #[test]
    fn durations_take_the_usual_units() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        let err = parse_duration("1.5s").unwrap_err();
        assert!(
            err.contains("unknown unit") && err.contains("1.5s"),
            "{err}"
        );
        assert!(parse_duration("s").unwrap_err().contains("not a duration"));
    }
}
