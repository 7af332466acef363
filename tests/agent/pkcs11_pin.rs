//! The token's PIN through the configuration: every accepted spelling of
//! where it is (#22.7), and a wrong one offered to the token once, not at
//! every restart (#22.13). OpenSC's `pkcs11-spy` sits between the agent and
//! SoftHSM2 and logs every call, so the test counts the logins the token
//! actually saw.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use peaqos_testkit::{Service, SoftHsm, available_or_skip};

use crate::pkcs11::{keygen, text};

const BIN: &str = env!("CARGO_BIN_EXE_peaqos-agent");

/// Where Debian's `opensc-pkcs11` puts the spy.
const SPY: [&str; 2] = [
    "/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so",
    "/usr/lib/aarch64-linux-gnu/pkcs11/pkcs11-spy.so",
];

/// A configuration whose `[identity]` is `identity` (the key and its PIN).
fn config(dir: &Path, identity: &str) -> PathBuf {
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[identity]
ref = "did:peaq:4242"
{identity}

[orchestrator]
url = "http://127.0.0.1:9"
connect_timeout = "1s"

[machine]
display_name = "hsm robot"
owner_id = "owner-1"
machine_type = "amr"
runtime_profile = "ros2"

[state]
dir = "{}"
"#,
            dir.join("state").display()
        ),
    )
    .unwrap();
    path
}

#[test]
fn every_spelling_of_the_pin_location_works_through_the_configuration() {
    let test = "every_spelling_of_the_pin_location_works_through_the_configuration";
    let Some(hsm) = SoftHsm::start(test, "robot") else {
        return;
    };
    let address = keygen(&hsm, "controller").checksummed();
    let dir = tempfile::tempdir().unwrap();
    let pin = hsm.pin_file().display().to_string();
    // A credential outside systemd: what the unit passes as it, here a
    // $CREDENTIALS_DIRECTORY of our own, as systemd would set it.
    let credentials = dir.path().join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    std::fs::copy(hsm.pin_file(), credentials.join("token-pin")).unwrap();
    let uri = hsm.uri("controller");
    let spellings = [
        format!("key = \"{uri}&pin-source={pin}\""),
        format!("key = \"{uri}&pin-source=file:{pin}\""),
        format!("key = \"{uri}&pin-source=file://{pin}\""),
        format!("key = \"{uri}&pin-source=credential:token-pin\""),
        format!("key = \"{uri}\"\nkey_pin_file = \"{pin}\""),
        format!("key = \"{uri}\"\nkey_pin_file = \"credential:token-pin\""),
    ];
    for identity in spellings {
        let path = config(dir.path(), &identity);
        for command in ["address", "check"] {
            let out = hsm
                .command(BIN)
                .args([command, "--config", path.to_str().unwrap()])
                .env("CREDENTIALS_DIRECTORY", &credentials)
                .env_remove("RUST_LOG")
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let shown = text(&out);
            assert!(
                shown.contains(&address) && !shown.contains("cannot read"),
                "{command} with {identity}: {shown}"
            );
            if command == "address" {
                assert!(out.status.success(), "{identity}: {shown}");
            }
        }
    }
}

/// How many `C_Login` the spy logged.
fn logins(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.ends_with(" C_Login"))
        .count()
}

#[test]
fn a_refused_pin_is_offered_once_across_restarts_until_its_file_changes() {
    let test = "a_refused_pin_is_offered_once_across_restarts_until_its_file_changes";
    let Some(hsm) = SoftHsm::start(test, "robot") else {
        return;
    };
    let spy = SPY.iter().map(PathBuf::from).find(|p| p.is_file());
    let Some(spy) = available_or_skip(
        Service::Softhsm,
        test,
        spy,
        "needs OpenSC's pkcs11-spy.so (apt-get install opensc-pkcs11)",
    ) else {
        return;
    };
    let address = keygen(&hsm, "controller").checksummed();
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("token.pin");
    std::fs::write(&wrong, "0000\n").unwrap();
    let uri = format!(
        "pkcs11:token=robot;object=controller?module-path={}",
        spy.display()
    );
    let path = config(
        dir.path(),
        &format!("key = \"{uri}\"\nkey_pin_file = \"{}\"", wrong.display()),
    );
    let log = dir.path().join("spy.log");
    let start = |command: &str| {
        hsm.command(BIN)
            .args([command, "--config", path.to_str().unwrap()])
            .env("PKCS11SPY", hsm.module())
            .env("PKCS11SPY_OUTPUT", &log)
            .env_remove("CREDENTIALS_DIRECTORY")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };

    // As under the shipped unit: exit 78, restarted, four times over.
    let first = start("run");
    assert_eq!(first.status.code(), Some(78), "{}", text(&first));
    assert!(
        text(&first).contains("rejected the PIN"),
        "{}",
        text(&first)
    );
    assert_eq!(logins(&log), 1);
    for _ in 0..3 {
        let again = start("run");
        assert_eq!(again.status.code(), Some(78), "{}", text(&again));
        let shown = text(&again);
        assert!(
            shown.contains("refused the PIN in") && shown.contains("fix the PIN file"),
            "{shown}"
        );
    }
    assert_eq!(logins(&log), 1, "a refused PIN was offered again");
    // `check` and `address` read the same record.
    assert_eq!(start("address").status.code(), Some(78));
    assert_eq!(logins(&log), 1, "address offered the refused PIN again");
    let record =
        std::fs::read_to_string(dir.path().join("state/pkcs11-refused-pins.json")).unwrap();
    assert!(!record.contains("0000"), "{record}");

    // The operator fixes the file: one login, accepted, and the record of
    // the refusal is gone.
    std::fs::copy(hsm.pin_file(), &wrong).unwrap();
    let fixed = start("address");
    assert!(fixed.status.success(), "{}", text(&fixed));
    assert_eq!(String::from_utf8_lossy(&fixed.stdout).trim(), address);
    assert_eq!(logins(&log), 2);
    let record =
        std::fs::read_to_string(dir.path().join("state/pkcs11-refused-pins.json")).unwrap();
    assert_eq!(record.trim(), "[]");
}
