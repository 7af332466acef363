//! `cargo xtask arm`: the agent on the boards fleets use, without a board.
//!
//! Cross-builds the `minsize` agent (the profile the packages ship) for
//! aarch64 and armv7 with Debian's cross toolchains, then runs each under
//! qemu-user as an operator would on the board: `keygen`, `address`,
//! `check`, then `run` against the real x86-64 orchestrator (release,
//! SQLite, port 0) until it publishes `active` on a private MQTT broker,
//! and the status query (`peaqos-agent status --json` of the x86-64
//! build) must answer `active` for its identity and key; SIGTERM must stop
//! it cleanly. With `--debs`, the Debian packages are made from these very
//! executables (`cargo deb --no-build`: each target is compiled once) for
//! x86-64 (agent and orchestrator) and the boards (the agent), and lintian
//! checks every one of them; each shipped executable in them must carry its
//! dependency list, which `cargo audit bin` checks against the RustSec
//! snapshot (`arm/audit.rs`). Files go to `target/arm/`.

mod audit;
mod debs;
mod error;
pub(crate) mod toolchain;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;

pub(crate) use self::error::ArmError;
use self::toolchain::{BOARDS, Board};
use crate::harness::agent::{self, Agent};
use crate::harness::agent_config::AgentConfig;
use crate::harness::broker::{self, Broker};
use crate::harness::cargo::{AGENT, ORCHESTRATOR, cargo, shipping_build};
use crate::harness::events::{Event, Events};
use crate::harness::orchestrator::{self, Orchestrator};
use crate::harness::process::{Managed, STOP_GRACE, StopOutcome, child_command};
use crate::harness::workdir::{WorkDir, toml_string};
use crate::harness::{HarnessError, print_tail};

/// Cross-builds the minsize agent for aarch64 and armv7, runs each under
/// qemu-user against the x86-64 orchestrator until `active` (and asks its
/// status over MQTT); with --debs, packages and lints. Files go to
/// target/arm/.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask arm")]
struct Options {
    /// A board's Rust target (repeat for several) [default: both,
    /// aarch64-unknown-linux-gnu and armv7-unknown-linux-gnueabihf].
    #[arg(long = "target", value_name = "TRIPLE")]
    targets: Vec<String>,
    /// Also make the Debian packages from these builds (x86-64: agent and
    /// orchestrator; the boards: the agent) and check each with lintian.
    #[arg(long)]
    debs: bool,
    /// Seconds an emulated agent may take from exec to `active`.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    timeout: u64,
    /// Take the x86-64 agent and orchestrator (the run's orchestrator, the
    /// status query, the x86-64 packages) from `cargo test --workspace
    /// --no-run` instead of the shipping profiles: CI has just built them
    /// that way, and a second x86-64 build of both would cost it minutes.
    #[arg(long)]
    test_build: bool,
}

pub(crate) fn run(args: &[String]) -> Result<(), ArmError> {
    let options = Options::try_parse_from(
        std::iter::once("cargo xtask arm").chain(args.iter().map(String::as_str)),
    )
    .unwrap_or_else(|e| e.exit());
    let boards = if options.targets.is_empty() {
        BOARDS.to_vec()
    } else {
        options
            .targets
            .iter()
            .map(|t| Board::by_target(t).ok_or_else(|| ArmError::UnknownTarget(t.clone())))
            .collect::<Result<_, _>>()?
    };
    let tools = toolchain::find(&boards, options.debs).map_err(ArmError::Missing)?;
    let root = crate::workspace_root();

    let native = build_native(&root, options.test_build)?;
    say(&format!(
        "cross-building peaqos-agent (--profile minsize) for {}",
        boards
            .iter()
            .map(|b| b.target)
            .collect::<Vec<_>>()
            .join(" and ")
    ));
    let binaries = build_boards(&root, &boards)?;
    let emulated: Vec<(Board, Agent)> = boards
        .iter()
        .zip(&binaries)
        .zip(&tools.qemu)
        .map(|((board, binary), qemu)| (*board, Agent::emulated(binary, qemu, board.sysroot())))
        .collect();

    let (work, leftovers) = WorkDir::prepare(&root.join("target").join("arm"), "arm")?;
    for (name, pid) in leftovers {
        say(&format!(
            "stopped {name} (pid {pid}), left running by an earlier run that was killed"
        ));
    }
    say(&format!("working directory {}", work.path().display()));
    let setup = Setup {
        native_agent: Agent::native(&native.agent),
        orchestrator: native.orchestrator.clone(),
        timeout: Duration::from_secs(options.timeout),
    };
    let runs = match emulate(&setup, &emulated, &work) {
        Ok(runs) => runs,
        Err(e) => {
            if let Some(log) = e.log() {
                print_tail(log, 20);
            }
            return Err(e);
        }
    };
    let _ = std::fs::remove_file(work.file("pids"));

    // The test build's agent is no measure of the shipped one's size.
    let mut sizes = Vec::new();
    if !options.test_build {
        sizes.push(("x86_64-unknown-linux-gnu", file_size(&native.agent)?));
    }
    for (board, agent) in &emulated {
        sizes.push((board.target, file_size(agent.binary())?));
    }
    let table = summary(&sizes, &runs);
    if options.debs {
        let x86 = if options.test_build {
            debs::Native::TestBuild(&native)
        } else {
            debs::Native::Shipping
        };
        debs::build_and_lint(&root, &work, &boards, &x86)?;
    }
    print!("{table}");
    work.write("arm.md", &table)?;
    Ok(())
}

