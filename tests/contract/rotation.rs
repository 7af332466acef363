//! Key rotation against the contract double, with the real binary: `key
//! rotate` while the agent runs, the owner adding the successor and later
//! removing the old key (the record never leaves `active`, as a client
//! reading it would see it), the owner replacing the controller in one step
//! (back at the next check), and kill -9 right after each step.

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use peaqos_protocol::Address;

use crate::agent::{AgentProcess, Device, poll};
use crate::double::{Double, Endpoint, Quirks};
use crate::scenarios::reads_later;

const BIN: &str = env!("CARGO_BIN_EXE_peaqos-agent");
const ID: &str = "did:peaq:7070";
const WAIT: Duration = Duration::from_secs(15);

/// `peaqos-agent key rotate --config config`: the successor's address.
fn rotate(config: &std::path::Path) -> Address {
    let out = Command::new(BIN)
        .args(["key", "rotate", "--config"])
        .arg(config)
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Address::parse(String::from_utf8(out.stdout).unwrap().trim()).unwrap()
}

/// Whether the record reads `active` as a client reading it sees it: the
/// contract's `GET` re-verifies the stored proof's signer against the
/// controllers now.
fn reads_active(double: &Double, controllers: &[Address]) -> bool {
    double.records().iter().any(|r| {
        r.identity == ID
            && r.status == "active"
            && r.signer().is_some_and(|s| controllers.contains(&s))
    })
}

fn signer(double: &Double) -> Option<Address> {
    double
        .records()
        .into_iter()
        .find(|r| r.identity == ID)
        .and_then(|r| r.signer())
}

async fn started(hold: Option<&str>) -> (Double, Device, std::path::PathBuf, AgentProcess) {
    let double = Double::start(Quirks::default()).await;
    let device = Device::new(ID);
    double.set_controllers(ID, &[device.address()]);
    let config = device.write_config(&double.url(), "", "");
    let env: Vec<(&str, &std::path::Path)> = hold
        .map(|h| vec![("PEAQOS_AGENT_TEST_HOLD_AFTER", std::path::Path::new(h))])
        .unwrap_or_default();
    let mut agent = device.run(&config, &env);
    agent.wait_line(0, "state=active", WAIT).await;
    (double, device, config, agent)
}

/// The owner changes the controllers; the watcher's list changes with
/// them, under its lock.
fn set_controllers(double: &Double, watched: &Mutex<Vec<Address>>, list: Vec<Address>) {
    let mut watched = watched.lock().unwrap();
    double.set_controllers(ID, &list);
    *watched = list;
}

/// Signatures the agent logged after log line `from`, by signer.
fn signed_by(agent: &AgentProcess, from: usize, who: Address) -> usize {
    agent
        .log()
        .lines()
        .skip(from)
        .filter(|l| l.contains("signed identity challenge") && l.contains(&*who.checksummed()))
        .count()
}

