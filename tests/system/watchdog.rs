//! `peaqos_agent::systemd` against a fake `$NOTIFY_SOCKET`: READY=1,
//! STATUS=, STOPPING=1, and a watchdog fed only while every task beats.
//!
//! The environment systemd hands a service (`NOTIFY_SOCKET`,
//! `WATCHDOG_USEC`) is process-wide, so each scenario runs this test binary
//! again as a child process with that environment, and the parent reads
//! what the child sent to a Unix datagram socket in a temp dir.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use peaqos_agent::systemd::{self, Heartbeat};
use tokio_util::sync::CancellationToken;

const CHILD_ENV: &str = "PEAQOS_SYSTEMD_TEST_CHILD";
/// The watchdog period the children run with: short, so that the suite
/// stays fast; pings are due every half period.
const WATCHDOG_MS: u64 = 200;

/// One notification as the parent received it.
#[derive(Debug)]
struct Message {
    at: Duration,
    text: String,
}

/// Runs `scenario` in a child with a fake notify socket (and a watchdog
/// unless `watchdog_env` says otherwise); returns the notifications and the
/// child's stderr.
fn run_child(scenario: &str, watchdog_env: &[(&str, String)]) -> (Vec<Message>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket.set_nonblocking(true).unwrap();

    let started = Instant::now();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "watchdog::child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, scenario)
        .env("NOTIFY_SOCKET", &path)
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .envs(watchdog_env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let deadline = started + Duration::from_secs(20);
    let mut messages = Vec::new();
    let mut buffer = [0_u8; 4096];
    let status = loop {
        while let Ok(len) = socket.recv(&mut buffer) {
            messages.push(Message {
                at: started.elapsed(),
                text: String::from_utf8_lossy(&buffer[..len]).into_owned(),
            });
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "child {scenario} did not exit");
        std::thread::sleep(Duration::from_millis(2));
    };
    while let Ok(len) = socket.recv(&mut buffer) {
        messages.push(Message {
            at: started.elapsed(),
            text: String::from_utf8_lossy(&buffer[..len]).into_owned(),
        });
    }
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "child {scenario} failed:\n{stderr}");
    assert!(
        stderr.contains(&format!("child {scenario}: ok")),
        "child {scenario} did not run:\n{stderr}"
    );
    (messages, stderr)
}

fn watchdog_env() -> Vec<(&'static str, String)> {
    vec![("WATCHDOG_USEC", (WATCHDOG_MS * 1000).to_string())]
}

fn pings(messages: &[Message]) -> Vec<Duration> {
    messages
        .iter()
        .filter(|m| m.text == "WATCHDOG=1\n")
        .map(|m| m.at)
        .collect()
}

#[test]
fn ready_status_stopping_and_a_watchdog_fed_while_all_tasks_beat() {
    let (messages, _) = run_child("alive", &watchdog_env());
    let texts: Vec<&str> = messages.iter().map(|m| m.text.as_str()).collect();

    let ready = texts
        .iter()
        .position(|t| *t == "READY=1\n")
        .expect("READY=1");
    assert!(
        texts.contains(&"STATUS=active machine 7f3a\n"),
        "status sent as one line: {texts:?}"
    );
    let stopping = texts
        .iter()
        .position(|t| *t == "STOPPING=1\n")
        .expect("STOPPING=1");
    assert!(ready < stopping);
    // The child runs 1.5 s with a 200 ms period: about 15 pings. One task
    // only sleeps (through `Heartbeat::sleep`), so if sleeping did not beat,
    // the pings would stop after one period (about 3).
    let ping_count = pings(&messages).len();
    assert!(
        ping_count >= 6,
        "expected a ping every {} ms: {texts:?}",
        WATCHDOG_MS / 2
    );
    // Shutdown stops the feeding before the process says it is stopping.
    assert!(
        !texts[stopping..].contains(&"WATCHDOG=1\n"),
        "pings after STOPPING=1: {texts:?}"
    );
}

