//! A gateway against our orchestrator, with the real binary: twenty
//! machines, one file and one key each, all active from one process; a
//! reload that removes one and adds another; a kill -9 and a restart that
//! comes back from the state files without a new record.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::orchestrator::Orchestrator;
use crate::support::write_key;
use peaqos_protocol::Address;

const BIN: &str = env!("CARGO_BIN_EXE_peaqos-agent");
const WAIT: Duration = Duration::from_secs(20);
const MACHINES: usize = 20;

fn identity(n: usize) -> String {
    format!("did:peaq:{}", 6000 + n)
}

fn name(n: usize) -> String {
    format!("cell-{n:02}")
}

/// Writes machine `n`'s key and file into `machines`; returns its address.
fn add_machine(machines: &Path, n: usize) -> Address {
    let (key, key_path) = write_key(machines, &name(n));
    let text = format!(
        "[identity]\nref = \"{}\"\nkey_file = \"{}\"\n\n[machine]\ndisplay_name = \"Cell {n}\"\n\
         owner_id = \"plant-1\"\nmachine_type = \"plc\"\nruntime_profile = \"plc\"\n",
        identity(n),
        key_path.display()
    );
    std::fs::write(machines.join(format!("{}.toml", name(n))), text).unwrap();
    key.address()
}

fn start(config: &Path) -> Child {
    Command::new(BIN)
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .env_remove("JOURNAL_STREAM")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn stored_machine_id(state: &Path, n: usize) -> Option<String> {
    let path = state.join("machines").join(name(n)).join("state.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    v["machineId"].as_str().map(str::to_owned)
}

/// Waits until machine `n`'s state file names a record the orchestrator
/// shows active for its identity.
async fn until_active(orchestrator: &Orchestrator, state: &Path, numbers: &[usize]) -> Vec<String> {
    let deadline = Instant::now() + WAIT;
    let mut ids = Vec::new();
    for &n in numbers {
        loop {
            if let Some(id) = stored_machine_id(state, n) {
                let (code, record) = orchestrator.machine(&id).await;
                if code == 200
                    && record["item"]["status"] == "active"
                    && record["item"]["identityRef"] == identity(n).as_str()
                {
                    ids.push(id);
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{} not active within {WAIT:?}",
                name(n)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    ids
}

fn signal(child: &Child, signal: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
    rustix::process::kill_process(pid, signal).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_of_twenty_machines_is_active_reloads_and_survives_kill_9() {
    let orchestrator = Orchestrator::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let machines = dir.path().join("machines.d");
    std::fs::create_dir(&machines).unwrap();
    let state: PathBuf = dir.path().join("state");
    let mut registry: Vec<(String, Address)> = (0..MACHINES)
        .map(|n| (identity(n), add_machine(&machines, n)))
        .collect();
    orchestrator.set_registry(&registry);
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[orchestrator]\nurl = \"{}\"\n\n[state]\ndir = \"{}\"\n{}",
            orchestrator.url(),
            state.display(),
            crate::support::FAST_RENEWAL
        ),
    )
    .unwrap();

    let mut agent = start(&config);
    let all: Vec<usize> = (0..MACHINES).collect();
    let ids = until_active(&orchestrator, &state, &all).await;
    assert_eq!(orchestrator.machine_ids().await.len(), MACHINES);

    // Reload: one removed (its record left active), one added.
    std::fs::remove_file(machines.join(format!("{}.toml", name(0)))).unwrap();
    registry.push((identity(MACHINES), add_machine(&machines, MACHINES)));
    orchestrator.set_registry(&registry);
    signal(&agent, rustix::process::Signal::HUP);
    until_active(&orchestrator, &state, &[MACHINES]).await;
    let (_, removed) = orchestrator.machine(&ids[0]).await;
    assert_eq!(
        removed["item"]["status"], "active",
        "removing a machine is not archiving it"
    );

    // kill -9 and a restart: the same records, from the state files.
    agent.kill().unwrap();
    agent.wait().unwrap();
    let before = orchestrator.machine_ids().await;
    let mut agent = start(&config);
    let running: Vec<usize> = (1..=MACHINES).collect();
    let again = until_active(&orchestrator, &state, &running).await;
    assert_eq!(again[..MACHINES - 1], ids[1..], "the same records");
    let mut after = orchestrator.machine_ids().await;
    let mut before = before;
    after.sort();
    before.sort();
    assert_eq!(after, before, "no new records");
    signal(&agent, rustix::process::Signal::TERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while agent.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the gateway did not stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
