//! Keys sealed at rest (issue 21, item 2): `keygen --sealed` and the
//! commands run by hand (`address`, `check`) against a unit whose drop-in
//! (systemd/examples/sealed-key.conf) loads the key with
//! `LoadCredentialEncrypted=`.
//!
//! Each test runs as root in a private mount namespace with its own, empty
//! `/var/lib/systemd` (a directory of the test's, bound there: so
//! `systemd-creds` makes a throwaway host key, never touching the machine's) and `/etc/systemd/system` (where the
//! drop-in goes). No PID-1 systemd is involved: what these cannot show is
//! systemd itself decrypting the credential for the service (see
//! docs/testing.md).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use crate::support::{config_text, write_key};

const BIN: &str = env!("CARGO_BIN_EXE_peaqos-agent");
const ID: &str = "did:peaq:4242";

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `unshare` and `systemd-creds`, when this process is root; else one
/// skip line.
fn tools(test: &str) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    let unshare = peaqos_testkit::root_unshare(test)?;
    let creds = peaqos_testkit::available_or_skip(
        peaqos_testkit::Service::Systemd,
        test,
        peaqos_testkit::find_program("systemd-creds"),
        "no systemd-creds (systemd 250 or later)",
    )?;
    Some((unshare, creds))
}

/// Runs `script` (sh, with `$1`.. = `args`) in a private mount namespace
/// with a fresh host key and, when `drop_in` is given, the unit's drop-in
/// directory holding only it. A booted systemd's /run/systemd is hidden so
/// that the commands read the unit files as they do without systemd.
fn in_namespace(unshare: &Path, drop_in: Option<&str>, script: &str, args: &[&Path]) -> Output {
    let setup = "set -e
mount --bind \"$PEAQOS_HOST_KEY_DIR\" /var/lib/systemd
mount -t tmpfs tmpfs /etc/systemd/system
if [ -d /run/systemd/system ]; then mount -t tmpfs tmpfs /run/systemd; fi
mkdir /etc/systemd/system/peaqos-agent.service.d
if [ -n \"$PEAQOS_DROP_IN\" ]; then
  printf '%s' \"$PEAQOS_DROP_IN\" > /etc/systemd/system/peaqos-agent.service.d/sealed-key.conf
fi
set +e
";
    // On disk, not a tmpfs: systemd-creds' `auto` refuses a host key on a
    // temporary file system (it would not survive a reboot).
    let host_key = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    Command::new(unshare)
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!("{setup}{script}"))
        .arg("sh")
        .args(args)
        .env("PEAQOS_DROP_IN", drop_in.unwrap_or(""))
        .env("PEAQOS_HOST_KEY_DIR", host_key.path())
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

/// The part of `out`'s stdout after the line `--- name`, up to the next.
fn section<'a>(out: &'a str, name: &str) -> &'a str {
    let start = out
        .find(&format!("--- {name}\n"))
        .unwrap_or_else(|| panic!("no section {name}: {out}"))
        + name.len()
        + 5;
    let rest = &out[start..];
    &rest[..rest.find("--- ").unwrap_or(rest.len())]
}

fn drop_in() -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/examples/sealed-key.conf"),
    )
    .unwrap()
}

/// `dir/agent.toml` with the key `credential:controller-key` and the
/// state in `dir/state`.
fn credential_config(dir: &Path) -> std::path::PathBuf {
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        config_text(
            "http://127.0.0.1:9",
            ID,
            Path::new("KEY"),
            &dir.join("state"),
            "",
        )
        .replace("\"KEY\"", "\"credential:controller-key\""),
    )
    .unwrap();
    config
}