/// The x86-64 executables.
#[derive(Debug)]
pub(crate) struct Native {
    pub(crate) agent: PathBuf,
    pub(crate) orchestrator: PathBuf,
}

/// The shipping builds (`--profile minsize` agent, `--release`
/// orchestrator), or with `test_build` the test suite's.
fn build_native(root: &Path, test_build: bool) -> Result<Native, HarnessError> {
    if test_build {
        say("x86-64 peaqos-agent and peaqos-orchestrator: cargo test --workspace --no-run");
        let built = cargo(root, &["test", "--workspace", "--no-run", "--locked"])?;
        return Ok(Native {
            agent: built.executable(AGENT, "bin")?,
            orchestrator: built.executable(ORCHESTRATOR, "bin")?,
        });
    }
    say("building peaqos-agent (--profile minsize) and peaqos-orchestrator (--release) for x86-64");
    Ok(Native {
        agent: build_agent(root, None)?,
        orchestrator: {
            let mut args = shipping_build();
            args.extend(["--locked", "--release", "-p", ORCHESTRATOR]);
            cargo(root, &args)?.executable(ORCHESTRATOR, "bin")?
        },
    })
}

/// `cargo [auditable] build --locked --profile minsize -p peaqos-agent
/// [--target T]`: the agent as the packages ship it. `footprint` measures
/// the same builds.
pub(crate) fn build_agent(root: &Path, board: Option<&Board>) -> Result<PathBuf, HarnessError> {
    let mut args = shipping_build();
    args.extend(["--locked", "--profile", "minsize", "-p", AGENT]);
    if let Some(board) = board {
        args.extend(["--target", board.target]);
    }
    cargo(root, &args)?.executable_for(AGENT, "bin", board.map(|b| b.target))
}

/// The agent for every board in one cargo call: while one target's
/// single-threaded LTO runs, the other's crates compile on the other core.
fn build_boards(root: &Path, boards: &[Board]) -> Result<Vec<PathBuf>, HarnessError> {
    let mut args = shipping_build();
    args.extend(["--locked", "--profile", "minsize", "-p", AGENT]);
    for board in boards {
        args.extend(["--target", board.target]);
    }
    let built = cargo(root, &args)?;
    boards
        .iter()
        .map(|board| built.executable_for(AGENT, "bin", Some(board.target)))
        .collect()
}

#[derive(Debug)]
struct Setup {
    /// The x86-64 agent, whose `status --json` asks the emulated ones.
    native_agent: Agent,
    orchestrator: PathBuf,
    timeout: Duration,
}

/// What one emulated agent did.
#[derive(Debug)]
struct BoardRun {
    board: &'static str,
    address: String,
    machine_id: String,
    /// From exec (under qemu) to its `active` status on the broker.
    active_after: Duration,
}

/// Where an agent's files are and what it is.
#[derive(Debug)]
struct Prepared {
    board: Board,
    agent: Agent,
    identity: String,
    key_file: PathBuf,
    address: String,
}

