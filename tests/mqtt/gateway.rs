//! A gateway's MQTT interface (`mqtt::spawn_host`), observed with
//! Mosquitto's own clients: many machines on one connection, each with its
//! own retained status and availability, queries and commands; removal
//! clears a machine's retained topics; a dead gateway reads offline for
//! every machine through the topics Home Assistant subscribes to.

use std::collections::BTreeMap;
use std::thread;
use std::time::{Duration, Instant};

use peaqos_agent::mqtt::{CommandName, Protocol};
use peaqos_testkit::Mosquitto;

use crate::host::Host;
use crate::support::{Tools, WAIT, broker, config, publish, request};

const GATEWAY: &str = "site-gw";
const GATEWAY_AVAILABILITY: &str = "peaqos/site-gw/availability";

/// Every retained message under `filter`, as a fresh subscriber sees it.
fn retained(broker: &Mosquitto, tools: &Tools, filter: &str) -> BTreeMap<String, String> {
    broker.retained(&tools.sub, filter)
}

/// The retained messages under `filter` once `pred` holds for them.
fn retained_until(
    broker: &Mosquitto,
    tools: &Tools,
    filter: &str,
    what: &str,
    pred: impl Fn(&BTreeMap<String, String>) -> bool,
) -> BTreeMap<String, String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let seen = retained(broker, tools, filter);
        if pred(&seen) {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what} under {filter}; retained: {seen:#?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("m{i:03}")).collect()
}

