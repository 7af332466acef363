//! The shipped systemd units, sysusers.d and tmpfiles.d entries:
//! `systemd-analyze verify` accepts the units without a warning,
//! `systemd-analyze security --offline=true` scores each at most 2.0
//! ("OK"), and the settings users rely on are there. The systemd tools work
//! without systemd as PID 1; where they are missing, the tests that need
//! them print one skip line.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use peaqos_testkit::{Service, available_or_skip, find_program};

const AGENT_UNIT: &str = "peaqos-agent.service";
const ORCHESTRATOR_UNIT: &str = "peaqos-orchestrator.service";
/// `systemd-analyze security` exposure: 0.0 (best) to 10.0; up to 2.0 is
/// rated "OK".
const MAX_EXPOSURE: f64 = 2.0;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn unit_text(name: &str) -> String {
    std::fs::read_to_string(repo().join("systemd").join(name)).unwrap()
}

/// The values of `key=` in the unit, in order (keys may repeat).
fn values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim())
        .collect()
}

fn value<'a>(unit: &'a str, key: &str) -> &'a str {
    match values(unit, key).as_slice() {
        [v] => v,
        other => panic!("{key}= set {} times: {other:?}", other.len()),
    }
}

fn systemd_analyze(test: &str) -> Option<PathBuf> {
    available_or_skip(
        Service::Systemd,
        test,
        find_program("systemd-analyze"),
        "no systemd-analyze (apt-get install systemd)",
    )
}

/// The orchestrator binary next to the agent's in the target dir, or, if
/// it was not built, the agent binary as a stand-in: `verify` only needs
/// ExecStart= to name an existing executable.
fn orchestrator_binary() -> PathBuf {
    let agent = Path::new(env!("CARGO_BIN_EXE_peaqos-agent"));
    let orchestrator = agent.with_file_name("peaqos-orchestrator");
    if orchestrator.is_file() {
        orchestrator
    } else {
        agent.to_path_buf()
    }
}

/// A copy of the unit in a temp dir whose ExecStart= names a binary that
/// exists on this machine (the packaged path /usr/bin/... does not).
fn unit_copy(dir: &Path, name: &str, installed: &str, binary: &Path) -> PathBuf {
    let text = unit_text(name);
    let exec = format!("ExecStart={installed} ");
    assert!(text.contains(&exec), "{name}: {exec}");
    let copy = dir.join(name);
    std::fs::write(
        &copy,
        text.replace(&exec, &format!("ExecStart={} ", binary.display())),
    )
    .unwrap();
    copy
}

fn unit_copies(dir: &Path) -> Vec<PathBuf> {
    vec![
        unit_copy(
            dir,
            AGENT_UNIT,
            "/usr/bin/peaqos-agent",
            Path::new(env!("CARGO_BIN_EXE_peaqos-agent")),
        ),
        unit_copy(
            dir,
            ORCHESTRATOR_UNIT,
            "/usr/bin/peaqos-orchestrator",
            &orchestrator_binary(),
        ),
    ]
}

#[test]
fn systemd_analyze_verify_accepts_both_units_without_warnings() {
    let Some(analyze) = systemd_analyze("systemd_analyze_verify") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for unit in unit_copies(dir.path()) {
        let out = Command::new(&analyze)
            .args(["verify", "--man=no"])
            .arg(&unit)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{}: {stderr}", unit.display());
        // verify exits 0 on unknown keys and bad values ("ignoring"), so
        // any line about our file fails the test.
        let about_unit: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains(&*unit.to_string_lossy()))
            .collect();
        assert!(about_unit.is_empty(), "{}: {about_unit:#?}", unit.display());
    }
}

#[test]
fn security_exposure_of_both_units_is_at_most_2() {
    let Some(analyze) = systemd_analyze("systemd_analyze_security") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for unit in unit_copies(dir.path()) {
        let out = Command::new(&analyze)
            .args(["security", "--offline=true", "--threshold=20", "--no-pager"])
            .arg(&unit)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("no exposure level for {}: {stdout}", unit.display()));
        let score: f64 = line
            .rsplit(':')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("cannot parse {line:?}"));
        assert!(
            score <= MAX_EXPOSURE,
            "{}: exposure {score} > {MAX_EXPOSURE}:\n{stdout}",
            unit.display()
        );
        assert!(
            out.status.success(),
            "{}: --threshold=20 failed ({score}):\n{stdout}",
            unit.display()
        );
    }
}