fn emulate(
    setup: &Setup,
    boards: &[(Board, Agent)],
    work: &WorkDir,
) -> Result<Vec<BoardRun>, ArmError> {
    let events = Events::start()?;
    // Keys first: the registry that names them is the orchestrator's.
    let mut prepared = Vec::new();
    for (n, (board, agent)) in boards.iter().enumerate() {
        let key_file = work.file(&format!("{}.key", board.short));
        let address = agent.keygen(&key_file)?;
        let printed = agent.address(&key_file)?;
        if printed != address {
            return Err(ArmError::AddressMismatch {
                board: board.short,
                generated: address,
                printed,
            });
        }
        say(&format!(
            "{}: keygen and address under {}: {address}",
            board.short,
            qemu_name(board)
        ));
        prepared.push(Prepared {
            board: *board,
            agent: agent.clone(),
            identity: format!("did:peaq:{}", 7001 + n),
            key_file,
            address,
        });
    }
    let registry = work.write("registry.toml", &registry_toml(&prepared))?;
    let mut command = child_command(&setup.orchestrator);
    command
        .env(
            "DATABASE_URL",
            format!("sqlite://{}", work.file("orchestrator.db").display()),
        )
        .env("PEAQOS_MCR_REGISTRY_FILE", &registry);
    let mut orchestrator = orchestrator::start(
        command,
        &work.file("orchestrator.log"),
        &work.pids(),
        &|| events.interrupted(),
    )?;
    say(&format!(
        "orchestrator (x86-64) {} (log {})",
        orchestrator.url(),
        orchestrator.child.log.display()
    ));
    let mut broker = broker::start(work, false, &|| events.interrupted())?;
    say(&format!(
        "MQTT broker {}: {}",
        broker.url(),
        broker.describe()
    ));
    let mut runs = Vec::new();
    for p in &prepared {
        runs.push(run_board(
            setup,
            p,
            work,
            &events,
            &mut orchestrator,
            &mut broker,
        )?);
    }
    let hurry = || false;
    let _ = orchestrator.child.stop(STOP_GRACE, &hurry);
    if let Broker::Mosquitto { child, .. } = &mut broker {
        let _ = child.stop(STOP_GRACE, &hurry);
    }
    Ok(runs)
}

fn run_board(
    setup: &Setup,
    p: &Prepared,
    work: &WorkDir,
    events: &Events,
    orchestrator: &mut Orchestrator,
    broker: &mut Broker,
) -> Result<BoardRun, ArmError> {
    let board = p.board.short;
    let prefix = format!("peaqos/arm-{board}");
    let state_dir = work.create_dir(&format!("{board}-state"))?;
    let config = work.write(
        &format!("{board}.toml"),
        &agent_toml(p, &state_dir, &orchestrator.url(), &broker.url(), &prefix),
    )?;
    let checked = p.agent.check(&config)?;
    say(&format!("{board}: check under {}:", qemu_name(&p.board)));
    for line in checked.lines() {
        println!("  {line}");
    }

    events.watch_agent(broker.port(), &prefix);
    let started = Instant::now();
    let mut command = p.agent.command(["run", "--config"]);
    command.arg(&config);
    let mut agent = Managed::spawn(
        "agent",
        command,
        &work.file(&format!("{board}.log")),
        &work.pids(),
    )?;
    let mut last = "none published".to_owned();
    let active_after = loop {
        match events.next(Duration::from_millis(200)) {
            Some(Event::Signal(signal)) => return Err(ArmError::Interrupted(signal)),
            Some(Event::Status(from, status)) if from == prefix => {
                let state = status["state"].as_str().unwrap_or("?").to_owned();
                if state == "active" {
                    break started.elapsed();
                }
                last = state;
            }
            _ => {}
        }
        for child in [&mut agent, &mut orchestrator.child] {
            if let Some(status) = child.exited() {
                return Err(HarnessError::Exited {
                    what: child.name,
                    status,
                    log: child.log.clone(),
                }
                .into());
            }
        }
        if started.elapsed() > setup.timeout {
            return Err(ArmError::NotActive {
                board,
                timeout: setup.timeout,
                last,
                log: agent.log.clone(),
            });
        }
    };
    say(&format!(
        "{board}: active {:.1} s after exec under {}",
        active_after.as_secs_f64(),
        qemu_name(&p.board)
    ));
    let answer = setup.native_agent.status(&config, true)?;
    let answer = agent::expect_active(&answer, &p.identity, &p.address)?;
    let machine_id = answer["machineId"].as_str().unwrap_or_default().to_owned();
    say(&format!(
        "{board}: its status answer over MQTT (peaqos-agent status --json, x86-64): active, {}, machine {machine_id}",
        p.identity
    ));
    match agent.stop(STOP_GRACE, &|| false) {
        StopOutcome::Stopped(status) if status.success() => {}
        outcome => {
            return Err(ArmError::BadStop {
                board,
                outcome: outcome.to_string(),
                log: agent.log.clone(),
            });
        }
    }
    Ok(BoardRun {
        board,
        address: p.address.clone(),
        machine_id,
        active_after,
    })
}

