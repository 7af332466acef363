//! The agent's Debian package, built by cargo-deb from the test build of the
//! binary (no LTO release build), then:
//! - its contents: files, modes, owners, conffiles, maintainer scripts;
//! - as root, a real `dpkg --root` installation into a throwaway root:
//!   the postinst creates the service user, the state directory and a
//!   controller key (0600, owned by the user) and prints its address; an
//!   upgrade keeps key, state and a locally edited config; a purge removes
//!   the state and keeps the key. Maintainer scripts run chrootless with
//!   $DPKG_ROOT, inside a private mount namespace with an empty /run, so
//!   that nothing reaches the host's systemd.
//!
//! Needs `cargo deb` (packaging/build-debs.sh installs the pinned version)
//! and dpkg; without them the test prints one skip line, unless
//! `PEAQOS_TEST_REQUIRE` names `deb` (or `all`).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use peaqos_testkit::{Service, available_or_skip, find_program};

const TEST: &str = "packaging_deb";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn skip(why: &str) {
    available_or_skip::<()>(Service::Deb, TEST, None, why);
}

fn run(command: &mut Command) -> Output {
    let output = command.stdin(Stdio::null()).output().unwrap();
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn cargo_deb_available() -> bool {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["deb", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Builds the .deb from the already-built test binary: cargo-deb takes
/// `<target-dir>/release/peaqos-agent`, so a private target dir holds a copy.
fn build_deb(work: &Path) -> PathBuf {
    let target = work.join("target");
    std::fs::create_dir_all(target.join("release")).unwrap();
    std::fs::copy(
        env!("CARGO_BIN_EXE_peaqos-agent"),
        target.join("release/peaqos-agent"),
    )
    .unwrap();
    let out_dir = work.join("out");
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(repo())
            .args([
                "deb",
                "-p",
                "peaqos-agent",
                "--no-build",
                "--profile",
                "release",
                "--fast",
                "--deb-version",
                "0.1.0-1",
                "-o",
            ])
            .arg(&out_dir)
            .env("CARGO_TARGET_DIR", &target),
    );
    let debs: Vec<PathBuf> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    assert_eq!(debs.len(), 1, "{debs:?}");
    debs.into_iter().next().unwrap()
}

#[test]
fn agent_deb_installs_creates_user_and_key_and_upgrades_and_purges_safely() {
    let Some(dpkg_deb) = find_program("dpkg-deb") else {
        skip("dpkg-deb not available (apt-get install dpkg)");
        return;
    };
    if !cargo_deb_available() {
        skip("cargo-deb not installed (packaging/build-debs.sh installs it)");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let deb = build_deb(work.path());

    check_contents(&dpkg_deb, &deb);
    let control = work.path().join("control");
    run(Command::new(&dpkg_deb).arg("-e").arg(&deb).arg(&control));
    check_control(&control);

    if !is_root() {
        skip("the dpkg --root installation needs root");
        return;
    }
    let namespaces = Command::new("unshare")
        .args(["--mount", "true"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !namespaces || find_program("dpkg").is_none() {
        skip("cannot run dpkg in a private mount namespace (unshare --mount)");
        return;
    }
    check_install_upgrade_purge(&deb, &work.path().join("root"));
}

/// Files, modes and owners in the data archive.
fn check_contents(dpkg_deb: &Path, deb: &Path) {
    let listing = stdout(&run(Command::new(dpkg_deb).arg("-c").arg(deb)));
    let entry = |path: &str| -> (String, String) {
        let line = listing
            .lines()
            .find(|l| l.ends_with(&format!(" ./{path}")))
            .unwrap_or_else(|| panic!("{path} not in the package:\n{listing}"));
        let mut fields = line.split_whitespace();
        (
            fields.next().unwrap().to_owned(),
            fields.next().unwrap().to_owned(),
        )
    };
    for (path, mode) in [
        ("usr/bin/peaqos-agent", "-rwxr-xr-x"),
        ("usr/lib/systemd/system/peaqos-agent.service", "-rw-r--r--"),
        ("usr/lib/sysusers.d/peaqos-agent.conf", "-rw-r--r--"),
        ("usr/lib/tmpfiles.d/peaqos-agent.conf", "-rw-r--r--"),
        ("etc/peaqos-agent/agent.toml", "-rw-r--r--"),
        // A gateway's folder, with an example the agent does not read.
        (
            "etc/peaqos-agent/machines.d/machine.toml.example",
            "-rw-r--r--",
        ),
        ("usr/share/doc/peaqos-agent/README.Debian", "-rw-r--r--"),
        ("usr/share/doc/peaqos-agent/mqtt.md", "-rw-r--r--"),
        ("usr/share/doc/peaqos-agent/copyright", "-rw-r--r--"),
        // The PKCS#11 drop-in, an example the operator enables; the unit
        // itself is not loosened.
        (
            "usr/share/doc/peaqos-agent/examples/pkcs11.conf",
            "-rw-r--r--",
        ),
        // The sealed-key drop-in (LoadCredentialEncrypted=), likewise.
        (
            "usr/share/doc/peaqos-agent/examples/sealed-key.conf",
            "-rw-r--r--",
        ),
        // lintian reads its overrides from here (each with its reason).
        ("usr/share/lintian/overrides/peaqos-agent", "-rw-r--r--"),
    ] {
        let (actual_mode, owner) = entry(path);
        assert_eq!(actual_mode, mode, "{path}");
        assert!(owner == "root/root" || owner == "0/0", "{path}: {owner}");
    }
    // A man page for the command and one per subcommand (packaging/man,
    // rendered from the clap parser), compressed as Debian wants them.
    let pages = std::fs::read_dir(repo().join("packaging/man"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|f| f.starts_with("peaqos-agent"))
        .collect::<Vec<_>>();
    assert!(pages.len() > 1, "{pages:?}");
    for page in pages {
        let (mode, _) = entry(&format!("usr/share/man/man1/{page}.gz"));
        assert_eq!(mode, "-rw-r--r--", "{page}");
    }
    // The key is generated on the machine, never shipped.
    assert!(!listing.contains("controller.key"), "{listing}");
    // The unit in the package is the one in the repository.
    let unit = std::fs::read_to_string(repo().join("systemd/peaqos-agent.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/peaqos-agent run"));
}

fn check_control(control: &Path) {
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert!(
        conffiles
            .lines()
            .any(|l| l == "/etc/peaqos-agent/agent.toml"),
        "agent.toml is a conffile: {conffiles}"
    );
    let fields = std::fs::read_to_string(control.join("control")).unwrap();
    let depends = fields
        .lines()
        .find(|l| l.starts_with("Depends:"))
        .unwrap_or_default();
    assert!(depends.contains("systemd-sysusers"), "{fields}");
    // rustls needs the system's CA roots, or the agent does not start.
    assert!(depends.contains("ca-certificates"), "{fields}");
    for script in ["postinst", "prerm", "postrm"] {
        let path = control.join(script);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|_| panic!("no {script} in the package"));
        assert!(!text.contains("#DEBHELPER#"), "{script}: token replaced");
        assert_eq!(
            std::fs::metadata(&path).unwrap().mode() & 0o777,
            0o755,
            "{script}"
        );
        run(Command::new("sh").arg("-n").arg(&path));
    }
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    assert!(postinst.contains("systemd-sysusers"), "creates the user");
    assert!(postinst.contains("deb-systemd-helper"), "unit handling");
}

/// Runs `dpkg --root=ROOT ARGS` chrootless in a private mount namespace
/// with an empty /run (so that "is systemd running" checks say no and
/// nothing reaches the host's service manager).
fn dpkg(root: &Path, args: &[&str]) -> Output {
    run(Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount -t tmpfs tmpfs /run && exec \"$@\"")
        .arg("sh")
        .arg("dpkg")
        .arg(format!("--root={}", root.display()))
        .args([
            "--force-script-chrootless",
            "--force-depends",
            "--log=/dev/null",
        ])
        .args(args))
}

fn check_install_upgrade_purge(deb: &Path, root: &Path) {
    let admin = root.join("var/lib/dpkg");
    std::fs::create_dir_all(admin.join("info")).unwrap();
    std::fs::create_dir_all(admin.join("updates")).unwrap();
    std::fs::write(admin.join("status"), "").unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    let deb_arg = deb.to_str().unwrap();

    // First install.
    let installed = dpkg(root, &["-i", deb_arg]);
    let said = stdout(&installed);
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    let user: Vec<&str> = passwd
        .lines()
        .find(|l| l.starts_with("peaqos-agent:"))
        .unwrap_or_else(|| panic!("no service user: {passwd}"))
        .split(':')
        .collect();
    let (uid, gid): (u32, u32) = (user[2].parse().unwrap(), user[3].parse().unwrap());

    let key_path = root.join("etc/peaqos-agent/controller.key");
    let key = std::fs::metadata(&key_path).expect("postinst generated a key");
    assert_eq!(key.mode() & 0o7777, 0o600);
    assert_eq!(
        (key.uid(), key.gid()),
        (uid, gid),
        "owned by the service user"
    );
    let key_text = std::fs::read_to_string(&key_path).unwrap();
    let address = stdout(&run(Command::new(root.join("usr/bin/peaqos-agent"))
        .args(["address", "--key"])
        .arg(&key_path)));
    let address = address.trim();
    assert!(
        address.starts_with("0x") && address.len() == 42,
        "{address}"
    );
    assert!(
        said.contains(&format!("controller address: {address}")),
        "postinst prints the address: {said}"
    );
    assert!(
        said.contains("systemctl enable --now peaqos-agent"),
        "{said}"
    );
    assert!(said.contains("[identity] ref"), "{said}");

    first_check_finds_the_key(root, address);

    let state_dir = root.join("var/lib/peaqos-agent");
    let state = std::fs::metadata(&state_dir).unwrap();
    assert_eq!(
        (state.uid(), state.mode() & 0o7777),
        (uid, 0o700),
        "state dir"
    );
    let binary = std::fs::metadata(root.join("usr/bin/peaqos-agent")).unwrap();
    assert_eq!((binary.uid(), binary.mode() & 0o7777), (0, 0o755));
    let unit = std::fs::metadata(root.join("usr/lib/systemd/system/peaqos-agent.service")).unwrap();
    assert_eq!((unit.uid(), unit.mode() & 0o7777), (0, 0o644));
    // Not enabled on install: it needs an identity and a URL first.
    assert!(
        !root
            .join("etc/systemd/system/multi-user.target.wants/peaqos-agent.service")
            .exists()
    );

    // Upgrade (the same version again takes the upgrade path: postinst
    // configure with the old version): key, state and an edited config stay.
    let config_path = root.join("etc/peaqos-agent/agent.toml");
    let mut config = std::fs::read_to_string(&config_path).unwrap();
    config.push_str("\n# edited by the operator\n");
    std::fs::write(&config_path, &config).unwrap();
    std::fs::write(state_dir.join("state.json"), "{}").unwrap();
    let upgraded = dpkg(root, &["--force-confold", "-i", deb_arg]);
    assert!(
        !stdout(&upgraded).contains("generated a new controller key"),
        "{}",
        stdout(&upgraded)
    );
    assert_eq!(std::fs::read_to_string(&key_path).unwrap(), key_text);
    assert_eq!(std::fs::read_to_string(&config_path).unwrap(), config);
    assert!(state_dir.join("state.json").exists());

    // Purge: state gone, key kept (and said so), package files gone.
    let purged = dpkg(root, &["--purge", "peaqos-agent"]);
    assert!(!state_dir.exists(), "purge removes the state");
    assert_eq!(std::fs::read_to_string(&key_path).unwrap(), key_text);
    assert!(
        stdout(&purged).contains("kept the controller key"),
        "{}",
        stdout(&purged)
    );
    assert!(!root.join("usr/bin/peaqos-agent").exists());
    assert!(!config_path.exists(), "purge removes the conffile");
}

/// The README's step 3 on a correct install, from a shell (no
/// $CREDENTIALS_DIRECTORY): `check` reads `credential:controller-key` where
/// the unit would, and finds the key the postinst made. Only the
/// orchestrator's URL and (to stay inside the throwaway root) the state
/// directory are changed, in a drop-in.
fn first_check_finds_the_key(root: &Path, address: &str) {
    let shipped = root.join("etc/peaqos-agent/agent.toml");
    let drop_ins = root.join("etc/peaqos-agent/agent.d");
    let had_drop_ins = drop_ins.exists();
    std::fs::create_dir_all(&drop_ins).unwrap();
    let drop_in = drop_ins.join("50-test.toml");
    std::fs::write(
        &drop_in,
        format!(
            "[orchestrator]\nurl = \"http://127.0.0.1:9\"\n[state]\ndir = \"{}\"\n",
            root.join("var/lib/peaqos-agent").display()
        ),
    )
    .unwrap();
    let check = Command::new(root.join("usr/bin/peaqos-agent"))
        .args(["check", "--config"])
        .arg(&shipped)
        .env_remove("CREDENTIALS_DIRECTORY")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let check = stdout(&check);
    assert!(
        check.contains("ok    credential    credential:controller-key: "),
        "{check}"
    );
    assert!(
        check
            .lines()
            .any(|l| l.starts_with("ok    key file") && l.contains(address)),
        "{check}"
    );
    std::fs::remove_file(&drop_in).unwrap();
    if !had_drop_ins {
        std::fs::remove_dir(&drop_ins).unwrap();
    }
}
