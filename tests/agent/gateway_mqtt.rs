//! Issue #20's "done when", observed through MQTT with the real binary,
//! our orchestrator, a private Mosquitto and its own clients: a gateway of
//! 200 machines (200 files, 200 keys, 10 of them objects on one SoftHSM2
//! token) is all active on ONE broker connection, with 200 retained
//! statuses; removing 10 files and reloading clears their retained topics;
//! kill -9 makes every machine read offline through what Home Assistant
//! subscribes to; a restart brings all back from their state files without
//! a new record.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use peaqos_protocol::Address;
use peaqos_testkit::{Mosquitto, Service, SoftHsm, available_or_skip, find_program};

use crate::support::orchestrator::Orchestrator;
use crate::support::write_key;

const BIN: &str = env!("CARGO_BIN_EXE_peaqos-agent");
const TEST: &str = "a_gateway_of_200_machines_on_one_mqtt_connection";
const MACHINES: usize = 200;
/// Machines whose key is an object on the token.
const ON_TOKEN: usize = 10;
/// Every wait is bounded by this.
const WAIT: Duration = Duration::from_secs(60);
/// The gateway has no machine of its own: its name is "gateway".
const GATEWAY_AVAILABILITY: &str = "peaqos/gateway/availability";

fn name(n: usize) -> String {
    format!("m{n:03}")
}

fn identity(n: usize) -> String {
    format!("did:peaq:{}", 8000 + n)
}

/// Machine `n`'s file, its key a file or (for the first [`ON_TOKEN`]) an
/// object on the token; returns its address.
fn add_machine(hsm: &SoftHsm, machines: &Path, n: usize) -> Address {
    let (key_line, address) = if n < ON_TOKEN {
        let uri = format!(
            "{}&pin-source={}",
            hsm.uri(&name(n)),
            hsm.pin_file().display()
        );
        let out = hsm
            .command(BIN)
            .args(["keygen", "--pkcs11", &uri])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let address = Address::parse(String::from_utf8(out.stdout).unwrap().trim()).unwrap();
        (format!("key = \"{uri}\""), address)
    } else {
        let (key, path) = write_key(machines, &name(n));
        (format!("key_file = \"{}\"", path.display()), key.address())
    };
    let file = format!(
        "[identity]\nref = \"{}\"\n{key_line}\n\n[machine]\ndisplay_name = \"Charger {n}\"\n\
         owner_id = \"site-1\"\nmachine_type = \"charger\"\nruntime_profile = \"ocpp\"\n",
        identity(n)
    );
    std::fs::write(machines.join(format!("{}.toml", name(n))), file).unwrap();
    address
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn start(hsm: &SoftHsm, config: &Path, log: &Path) -> Child {
    hsm.command(BIN)
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .env_remove("JOURNAL_STREAM")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("CREDENTIALS_DIRECTORY")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// The retained messages under `filter` once `pred` holds for them.
fn retained_until(
    broker: &Mosquitto,
    sub: &Path,
    filter: &str,
    what: &str,
    log: &Path,
    pred: impl Fn(&BTreeMap<String, String>) -> bool,
) -> BTreeMap<String, String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let seen = broker.retained(sub, filter);
        if pred(&seen) {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what} under {filter} ({} retained); the agent's log ends:\n{}",
            seen.len(),
            tail(log)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Statuses of `numbers`, all `active`.
fn all_active(numbers: &[usize]) -> impl Fn(&BTreeMap<String, String>) -> bool + '_ {
    move |seen| {
        numbers.iter().all(|n| {
            seen.get(&format!("peaqos/{}/status", name(*n)))
                .is_some_and(|p| p.contains(r#""state":"active""#))
        })
    }
}

/// Statuses of `numbers`, all `active` and made after `after` (an RFC 3339
/// stamp, as the statuses carry it).
fn active_since<'a>(
    numbers: &'a [usize],
    after: &'a str,
) -> impl Fn(&BTreeMap<String, String>) -> bool + 'a {
    move |seen| {
        numbers.iter().all(|n| {
            seen.get(&format!("peaqos/{}/status", name(*n)))
                .and_then(|p| serde_json::from_str::<serde_json::Value>(p).ok())
                .is_some_and(|s| {
                    s["state"] == "active" && s["timestamp"].as_str().is_some_and(|t| t > after)
                })
        })
    }
}

/// Whether Home Assistant would show machine `n` available (the
/// testkit's rule), linked to the gateway and listing its will topic.
fn ha_available(
    discovery: &BTreeMap<String, String>,
    avail: &BTreeMap<String, String>,
    n: usize,
) -> bool {
    let topic = format!("homeassistant/sensor/{}/state/config", name(n));
    let config: serde_json::Value = serde_json::from_str(&discovery[&topic]).unwrap();
    assert_eq!(config["device"]["via_device"], "peaqos_gateway", "{config}");
    assert!(discovery[&topic].contains(GATEWAY_AVAILABILITY), "{config}");
    peaqos_testkit::ha_available(&discovery[&topic], avail)
}

fn signal(child: &Child, signal: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
    rustix::process::kill_process(pid, signal).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)] // one scenario, step after step, as the issue tells it
