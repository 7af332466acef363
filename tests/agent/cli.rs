//! The `peaqos-agent` binary as operators and packages use it: keygen,
//! address, check, run with bad input, and SIGTERM.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::fake::Fake;
use crate::support::{FAST_RENEWAL, config_text, write_key};
use peaqos_protocol::MachineStatus;

const BIN: &str = env!("CARGO_BIN_EXE_peaqos-agent");
const ID: &str = "did:peaq:4242";

fn agent(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn keygen_writes_a_private_key_once_and_address_reads_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("controller.key");
    let key_arg = key.to_str().unwrap();
    let out = agent(&["keygen", "--out", key_arg]);
    assert!(out.status.success(), "{}", text(&out));
    let printed = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(
        printed.starts_with("0x") && printed.len() == 42,
        "{printed}"
    );
    assert_eq!(mode(&key), 0o600);
    let hex = std::fs::read_to_string(&key).unwrap();
    assert_eq!(hex.trim().len(), 64);
    assert!(!printed.contains(hex.trim()));

    let again = agent(&["keygen", "--out", key_arg]);
    assert!(!again.status.success());
    assert!(
        text(&again).contains("refusing to overwrite"),
        "{}",
        text(&again)
    );
    assert_eq!(std::fs::read_to_string(&key).unwrap(), hex, "untouched");

    let addr = agent(&["address", "--key", key_arg]);
    assert!(addr.status.success(), "{}", text(&addr));
    assert_eq!(String::from_utf8(addr.stdout).unwrap().trim(), printed);
}

#[test]
fn a_key_file_others_can_read_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let (_, key) = write_key(dir.path(), "loose");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = agent(&["address", "--key", key.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("chmod 600 {}", key.display())),
        "{}",
        text(&out)
    );

    // `run` refuses it too, before any network activity.
    let config = dir.path().join("agent.toml");
    let state = dir.path().join("state");
    std::fs::write(
        &config,
        config_text("http://127.0.0.1:9", ID, &key, &state, ""),
    )
    .unwrap();
    let out = agent(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(text(&out).contains("chmod 600"), "{}", text(&out));
    assert!(!state.exists(), "nothing written");
}

#[test]
fn a_bad_config_stops_run_naming_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let (_, key) = write_key(dir.path(), "controller");
    let config = dir.path().join("agent.toml");
    let state = dir.path().join("state");
    std::fs::write(
        &config,
        config_text("http://127.0.0.1:9", ID, &key, &state, ""),
    )
    .unwrap();
    let drop_ins = dir.path().join("agent.d");
    std::fs::create_dir(&drop_ins).unwrap();
    let bad = drop_ins.join("50-typo.toml");
    std::fs::write(&bad, "[renewal]\ncheck_intervall = \"5m\"\n").unwrap();
    let out = agent(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains(&format!("{}:2:1", bad.display())), "{t}");
    assert!(t.contains("check_intervall"), "{t}");

    let check = agent(&["check", "--config", config.to_str().unwrap()]);
    assert!(!check.status.success());
    let t = text(&check);
    assert!(t.lines().next().unwrap().starts_with("FAIL  config"), "{t}");
    assert!(t.contains("skip  orchestrator"), "{t}");
}

/// Issue #15 (a newcomer's first minutes): the shipped configuration names
/// the key `credential:controller-key`, which only systemd provides. Outside
/// systemd, `check` and `address` read what the unit would pass (its
/// `LoadCredential=controller-key:/etc/peaqos-agent/controller.key`, that
/// is `controller.key` beside the configuration) and say so.
#[test]
fn outside_systemd_a_credential_is_read_from_the_units_source() {
    let dir = tempfile::tempdir().unwrap();
    // Where the unit's source would be, relative to the configuration.
    let (key, key_path) = write_key(dir.path(), "controller");
    let config = dir.path().join("agent.toml");
    let state = dir.path().join("state");
    std::fs::write(
        &config,
        config_text("http://127.0.0.1:9", ID, Path::new("KEY"), &state, "")
            .replace("\"KEY\"", "\"credential:controller-key\""),
    )
    .unwrap();
    let address = agent(&["address", "--config", config.to_str().unwrap()]);
    assert!(address.status.success(), "{}", text(&address));
    assert_eq!(
        String::from_utf8_lossy(&address.stdout).trim(),
        key.address().checksummed()
    );
    let check = agent(&["check", "--config", config.to_str().unwrap()]);
    let t = text(&check);
    assert!(
        t.contains(&format!(
            "ok    credential    credential:controller-key: {}",
            key_path.display()
        )),
        "{t}"
    );
    assert!(
        t.lines()
            .any(|l| l.starts_with("ok    key file") && l.contains(&key.address().checksummed())),
        "{t}"
    );
    // A credential the unit does not define still fails, and says what to do.
    std::fs::write(
        &config,
        config_text("http://127.0.0.1:9", ID, Path::new("KEY"), &state, "")
            .replace("\"KEY\"", "\"credential:other-key\""),
    )
    .unwrap();
    let check = agent(&["check", "--config", config.to_str().unwrap()]);
    let t = text(&check);
    assert!(t.contains("FAIL  key file"), "{t}");
    assert!(t.contains("name the file itself"), "{t}");
}

