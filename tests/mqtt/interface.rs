//! The agent's MQTT interface against a real Mosquitto, observed with
//! Mosquitto's own clients (and paho-mqtt for MQTT 3.1.1): retained status
//! and availability, queries, commands, Home Assistant discovery, broker
//! restarts and malformed input.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{Agent, Answer, WAIT, Watch, broker, config, publish, request, wait_retained};
use peaqos_agent::mqtt::{self, CommandName, MqttError, Protocol};
use peaqos_agent::status::AgentState;
use peaqos_protocol::MachineStatus;

fn status_seq(text: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()?
        .get("seq")?
        .as_u64()
}

#[test]
fn status_and_availability_are_retained_and_follow_every_change() {
    let Some((broker, tools)) = broker("status_and_availability", "") else {
        return;
    };
    let agent = Agent::start(&config(&broker, Protocol::V5), "Robot Arm #7", Answer::Ok);
    let prefix = "peaqos/Robot_Arm_7";
    let mut watch = Watch::start(&broker, &tools, &[&format!("{prefix}/#")]);
    watch.wait("online", |s| {
        s.topic == format!("{prefix}/availability") && s.payload == "online" && s.retain
    });
    let first = watch.wait("status", |s| s.topic == format!("{prefix}/status"));
    assert!(first.retain, "status must be retained");
    let status = first.json();
    assert_eq!(status["schema"], 1);
    assert_eq!(status["state"], "registering");
    assert_eq!(status["identity"], "did:peaq:4242");
    assert_eq!(
        status["controllerAddress"],
        "0x8fd379246834eac74B8419FfdA202CF8051F7A03"
    );
    for key in [
        "machineId",
        "recordStatus",
        "proofVerifiedAt",
        "proofExpiresAt",
        "lastError",
        "nextAttemptAt",
        "clockSkewMs",
        "agentVersion",
        "bootId",
        "seq",
        "timestamp",
    ] {
        assert!(status.get(key).is_some(), "status lacks {key}: {status}");
    }

    agent.update(|s| {
        s.state = AgentState::Active;
        s.machine_id = Some("m-123".into());
        s.record_status = Some(MachineStatus::Active);
    });
    let seq = agent.seq();
    let active = watch.wait("active status", |s| {
        s.topic == format!("{prefix}/status") && status_seq(&s.payload) == Some(seq)
    });
    assert_eq!(active.json()["state"], "active");
    assert_eq!(active.json()["machineId"], "m-123");
    assert_eq!(active.json()["recordStatus"], "active");

    // A reader that connects later gets the newest state from the broker.
    let retained = wait_retained(&broker, &tools, &format!("{prefix}/status"), |p| {
        status_seq(p) == Some(seq)
    });
    assert!(retained.contains(r#""state":"active""#));
    wait_retained(&broker, &tools, &format!("{prefix}/availability"), |p| {
        p == "online"
    });
}

#[test]
fn a_burst_of_changes_is_coalesced_to_the_newest() {
    let Some((broker, tools)) = broker("burst_coalesced", "") else {
        return;
    };
    let agent = Agent::start(&config(&broker, Protocol::V5), "r1", Answer::Ok);
    let mut watch = Watch::start(&broker, &tools, &["peaqos/r1/status"]);
    watch.wait("first status", |_| true);
    let started = Instant::now();
    for _ in 0..10_000 {
        agent.update(|s| s.state = AgentState::Backoff);
    }
    // Updating the status never waits for MQTT.
    assert!(started.elapsed() < Duration::from_secs(2));
    let last = agent.seq();
    watch.wait("the newest status", |s| {
        status_seq(&s.payload) == Some(last)
    });
    // Far fewer publishes than changes: stale snapshots were dropped.
    let published = watch.on("peaqos/r1/status").len();
    assert!(published < 1000, "{published} publishes for 10000 changes");
}

#[test]
fn status_is_also_republished_periodically() {
    let Some((broker, tools)) = broker("status_periodic", "") else {
        return;
    };
    let mut cfg = config(&broker, Protocol::V5);
    cfg.status_interval = Duration::from_secs(1);
    let _agent = Agent::start(&cfg, "r1", Answer::Ok);
    let mut watch = Watch::start(&broker, &tools, &["peaqos/r1/status"]);
    watch.wait("first status", |_| true);
    // Unchanged status, published again (for readers and Home Assistant
    // sensors that expect regular updates).
    let again = watch.wait("a periodic republish", |_| true);
    assert_eq!(status_seq(&again.payload), Some(0));
}

#[test]
fn v5_queries_are_answered_on_their_response_topic_with_correlation_data() {
    let Some((broker, tools)) = broker("v5_query", "") else {
        return;
    };
    let agent = Agent::start(&config(&broker, Protocol::V5), "r1", Answer::Ok);
    agent.update(|s| s.state = AgentState::Active);
    wait_retained(&broker, &tools, "peaqos/r1/availability", |p| p == "online");

    // mosquitto_rr: Mosquitto's own request/response client.
    let answer = request(
        broker.port(),
        &tools,
        "peaqos/r1/status/get",
        "peaqos/r1/reply/rr-1",
        &["-m", ""],
        5,
    )
    .expect("mosquitto_rr got no answer");
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["state"], "active");
    assert_eq!(answer["seq"], agent.seq());

    // The correlation data comes back unchanged.
    let mut watch = Watch::start(&broker, &tools, &["peaqos/r1/reply/#"]);
    publish(
        broker.port(),
        &tools,
        &[
            "-V",
            "5",
            "-t",
            "peaqos/r1/status/get",
            "-m",
            "",
            "-D",
            "publish",
            "response-topic",
            "peaqos/r1/reply/sub-1",
            "-D",
            "publish",
            "correlation-data",
            "corr-42",
        ],
    );
    let reply = watch.wait("reply", |s| s.topic == "peaqos/r1/reply/sub-1");
    assert_eq!(reply.correlation, "corr-42");
    assert!(!reply.retain, "replies are not retained");
    assert_eq!(reply.json()["state"], "active");
}

#[test]
fn v311_clients_query_with_a_json_body() {
    let Some((broker, tools)) = broker("v311_json_query", "") else {
        return;
    };
    let Some(python) = peaqos_testkit::python_with("v311_json_query", &["paho.mqtt.client"]) else {
        return;
    };
    for protocol in [Protocol::V5, Protocol::V311] {
        let mut agent = Agent::start(&config(&broker, protocol), "r1", Answer::Ok);
        agent.update(|s| s.state = AgentState::Active);
        // `online` is published after the agent subscribed: it is listening.
        wait_retained(&broker, &tools, "peaqos/r1/availability", |p| p == "online");
        let out = Command::new(&python)
            .args(["-c", PAHO_QUERY, &broker.port().to_string()])
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "paho query failed (agent on MQTT {protocol})"
        );
        let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            answer["correlationId"], "paho-7",
            "agent on MQTT {protocol}"
        );
        assert_eq!(answer["state"], "active");
        assert_eq!(answer["seq"], agent.seq());
        agent.stop();
    }
}