async fn a_gateway_of_200_machines_on_one_mqtt_connection() {
    use std::os::unix::fs::PermissionsExt;
    let Some(hsm) = SoftHsm::start(TEST, "gateway-200") else {
        return;
    };
    let logs = tempfile::tempdir().unwrap();
    // Mosquitto started as root drops to its own user before logging.
    std::fs::set_permissions(logs.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let broker_log = logs.path().join("mosquitto.log");
    let Some(broker) = Mosquitto::start(
        TEST,
        &format!("log_dest file {}\nlog_type all\n", broker_log.display()),
    ) else {
        return;
    };
    let Some(sub) = available_or_skip(
        Service::Mosquitto,
        TEST,
        find_program("mosquitto_sub"),
        "mosquitto_sub missing (Debian: mosquitto-clients)",
    ) else {
        return;
    };
    let orchestrator = Orchestrator::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let machines = dir.path().join("machines.d");
    std::fs::create_dir(&machines).unwrap();
    let state: PathBuf = dir.path().join("state");
    let registry: Vec<(String, Address)> = (0..MACHINES)
        .map(|n| (identity(n), add_machine(&hsm, &machines, n)))
        .collect();
    orchestrator.set_registry(&registry);
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[orchestrator]\nurl = \"{}\"\n\n[state]\ndir = \"{}\"\n\n[mqtt]\nenabled = true\n\
             url = \"{}\"\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\n\n\
             [mqtt.home_assistant]\nenabled = true\n",
            orchestrator.url(),
            state.display(),
            broker.url()
        ),
    )
    .unwrap();
    let agent_log = dir.path().join("agent.log");

    // All 200 active, on one connection, 200 retained statuses.
    let started = Instant::now();
    let mut agent = start(&hsm, &config, &agent_log);
    let everyone: Vec<usize> = (0..MACHINES).collect();
    retained_until(
        &broker,
        &sub,
        "peaqos/+/status",
        "200 active",
        &agent_log,
        all_active(&everyone),
    );
    eprintln!("200 machines active after {:?}", started.elapsed());
    let records = orchestrator.machine_ids().await;
    assert_eq!(records.len(), MACHINES);
    let log = std::fs::read_to_string(&broker_log).unwrap();
    let connections: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("New client connected") && l.contains(" as peaqos-agent"))
        .collect();
    assert_eq!(
        connections.len(),
        1,
        "one connection for the gateway: {connections:#?}"
    );
    assert!(
        connections[0].contains("as peaqos-agent-gateway"),
        "{connections:?}"
    );

    // `status` lists every machine; `status NAME` asks one.
    let out = Command::new(BIN)
        .args(["status", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let listing = String::from_utf8(out.stdout).unwrap();
    assert!(
        listing.starts_with("gateway gateway: online, 200 machines\n"),
        "{listing}"
    );
    assert_eq!(
        listing
            .lines()
            .filter(|l| l.contains(" active ") && l.contains(" yes"))
            .count(),
        MACHINES,
        "{listing}"
    );
    let out = Command::new(BIN)
        .args(["status", "m007", "--json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let one: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(one["state"], "active");

    // Remove 10 files (5 of them token keys) and reload: their retained
    // topics are cleared, the others' stay.
    let removed: Vec<usize> = (5..15).collect();
    for n in &removed {
        std::fs::remove_file(machines.join(format!("{}.toml", name(*n)))).unwrap();
    }
    signal(&agent, rustix::process::Signal::HUP);
    let kept: Vec<usize> = (0..MACHINES).filter(|n| !removed.contains(n)).collect();
    let after = retained_until(
        &broker,
        &sub,
        "peaqos/#",
        "10 machines cleared",
        &agent_log,
        |seen| {
            removed.iter().all(|n| {
                !seen
                    .keys()
                    .any(|t| t.starts_with(&format!("peaqos/{}/", name(*n))))
            })
        },
    );
    assert!(all_active(&kept)(&after), "the other 190 statuses stay");
    let discovery = retained_until(
        &broker,
        &sub,
        "homeassistant/sensor/#",
        "10 discovery configs cleared",
        &agent_log,
        |seen| seen.len() == MACHINES - removed.len(),
    );

    // kill -9: every machine reads offline through its availability list.
    let avail = broker.retained(&sub, "peaqos/+/availability");
    assert!(kept.iter().all(|n| ha_available(&discovery, &avail, *n)));
    agent.kill().unwrap();
    agent.wait().unwrap();
    let avail = retained_until(
        &broker,
        &sub,
        "peaqos/+/availability",
        "the will",
        &agent_log,
        |s| s.get(GATEWAY_AVAILABILITY).is_some_and(|p| p == "offline"),
    );
    let still: Vec<usize> = kept
        .iter()
        .copied()
        .filter(|n| ha_available(&discovery, &avail, *n))
        .collect();
    assert!(still.is_empty(), "available after kill -9: {still:?}");

    // Restart: all back from their state files, no new record.
    let killed_at = broker
        .retained(&sub, "peaqos/+/status")
        .values()
        .filter_map(|p| serde_json::from_str::<serde_json::Value>(p).ok())
        .filter_map(|s| s["timestamp"].as_str().map(str::to_owned))
        .max()
        .unwrap();
    let mut agent = start(&hsm, &config, &agent_log);
    retained_until(
        &broker,
        &sub,
        "peaqos/+/availability",
        "online again",
        &agent_log,
        |s| s.get(GATEWAY_AVAILABILITY).is_some_and(|p| p == "online"),
    );
    retained_until(
        &broker,
        &sub,
        "peaqos/+/status",
        "190 active again",
        &agent_log,
        active_since(&kept, &killed_at),
    );
    let mut again = orchestrator.machine_ids().await;
    let mut before = records;
    again.sort();
    before.sort();
    assert_eq!(again, before, "no new records");
    for n in &kept {
        let file = state.join("machines").join(name(*n)).join("state.json");
        assert!(file.is_file(), "{}", file.display());
    }

    // A clean stop: every machine's own availability says offline.
    signal(&agent, rustix::process::Signal::TERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the gateway did not stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let avail = broker.retained(&sub, "peaqos/+/availability");
    assert_eq!(avail.len(), kept.len() + 1, "{avail:#?}");
    assert!(avail.values().all(|p| p == "offline"), "{avail:#?}");
}