#[tokio::test]
#[allow(clippy::too_many_lines)] // one rotation, told in order
async fn two_controllers_rotation_never_leaves_active_and_the_old_key_is_silent_after() {
    let (double, device, config, mut agent) = started(None).await;
    let double = Arc::new(double);
    let old = device.address();
    let controllers = Arc::new(Mutex::new(vec![old]));
    // A client polling the record all along: it must read active at every
    // look (a change of controllers and the check happen under one lock).
    let watching = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (looks, lapses) = (
        Arc::new(Mutex::new(0usize)),
        Arc::new(Mutex::new(Vec::new())),
    );
    let watcher = {
        let (double, controllers, watching) =
            (double.clone(), controllers.clone(), watching.clone());
        let (looks, lapses) = (looks.clone(), lapses.clone());
        tokio::spawn(async move {
            while watching.load(std::sync::atomic::Ordering::SeqCst) {
                {
                    let list = controllers.lock().unwrap();
                    if !reads_active(&double, &list) {
                        lapses
                            .lock()
                            .unwrap()
                            .push(format!("{:?}", double.records()));
                    }
                    *looks.lock().unwrap() += 1;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    let mark = agent.mark();
    let next = rotate(&config);
    assert_ne!(next, old);
    let keys = device.state_dir().join("keys");
    assert!(keys.join(format!("{}.key", next.checksummed())).exists());
    agent.wait_line(mark, "key rotation: prepared", WAIT).await;
    // Not a controller yet: checks take challenges but sign nothing with
    // the successor, and the old key keeps the record.
    reads_later(&double, &agent, 3).await;
    assert_eq!(signed_by(&agent, mark, next), 0, "{}", agent.log());

    // The owner adds the successor.
    set_controllers(&double, &controllers, vec![old, next]);
    let promoted = agent.wait_line(mark, "key rotation: promoted", WAIT).await;
    agent
        .wait_line(promoted, "key rotation: retired", WAIT)
        .await;
    assert_eq!(signer(&double), Some(next));
    // ... and later removes the old key.
    set_controllers(&double, &controllers, vec![next]);
    reads_later(&double, &agent, 3).await;
    agent.mark();
    let log = agent.stop().await;
    watching.store(false, std::sync::atomic::Ordering::SeqCst);
    watcher.await.unwrap();

    assert!(*looks.lock().unwrap() > 50);
    assert!(
        lapses.lock().unwrap().is_empty(),
        "left active: {:?}",
        lapses.lock().unwrap()
    );
    // The old key signed nothing after the promotion.
    let after: Vec<&str> = log
        .lines()
        .skip(promoted)
        .filter(|l| l.contains("signed identity challenge"))
        .collect();
    assert!(
        after.iter().all(|l| !l.contains(&*old.checksummed())),
        "{log}"
    );
    assert!(
        log.contains(&format!("old_controller={}", old.checksummed())),
        "{log}"
    );
    // The configured file is the operator's: recorded as retired, kept.
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(keys.join("rotation.json")).unwrap()).unwrap();
    assert_eq!(record["current"]["address"], next.checksummed());
    assert_eq!(record["retired"][0]["address"], old.checksummed());
    assert!(record["next"].is_null(), "{record}");

    // A restart comes back with the successor, and check says so.
    let mut again = device.run(&config, &[]);
    again
        .wait_line(0, &format!("controller={}", next.checksummed()), WAIT)
        .await;
    again.wait_line(0, "state=active", WAIT).await;
    again.stop().await;
    let address = Command::new(BIN)
        .args(["address", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&address.stdout).trim(),
        &*next.checksummed()
    );
    let check = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(
        text.contains(&format!("rotated: {}", next.checksummed())),
        "{text}"
    );
    assert!(
        text.contains("key retired") && text.contains(&device.key_path.display().to_string()),
        "{text}"
    );
}

#[tokio::test]
async fn one_step_replacement_is_back_at_the_next_check() {
    let (double, device, config, mut agent) = started(None).await;
    let mark = agent.mark();
    let next = rotate(&config);
    agent.wait_line(mark, "key rotation: prepared", WAIT).await;
    // The owner replaces the controller: the old key's proof no longer
    // counts, and the record reads as not activated.
    let reads = double.count(Endpoint::GetMachine);
    double.set_controllers(ID, &[next]);
    agent.wait_line(mark, "key rotation: promoted", WAIT).await;
    // Back with the successor's proof at the first check after the change
    // (a read already under way when the controllers changed may count
    // too), not after a retry.
    assert!(
        double.count(Endpoint::GetMachine) <= reads + 2,
        "{}",
        agent.log()
    );
    assert!(reads_active(&double, &[next]));
    assert_eq!(
        signed_by(&agent, mark, device.address()),
        0,
        "{}",
        agent.log()
    );
    agent.stop().await;
}

/// kill -9 right after each step: the machine comes back, with a key that
/// is a controller, and finishes the rotation.
#[tokio::test]
async fn kill_9_after_each_step_comes_back_with_a_controller_key() {
    for step in ["prepared", "proven", "promoted", "retired"] {
        let (double, device, config, agent) = started(Some(step)).await;
        let mark = agent.mark();
        let next = rotate(&config);
        let mut agent = agent;
        agent.wait_line(mark, "key rotation: prepared", WAIT).await;
        // One step: from now on only the successor is a controller.
        double.set_controllers(ID, &[next]);
        agent.wait_line(mark, "holding after this step", WAIT).await;
        assert!(
            agent.log().contains(&format!("rotation_step=\"{step}\""))
                || agent.log().contains(&format!("rotation_step={step}")),
            "{}",
            agent.log()
        );
        let _ = agent.kill();
        let mut again = device.run(&config, &[]);
        poll(
            &format!("active with the successor after kill -9 at {step}"),
            WAIT,
            || reads_active(&double, &[next]).then_some(()),
            || again.log(),
        )
        .await;
        again.wait_line(0, "state=active", WAIT).await;
        if step != "retired" {
            again.wait_line(0, "key rotation: retired", WAIT).await;
        }
        let record: serde_json::Value = serde_json::from_slice(
            &std::fs::read(device.state_dir().join("keys/rotation.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(record["current"]["address"], next.checksummed(), "{step}");
        assert!(record["retiring"].is_null(), "{step}: {record}");
        again.stop().await;
    }
}

/// The fleet's way: the MQTT `rotate_key` command makes the successor, the
/// retained status shows `nextControllerAddress`, and after a one-step
/// replacement the `reregister` command brings the record back at once
/// (the check interval here is an hour).
#[tokio::test]
async fn over_mqtt_rotate_key_then_reregister_after_a_one_step_replacement() {
    const TEST: &str = "over_mqtt_rotate_key_then_reregister_after_a_one_step_replacement";
    let Some(broker) = peaqos_testkit::Mosquitto::start(TEST, "") else {
        return;
    };
    let tools = peaqos_testkit::find_program("mosquitto_pub")
        .zip(peaqos_testkit::find_program("mosquitto_sub"));
    let Some((publish, sub)) = peaqos_testkit::available_or_skip(
        peaqos_testkit::Service::Mosquitto,
        TEST,
        tools,
        "mosquitto_pub/mosquitto_sub missing (Debian: mosquitto-clients)",
    ) else {
        return;
    };
    let double = Double::start(Quirks::default()).await;
    let device = Device::new(ID);
    double.set_controllers(ID, &[device.address()]);
    let mqtt = format!(
        "[mqtt]\nenabled = true\nurl = \"{}\"\ntopic_prefix = \"peaqos/rot\"\n\n\
         [mqtt.commands]\nenabled = true\nallow = [\"reregister\", \"rotate_key\"]\n",
        broker.url()
    );
    let config = device.write_config(&double.url(), "", &mqtt);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("check_interval = \"300ms\"", "check_interval = \"1h\"");
    std::fs::write(&config, text).unwrap();
    let mut agent = device.run(&config, &[]);
    agent.wait_line(0, "state=active", WAIT).await;
    let command = |name: &str, id: &str| {
        let ok = Command::new(&publish)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &broker.port().to_string(),
                "-q",
                "1",
            ])
            .args([
                "-t",
                &format!("peaqos/rot/command/{name}"),
                "-m",
                &format!("{{\"id\":\"{id}\"}}"),
            ])
            .status()
            .unwrap();
        assert!(ok.success());
    };
    let mark = agent.mark();
    command("rotate_key", "r1");
    agent.wait_line(mark, "key rotation: prepared", WAIT).await;
    let next = poll(
        "nextControllerAddress in the retained status",
        WAIT,
        || {
            let status = broker.retained(&sub, "peaqos/rot/status");
            let v: serde_json::Value =
                serde_json::from_str(status.get("peaqos/rot/status")?).ok()?;
            Address::parse(v["nextControllerAddress"].as_str()?).ok()
        },
        || agent.log(),
    )
    .await;
    assert_ne!(next, device.address());
    let reads = double.count(Endpoint::GetMachine);
    double.set_controllers(ID, &[next]);
    command("reregister", "r2");
    agent.wait_line(mark, "key rotation: promoted", WAIT).await;
    assert!(reads_active(&double, &[next]));
    assert_eq!(
        double.count(Endpoint::GetMachine),
        reads + 1,
        "one cycle, on the command"
    );
    poll(
        "the successor as controllerAddress, no nextControllerAddress",
        WAIT,
        || {
            let status = broker.retained(&sub, "peaqos/rot/status");
            let v: serde_json::Value =
                serde_json::from_str(status.get("peaqos/rot/status")?).ok()?;
            (v["controllerAddress"] == next.checksummed()
                && v.get("nextControllerAddress").is_none())
            .then_some(())
        },
        || agent.log(),
    )
    .await;
    agent.stop().await;
}

/// A server whose challenges list only some controllers (the contract
/// promises at least one) and lag behind: after a one-step replacement
/// they still name the old key. Its proof is refused, and the next
/// challenge is signed with the successor, which the server accepts.
#[tokio::test]
async fn a_refused_proof_hands_the_next_challenge_to_the_successor() {
    let (double, device, config, mut agent) = started(None).await;
    let old = device.address();
    let mark = agent.mark();
    let next = rotate(&config);
    agent.wait_line(mark, "key rotation: prepared", WAIT).await;
    double.set_listed(Some(&[old]));
    double.set_controllers(ID, &[next]);
    let promoted = agent.wait_line(mark, "key rotation: promoted", WAIT).await;
    assert!(reads_active(&double, &[next]));
    // The old key signed once more (refused), then the successor.
    let log = agent.log();
    let signers: Vec<bool> = log
        .lines()
        .skip(mark)
        .take(promoted - mark)
        .filter(|l| l.contains("signed identity challenge"))
        .map(|l| l.contains(&*next.checksummed()))
        .collect();
    assert_eq!(signers.last(), Some(&true), "{log}");
    assert!(
        signers.contains(&false),
        "the old key was tried first: {log}"
    );
    agent.stop().await;
}