/// A paho-mqtt 3.1.1 client: subscribes to a reply topic, asks with the
/// JSON body, prints the answer.
const PAHO_QUERY: &str = r#"
import json, sys, threading
import paho.mqtt.client as mqtt
port = int(sys.argv[1])
got = threading.Event()
subscribed = threading.Event()
answer = {}
def on_connect(c, u, flags, rc, props=None):
    c.subscribe("peaqos/r1/reply/paho", qos=1)
def on_subscribe(c, u, mid, rcs, props=None):
    subscribed.set()
def on_message(c, u, msg):
    answer["text"] = msg.payload.decode()
    got.set()
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-query", protocol=mqtt.MQTTv311)
c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
c.connect("127.0.0.1", port, 10)
c.loop_start()
if not subscribed.wait(10): sys.exit("no SUBACK")
body = {"replyTo": "peaqos/r1/reply/paho", "correlationId": "paho-7"}
c.publish("peaqos/r1/status/get", json.dumps(body), qos=1).wait_for_publish(10)
if not got.wait(10): sys.exit("no answer")
c.disconnect(); c.loop_stop()
print(answer["text"])
"#;

#[test]
fn malformed_huge_retained_and_misdirected_queries_have_no_effect() {
    let Some((broker, tools)) = broker("malformed_queries", "") else {
        return;
    };
    let _agent = Agent::start(&config(&broker, Protocol::V5), "r1", Answer::Ok);
    wait_retained(&broker, &tools, "peaqos/r1/availability", |p| p == "online");
    let before = wait_retained(&broker, &tools, "peaqos/r1/status", |p| !p.is_empty());
    let mut watch = Watch::start(&broker, &tools, &["#"]);
    // Retained messages delivered on subscribing come first; skip them.
    let start = watch.seen.len();
    let port = broker.port();
    let big = "x".repeat(8 * 1024);
    let huge = std::env::temp_dir().join(format!("peaqos-huge-{}", std::process::id()));
    std::fs::write(&huge, vec![b'{'; 1024 * 1024]).unwrap();
    let get = "peaqos/r1/status/get";
    let attempts: Vec<Vec<&str>> = vec![
        // v5 response topics outside <prefix>/reply/
        vec![
            "-V",
            "5",
            "-t",
            get,
            "-m",
            "",
            "-D",
            "publish",
            "response-topic",
            "peaqos/r1/status",
        ],
        vec![
            "-V",
            "5",
            "-t",
            get,
            "-m",
            "",
            "-D",
            "publish",
            "response-topic",
            "elsewhere/x",
        ],
        vec![
            "-V",
            "5",
            "-t",
            get,
            "-m",
            "",
            "-D",
            "publish",
            "response-topic",
            "peaqos/r1/replyx",
        ],
        // JSON replyTo outside the prefix, bad JSON, no reply address
        vec![
            "-t",
            get,
            "-m",
            r#"{"replyTo":"peaqos/r1/availability","correlationId":1}"#,
        ],
        vec!["-t", get, "-m", r#"{"replyTo":"peaqos/r2/reply/x"}"#],
        vec!["-t", get, "-m", "{not json"],
        vec!["-t", get, "-m", r#"{"replyTo":["peaqos/r1/reply/x"]}"#],
        vec!["-t", get, "-m", ""],
        // over the 4 KiB request limit, and over the packet limit
        vec!["-t", get, "-m", &big],
        vec!["-V", "5", "-t", get, "-f", huge.to_str().unwrap()],
        // retained queries would be replayed on every reconnect
        vec![
            "-r",
            "-t",
            get,
            "-m",
            r#"{"replyTo":"peaqos/r1/reply/retained"}"#,
        ],
    ];
    for args in &attempts {
        publish(port, &tools, args);
    }
    std::fs::remove_file(&huge).ok();
    // A good query afterwards is answered: the agent is alive and
    // connected, and (being in order) it has handled everything above.
    publish(
        port,
        &tools,
        &["-t", get, "-m", r#"{"replyTo":"peaqos/r1/reply/ok"}"#],
    );
    watch.wait("the good reply", |s| s.topic == "peaqos/r1/reply/ok");
    watch.sync();
    let from_agent: Vec<_> = watch.seen[start..]
        .iter()
        .filter(|s| s.topic != get && s.topic != "peaqos/r1/reply/ok")
        .collect();
    assert!(
        from_agent.is_empty(),
        "the agent published in answer to bad queries: {from_agent:#?}"
    );
    // The connection never dropped (no last will) and status is unchanged.
    assert_eq!(
        wait_retained(&broker, &tools, "peaqos/r1/availability", |_| true),
        "online"
    );
    assert_eq!(
        wait_retained(&broker, &tools, "peaqos/r1/status", |_| true),
        before
    );
    publish(port, &tools, &["-r", "-t", get, "-n"]); // clear the retained query
}

/// Issue #15 item 8: the query rate limit is configurable, and what it
/// drops is counted where a dashboard looks (the retained status), within
/// a second, instead of a debug log line.
#[test]
fn query_rate_limit_is_configurable_and_counted() {
    use std::io::Write as _;
    let Some((broker, tools)) = broker("query_rate_limit", "") else {
        return;
    };
    let mut cfg = config(&broker, Protocol::V311);
    cfg.query_burst = 3;
    cfg.query_rate = 1;
    let _agent = Agent::start(&cfg, "r1", Answer::Ok);
    wait_retained(&broker, &tools, "peaqos/r1/availability", |p| p == "online");
    let reply = "peaqos/r1/reply/rl";
    let mut watch = Watch::start(&broker, &tools, &[reply, "peaqos/r1/status"]);
    // Ten queries at once, from one connection (mosquitto_pub -l: a message
    // per line).
    let mut pubber = Command::new(&tools.publish)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port().to_string(),
            "-q",
            "1",
        ])
        .args(["-t", "peaqos/r1/status/get", "-l"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    {
        let mut stdin = pubber.stdin.take().unwrap();
        for i in 0..10 {
            writeln!(stdin, r#"{{"replyTo":"{reply}","correlationId":{i}}}"#).unwrap();
        }
    }
    assert!(pubber.wait().unwrap().success());
    let counted = watch.wait("the status with every query counted", |s| {
        s.topic == "peaqos/r1/status"
            && serde_json::from_str::<serde_json::Value>(&s.payload).is_ok_and(|v| {
                let q = &v["queries"];
                q["answered"].as_u64().unwrap_or(0) + q["rateLimited"].as_u64().unwrap_or(0) == 10
            })
    });
    let queries = counted.json()["queries"].clone();
    let (answered, limited) = (
        queries["answered"].as_u64().unwrap(),
        queries["rateLimited"].as_u64().unwrap(),
    );
    // The status is republished a second after a drop (three answered at
    // once, maybe one more after a refill).
    assert!(limited >= 6, "{queries}");
    assert!((3..=4).contains(&answered), "{queries}");
    assert_eq!(queries["refused"], 0);
    watch.sync();
    assert_eq!(watch.on(reply).len() as u64, answered);
}

#[test]
fn broker_restart_brings_status_back_by_itself() {
    let Some((mut broker, tools)) = broker("broker_restart", "") else {
        return;
    };
    let agent = Agent::start(&config(&broker, Protocol::V5), "r1", Answer::Ok);
    wait_retained(&broker, &tools, "peaqos/r1/status", |p| {
        status_seq(p) == Some(0)
    });
    broker.stop();
    // Changes while the broker is down never block and are coalesced.
    for _ in 0..5 {
        agent.update(|s| s.state = AgentState::Backoff);
    }
    let seq = agent.seq();
    broker.restart(); // no persistence: the retained state is gone
    let status = wait_retained(&broker, &tools, "peaqos/r1/status", |p| {
        status_seq(p) == Some(seq)
    });
    assert!(status.contains(r#""state":"backoff""#));
    wait_retained(&broker, &tools, "peaqos/r1/availability", |p| p == "online");
    // Subscriptions are back too: queries are answered.
    let answer = request(
        broker.port(),
        &tools,
        "peaqos/r1/status/get",
        "peaqos/r1/reply/after-restart",
        &["-m", ""],
        5,
    );
    assert!(answer.is_some_and(|a| status_seq(&a) == Some(seq)));
}

#[test]
fn a_broker_down_at_boot_never_delays_start() {
    let Some((mut broker, tools)) = broker("broker_down_at_boot", "") else {
        return;
    };
    broker.stop();
    let started = Instant::now();
    let agent = Agent::start(&config(&broker, Protocol::V311), "r1", Answer::Ok);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "spawn waited for the broker"
    );
    agent.update(|s| s.state = AgentState::Active);
    broker.restart();
    let status = wait_retained(&broker, &tools, "peaqos/r1/status", |p| {
        status_seq(p) == Some(1)
    });
    assert!(status.contains(r#""state":"active""#));
}

#[test]
fn a_broker_that_keeps_failing_is_retried_with_backoff_not_in_a_tight_loop() {
    // Not a broker: accepts TCP connections and closes them at once, so
    // every attempt fails right after connecting. No Mosquitto needed.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut cfg: peaqos_agent::mqtt::MqttConfig = toml::from_str(&format!(
        "enabled = true\nurl = \"mqtt://127.0.0.1:{port}\"\n\
         reconnect_min = \"200ms\"\nreconnect_max = \"400ms\"\n"
    ))
    .unwrap();
    cfg.protocol = Protocol::V5;
    let agent = Agent::start(&cfg, "r1", Answer::Ok);
    // Six attempts, each accepted and closed at once on a thread of its
    // own, timed as they arrive.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for _ in 0..6 {
            let (socket, _) = listener.accept().unwrap();
            if tx.send(Instant::now()).is_err() {
                return;
            }
            drop(socket);
        }
    });
    let arrivals: Vec<Instant> = (0..6)
        .map(|n| {
            rx.recv_timeout(WAIT)
                .unwrap_or_else(|_| panic!("attempt {} never came", n + 1))
        })
        .collect();
    drop(agent);
    // Full jitter under 200 ms, then 400 ms, never below a tenth of
    // reconnect_min: every gap is at least 20 ms, where reconnecting at once
    // takes well under one. (Lower bounds: a slow machine only lengthens
    // the gaps.)
    for pair in arrivals.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(20),
            "reconnected after {gap:?}: {arrivals:?}"
        );
    }
}