#[test]
fn agent_unit_notifies_feeds_a_watchdog_and_starts_without_the_network() {
    let unit = unit_text(AGENT_UNIT);
    assert_eq!(value(&unit, "Type"), "notify");
    assert!(!value(&unit, "WatchdogSec").is_empty());
    assert_eq!(value(&unit, "Restart"), "on-failure");
    for key in ["After", "Wants", "Requires", "BindsTo"] {
        assert!(
            values(&unit, key)
                .iter()
                .all(|v| !v.contains("network-online.target")),
            "{key}=: the agent must start and report while the network is down"
        );
    }
    assert_eq!(
        value(&unit, "ExecStart"),
        "/usr/bin/peaqos-agent run --config /etc/peaqos-agent/agent.toml"
    );
    let credentials = values(&unit, "LoadCredential");
    assert!(credentials.contains(&"controller-key:/etc/peaqos-agent/controller.key"));
    // The optional secrets the config can name: relative names, looked up
    // in the credential store and skipped (not a start failure) when absent,
    // so that the agent starts without them.
    for name in [
        "mqtt-password",
        "mqtt-client-key",
        "orchestrator-api-key",
        "orchestrator-client-key",
    ] {
        assert!(
            credentials.contains(&format!("{name}:peaqos-agent.{name}").as_str()),
            "{name}: {credentials:?}"
        );
    }
    // Every `credential:NAME` in the example config is loaded by the unit.
    let example = std::fs::read_to_string(repo().join("config/agent.example.toml")).unwrap();
    for (at, prefix) in example.match_indices("credential:") {
        let name: String = example[at + prefix.len()..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            .collect();
        if name.is_empty() || name == "NAME" {
            continue;
        }
        assert!(
            credentials
                .iter()
                .any(|c| c.starts_with(&format!("{name}:"))),
            "config names credential {name:?} but the unit does not load it"
        );
    }
}

#[test]
fn both_units_run_as_their_own_user_with_private_state_and_no_core_dumps() {
    for (name, user) in [
        (AGENT_UNIT, "peaqos-agent"),
        (ORCHESTRATOR_UNIT, "peaqos-orchestrator"),
    ] {
        let unit = unit_text(name);
        assert_eq!(value(&unit, "User"), user, "{name}");
        assert_eq!(value(&unit, "StateDirectory"), user, "{name}");
        assert_eq!(value(&unit, "StateDirectoryMode"), "0700", "{name}");
        assert_eq!(value(&unit, "LimitCORE"), "0", "{name}");
        assert_eq!(value(&unit, "UMask"), "0077", "{name}");
        assert_eq!(value(&unit, "ProtectSystem"), "strict", "{name}");
        assert_eq!(value(&unit, "CapabilityBoundingSet"), "", "{name}");
        assert_eq!(value(&unit, "MemoryDenyWriteExecute"), "yes", "{name}");
        assert_eq!(
            value(&unit, "RestrictAddressFamilies"),
            "AF_UNIX AF_INET AF_INET6",
            "{name}"
        );
        assert!(
            values(&unit, "SystemCallFilter").contains(&"@system-service"),
            "{name}"
        );
        // Restart forever, but at a bounded rate: RestartSec= times the burst
        // must exceed the interval, or systemd gives up on a failing service.
        let secs = |key: &str| -> u32 {
            value(&unit, key)
                .trim_end_matches('s')
                .parse()
                .unwrap_or_else(|_| panic!("{name}: {key}= in plain seconds"))
        };
        assert!(
            secs("RestartSec") * value(&unit, "StartLimitBurst").parse::<u32>().unwrap()
                > secs("StartLimitIntervalSec"),
            "{name}: restart limit would stop restarts for good"
        );
    }
    let orchestrator = unit_text(ORCHESTRATOR_UNIT);
    assert_eq!(
        value(&orchestrator, "ConfigurationDirectory"),
        "peaqos-orchestrator"
    );
    assert_eq!(
        value(&orchestrator, "EnvironmentFile"),
        "-/etc/peaqos-orchestrator/env"
    );
}

/// systemd-sysusers and systemd-tmpfiles apply the shipped entries to an
/// empty root: the users exist, and the state directories belong to them
/// with mode 0700.
#[test]
fn sysusers_and_tmpfiles_entries_create_users_and_private_state_dirs() {
    const TEST: &str = "sysusers_and_tmpfiles";
    let tools = find_program("systemd-sysusers").zip(find_program("systemd-tmpfiles"));
    let Some((sysusers, tmpfiles)) = available_or_skip(
        Service::Systemd,
        TEST,
        tools,
        "no systemd-sysusers/systemd-tmpfiles",
    ) else {
        return;
    };
    if available_or_skip(
        Service::Systemd,
        TEST,
        is_root().then_some(()),
        "needs root to chown in the temp root",
    )
    .is_none()
    {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("etc")).unwrap();
    for (tool, dir, extra) in [
        (&sysusers, "sysusers.d", None),
        (&tmpfiles, "tmpfiles.d", Some("--create")),
    ] {
        let out = Command::new(tool)
            .arg(format!("--root={}", root.path().display()))
            .args(extra)
            .arg(repo().join("systemd").join(dir).join("peaqos-agent.conf"))
            .arg(
                repo()
                    .join("systemd")
                    .join(dir)
                    .join("peaqos-orchestrator.conf"),
            )
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            tool.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    for user in ["peaqos-agent", "peaqos-orchestrator"] {
        let entry: Vec<&str> = passwd
            .lines()
            .find(|l| l.starts_with(&format!("{user}:")))
            .unwrap_or_else(|| panic!("{user} not created: {passwd}"))
            .split(':')
            .collect();
        assert_eq!(entry[5], format!("/var/lib/{user}"));
        assert_eq!(entry[6], "/usr/sbin/nologin");
        let uid: u32 = entry[2].parse().unwrap();
        assert!(uid > 0 && uid < 1000, "{user} is a system user: {uid}");

        let state = std::fs::metadata(root.path().join("var/lib").join(user)).unwrap();
        assert_eq!(state.uid(), uid, "{user} owns its state dir");
        assert_eq!(state.mode() & 0o7777, 0o700);
        let etc = std::fs::metadata(root.path().join("etc").join(user)).unwrap();
        assert_eq!(etc.uid(), 0);
        assert_eq!(etc.mode() & 0o7777, 0o755);
    }
}

pub(crate) fn is_root() -> bool {
    // `id -u` avoids a dependency for one check.
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The agent unit with every block of the PKCS#11 example drop-in
/// uncommented, as one file (a later assignment wins, `LoadCredential=`
/// empty clears the list, as with a drop-in).
fn agent_unit_with_pkcs11_drop_in(dir: &Path) -> (PathBuf, String) {
    let unit = unit_copy(
        dir,
        AGENT_UNIT,
        "/usr/bin/peaqos-agent",
        Path::new(env!("CARGO_BIN_EXE_peaqos-agent")),
    );
    let drop_in = std::fs::read_to_string(repo().join("systemd/examples/pkcs11.conf")).unwrap();
    let applied: String = drop_in
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest)
                if rest.starts_with(|c: char| c.is_ascii_uppercase())
                    && rest.split_once('=').is_some_and(|(k, _)| !k.contains(' ')) =>
            {
                rest
            }
            _ => l,
        })
        .fold(String::new(), |out, l| out + l + "\n");
    let combined = dir.join("peaqos-agent-pkcs11.service");
    let text = std::fs::read_to_string(&unit).unwrap() + "\n" + &applied;
    std::fs::write(&combined, &text).unwrap();
    (combined, applied)
}