#[test]
fn a_stalled_task_starves_the_watchdog_until_it_beats_again() {
    let (messages, stderr) = run_child("stall", &watchdog_env());
    let pings = pings(&messages);
    assert!(!pings.is_empty(), "{messages:?}");
    // The MQTT task beats at start, then not for 600 ms (three periods),
    // then again: the pings stop for a while and resume.
    let gaps: Vec<Duration> = pings
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]))
        .collect();
    let gap = gaps.iter().copied().max().unwrap_or_default();
    assert!(
        gap >= Duration::from_millis(WATCHDOG_MS + WATCHDOG_MS / 4),
        "no pause in feeding while a task stalled (largest gap {gap:?}): {messages:?}"
    );
    // ... and resumed: the largest gap is not the silence before exit.
    let gap_index = gaps.iter().position(|g| *g == gap).unwrap();
    assert!(
        gap_index + 1 < gaps.len(),
        "feeding did not resume after the task beat again: {messages:?}"
    );
    // The log names the task that stopped, then says it is back.
    let stalled_line = stderr
        .lines()
        .find(|l| l.contains("stopped making progress"))
        .unwrap_or_else(|| panic!("no stall logged:\n{stderr}"));
    assert!(stalled_line.contains("mqtt"), "{stalled_line}");
    assert!(
        !stalled_line.contains("registration"),
        "only the stalled task is named: {stalled_line}"
    );
    assert!(stderr.contains("all tasks alive again"), "{stderr}");
}

#[test]
fn no_watchdog_configured_or_meant_for_another_process_means_no_pings() {
    for env in [
        vec![],
        vec![
            ("WATCHDOG_USEC", (WATCHDOG_MS * 1000).to_string()),
            // systemd sets WATCHDOG_PID to the main process; a child that
            // inherited the variables must not feed the watchdog.
            ("WATCHDOG_PID", "1".to_owned()),
        ],
    ] {
        let (messages, _) = run_child("no_watchdog", &env);
        let texts: Vec<&str> = messages.iter().map(|m| m.text.as_str()).collect();
        assert!(texts.contains(&"READY=1\n"), "{texts:?}");
        assert!(!texts.contains(&"WATCHDOG=1\n"), "{env:?}: {texts:?}");
    }
}

/// The child side; does nothing unless started by `run_child`.
#[test]
fn child() {
    let Ok(scenario) = std::env::var(CHILD_ENV) else {
        return;
    };
    peaqos_logging::init(None).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    runtime.block_on(async {
        match scenario.as_str() {
            "alive" => child_alive().await,
            "stall" => child_stall().await,
            "no_watchdog" => child_no_watchdog().await,
            other => panic!("unknown scenario {other}"),
        }
    });
    eprintln!("child {scenario}: ok");
}

/// Registration beats from its loop; MQTT only sleeps via the heartbeat.
async fn child_alive() {
    let registration = Heartbeat::new("registration");
    let mqtt = Heartbeat::new("mqtt");
    let shutdown = CancellationToken::new();
    let watchdog = systemd::spawn_watchdog(&[registration.clone(), mqtt.clone()], shutdown.clone())
        .expect("WATCHDOG_USEC is set");
    assert_eq!(
        systemd::beat_interval(),
        Some(Duration::from_millis(WATCHDOG_MS / 4))
    );
    systemd::notify_ready();
    systemd::notify_status("active\nmachine 7f3a");
    let loop_shutdown = shutdown.clone();
    let registration_loop = tokio::spawn(async move {
        while !loop_shutdown.is_cancelled() {
            registration.beat();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let mqtt_loop = tokio::spawn(async move { mqtt.sleep(Duration::from_millis(1500)).await });
    mqtt_loop.await.unwrap();
    shutdown.cancel();
    watchdog.await.unwrap();
    registration_loop.await.unwrap();
    systemd::notify_stopping();
}

/// MQTT beats at start, hangs for three periods, then beats again.
async fn child_stall() {
    let registration = Heartbeat::new("registration");
    let mqtt = Heartbeat::new("mqtt");
    let shutdown = CancellationToken::new();
    let watchdog = systemd::spawn_watchdog(&[registration.clone(), mqtt.clone()], shutdown.clone())
        .expect("WATCHDOG_USEC is set");
    systemd::notify_ready();
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        registration.beat();
        let hung =
            (Duration::from_millis(100)..Duration::from_millis(700)).contains(&started.elapsed());
        if !hung {
            mqtt.beat();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    watchdog.await.unwrap();
    systemd::notify_stopping();
}

async fn child_no_watchdog() {
    let heartbeat = Heartbeat::new("registration");
    assert!(
        systemd::spawn_watchdog(std::slice::from_ref(&heartbeat), CancellationToken::new())
            .is_none(),
        "no watchdog for this process"
    );
    assert_eq!(systemd::beat_interval(), None);
    systemd::notify_ready();
    // Long enough that a (wrongly) started watchdog would have pinged.
    heartbeat.sleep(Duration::from_millis(300)).await;
    systemd::notify_stopping();
}
