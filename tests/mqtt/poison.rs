//! Issue #15 item 7: a message over the agent's `max_packet_size` on a topic
//! it subscribes to. MQTT 3.1.1 cannot tell the broker our limit, so the
//! broker forwards it and the client must drop the connection; a retained
//! one used to be replayed after every resubscription, and the agent
//! reconnected in a loop (8 times in 30 s in the report) with `status`
//! failing until someone cleared it. Mosquitto's own `mosquitto_pub` plants
//! the message; the broker's log counts the agent's connections.

use std::path::Path;

use crate::support::{Agent, Answer, WAIT, broker, config, publish, wait_retained};
use peaqos_agent::mqtt::{self, Protocol};
use peaqos_agent::status::AgentState;
use peaqos_testkit::{Service, available_or_skip, find_program};

/// Over the default `max_packet_size` (64 KiB).
const POISON_SIZE: usize = 70_000;

fn connections(log: &Path, client_id: &str) -> usize {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let needle = format!(" as {client_id} ");
    text.lines().filter(|l| l.contains(&needle)).count()
}

#[test]
fn a_retained_oversized_query_costs_a_3_1_1_agent_one_reconnection_and_status_still_answers() {
    use std::os::unix::fs::PermissionsExt;
    let logs = tempfile::tempdir().unwrap();
    // Mosquitto started as root drops to its own user before logging.
    std::fs::set_permissions(logs.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let log = logs.path().join("mosquitto.log");
    let Some((broker, tools)) = broker(
        "mqtt_retained_poison",
        &format!("log_dest file {}\nlog_type all\n", log.display()),
    ) else {
        return;
    };
    let poison = logs.path().join("poison");
    std::fs::write(&poison, vec![b'x'; POISON_SIZE]).unwrap();
    let poison = poison.to_str().unwrap();
    publish(
        broker.port(),
        &tools,
        &[
            "-V",
            "311",
            "-r",
            "-t",
            "peaqos/r1/status/get",
            "-f",
            poison,
        ],
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cfg = config(&broker, Protocol::V311);
    let agent = Agent::start(&cfg, "r1", Answer::Ok);
    agent.update(|s| s.state = AgentState::Active);
    // Asks `times` status queries; each must be answered `active`.
    let answers_active = |times: usize| {
        for _ in 0..times {
            let answer = rt
                .block_on(mqtt::query_status(&cfg, "r1", WAIT))
                .unwrap_or_else(|e| {
                    panic!(
                        "{}\nbroker log:\n{}",
                        crate::support::error_chain(&e),
                        std::fs::read_to_string(&log).unwrap_or_default()
                    )
                });
            assert_eq!(answer["state"], "active");
        }
    };
    // The retained poison is gone (the agent cleared it before subscribing
    // again), and the agent answers, several times over.
    wait_retained(&broker, &tools, "peaqos/r1/availability", |p| p == "online");
    answers_active(5);
    let seen = connections(&log, "peaqos-agent-r1");
    assert!(
        (1..=2).contains(&seen),
        "the agent connected {seen} times (one drop for the poison at most):\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // Someone plants it again while the agent is subscribed: one more
    // reconnection, cleared again, still answering.
    publish(
        broker.port(),
        &tools,
        &[
            "-V",
            "311",
            "-r",
            "-t",
            "peaqos/r1/status/get",
            "-f",
            poison,
        ],
    );
    // 3.1.1 cannot spare that one reconnection (a query sent meanwhile is
    // lost): wait for it, then for `online` again.
    let deadline = std::time::Instant::now() + WAIT;
    while connections(&log, "peaqos-agent-r1") == seen {
        assert!(
            std::time::Instant::now() < deadline,
            "the live poison did not break the connection"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    wait_retained(&broker, &tools, "peaqos/r1/availability", |p| p == "online");
    answers_active(3);
    let again = connections(&log, "peaqos-agent-r1");
    assert!(
        again <= seen + 1,
        "{again} connections after the second poison (had {seen})"
    );
}

/// When the broker does not let the agent clear the retained message (its
/// ACL), the replay breaks the next session too: the agent then stops
/// subscribing to `status/get` (a quarantine) and stays connected, instead
/// of reconnecting in a loop.
#[test]
fn when_the_clear_is_refused_the_agent_quarantines_requests_and_stays_connected() {
    use std::os::unix::fs::PermissionsExt;
    let name = "mqtt_poison_quarantine";
    let Some(mosquitto_passwd) = available_or_skip(
        Service::Mosquitto,
        name,
        find_program("mosquitto_passwd"),
        "no mosquitto_passwd",
    ) else {
        return;
    };
    let logs = tempfile::tempdir().unwrap();
    std::fs::set_permissions(logs.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let log = logs.path().join("mosquitto.log");
    let passwd = logs.path().join("passwd");
    let ok = std::process::Command::new(mosquitto_passwd)
        .args(["-c", "-b"])
        .arg(&passwd)
        .args(["planter", "pw-planter"])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    // Anonymous clients (the agent here) may read status/get but not
    // write it; only "planter" may.
    let acl = logs.path().join("acl");
    std::fs::write(
        &acl,
        "topic read peaqos/r1/status/get\ntopic readwrite peaqos/r1/availability\n\
         topic readwrite peaqos/r1/status\ntopic readwrite peaqos/r1/reply/#\n\
         topic readwrite test-sync/#\nuser planter\ntopic write peaqos/r1/status/get\n",
    )
    .unwrap();
    for f in [&passwd, &acl] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let Some((broker, tools)) = broker(
        name,
        &format!(
            "log_dest file {}\nlog_type all\npassword_file {}\nacl_file {}\n",
            log.display(),
            passwd.display(),
            acl.display()
        ),
    ) else {
        return;
    };
    let poison = logs.path().join("poison");
    std::fs::write(&poison, vec![b'x'; POISON_SIZE]).unwrap();
    publish(
        broker.port(),
        &tools.as_user("planter", "pw-planter"),
        &[
            "-V",
            "311",
            "-r",
            "-t",
            "peaqos/r1/status/get",
            "-f",
            poison.to_str().unwrap(),
        ],
    );
    let cfg = config(&broker, Protocol::V311);
    let agent = Agent::start(&cfg, "r1", Answer::Ok);
    agent.update(|s| s.state = AgentState::Active);
    // Sessions broken by the replay (the last of them after a refused
    // clear), then one that does not subscribe to status/get: its `online`
    // comes without a SUBSCRIBE before it. Which session that is depends on
    // whether a loaded machine cost the agent an extra connection, so the
    // quiet one is looked for rather than counted to.
    let deadline = std::time::Instant::now() + WAIT;
    let quiet = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let sessions: Vec<&str> = text.split(" as peaqos-agent-r1 ").skip(1).collect();
        let found = sessions.iter().position(|session| {
            session
                .find("'peaqos/r1/availability'")
                .is_some_and(|online_at| {
                    session.contains("Received PUBLISH from peaqos-agent-r1 (d0, q1, r1, m")
                        && !session[..online_at].contains("Received SUBSCRIBE from peaqos-agent-r1")
                })
        });
        if let Some(i) = found {
            break (i, text);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no quiet (quarantined) session:\n{text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let (index, text) = quiet;
    // Before it, the replay broke at least two sessions, the last of which
    // had its clear refused.
    assert!(index >= 2, "quarantined after {index} sessions:\n{text}");
    assert!(
        text.contains("Denied PUBLISH from peaqos-agent-r1"),
        "{text}"
    );
    // It stays: `online` retained, and no fourth session by the time the
    // status is readable by a fresh subscriber.
    wait_retained(&broker, &tools, "peaqos/r1/availability", |p| p == "online");
    wait_retained(&broker, &tools, "peaqos/r1/status", |p| {
        p.contains("active")
    });
    assert_eq!(connections(&log, "peaqos-agent-r1"), 3);
}