#[test]
fn the_pkcs11_drop_in_verifies_and_loosens_only_what_tokens_need() {
    let dir = tempfile::tempdir().unwrap();
    let (combined, applied) = agent_unit_with_pkcs11_drop_in(dir.path());
    // The keys it may touch: credentials, the token store, devices, groups.
    let allowed = [
        "LoadCredential",
        "ReadWritePaths",
        "SupplementaryGroups",
        "PrivateUsers",
        "PrivateDevices",
        "DevicePolicy",
        "DeviceAllow",
    ];
    for line in applied.lines().filter(|l| !l.starts_with(['#', '['])) {
        if let Some((key, _)) = line.split_once('=') {
            assert!(allowed.contains(&key), "the drop-in sets {key}=");
        }
    }
    let credentials = values(&applied, "LoadCredential");
    assert_eq!(
        credentials.first(),
        Some(&""),
        "clears the key file credential"
    );
    assert!(credentials.contains(&"token-pin:/etc/peaqos-agent/token.pin"));
    assert!(!credentials.iter().any(|c| c.starts_with("controller-key:")));

    let Some(analyze) = systemd_analyze("the_pkcs11_drop_in_verifies") else {
        return;
    };
    verify_without_a_word(&analyze, &combined, &combined);
    let (score, stdout) = offline_exposure(&analyze, &combined);
    eprintln!("unit with every block of the PKCS#11 drop-in: exposure {score}");
    assert!(score <= MAX_EXPOSURE, "{stdout}");
}

/// `systemd-analyze verify` of `unit` succeeds and says nothing about the
/// files under `about` (the unit, its drop-ins).
fn verify_without_a_word(analyze: &Path, unit: &Path, about: &Path) {
    let out = Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let said: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains(&*about.to_string_lossy()))
        .collect();
    assert!(out.status.success() && said.is_empty(), "{stderr}");
}

