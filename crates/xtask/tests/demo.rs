//! The quick start, run as a user runs it: the xtask binary, which gets the
//! agent and the orchestrator from cargo, brings everything up in a
//! temporary directory and must see the agent `active` through the MQTT
//! status answer; and whatever way it ends, nothing it started may be left
//! running.
//!
//! One difference from a user's run: `--test-build` takes the binaries from
//! `cargo test --workspace --no-run`, a no-op inside the suite's own run
//! (`cargo xtask test`), where a user's `cargo build -p ...` would compile
//! their dependencies again with other features (74 s in a fresh CI run).

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use peaqos_testkit::{Service, available_or_skip, mosquitto_binary};
use rustix::process::{Pid, Signal};

/// Bound on one demo run. Generous because under `cargo test -p xtask`
/// alone the demo may have to build the workspace's tests first; once
/// built, a run takes about a second.
const RUN_BOUND: Duration = Duration::from_secs(600);
/// Bound on stopping after Ctrl-C: a few seconds, by the demo's own grace.
const STOP_BOUND: Duration = Duration::from_secs(20);

fn xtask() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_xtask"));
    command.args(["demo", "--test-build"]).stdin(Stdio::null());
    command
}

/// Runs to the end (or is killed at `bound`); stdout and stderr captured.
fn run(mut command: Command, bound: Duration) -> Output {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn xtask");
    let (tx, rx) = mpsc::channel();
    let pid = child.id();
    let waiter = std::thread::spawn(move || {
        let out = child.wait_with_output();
        let _ = tx.send(());
        out
    });
    if rx.recv_timeout(bound).is_err() {
        let _ = rustix::process::kill_process(pid_of(pid), Signal::KILL);
    }
    waiter.join().unwrap().expect("xtask output")
}

fn pid_of(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).unwrap()).unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The pid the demo printed for `what` ("... started (pid 123; ...").
fn pid_after(stdout: &str, what: &str) -> u32 {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&format!("demo: {what}")) && l.contains("(pid "))
        .unwrap_or_else(|| panic!("no pid for {what} in:\n{stdout}"));
    let rest = &line[line.find("(pid ").unwrap() + 5..];
    rest[..rest.find(';').unwrap()].parse().unwrap()
}

/// Whether `pid` is a live process (not gone, not a zombie).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat[stat.rfind(')').unwrap() + 1..]
            .split_whitespace()
            .next();
        !matches!(state, Some("Z" | "X"))
    })
}

/// Polls until `pid` is gone, up to `bound`.
fn gone_within(pid: u32, bound: Duration) -> bool {
    let deadline = Instant::now() + bound;
    while running(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// What every successful `--until-active` run shows: the agent's answer
/// over MQTT says `active` for the demo identity and the fresh key that the
/// registry names, and every process it started has stopped.
fn assert_active_and_stopped(output: &Output, dir: &Path) -> String {
    let stdout = text(&output.stdout);
    assert!(
        output.status.success(),
        "{}\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        text(&output.stderr)
    );
    let json = &stdout[stdout.find("\n{").expect("the status JSON") + 1..];
    let json = &json[..=json.find("\n}").expect("end of the status JSON") + 1];
    let answer: serde_json::Value = serde_json::from_str(json).expect(json);
    assert_eq!(answer["state"], "active", "{answer}");
    assert_eq!(answer["identity"], "did:peaq:4242", "{answer}");
    assert!(answer["machineId"].is_string(), "{answer}");
    let registry = std::fs::read_to_string(dir.join("registry.toml")).unwrap();
    let address = answer["controllerAddress"].as_str().unwrap();
    assert!(
        registry.contains(&format!("\"did:peaq:4242\" = [\"{address}\"]")),
        "the key the agent signs with is the one the registry names:\n{registry}"
    );
    // The status line as published, before the answer.
    assert!(
        stdout
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("active")),
        "{stdout}"
    );
    for what in ["orchestrator", "agent started"] {
        let pid = pid_after(&stdout, what);
        assert!(!running(pid), "{what} (pid {pid}) still runs:\n{stdout}");
    }
    assert!(!dir.join("pids").exists(), "a clean stop forgets its pids");
    stdout
}

#[test]
fn until_active_with_the_embedded_broker_when_mosquitto_is_hidden() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = xtask();
    command
        .args(["--until-active", "--dir"])
        .arg(dir.path())
        .env("PEAQOS_MOSQUITTO", "/nonexistent");
    let output = run(command, RUN_BOUND);
    let stdout = assert_active_and_stopped(&output, dir.path());
    assert!(
        stdout.contains("embedded rumqttd") && stdout.contains("no mosquitto on PATH"),
        "{stdout}"
    );
    assert!(
        stdout.contains("embedded broker: ends with this process"),
        "{stdout}"
    );
}

