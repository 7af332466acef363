//! The agent binary as systemd runs it: the shipped example config, the
//! controller key as a credential (`$CREDENTIALS_DIRECTORY`), a notify
//! socket and a watchdog, and no reachable orchestrator. It must say
//! READY=1 without waiting for the network, report its state in STATUS=,
//! feed the watchdog, and on SIGTERM say STOPPING=1 and exit cleanly.

use std::net::TcpListener;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const AGENT: &str = env!("CARGO_BIN_EXE_peaqos-agent");

/// Receives notifications until one satisfies `want`, for at most
/// `within`; returns everything received.
fn receive_until(
    socket: &UnixDatagram,
    seen: &mut Vec<String>,
    within: Duration,
    want: impl Fn(&str) -> bool,
) -> bool {
    let deadline = Instant::now() + within;
    let mut buffer = [0_u8; 4096];
    while Instant::now() < deadline {
        socket
            .set_read_timeout(Some(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ))
            .unwrap();
        let Ok(len) = socket.recv(&mut buffer) else {
            continue;
        };
        let text = String::from_utf8_lossy(&buffer[..len]).into_owned();
        let done = text.lines().any(&want);
        seen.push(text);
        if done {
            return true;
        }
    }
    false
}

#[test]
fn agent_is_ready_without_network_reports_status_feeds_watchdog_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let credentials = dir.path().join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let key = credentials.join("controller-key");
    let keygen = Command::new(AGENT)
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(keygen.status.success(), "{keygen:?}");

    // The shipped config, pointed at a port where nothing listens.
    let closed_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/agent.example.toml"),
    )
    .unwrap();
    for line in [
        "url = \"https://orchestrator.example.com\"",
        "dir = \"/var/lib/peaqos-agent\"",
        "key_file = \"credential:controller-key\"",
    ] {
        assert!(example.contains(line), "example config has {line}");
    }
    let config = example
        .replace(
            "url = \"https://orchestrator.example.com\"",
            &format!("url = \"http://127.0.0.1:{closed_port}\""),
        )
        .replace(
            "dir = \"/var/lib/peaqos-agent\"",
            &format!("dir = \"{}\"", state.display()),
        );
    let config_path = dir.path().join("agent.toml");
    std::fs::write(&config_path, config).unwrap();

    let notify_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&notify_path).unwrap();
    let mut agent = Command::new(AGENT)
        .arg("run")
        .arg("--config")
        .arg(&config_path)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "2000000")
        .env_remove("WATCHDOG_PID")
        .env("CREDENTIALS_DIRECTORY", &credentials)
        .env_remove("JOURNAL_STREAM")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let mut seen = Vec::new();
    let ready = receive_until(&socket, &mut seen, Duration::from_secs(10), |l| {
        l == "READY=1"
    });
    let backoff = ready
        && receive_until(&socket, &mut seen, Duration::from_secs(10), |l| {
            l.starts_with("STATUS=backoff")
        });
    let fed = backoff
        && receive_until(&socket, &mut seen, Duration::from_secs(10), |l| {
            l == "WATCHDOG=1"
        });

    let terminated = Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status()
        .unwrap();
    assert!(terminated.success());
    let stopping = receive_until(&socket, &mut seen, Duration::from_secs(10), |l| {
        l == "STOPPING=1"
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = agent.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            agent.kill().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut agent.stderr.take().unwrap(), &mut stderr).unwrap();

    assert!(ready, "no READY=1 while offline: {seen:?}\n{stderr}");
    assert!(backoff, "no STATUS=backoff…: {seen:?}\n{stderr}");
    assert!(fed, "no WATCHDOG=1: {seen:?}\n{stderr}");
    assert!(stopping, "no STOPPING=1 after SIGTERM: {seen:?}\n{stderr}");
    assert!(
        status.is_some_and(|s| s.success()),
        "exit after SIGTERM: {status:?}\n{stderr}"
    );
    // The key never appears in the output.
    let secret = std::fs::read_to_string(&key).unwrap();
    assert!(!stderr.contains(secret.trim()));
}
