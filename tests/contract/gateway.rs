//! A gateway against the contract double, with the real binary: one agent,
//! one file per machine in `machines.d/`, each machine its own identity
//! and key; reloads (SIGHUP) that add, remove, change and break files; a
//! machine whose key is not a controller or cannot be read; a kill -9 and a
//! restart from the state files. Every scenario counts the challenges it
//! cost at the server.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use peaqos_protocol::{Address, SecretKey};
use rustix::process::Signal;

use crate::agent::{AgentProcess, RENEWAL, poll, spawn};
use crate::double::{Double, Endpoint, Quirks, Record};

const WAIT: Duration = Duration::from_secs(20);
const MACHINES: usize = 20;

/// A gateway's configuration directory, state directory and machines.
struct Gateway {
    dir: tempfile::TempDir,
    keys: Vec<(String, Address)>,
}

fn identity(n: usize) -> String {
    format!("did:peaq:{}", 5000 + n)
}

impl Gateway {
    fn new(url: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("machines.d")).unwrap();
        let text = format!(
            r#"
[orchestrator]
url = "{url}"
connect_timeout = "1s"
request_timeout = "2s"

[state]
dir = "{state}"
{RENEWAL}
"#,
            state = dir.path().join("state").display(),
        );
        std::fs::write(dir.path().join("agent.toml"), text).unwrap();
        Self {
            dir,
            keys: Vec::new(),
        }
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("agent.toml")
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir
            .path()
            .join("machines.d")
            .join(format!("{name}.toml"))
    }

    /// Writes machine `n`'s key and file.
    fn add(&mut self, double: &Double, n: usize, display_name: &str) {
        let name = format!("dock-{n:02}");
        let key = SecretKey::generate().unwrap();
        let key_path = self
            .dir
            .path()
            .join("machines.d")
            .join(format!("{name}.key"));
        std::fs::write(&key_path, format!("{}\n", key.to_hex().as_str())).unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        double.set_controllers(&identity(n), &[key.address()]);
        self.write(n, display_name, &key_path);
        self.keys.push((name, key.address()));
    }

    fn write(&self, n: usize, display_name: &str, key_path: &Path) {
        let name = format!("dock-{n:02}");
        let text = format!(
            r#"
[identity]
ref = "{identity}"
key_file = "{key}"

[machine]
display_name = "{display_name}"
owner_id = "site-1"
machine_type = "charger"
runtime_profile = "plc"
"#,
            identity = identity(n),
            key = key_path.display(),
        );
        std::fs::write(self.file(&name), text).unwrap();
    }

    fn key_path(&self, n: usize) -> PathBuf {
        self.dir
            .path()
            .join("machines.d")
            .join(format!("dock-{n:02}.key"))
    }

    fn stored_machine_id(&self, name: &str) -> Option<String> {
        let path = self
            .dir
            .path()
            .join("state/machines")
            .join(name)
            .join("state.json");
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
        v["machineId"].as_str().map(str::to_owned)
    }
}

/// Waits until every machine of `gateway` whose number is in `numbers`
/// has one active record proved by its own key, named in its state file.
async fn until_all_active(
    double: &Double,
    gateway: &Gateway,
    agent: &AgentProcess,
    numbers: &[usize],
) -> Vec<Record> {
    poll(
        "every machine active, proved by its own key, named in its state file",
        WAIT,
        || {
            let records = double.records();
            numbers
                .iter()
                .map(|&n| {
                    let (name, address) = gateway
                        .keys
                        .iter()
                        .find(|(name, _)| name == &format!("dock-{n:02}"))?;
                    let ours: Vec<&Record> = records
                        .iter()
                        .filter(|r| r.identity == identity(n))
                        .collect();
                    let [r] = ours.as_slice() else { return None };
                    let good = r.status == "active"
                        && r.signer() == Some(*address)
                        && gateway.stored_machine_id(name).as_deref() == Some(r.id.as_str());
                    good.then(|| (*r).clone())
                })
                .collect::<Option<Vec<_>>>()
        },
        || format!("records: {:#?}\nlog:\n{}", double.records(), agent.log()),
    )
    .await
}

/// Waits until the loops have read their records `n` more times in all:
/// time passing for the agent, counted in its own steps.
async fn reads_later(double: &Double, agent: &AgentProcess, n: usize) {
    let from = double.count(Endpoint::GetMachine);
    poll(
        "more record reads",
        WAIT,
        || (double.count(Endpoint::GetMachine) >= from + n).then_some(()),
        || agent.log(),
    )
    .await;
}