#[test]
fn until_active_with_mosquitto() {
    let test = "until_active_with_mosquitto";
    let found = mosquitto_binary().filter(|p| p.is_file());
    let Some(mosquitto) = available_or_skip(Service::Mosquitto, test, found, "no mosquitto") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut command = xtask();
    command.args(["--until-active", "--dir"]).arg(dir.path());
    let output = run(command, RUN_BOUND);
    let stdout = assert_active_and_stopped(&output, dir.path());
    assert!(
        stdout.contains(&format!("Mosquitto ({}", mosquitto.display())),
        "{stdout}"
    );
    assert!(stdout.contains("mosquitto: stopped"), "{stdout}");
}

/// Starts an interactive demo and returns it with its stdout so far, once
/// it says it runs until Ctrl-C.
fn start_interactive(dir: &Path, args: &[&str]) -> (Child, String) {
    let mut child = xtask()
        .arg("--dir")
        .arg(dir)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn xtask");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + RUN_BOUND;
    let mut seen = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the demo did not come up:\n{seen}\nstderr:\n{}",
                text(&out.stderr)
            );
        };
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("running; Ctrl-C stops") {
            break;
        }
    }
    // Keep reading so that the demo never blocks on a full pipe.
    std::thread::spawn(move || while rx.recv().is_ok() {});
    (child, seen)
}

fn wait_bounded(child: &mut Child, bound: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + bound;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    None
}

#[test]
fn ctrl_c_stops_everything_it_started() {
    let dir = tempfile::tempdir().unwrap();
    let (mut demo, stdout) = start_interactive(dir.path(), &[]);
    // What a person sees before pressing Ctrl-C: the answer over MQTT.
    assert!(
        stdout.lines().any(|l| l.trim_start().starts_with("state")
            && l.split_whitespace().nth(1) == Some("active")),
        "{stdout}"
    );
    let agent = pid_after(&stdout, "agent started");
    let orchestrator = pid_after(&stdout, "orchestrator");
    assert!(running(agent) && running(orchestrator));

    rustix::process::kill_process(pid_of(demo.id()), Signal::INT).unwrap();
    let status = wait_bounded(&mut demo, STOP_BOUND).expect("the demo stops after Ctrl-C");
    assert!(status.success(), "{status}");
    assert!(!running(agent), "the agent still runs");
    assert!(!running(orchestrator), "the orchestrator still runs");
    // The agent stopped first and said goodbye on the broker.
    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap();
    assert!(log.contains("MQTT interface stopped"), "{log}");
}

#[test]
fn a_killed_demo_is_cleaned_up_by_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let (mut demo, stdout) = start_interactive(dir.path(), &["--embedded-broker"]);
    let agent = pid_after(&stdout, "agent started");
    let orchestrator = pid_after(&stdout, "orchestrator");
    // SIGKILL cannot be caught: the children outlive xtask...
    demo.kill().unwrap();
    demo.wait().unwrap();

    // ...until the next demo in that directory stops them.
    let mut command = xtask();
    command
        .args(["--until-active", "--embedded-broker", "--dir"])
        .arg(dir.path());
    let output = run(command, RUN_BOUND);
    let stdout = assert_active_and_stopped(&output, dir.path());
    for (name, pid) in [("agent", agent), ("orchestrator", orchestrator)] {
        assert!(
            stdout.contains(&format!(
                "stopped {name} (pid {pid}), left running by an earlier demo"
            )),
            "{stdout}"
        );
        assert!(
            gone_within(pid, STOP_BOUND),
            "{name} (pid {pid}) still runs"
        );
    }
}

#[test]
fn a_directory_it_did_not_make_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "mine").unwrap();
    let mut command = xtask();
    command.args(["--until-active", "--dir"]).arg(dir.path());
    let output = run(command, RUN_BOUND);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("is not empty and was not made by `cargo xtask demo`"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("notes.txt")).unwrap(),
        "mine"
    );
}