fn qemu_name(board: &Board) -> String {
    format!("qemu-user ({})", board.target)
}

/// The registry: each board's identity controlled by its own key.
fn registry_toml(prepared: &[Prepared]) -> String {
    let mut text = "# Written by `cargo xtask arm`: which addresses control which identity.\n\
                    [identities]\n"
        .to_owned();
    for p in prepared {
        let _ = writeln!(
            text,
            "{} = [{}]",
            toml_string(&p.identity),
            toml_string(&p.address)
        );
    }
    text
}

/// The agent's configuration: timeouts with room for emulation (every
/// instruction is translated), short retries so that a run is quick.
fn agent_toml(
    p: &Prepared,
    state_dir: &Path,
    orchestrator: &str,
    broker: &str,
    prefix: &str,
) -> String {
    AgentConfig {
        written_by: "cargo xtask arm",
        identity: &p.identity,
        key_file: &p.key_file,
        orchestrator_url: orchestrator,
        // Emulated boards are slow.
        timeouts: Some(("5s", "20s")),
        display_name: &format!("arm-{}", p.board.short),
        owner_id: "arm",
        runtime_profile: "ros2",
        state_dir,
        renewal: "backoff_initial = \"200ms\"\nbackoff_max = \"5s\"\nslow_retry = \"5s\"",
        mqtt: Some((broker, prefix)),
        fast_reconnect: true,
        log_level: None,
    }
    .render()
}

fn file_size(path: &Path) -> Result<u64, HarnessError> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|source| HarnessError::Io {
            action: "read the size of",
            path: path.to_owned(),
            source,
        })
}

/// The figures, as a markdown table (the README's).
fn summary(sizes: &[(&str, u64)], runs: &[BoardRun]) -> String {
    let mut text = String::from("\n| stripped `minsize` peaqos-agent | size |\n|---|---:|\n");
    for (name, size) in sizes {
        let _ = writeln!(
            text,
            "| {name} | {} B ({:.2} MiB) |",
            crate::footprint::report::thousands(*size as f64, 0),
            *size as f64 / 1_048_576.0,
        );
    }
    text.push_str(
        "\n| under qemu-user | keygen, address, check | exec to `active` (emulated) | status over MQTT |\n|---|---|---:|---|\n",
    );
    for run in runs {
        let _ = writeln!(
            text,
            "| {} | ok ({}) | {:.1} s | active, machine {} |",
            run.board,
            run.address,
            run.active_after.as_secs_f64(),
            run.machine_id
        );
    }
    text
}

fn say(text: &str) {
    println!("arm: {text}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_and_reject() {
        let parse = |args: &[&str]| {
            Options::try_parse_from(std::iter::once("cargo xtask arm").chain(args.iter().copied()))
        };
        let o = parse(&[]).unwrap();
        assert!(o.targets.is_empty() && !o.debs);
        assert_eq!(o.timeout, 120);
        let o = parse(&["--target", "aarch64-unknown-linux-gnu", "--debs"]).unwrap();
        assert_eq!(o.targets, ["aarch64-unknown-linux-gnu"]);
        assert!(o.debs);
        assert!(parse(&["--timeout", "soon"]).is_err());
    }

    #[test]
    fn every_identity_is_in_the_registry_with_its_own_key() {
        let prepared: Vec<Prepared> = BOARDS
            .iter()
            .enumerate()
            .map(|(n, board)| Prepared {
                board: *board,
                agent: Agent::native(Path::new("/bin/true")),
                identity: format!("did:peaq:{}", 7001 + n),
                key_file: PathBuf::from(format!("/w/{}.key", board.short)),
                address: format!("0x{n:040x}"),
            })
            .collect();
        let text = registry_toml(&prepared);
        assert!(
            text.contains(&format!("\"did:peaq:7001\" = [\"0x{:040x}\"]", 0)),
            "{text}"
        );
        assert!(
            text.contains(&format!("\"did:peaq:7002\" = [\"0x{:040x}\"]", 1)),
            "{text}"
        );
        let config = agent_toml(
            &prepared[1],
            Path::new("/w/s"),
            "http://127.0.0.1:1",
            "mqtt://127.0.0.1:2",
            "peaqos/arm-armv7",
        );
        assert!(config.contains("ref = \"did:peaq:7002\""), "{config}");
        assert!(
            config.contains("topic_prefix = \"peaqos/arm-armv7\""),
            "{config}"
        );
    }
}