/// SIGHUP, and waits for the reload's summary line; returns the mark
/// before it.
async fn reload(agent: &mut AgentProcess, summary: &str) -> usize {
    let mark = agent.mark();
    agent.signal(Signal::HUP);
    agent.wait_line(mark, summary, WAIT).await;
    mark
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_keeps_twenty_machines_active_and_a_reload_touches_only_what_changed() {
    let double = Double::start(Quirks::default()).await;
    let mut gateway = Gateway::new(&double.url());
    for n in 0..MACHINES {
        gateway.add(&double, n, &format!("Dock {n}"));
    }
    let mut agent = spawn(&gateway.config(), &[]);
    let all: Vec<usize> = (0..MACHINES).collect();
    let records = until_all_active(&double, &gateway, &agent, &all).await;
    assert_eq!(double.records().len(), MACHINES);
    assert_eq!(
        double.count(Endpoint::CreateChallenge),
        MACHINES,
        "one challenge per machine"
    );
    // Every line of a machine's loop names it (a span field: MACHINE_NAME=
    // in the journal), and its record once known.
    let id_03 = &records[3].id;
    agent
        .wait_line(0, &format!("machine_name=dock-03 machine_id={id_03}"), WAIT)
        .await;

    // Removed: its loop stops, its record is left alone; nobody else asks
    // for a challenge.
    let challenges = double.count(Endpoint::CreateChallenge);
    std::fs::remove_file(gateway.file("dock-19")).unwrap();
    let mark = reload(
        &mut agent,
        "reload: 0 started, 1 stopped, 0 restarted, 0 refused, 19 unchanged",
    )
    .await;
    agent.wait_line(mark, "machine stopped", WAIT).await;
    reads_later(&double, &agent, 3 * MACHINES).await;
    assert_eq!(double.count(Endpoint::CreateChallenge), challenges);
    let kept = double
        .record(&records[19].id)
        .expect("the record is left alone");
    assert_eq!(kept.status, "active");
    let gone = "machine_name=dock-19";
    let after = agent.mark();
    reads_later(&double, &agent, MACHINES).await;
    assert!(
        agent.find(after, gone).is_none(),
        "the removed machine's loop still runs:\n{}",
        agent.log()
    );

    // Added: it becomes active, with the one challenge it needs.
    gateway.add(&double, 20, "Dock 20");
    reload(
        &mut agent,
        "reload: 1 started, 0 stopped, 0 restarted, 0 refused, 19 unchanged",
    )
    .await;
    until_all_active(&double, &gateway, &agent, &[20]).await;
    assert_eq!(double.count(Endpoint::CreateChallenge), challenges + 1);

    // Changed: that machine alone restarts and pushes its new field; its
    // active record needs no new proof.
    gateway.write(5, "Dock 5 (moved)", &gateway.key_path(5));
    reload(
        &mut agent,
        "reload: 0 started, 0 stopped, 1 restarted, 0 refused, 19 unchanged",
    )
    .await;
    poll(
        "the changed field pushed",
        WAIT,
        || (double.record(&records[5].id)?.display_name == "Dock 5 (moved)").then_some(()),
        || agent.log(),
    )
    .await;
    assert_eq!(double.count(Endpoint::CreateChallenge), challenges + 1);

    // Broken at reload: a new bad file and a running machine's file made
    // bad; both named, the running machines carry on.
    std::fs::write(gateway.file("dock-30"), "[identity]\nref = \"nope\"\n").unwrap();
    let good_06 = std::fs::read_to_string(gateway.file("dock-06")).unwrap();
    std::fs::write(gateway.file("dock-06"), "[machine\n").unwrap();
    let mark = reload(
        &mut agent,
        "reload: 1 started, 0 stopped, 0 restarted, 1 refused, 19 unchanged",
    )
    .await;
    agent.wait_line(mark, "dock-30.toml", WAIT).await;
    agent.wait_line(mark, "dock-06.toml", WAIT).await;
    reads_later(&double, &agent, 2 * MACHINES).await;
    let running: Vec<usize> = (0..=20).filter(|n| *n != 19).collect();
    until_all_active(&double, &gateway, &agent, &running).await;
    assert_eq!(double.count(Endpoint::CreateChallenge), challenges + 1);

    // kill -9, then a restart: every machine back from its state file, no
    // new record, no challenge for a record that is still active.
    std::fs::write(gateway.file("dock-06"), good_06).unwrap();
    std::fs::remove_file(gateway.file("dock-30")).unwrap();
    let before: Vec<String> = double.records().iter().map(|r| r.id.clone()).collect();
    drop(agent.kill());
    let agent = spawn(&gateway.config(), &[]);
    until_all_active(&double, &gateway, &agent, &running).await;
    reads_later(&double, &agent, 2 * MACHINES).await;
    let after: Vec<String> = double.records().iter().map(|r| r.id.clone()).collect();
    assert_eq!(after, before, "no new records");
    assert_eq!(double.count(Endpoint::CreateChallenge), challenges + 1);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_that_is_no_controller_or_has_no_key_leaves_the_others_active() {
    let double = Double::start(Quirks::default()).await;
    let mut gateway = Gateway::new(&double.url());
    for n in 0..6 {
        gateway.add(&double, n, &format!("Dock {n}"));
    }
    // dock-00's key is not among its identity's controllers; dock-01's key
    // file is gone.
    double.set_controllers(&identity(0), &[SecretKey::generate().unwrap().address()]);
    std::fs::remove_file(gateway.key_path(1)).unwrap();
    let agent = spawn(&gateway.config(), &[]);
    until_all_active(&double, &gateway, &agent, &[2, 3, 4, 5]).await;
    let mut agent = agent;
    agent.wait_line(0, "state=not_controller", WAIT).await;
    let line = agent.wait_line(0, "state=config_error", WAIT).await;
    let log = agent.log();
    let text = log.lines().nth(line).unwrap();
    assert!(
        text.contains("dock-01.toml") && text.contains("dock-01.key"),
        "the error names the machine's file and its key file: {text}"
    );
    assert!(
        double
            .records()
            .iter()
            .all(|r| r.identity != identity(0) && r.identity != identity(1)),
        "{:#?}",
        double.records()
    );
    agent.stop().await;
}