#[test]
fn keygen_sealed_writes_a_credential_that_unseals_to_the_printed_address() {
    let Some((unshare, _)) = tools("keygen_sealed") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cred = dir.path().join("controller.key.cred");
    let out = in_namespace(
        &unshare,
        None,
        r#"echo "--- keygen"; "$1" keygen --sealed "$2"; echo "rc=$?"
echo "--- unsealed"; systemd-creds decrypt --name=controller-key "$2" -; echo
echo "--- again"; "$1" keygen --sealed "$2"; echo "rc=$?"
echo "--- address"; "$1" address --key "$2"; echo "rc=$?"
echo "--- tpm2"; "$1" keygen --sealed "$3" --with-key tpm2; echo "rc=$?"
echo "--- has-tpm2"; systemd-creds has-tpm2 >/dev/null; echo "rc=$?"
echo "--- end""#,
        &[Path::new(BIN), &cred, &dir.path().join("tpm.cred")],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let all = text(&out);
    let keygen = section(&stdout, "keygen");
    assert!(keygen.ends_with("rc=0\n"), "{all}");
    let printed = keygen.lines().next().unwrap();
    assert!(printed.starts_with("0x") && printed.len() == 42, "{all}");
    // auto on a machine without a TPM 2.0: says so, and that the host key
    // sealed it.
    assert!(
        all.contains("sealed with the host key") && all.contains("no TPM 2.0"),
        "{all}"
    );

    // The credential is what systemd-creds itself unseals, to the key
    // whose address was printed.
    let hex = section(&stdout, "unsealed").trim();
    let key = peaqos_protocol::SecretKey::from_hex(hex).unwrap_or_else(|e| panic!("{e}: {all}"));
    assert_eq!(key.address().checksummed(), printed);
    let sealed = std::fs::read_to_string(&cred).unwrap();
    assert!(!sealed.contains(hex), "the file holds the key in the clear");
    assert_eq!(
        std::fs::metadata(&cred).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Never overwritten; and the host key sealed it: outside the namespace
    // (another host key) it does not open.
    assert!(section(&stdout, "again").ends_with("rc=1\n"), "{all}");
    assert!(all.contains("refusing to overwrite"), "{all}");
    assert_eq!(std::fs::read_to_string(&cred).unwrap(), sealed);
    let address = section(&stdout, "address");
    assert_eq!(address, format!("{printed}\nrc=0\n"), "{all}");

    // No TPM here: --with-key tpm2 says so and leaves nothing behind.
    let tpm = section(&stdout, "has-tpm2") == "rc=0\n";
    if tpm {
        eprintln!("keygen_sealed: this machine has a TPM 2.0; the no-TPM message is not tested");
    } else {
        assert!(section(&stdout, "tpm2").ends_with("rc=1\n"), "{all}");
        assert!(all.contains("no TPM 2.0 on this machine"), "{all}");
    }
    // Only the credential is left: no plaintext key, no half-written file.
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let expected: &[&str] = if tpm {
        &["controller.key.cred", "tpm.cred"]
    } else {
        &["controller.key.cred"]
    };
    assert_eq!(names, expected);
}

/// The issue's report: with the unit's key sealed
/// (`LoadCredentialEncrypted=` in a drop-in), `sudo peaqos-agent check`
/// failed with `FAIL key file ... No such file or directory`, looking for
/// the plaintext `controller.key` the shipped unit names.
#[test]
fn check_and_address_read_a_key_the_unit_loads_sealed() {
    let Some((unshare, _)) = tools("check_sealed") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (key, plain) = write_key(dir.path(), "controller");
    let cred = dir.path().join("controller.key.cred");
    let wrong = dir.path().join("wrong.cred");
    let config = credential_config(dir.path());
    // Sealed by systemd-creds itself (not by the agent's keygen), then the
    // plaintext removed, as the walkthrough does.
    let out = in_namespace(
        &unshare,
        Some(&drop_in()),
        r#"systemd-creds encrypt --name=controller-key --with-key=host "$2" "$3" || exit 9
mv "$2" "$2.kept"
echo "--- address"; "$1" address --config "$4"; echo "rc=$?"
echo "--- check"; "$1" check --config "$4"; echo "rc=$?"
cp -p "$2.kept" "$2"
echo "--- beside"; "$1" check --config "$4"; echo "rc=$?"
rm "$2"; mv "$3" "$5"
systemd-creds encrypt --name=other-key --with-key=host "$2.kept" "$3" || exit 9
echo "--- wrong name"; "$1" check --config "$4"; echo "rc=$?"
echo "--- end""#,
        &[Path::new(BIN), &plain, &cred, &config, &wrong],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let all = text(&out);
    let address = key.address().checksummed();
    assert_eq!(
        section(&stdout, "address"),
        format!("{address}\nrc=0\n"),
        "{all}"
    );

    let check = section(&stdout, "check");
    assert!(
        check.contains(&format!(
            "ok    credential    credential:controller-key: {} (the unit's \
             LoadCredentialEncrypted= source",
            cred.display()
        )),
        "{all}"
    );
    assert!(
        check.contains(
            "ok    key           systemd credential, sealed with the host key \
             (/var/lib/systemd/credential.secret)"
        ),
        "{all}"
    );
    assert!(
        check
            .lines()
            .any(|l| l.starts_with("ok    key file") && l.contains(&address)),
        "{all}"
    );
    assert!(!check.contains("key plaintext"), "{all}");

    // The plaintext left beside it is a warning, not a failure.
    let beside = section(&stdout, "beside");
    let warn = beside
        .lines()
        .find(|l| l.starts_with("WARN  key plaintext"))
        .unwrap_or_else(|| panic!("no warning: {all}"));
    assert!(
        warn.contains(&plain.display().to_string()) && warn.contains("the same key"),
        "{warn}"
    );
    assert!(warn.contains("shred -u"), "{warn}");
    assert!(
        beside
            .lines()
            .any(|l| l.starts_with("ok    key file") && l.contains(&address)),
        "{all}"
    );

    // A credential sealed under another name is refused, as systemd would.
    let wrong = section(&stdout, "wrong name");
    let line = wrong
        .lines()
        .find(|l| l.starts_with("FAIL  key file"))
        .unwrap_or_else(|| panic!("no failure: {all}"));
    assert!(line.contains("cannot unseal"), "{line}");
    assert!(line.contains("other-key"), "{line}");
}

/// Key rotation with a sealed key: the sandboxed agent cannot seal, so the
/// successor is a 0600 plaintext file in the state directory's `keys/`,
/// with a warning from `key rotate` and from `check`.
#[test]
fn a_sealed_keys_successor_is_plaintext_with_a_warning() {
    let Some((unshare, _)) = tools("rotate_sealed") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (_, plain) = write_key(dir.path(), "controller");
    let cred = dir.path().join("controller.key.cred");
    let config = credential_config(dir.path());
    let state = dir.path().join("state");
    let out = in_namespace(
        &unshare,
        Some(&drop_in()),
        r#"systemd-creds encrypt --name=controller-key --with-key=host "$2" "$3" || exit 9
rm "$2"
echo "--- rotate"; "$1" key rotate --config "$4"; echo "rc=$?"
echo "--- check"; "$1" check --config "$4"; echo "rc=$?"
echo "--- end""#,
        &[Path::new(BIN), &plain, &cred, &config],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let all = text(&out);
    let rotate = section(&stdout, "rotate");
    assert!(rotate.ends_with("rc=0\n"), "{all}");
    let next = rotate.lines().next().unwrap();
    assert!(
        all.contains("the current key is a sealed credential"),
        "{all}"
    );
    let file = state.join("keys").join(format!("{next}.key"));
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (key, _) = peaqos_agent::key::load_path(&file, None).unwrap();
    assert_eq!(key.address().checksummed(), next);
    let check = section(&stdout, "check");
    assert!(
        check.lines().any(
            |l| l.starts_with("WARN  key plaintext") && l.contains(&file.display().to_string())
        ),
        "{all}"
    );
    assert!(
        check.contains(&format!("nextControllerAddress {next}")),
        "{all}"
    );
}