/// The broker's log, for its connection lines.
fn logged_broker(test: &str) -> Option<(Mosquitto, Tools, tempfile::TempDir)> {
    use std::os::unix::fs::PermissionsExt;
    let logs = tempfile::tempdir().unwrap();
    // Mosquitto started as root drops to its own user before logging.
    std::fs::set_permissions(logs.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let log = logs.path().join("mosquitto.log");
    let (broker, tools) = broker(
        test,
        &format!("log_dest file {}\nlog_type all\n", log.display()),
    )?;
    Some((broker, tools, logs))
}

/// 200 machines on one connection: 200 retained statuses and
/// availabilities, each its own; the broker logged one agent client.
/// Queries and commands reach the machine they name, and only it.
#[test]
fn two_hundred_machines_share_one_connection_and_answer_each_for_itself() {
    let Some((broker, tools, logs)) = logged_broker("gateway_many") else {
        return;
    };
    let mut config = config(&broker, Protocol::V5);
    config.commands.enabled = true;
    config.commands.allow = vec![CommandName::Reregister];
    let mut host = Host::start(&config, GATEWAY);
    let machines = names(200);
    for name in &machines {
        host.add(name, None);
    }
    host.add("hall-dock", Some("site/hall-2/dock-9"));

    let statuses = retained_until(&broker, &tools, "peaqos/+/status", "200 statuses", |s| {
        s.len() == 200
    });
    for name in &machines {
        let status: serde_json::Value =
            serde_json::from_str(&statuses[&format!("peaqos/{name}/status")]).unwrap();
        assert_eq!(status["machineId"], format!("mach_{name}"));
        assert_eq!(status["state"], "active");
    }
    let online = retained_until(&broker, &tools, "peaqos/+/availability", "online", |s| {
        s.len() == 201 && s.values().all(|p| p == "online")
    });
    assert!(online.contains_key(GATEWAY_AVAILABILITY));
    let own = retained(&broker, &tools, "site/hall-2/dock-9/status");
    assert!(own["site/hall-2/dock-9/status"].contains("mach_hall-dock"));

    let log = std::fs::read_to_string(logs.path().join("mosquitto.log")).unwrap();
    let agents: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("New client connected") && l.contains(" as peaqos-agent"))
        .collect();
    assert_eq!(
        agents.len(),
        1,
        "one connection for the gateway: {agents:#?}"
    );
    assert!(agents[0].contains("as peaqos-agent-site-gw"), "{agents:?}");

    // A query names its machine by topic, and that machine answers.
    let answer = request(
        broker.port(),
        &tools,
        "peaqos/m137/status/get",
        "peaqos/m137/reply/test",
        &["-m", ""],
        5,
    )
    .expect("m137 answers its query");
    assert!(answer.contains("mach_m137"), "{answer}");
    // A command goes to that machine's loop only.
    publish(
        broker.port(),
        &tools,
        &[
            "-t",
            "peaqos/m042/command/reregister",
            "-m",
            r#"{"id":"c1"}"#,
        ],
    );
    let deadline = Instant::now() + WAIT;
    while host.commands("m042") == 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(host.commands("m042"), 1);
    let others: usize = machines
        .iter()
        .filter(|n| *n != "m042")
        .map(|n| host.commands(n))
        .sum();
    assert_eq!(others, 0, "a command reached another machine's loop");

    // A clean stop marks every machine offline.
    host.stop();
    let offline = retained(&broker, &tools, "peaqos/+/availability");
    assert_eq!(offline.len(), 201);
    assert!(offline.values().all(|p| p == "offline"), "{offline:#?}");
    let statuses = retained(&broker, &tools, "peaqos/+/status");
    assert!(
        statuses
            .values()
            .all(|p| p.contains(r#""state":"stopping""#))
    );
}

/// A removed machine's retained status, availability and discovery are
/// cleared; the others' stay. A changed file (Remove, then Add at once)
/// keeps its topics: they are never cleared in between.
#[test]
fn a_removed_machine_s_retained_topics_are_cleared_and_nobody_else_s() {
    let Some((broker, tools)) = broker("gateway_remove", "") else {
        return;
    };
    let mut config = config(&broker, Protocol::V311);
    config.home_assistant.enabled = true;
    let mut host = Host::start(&config, GATEWAY);
    for name in ["m0", "m1", "m2"] {
        host.add(name, None);
    }
    let discovery = retained_until(&broker, &tools, "homeassistant/#", "discovery", |s| {
        s.len() == 4
    });
    assert!(discovery.contains_key("homeassistant/binary_sensor/site-gw/gateway/config"));
    retained_until(&broker, &tools, "peaqos/#", "statuses", |s| {
        ["m0", "m1", "m2"]
            .iter()
            .all(|n| s.contains_key(&format!("peaqos/{n}/status")))
    });
    let mut watch = crate::support::Watch::start(&broker, &tools, &["peaqos/m2/#"]);

    host.remove("m1");
    // Changed file: Remove then Add, with the host yielding in between (a
    // reload awaits the old loop's end): the service may well run between
    // the two, which must not clear the topics the Add keeps.
    host.remove("m2");
    std::thread::sleep(std::time::Duration::from_millis(200));
    host.add("m2", None);
    retained_until(
        &broker,
        &tools,
        "peaqos/m1/#",
        "m1 cleared",
        BTreeMap::is_empty,
    );
    retained_until(
        &broker,
        &tools,
        "homeassistant/sensor/m1/#",
        "m1's discovery cleared",
        BTreeMap::is_empty,
    );
    let left = retained(&broker, &tools, "peaqos/#");
    for topic in [
        "peaqos/m0/status",
        "peaqos/m0/availability",
        "peaqos/m2/status",
        "peaqos/m2/availability",
        GATEWAY_AVAILABILITY,
    ] {
        assert!(left.contains_key(topic), "{topic} gone: {left:#?}");
    }
    assert!(retained(&broker, &tools, "homeassistant/sensor/m0/state/config").len() == 1);
    watch.sync();
    let emptied: Vec<_> = watch.seen.iter().filter(|s| s.payload.is_empty()).collect();
    assert!(
        emptied.is_empty(),
        "a changed machine's topics were cleared: {emptied:#?}"
    );
    drop(host);
}

/// Whether Home Assistant would show a machine available (the testkit's
/// rule), its list naming the gateway's will topic.
fn ha_available(discovery: &str, retained: &BTreeMap<String, String>) -> bool {
    assert!(discovery.contains(GATEWAY_AVAILABILITY), "{discovery}");
    peaqos_testkit::ha_available(discovery, retained)
}

/// Killed without a goodbye: the broker publishes the gateway's last will,
/// and every machine reads unavailable through its discovery's
/// availability list; each is its own device, via the gateway's.
#[test]
fn a_dead_gateway_reads_offline_for_every_machine_through_home_assistant() {
    let Some((broker, tools)) = broker("gateway_will", "") else {
        return;
    };
    let mut config = config(&broker, Protocol::V5);
    config.home_assistant.enabled = true;
    let mut host = Host::start(&config, GATEWAY);
    let machines = names(20);
    for name in &machines {
        host.add(name, None);
    }
    let discovery = retained_until(
        &broker,
        &tools,
        "homeassistant/sensor/#",
        "discovery",
        |s| s.len() == 20,
    );
    let before = retained_until(&broker, &tools, "peaqos/+/availability", "online", |s| {
        s.len() == 21 && s.values().all(|p| p == "online")
    });
    for name in &machines {
        let payload = &discovery[&format!("homeassistant/sensor/{name}/state/config")];
        let config: serde_json::Value = serde_json::from_str(payload).unwrap();
        assert_eq!(config["device"]["via_device"], "peaqos_site-gw");
        assert_eq!(config["device"]["identifiers"][0], format!("peaqos_{name}"));
        assert!(ha_available(payload, &before), "{name} before");
    }

    host.crash();
    let after = retained_until(&broker, &tools, "peaqos/+/availability", "the will", |s| {
        s.get(GATEWAY_AVAILABILITY).is_some_and(|p| p == "offline")
    });
    for name in &machines {
        let payload = &discovery[&format!("homeassistant/sensor/{name}/state/config")];
        assert!(!ha_available(payload, &after), "{name} still available");
    }
}