/// `systemd-analyze security --offline=true` of `unit`: its overall
/// exposure, and the whole report.
fn offline_exposure(analyze: &Path, unit: &Path) -> (f64, String) {
    let out = Command::new(analyze)
        .args(["security", "--offline=true", "--threshold=20", "--no-pager"])
        .arg(unit)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("{stdout}"));
    let score: f64 = line
        .rsplit(':')
        .next()
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse {line:?}"));
    (score, stdout)
}

/// Issue 21 (keys sealed at rest): systemd/examples/sealed-key.conf, as a
/// real drop-in beside the unit, verifies without a warning and keeps the
/// unit's score; it only makes the key credential an encrypted one, under
/// the same name (so agent.toml keeps `credential:controller-key`) and
/// without an empty `LoadCredential=` (which would clear every credential,
/// the optional ones too).
#[test]
fn the_sealed_key_drop_in_verifies_and_only_seals_the_key() {
    let drop_in = std::fs::read_to_string(repo().join("systemd/examples/sealed-key.conf")).unwrap();
    let settings: Vec<&str> = drop_in
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(
        settings,
        [
            "[Service]",
            "LoadCredentialEncrypted=controller-key:/etc/peaqos-agent/controller.key.cred"
        ]
    );
    let unit = unit_text(AGENT_UNIT);
    assert!(
        values(&unit, "LoadCredential")
            .contains(&"controller-key:/etc/peaqos-agent/controller.key"),
        "the drop-in replaces the unit's key credential by its name"
    );

    let Some(analyze) = systemd_analyze("the_sealed_key_drop_in_verifies") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_copy(
        dir.path(),
        AGENT_UNIT,
        "/usr/bin/peaqos-agent",
        Path::new(env!("CARGO_BIN_EXE_peaqos-agent")),
    );
    let drop_in_dir = dir.path().join(format!("{AGENT_UNIT}.d"));
    std::fs::create_dir(&drop_in_dir).unwrap();
    let drop_in_path = drop_in_dir.join("sealed-key.conf");
    std::fs::write(&drop_in_path, &drop_in).unwrap();
    verify_without_a_word(&analyze, &unit, dir.path());
    // verify reads the drop-in directory: a bad key in it is reported.
    std::fs::write(&drop_in_path, format!("{drop_in}NoSuchSetting=1\n")).unwrap();
    let out = Command::new(&analyze)
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NoSuchSetting"),
        "systemd-analyze verify did not read the drop-in"
    );
    std::fs::write(&drop_in_path, &drop_in).unwrap();
    let (score, stdout) = offline_exposure(&analyze, &unit);
    eprintln!("unit with the sealed-key drop-in: exposure {score}");
    assert!(score <= MAX_EXPOSURE, "{stdout}");
}

/// #22.8 and #22.9, as far as the offline tools can check them (no booted
/// systemd in this suite): the agent's configuration directory is not a
/// ConfigurationDirectory= (which systemd exempts from ProtectSystem=strict
/// and mounts writable) and is read-only; the scratch space shared with
/// the rest of the system (/dev/shm, /run/lock) is inaccessible; and the
/// PKCS#11 drop-in keeps both.
#[test]
fn the_agent_cannot_write_its_configuration_or_shared_scratch_space() {
    let unit = unit_text(AGENT_UNIT);
    assert!(values(&unit, "ConfigurationDirectory").is_empty());
    assert_eq!(value(&unit, "ProtectSystem"), "strict");
    assert_eq!(value(&unit, "ReadOnlyPaths"), "/etc/peaqos-agent");
    let inaccessible: Vec<&str> = values(&unit, "InaccessiblePaths")
        .iter()
        .flat_map(|v| v.split_whitespace())
        .map(|p| p.trim_start_matches('-'))
        .collect();
    for path in ["/dev/shm", "/run/lock"] {
        assert!(inaccessible.contains(&path), "{path}: {inaccessible:?}");
    }
    // The writable place for keys the agent writes is its state directory.
    assert!(values(&unit, "ReadWritePaths").is_empty());
    assert_eq!(value(&unit, "StateDirectory"), "peaqos-agent");
    let drop_in = std::fs::read_to_string(repo().join("systemd/examples/pkcs11.conf")).unwrap();
    for key in [
        "ConfigurationDirectory",
        "InaccessiblePaths",
        "ReadOnlyPaths",
        "ReadWritePaths",
    ] {
        let set: Vec<&str> = values(&drop_in, key)
            .into_iter()
            .filter(|v| v.contains("/etc/peaqos-agent") || v.is_empty())
            .collect();
        assert!(
            set.is_empty(),
            "pkcs11.conf reopens something with {key}=: {set:?}"
        );
    }
}