/// Issue #15 (minor): `check` called a 100 %-full state directory
/// writable, because creating an empty file needs no free block. A tmpfs
/// filled to the last block, in a private mount namespace (root only).
#[test]
fn check_reports_a_full_state_directory() {
    let Some(unshare) = peaqos_testkit::root_unshare("check_full_state_dir") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (_, key) = write_key(dir.path(), "controller");
    let config = dir.path().join("agent.toml");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::write(
        &config,
        config_text("http://127.0.0.1:9", ID, &key, &state, ""),
    )
    .unwrap();
    let out = Command::new(unshare)
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            "mount -t tmpfs -o size=64k tmpfs \"$1\" && { cat /dev/zero > \"$1/fill\" 2>/dev/null; \
             exec \"$2\" check --config \"$3\"; }",
        )
        .arg("sh")
        .args([&state, Path::new(BIN), &config])
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap();
    let t = text(&out);
    let line = t
        .lines()
        .find(|l| l.contains("state dir"))
        .unwrap_or_else(|| panic!("no state dir line: {t}"));
    assert!(line.starts_with("FAIL"), "{t}");
    assert!(line.contains("No space left"), "{t}");
}

#[test]
fn status_without_mqtt_says_why_it_cannot_ask() {
    let dir = tempfile::tempdir().unwrap();
    let (_, key) = write_key(dir.path(), "controller");
    let config = dir.path().join("agent.toml");
    let state = dir.path().join("state");
    std::fs::write(
        &config,
        config_text("http://127.0.0.1:9", ID, &key, &state, ""),
    )
    .unwrap();
    let out = agent(&["status", "--config", config.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(
        text(&out).contains("MQTT interface is disabled"),
        "{}",
        text(&out)
    );
}

#[test]
fn every_command_has_help() {
    for cmd in ["run", "keygen", "address", "check", "status"] {
        let out = agent(&[cmd, "--help"]);
        assert!(out.status.success(), "{cmd}: {}", text(&out));
        assert!(text(&out).contains("Usage: peaqos-agent"), "{cmd}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_each_part_and_whether_we_are_a_controller() {
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (key, key_path) = write_key(dir.path(), "controller");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        config_text(&fake.url(), ID, &key_path, &dir.path().join("state"), ""),
    )
    .unwrap();
    let config_arg = config.to_str().unwrap().to_owned();
    let run_check = || {
        let arg = config_arg.clone();
        tokio::task::spawn_blocking(move || agent(&["check", "--config", &arg]))
    };

    // Not (yet) a controller: the check says so and fails.
    fake.set_controllers(ID, &[]);
    let out = run_check().await.unwrap();
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    for line in [
        "ok    config",
        "ok    key file",
        "ok    state dir",
        "ok    clock",
        "ok    orchestrator",
    ] {
        assert!(t.contains(line), "{line:?} missing in:\n{t}");
    }
    assert!(t.contains("FAIL  controller"), "{t}");
    assert!(t.contains("NOT among"), "{t}");
    assert!(t.contains("skip  mqtt"), "{t}");

    fake.set_controllers(ID, &[key.address()]);
    let out = run_check().await.unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains(&key.address().checksummed()), "{t}");
    assert!(t.contains("ok    challenge"), "{t}");
    assert!(t.contains("policy standard (default) would sign"), "{t}");
    // How the key is held (issue 21): here a plaintext file.
    assert!(t.contains("ok    key           plaintext file"), "{t}");
    assert_eq!(t.lines().count(), 9, "{t}");
    assert_eq!(fake.lock().counters.creates, 0, "check registers nothing");
}

/// Issue #15 item 10, the binary as installed (no MQTT: nothing but the
/// timers wakes the loop): probes run while it backs off, and end the wait
/// once the orchestrator answers. (Probes once ran only while a command
/// sender was alive, that is only with MQTT enabled.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_without_mqtt_probes_during_a_backoff_and_recovers_at_once() {
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (key, key_path) = write_key(dir.path(), "controller");
    fake.set_controllers(ID, &[key.address()]);
    fake.lock().fault = Some(crate::support::fake::Fault {
        status: 503,
        code: "SERVICE_UNAVAILABLE",
        retry_after: None,
    });
    let config = dir.path().join("agent.toml");
    let state = dir.path().join("state");
    std::fs::write(
        &config,
        config_text(
            &fake.url(),
            ID,
            &key_path,
            &state,
            // Without probes: a minute at least before the next attempt.
            "[renewal]\nbackoff_initial = \"10m\"\nbackoff_max = \"1h\"\nprobe_interval = \"100ms\"\n",
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--config", config.to_str().unwrap()])
        .env_remove("CREDENTIALS_DIRECTORY")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The first cycle, then probes (each a request that is not a cycle).
    fake.wait_until("a cycle and two probes", Duration::from_secs(10), |c| {
        c.requests >= 3
    })
    .await;
    fake.lock().fault = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fake
        .machines()
        .iter()
        .any(|m| m.status == MachineStatus::Active)
    {
        assert!(Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_registers_then_stops_cleanly_on_sigterm() {
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (key, key_path) = write_key(dir.path(), "controller");
    fake.set_controllers(ID, &[key.address()]);
    let config = dir.path().join("agent.toml");
    let state = dir.path().join("state");
    std::fs::write(
        &config,
        config_text(&fake.url(), ID, &key_path, &state, FAST_RENEWAL),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The log is read as it comes: the fake records the activating PATCH
    // before the agent has logged (and saved) what it answered, so a
    // SIGTERM sent on the fake's word alone could stop the agent first.
    let mut log = peaqos_testkit::ChildLog::follow(child.stderr.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    let active = loop {
        let active = fake
            .machines()
            .into_iter()
            .find(|m| m.status == MachineStatus::Active);
        if let Some(m) = active
            && log.find(0, "state=active").is_some()
        {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "agent never activated its record, or never logged state=active:\n{}",
            log.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let pid = child.id();
    let sent = Instant::now();
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(2),
            "agent still running 2 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(status.success(), "{status:?}");
    log.finish();
    let log = log.text();
    assert!(log.contains("SIGTERM"), "{log}");
    let key_hex = std::fs::read_to_string(&key_path).unwrap();
    assert!(
        !log.contains(key_hex.trim()),
        "the key never reaches the log"
    );
    let saved = std::fs::read_to_string(state.join("state.json")).unwrap();
    assert!(saved.contains(&active.id), "{saved}");
    // Issue #22 (11): `journalctl STATE=active MACHINE_ID=mach_…` found
    // nothing. The state entries are in the loop's span, which carries the
    // machine's name and, once known, its record's id: the journal gets
    // both as fields (crates/logging), stderr shows the span.
    let state_line = log
        .lines()
        .find(|l| l.contains("state=active"))
        .unwrap_or_else(|| panic!("no state=active entry:\n{log}"));
    assert!(
        state_line.contains(&format!(
            "machine{{machine_name=test robot machine_id={}}}",
            active.id
        )),
        "{state_line}"
    );
}

#[test]
fn an_eth_account_keystore_is_unlocked_with_its_password_file() {
    let Some(python) = peaqos_testkit::python_with(
        "an_eth_account_keystore_is_unlocked_with_its_password_file",
        &["eth_account"],
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let keystore = dir.path().join("keystore.json");
    let password = dir.path().join("password");
    std::fs::write(&password, "s3cret passphrase\n").unwrap();
    // eth-account makes the key and the keystore; we only decrypt.
    let script = r#"
import json, sys
from eth_account import Account
acct = Account.create()
ks = Account.encrypt(acct.key, "s3cret passphrase", kdf="pbkdf2", iterations=2000)
open(sys.argv[1], "w").write(json.dumps(ks))
print(acct.address)
"#;
    let out = Command::new(python)
        .args(["-c", script, keystore.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let expected = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    std::fs::set_permissions(&keystore, std::fs::Permissions::from_mode(0o600)).unwrap();

    let ks = keystore.to_str().unwrap();
    let out = agent(&[
        "address",
        "--key",
        ks,
        "--password-file",
        password.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), expected);

    let no_password = agent(&["address", "--key", ks]);
    assert_eq!(no_password.status.code(), Some(78));
    assert!(
        text(&no_password).contains("key_password_file"),
        "{}",
        text(&no_password)
    );

    std::fs::write(&password, "wrong\n").unwrap();
    let wrong = agent(&[
        "address",
        "--key",
        ks,
        "--password-file",
        password.to_str().unwrap(),
    ]);
    assert_eq!(wrong.status.code(), Some(78));
    assert!(
        text(&wrong).contains("wrong keystore password"),
        "{}",
        text(&wrong)
    );
}

/// `check` on a gateway: agent.toml, then every machine file, each of a
/// machine's lines marked with its name; a bad file fails the check with
/// the file, line and key named, and the good machine is checked in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_each_machine_file_and_its_problems() {
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let machines = dir.path().join("machines.d");
    std::fs::create_dir(&machines).unwrap();
    let (key, key_path) = write_key(&machines, "dock-1");
    fake.set_controllers(ID, &[key.address()]);
    std::fs::write(
        machines.join("dock-1.toml"),
        format!(
            "[identity]\nref = \"{ID}\"\nkey_file = \"{}\"\n\n[machine]\ndisplay_name = \"Dock 1\"\n\
             owner_id = \"o\"\nmachine_type = \"t\"\nruntime_profile = \"r\"\n",
            key_path.display()
        ),
    )
    .unwrap();
    std::fs::write(
        machines.join("dock-2.toml"),
        "[identity]\nref = \"did:peaq:2\"\nkey_file = \"k\"\n",
    )
    .unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[orchestrator]\nurl = \"{}\"\n\n[state]\ndir = \"{}\"\n",
            fake.url(),
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let arg = config.to_str().unwrap().to_owned();
    let out = tokio::task::spawn_blocking(move || agent(&["check", "--config", &arg]))
        .await
        .unwrap();
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    for line in [
        "ok    config",
        "ok    machines      ",
        "ok    machine       [dock-1] ",
        "ok    key file      [dock-1] ",
        "ok    state dir     [dock-1] ",
        "ok    orchestrator  [dock-1] ",
        "ok    controller    [dock-1] ",
        "ok    challenge     [dock-1] ",
        "FAIL  machine       [dock-2] invalid machine file: ",
    ] {
        assert!(t.contains(line), "{line:?} missing in:\n{t}");
    }
    assert!(
        t.contains("dock-2.toml:") && t.contains("missing field `machine`"),
        "{t}"
    );
    assert_eq!(fake.lock().counters.creates, 0, "check registers nothing");
}

/// #22.12: the docs give `address --key` on the installed key (0600,
/// root's or the service user's) as it works: with sudo. As anyone else it
/// fails with "Permission denied", shown here when the tests run as root
/// and `setpriv` can drop to nobody.
#[test]
fn the_docs_read_the_installed_key_as_root() {
    const COMMAND: &str = "peaqos-agent address --key /etc/peaqos-agent/controller.key";
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    for doc in [
        "README.md",
        "docs/agent.md",
        "packaging/debian/peaqos-agent/README.Debian",
    ] {
        let text = std::fs::read_to_string(repo.join(doc)).unwrap();
        for (at, _) in text.match_indices(COMMAND) {
            assert!(
                text[..at].ends_with("sudo "),
                "{doc}: `{COMMAND}` without sudo at byte {at}"
            );
        }
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let key = dir.path().join("controller.key");
    let out = agent(&["keygen", "--out", key.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let Some(setpriv) = peaqos_testkit::find_program("setpriv") else {
        return;
    };
    if !rustix::process::geteuid().is_root() {
        return;
    }
    let out = Command::new(setpriv)
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN])
        .args(["address", "--key", key.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("Permission denied"), "{}", text(&out));
}