#[test]
fn shutdown_publishes_offline_and_disconnects_promptly() {
    let Some((broker, tools)) = broker("shutdown_offline", "") else {
        return;
    };
    for protocol in [Protocol::V5, Protocol::V311] {
        let mut agent = Agent::start(&config(&broker, protocol), "r1", Answer::Ok);
        wait_retained(&broker, &tools, "peaqos/r1/availability", |p| p == "online");
        let took = agent.stop();
        assert!(took < Duration::from_secs(2), "stopping took {took:?}");
        assert_eq!(
            wait_retained(&broker, &tools, "peaqos/r1/availability", |_| true),
            "offline"
        );
        // The last retained status is the registration loop's final one.
        let last = wait_retained(&broker, &tools, "peaqos/r1/status", |_| true);
        assert!(last.contains(r#""state":"stopping""#), "{last}");
    }
}

#[test]
fn commands_are_off_by_default_and_then_not_even_subscribed() {
    let Some((broker, tools)) = broker("commands_off", "sys_interval 1") else {
        return;
    };
    let agent = Agent::start(&config(&broker, Protocol::V5), "r1", Answer::Ok);
    wait_retained(&broker, &tools, "peaqos/r1/availability", |p| p == "online");
    // The broker counts subscriptions: ours (status/get) plus the watcher's
    // two (its sync topic and $SYS).
    let mut watch = Watch::start(&broker, &tools, &["$SYS/broker/subscriptions/count"]);
    watch.wait("subscription count", |s| {
        s.topic == "$SYS/broker/subscriptions/count" && s.payload == "3"
    });
    publish(
        broker.port(),
        &tools,
        &["-t", "peaqos/r1/command/reregister", "-m", r#"{"id":"c1"}"#],
    );
    // Queries published after the command are answered after it would have
    // been handled.
    assert!(
        request(
            broker.port(),
            &tools,
            "peaqos/r1/status/get",
            "peaqos/r1/reply/x",
            &["-m", ""],
            5
        )
        .is_some()
    );
    assert_eq!(agent.commands(), 0);
}

#[test]
fn commands_run_once_each_are_rate_limited_and_report_results() {
    let Some((broker, tools)) = broker("commands_on", "") else {
        return;
    };
    let mut config = config(&broker, Protocol::V5);
    config.commands.enabled = true;
    config.commands.allow = vec![CommandName::Reregister];
    config.commands.burst = 2;
    let agent = Agent::start(&config, "r1", Answer::Ok);
    wait_retained(&broker, &tools, "peaqos/r1/availability", |p| p == "online");
    let mut watch = Watch::start(&broker, &tools, &["peaqos/r1/command/result"]);
    let port = broker.port();
    let command = |body: &str| {
        publish(
            port,
            &tools,
            &["-t", "peaqos/r1/command/reregister", "-m", body],
        );
    };
    let result = |w: &mut Watch, id: &str, status: &str| {
        let id = id.to_owned();
        let status = status.to_owned();
        w.wait(&format!("{id} {status}"), move |s| {
            let v: serde_json::Value = serde_json::from_str(&s.payload).unwrap_or_default();
            v["id"] == id.as_str() && v["status"] == status.as_str()
        })
        .json()
    };

    command(r#"{"id":"c1","requester":"test"}"#);
    result(&mut watch, "c1", "accepted");
    let done = result(&mut watch, "c1", "ok");
    assert_eq!(done["command"], "reregister");
    assert_eq!(done["requester"], "test");
    assert_eq!(agent.commands(), 1);

    // The same id again (a QoS 1 redelivery, a script run twice): ignored.
    command(r#"{"id":"c1"}"#);
    // Retained and malformed commands: ignored, no result.
    command(r#"{"id":"c2""#);
    publish(
        port,
        &tools,
        &[
            "-r",
            "-t",
            "peaqos/r1/command/reregister",
            "-m",
            r#"{"id":"c3"}"#,
        ],
    );
    command(r#"{"id":"c4"}"#);
    result(&mut watch, "c4", "ok");
    assert_eq!(agent.commands(), 2);
    // The bucket (burst 2) is empty now.
    command(r#"{"id":"c5"}"#);
    let limited = result(&mut watch, "c5", "rejected");
    assert!(
        limited["message"]
            .as_str()
            .unwrap()
            .contains("rate limited")
    );
    assert_eq!(agent.commands(), 2);
    watch.sync();
    for ignored in ["c1", "c2", "c3"] {
        let results = watch
            .on("peaqos/r1/command/result")
            .iter()
            .filter(|s| s.json()["id"] == ignored)
            .count();
        let expected = usize::from(ignored == "c1") * 2; // c1's first run only
        assert_eq!(results, expected, "results for {ignored}");
    }
    publish(
        port,
        &tools,
        &["-r", "-t", "peaqos/r1/command/reregister", "-n"],
    );
}

#[test]
fn command_results_follow_the_registration_loop_and_reach_reply_topics() {
    let Some((broker, tools)) = broker("command_results", "") else {
        return;
    };
    let mut cfg = config(&broker, Protocol::V5);
    cfg.commands.enabled = true;
    cfg.commands.allow = vec![CommandName::Reregister];
    cfg.commands.result_timeout = Duration::from_secs(1);
    {
        let agent = Agent::start(&cfg, "r1", Answer::Err("orchestrator unreachable"));
        wait_retained(&broker, &tools, "peaqos/r1/availability", |p| p == "online");
        // mosquitto_rr drives the command; the first answer is `accepted`,
        // then the result follows on the result topic.
        let mut watch = Watch::start(&broker, &tools, &["peaqos/r1/command/result"]);
        let answer = request(
            broker.port(),
            &tools,
            "peaqos/r1/command/reregister",
            "peaqos/r1/reply/admin",
            &["-m", r#"{"id":"e1"}"#],
            5,
        )
        .expect("no answer to the command");
        assert!(answer.contains(r#""status":"accepted""#), "{answer}");
        let failed = watch.wait("error result", |s| {
            s.payload.contains(r#""status":"error""#)
        });
        assert_eq!(failed.json()["message"], "orchestrator unreachable");
        assert_eq!(agent.commands(), 1);
    }
    {
        let _agent = Agent::start(&cfg, "r1", Answer::Never);
        wait_retained(&broker, &tools, "peaqos/r1/availability", |p| p == "online");
        let mut watch = Watch::start(&broker, &tools, &["peaqos/r1/command/result"]);
        publish(
            broker.port(),
            &tools,
            &["-t", "peaqos/r1/command/reregister", "-m", r#"{"id":"t1"}"#],
        );
        watch.wait("timeout result", |s| {
            s.payload.contains(r#""status":"timeout""#)
        });
    }
}

#[test]
fn home_assistant_discovery_is_published_and_renewed_when_it_comes_online() {
    let Some((broker, tools)) = broker("ha_discovery", "") else {
        return;
    };
    let mut cfg = config(&broker, Protocol::V5);
    cfg.home_assistant.enabled = true;
    let _agent = Agent::start(&cfg, "Robot 7", Answer::Ok);
    let topic = "homeassistant/sensor/Robot_7/state/config";
    let config_json = wait_retained(&broker, &tools, topic, |p| !p.is_empty());
    let v: serde_json::Value = serde_json::from_str(&config_json).unwrap();
    assert_eq!(v["state_topic"], "peaqos/Robot_7/status");
    assert_eq!(v["availability_topic"], "peaqos/Robot_7/availability");
    assert_eq!(v["value_template"], "{{ value_json.state }}");
    assert_eq!(v["json_attributes_topic"], "peaqos/Robot_7/status");
    // Home Assistant restarted and lost it (simulated by clearing it); its
    // birth message brings it back.
    publish(broker.port(), &tools, &["-r", "-t", topic, "-n"]);
    let mut watch = Watch::start(&broker, &tools, &[topic]);
    publish(
        broker.port(),
        &tools,
        &["-t", "homeassistant/status", "-m", "online"],
    );
    let again = watch.wait("rediscovery", |s| s.topic == topic && !s.payload.is_empty());
    assert_eq!(again.json(), v);
}

#[test]
fn the_status_command_api_answers_and_reports_an_offline_agent() {
    let Some((broker, tools)) = broker("query_status_api", "") else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for protocol in [Protocol::V5, Protocol::V311] {
        let cfg = config(&broker, protocol);
        let mut agent = Agent::start(&cfg, "r1", Answer::Ok);
        agent.update(|s| s.state = AgentState::Active);
        wait_retained(&broker, &tools, "peaqos/r1/availability", |p| p == "online");
        let answer = rt
            .block_on(mqtt::query_status(&cfg, "r1", WAIT))
            .unwrap_or_else(|e| panic!("MQTT {protocol}: {}", crate::support::error_chain(&e)));
        assert_eq!(answer["state"], "active");
        assert_eq!(answer["seq"], agent.seq());
        assert!(answer.get("correlationId").is_none());
        // The helper client used its own client id: the agent is still online.
        assert_eq!(
            wait_retained(&broker, &tools, "peaqos/r1/availability", |_| true),
            "online"
        );

        let found = rt.block_on(mqtt::check_broker(&cfg, WAIT)).unwrap();
        assert!(found.contains(&format!("MQTT {protocol}")), "{found}");

        agent.stop();
        let started = Instant::now();
        let err = rt
            .block_on(mqtt::query_status(&cfg, "r1", WAIT))
            .unwrap_err();
        assert!(matches!(err, MqttError::AgentOffline { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    // Nothing listening at all: a clear connection error, not a hang.
    let mut cfg = config(&broker, Protocol::V5);
    cfg.url = format!("mqtt://127.0.0.1:{}", peaqos_testkit::free_port());
    let err = rt.block_on(mqtt::check_broker(&cfg, WAIT)).unwrap_err();
    assert!(matches!(err, MqttError::Connect { .. }), "{err}");
}
