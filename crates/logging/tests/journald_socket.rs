//! End to end through `peaqos_logging::init_with` and the real
//! `systemd_journal_logger::JournalLog`: a child process whose stderr is
//! "the journal" (`$JOURNAL_STREAM` names it, as systemd does for services)
//! logs to a fake journald socket, and the datagram it sends carries
//! `STATE=`, `MACHINE_ID=` and `ERROR_CODE=` as journal fields.
//!
//! `JournalLog` always sends to /run/systemd/journal/socket, so the child
//! runs in private user and mount namespaces (`unshare`) with a tmpfs over
//! /run: the fake socket never touches the host's journal. Where
//! namespaces are not allowed, the test prints one skip line.
//!
//! Each scenario runs in its own child process, because a global
//! subscriber can be installed once per process and the environment
//! (`JOURNAL_STREAM`, `RUST_LOG`) is process-wide.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use peaqos_logging::{Options, Output};

const CHILD_ENV: &str = "PEAQOS_LOGGING_TEST_CHILD";
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Runs this test binary's `child` test in fresh namespaces, with stderr
/// going to a file whose device and inode `JOURNAL_STREAM` names unless
/// `journal_stream` is false. Returns the child's stderr, or `None` when
/// namespaces are not available here.
fn run_child(scenario: &str, journal_stream: bool, rust_log: Option<&str>) -> Option<String> {
    let probe = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!(
            "skipped journald socket test: cannot create user and mount namespaces (unshare)"
        );
        return None;
    }

    let dir = tempfile::tempdir().unwrap();
    let stderr_path = dir.path().join("stderr");
    let stderr = File::create(&stderr_path).unwrap();
    let meta = stderr.metadata().unwrap();
    let mut command = Command::new("unshare");
    command
        .args(["--user", "--map-root-user", "--mount", "--", "sh", "-c"])
        .arg("mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && exec \"$@\"")
        .arg("sh")
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, scenario)
        .env_remove("RUST_LOG")
        .env_remove("JOURNAL_STREAM")
        .stdout(Stdio::null())
        .stderr(stderr);
    if journal_stream {
        command.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
    }
    if let Some(filter) = rust_log {
        command.env("RUST_LOG", filter);
    }
    let status = command.status().expect("run unshare");
    let output = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(status.success(), "child {scenario} failed:\n{output}");
    Some(output)
}

#[test]
fn journal_stream_on_stderr_sends_structured_fields_to_journald() {
    let Some(output) = run_child("journal", true, None) else {
        return;
    };
    assert!(
        output.contains("child journal: ok"),
        "child did not run its checks:\n{output}"
    );
}

#[test]
fn without_journal_stream_logs_readable_lines_to_stderr_filtered_by_rust_log() {
    let Some(output) = run_child("stderr", false, Some("warn")) else {
        return;
    };
    assert!(
        output.contains("child stderr: ok"),
        "child did not run its checks:\n{output}"
    );
    let line = output
        .lines()
        .find(|l| l.contains("orchestrator unreachable"))
        .unwrap_or_else(|| panic!("no warning line in:\n{output}"));
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.contains("state=\"backoff\"") || line.contains("state=backoff"),
        "{line}"
    );
    assert!(line.contains("error_code"), "{line}");
    assert!(
        !line.contains('\u{1b}'),
        "no colour codes when stderr is a file: {line}"
    );
    // RUST_LOG=warn wins over the `debug` level the child passes as config.
    assert!(!output.contains("hidden by RUST_LOG"), "{output}");
}

/// The child side; does nothing unless started by `run_child`.
#[test]
fn child() {
    match std::env::var(CHILD_ENV).as_deref() {
        Ok("journal") => child_journal(),
        Ok("stderr") => child_stderr(),
        _ => {}
    }
}

fn child_journal() {
    let socket = UnixDatagram::bind(JOURNAL_SOCKET).expect("bind fake journald socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();

    let chosen = peaqos_logging::init_with(&Options {
        level: Some("debug"),
        output: Output::Auto,
    })
    .unwrap();
    assert_eq!(chosen, Output::Journal, "JOURNAL_STREAM names stderr");

    let span = tracing::info_span!("registration", machine_id = "7f3a");
    let _entered = span.enter();
    tracing::warn!(
        state = "not_controller",
        error_code = "MACHINE_IDENTITY_CONTROLLER_MISMATCH",
        "our key is not a controller of the identity"
    );
    // Config level `debug` applies (RUST_LOG is unset): the default `info`
    // would drop this one.
    tracing::debug!(state = "backoff", "debug from config level");

    let warn = receive_entry(&socket, "our key is not a controller");
    assert_eq!(warn["PRIORITY"], "4");
    assert_eq!(warn["STATE"], "not_controller");
    assert_eq!(warn["MACHINE_ID"], "7f3a");
    assert_eq!(warn["ERROR_CODE"], "MACHINE_IDENTITY_CONTROLLER_MISMATCH");
    assert_eq!(warn["TARGET"], module_path!());
    assert_eq!(warn["SYSLOG_IDENTIFIER"], exe_name());
    assert!(warn.contains_key("CODE_LINE"));

    let debug = receive_entry(&socket, "debug from config level");
    assert_eq!(debug["PRIORITY"], "6");
    assert_eq!(debug["STATE"], "backoff");
    eprintln!("child journal: ok");
}

fn child_stderr() {
    assert!(
        !Path::new(JOURNAL_SOCKET).exists(),
        "no journald in the namespace"
    );
    let chosen = peaqos_logging::init_with(&Options {
        level: Some("debug"),
        output: Output::Auto,
    })
    .unwrap();
    assert_eq!(chosen, Output::Stderr);
    tracing::info!("hidden by RUST_LOG");
    tracing::warn!(
        state = "backoff",
        error_code = "SERVICE_UNAVAILABLE",
        "orchestrator unreachable"
    );
    eprintln!("child stderr: ok");
}

fn exe_name() -> String {
    std::env::current_exe()
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// Reads datagrams until one whose MESSAGE contains `needle` (JournalLog
/// sends an empty probe datagram when it connects).
fn receive_entry(socket: &UnixDatagram, needle: &str) -> HashMap<String, String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buffer = vec![0_u8; 64 * 1024];
    while Instant::now() < deadline {
        let len = socket.recv(&mut buffer).expect("datagram within 5 s");
        let entry = parse_native(&buffer[..len]);
        if entry.get("MESSAGE").is_some_and(|m| m.contains(needle)) {
            return entry;
        }
    }
    panic!("no journal entry with {needle:?}");
}

/// Parses journald's native protocol: `KEY=value\n`, or for values that
/// may hold newlines `KEY\n` + little-endian u64 length + value + `\n`.
fn parse_native(mut data: &[u8]) -> HashMap<String, String> {
    let mut entry = HashMap::new();
    while !data.is_empty() {
        let line_end = data
            .iter()
            .position(|&b| b == b'\n')
            .expect("field ends in a newline");
        let line = &data[..line_end];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            entry.insert(
                String::from_utf8(line[..eq].to_vec()).unwrap(),
                String::from_utf8(line[eq + 1..].to_vec()).unwrap(),
            );
            data = &data[line_end + 1..];
        } else {
            let key = String::from_utf8(line.to_vec()).unwrap();
            let rest = &data[line_end + 1..];
            let len = usize::try_from(u64::from_le_bytes(rest[..8].try_into().unwrap())).unwrap();
            let value = String::from_utf8(rest[8..8 + len].to_vec()).unwrap();
            assert_eq!(rest[8 + len], b'\n');
            entry.insert(key, value);
            data = &rest[8 + len + 1..];
        }
    }
    entry
}
