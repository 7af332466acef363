//! `cargo xtask test`: probes for the real servers the suite can use, says in
//! one line which it found, then runs `cargo test --workspace`.

use std::path::{Path, PathBuf};
use std::process::Command;

use peaqos_testkit::{Service, find_program, mosquitto_binary, required};

const VENV: &str = "target/interop-venv";
const REQUIREMENTS: &str = "tests/interop/requirements.txt";
const PY_MODULES: &str = "import eth_account, paho.mqtt.client, peaq_os_sdk";

pub(crate) fn run(extra: &[String]) -> Result<(), String> {
    let root = crate::workspace_root();
    std::env::set_current_dir(&root).map_err(|e| format!("cd {}: {e}", root.display()))?;

    let mut envs: Vec<(String, String)> = Vec::new();
    let probes: Vec<(Service, Result<String, String>)> = vec![
        (
            Service::Mosquitto,
            mosquitto_binary()
                .map(|bin| format!("mosquitto ({})", bin.display()))
                .ok_or_else(|| "mosquitto (no binary; MQTT tests skip)".to_owned()),
        ),
        (
            Service::Postgres,
            postgres_reachable()
                .map(|url| format!("postgresql ({url})"))
                .map_err(|why| format!("postgresql ({why}; PostgreSQL tests skip)")),
        ),
        (
            Service::Python,
            python(required(Service::Python))
                .map(|py| {
                    envs.push(("PEAQOS_PYTHON".into(), py.display().to_string()));
                    format!("python interop ({})", py.display())
                })
                .map_err(|why| format!("python interop ({why})")),
        ),
        (
            Service::Systemd,
            find_program("systemd-analyze")
                .map(|bin| format!("systemd tools ({})", bin.display()))
                .ok_or_else(|| "systemd tools (no systemd-analyze; unit checks skip)".to_owned()),
        ),
        (
            Service::Deb,
            deb_tools()
                .map(|()| "Debian packaging (cargo deb, dpkg)".to_owned())
                .map_err(|why| format!("Debian packaging ({why}; the .deb test skips)")),
        ),
        (
            Service::Softhsm,
            find_program("softhsm2-util")
                .zip(find_program("pkcs11-tool"))
                .map(|_| "SoftHSM2 and pkcs11-tool".to_owned())
                .ok_or_else(|| {
                    "SoftHSM2 (no softhsm2-util or pkcs11-tool; PKCS#11 tests skip)".to_owned()
                }),
        ),
        (
            Service::Root,
            find_program("unshare")
                .filter(|_| {
                    Command::new("id")
                        .arg("-u")
                        .output()
                        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
                })
                .map(|_| "root with unshare (private mounts)".to_owned())
                .ok_or_else(|| {
                    "root with unshare (not root; the full-disk check skips)".to_owned()
                }),
        ),
        clock_probe(),
        browser_probe(),
        (Service::Podman, podman()),
    ];
    let (used, missing): (Vec<_>, Vec<_>) = probes.iter().partition(|(_, p)| p.is_ok());
    let list = |items: &[&(Service, Result<String, String>)]| {
        if items.is_empty() {
            "none".to_owned()
        } else {
            items
                .iter()
                .map(|(_, p)| p.as_ref().map_or_else(Clone::clone, Clone::clone))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    println!(
        "real servers and tools used: {}; not used: {}",
        list(&used),
        list(&missing)
    );
    if let Some((service, _)) = missing.iter().find(|(service, _)| required(*service)) {
        return Err(format!(
            "{} is required by PEAQOS_TEST_REQUIRE but not available",
            service.name()
        ));
    }

    let status = crate::cargo()
        .args(["test", "--workspace"])
        .args(extra)
        .envs(envs)
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("cargo test failed ({status})"))
    }
}

/// What the container image's test needs: podman to build, inspect and
/// export it, musl-gcc for its static binary.
fn podman() -> Result<String, String> {
    find_program("podman")
        .zip(find_program("musl-gcc"))
        .map(|(podman, _)| format!("podman ({})", podman.display()))
        .ok_or_else(|| "podman (no podman or musl-gcc; the image test skips)".to_owned())
}

fn postgres_reachable() -> Result<String, String> {
    use std::net::{SocketAddr, TcpStream};
    use std::time::Duration;
    let url = std::env::var("PEAQOS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let hostport = url
        .split('@')
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or_default();
    let addr: SocketAddr = hostport
        .parse()
        .map_err(|_| format!("cannot parse {hostport}"))?;
    TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .map(|_| hostport.to_owned())
        .map_err(|_| format!("nothing listens at {hostport}"))
}

/// A Python with the interop packages: the project's venv if it exists;
/// when Python interop is required, the venv is created from the pinned
/// requirements (PyPI is one of the reachable registries).
fn python(create: bool) -> Result<PathBuf, String> {
    let venv_python = Path::new(VENV).join("bin/python");
    // The requirements the venv was last installed from: when they change
    // (a package added or pinned anew), the venv is brought up to date.
    let stamp = Path::new(VENV).join("requirements.installed");
    let wanted = std::fs::read_to_string(REQUIREMENTS).unwrap_or_default();
    let fresh = std::fs::read_to_string(&stamp).is_ok_and(|had| had == wanted);
    let exists = venv_python.exists();
    if (create && !exists) || (exists && !fresh) {
        let ok = (exists
            || Command::new("python3")
                .args(["-m", "venv", VENV])
                .status()
                .is_ok_and(|s| s.success()))
            && Command::new(&venv_python)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "-r",
                    REQUIREMENTS,
                ])
                .status()
                .is_ok_and(|s| s.success());
        if ok {
            let _ = std::fs::write(&stamp, &wanted);
        } else if exists {
            // Offline, say: the venv as it is still serves the tests it can.
            eprintln!("could not update {VENV} from {REQUIREMENTS}; using it as it is");
        } else {
            return Err(format!("could not create {VENV} from {REQUIREMENTS}"));
        }
    }
    // Not canonicalize(): a venv's python is a symlink to the base
    // interpreter, and resolving it would leave the venv's packages behind.
    let candidates = [
        std::path::absolute(&venv_python).ok(),
        Some(PathBuf::from("python3")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|py| {
            Command::new(py)
                .args(["-c", PY_MODULES])
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .ok_or_else(|| format!("no python with eth-account, paho-mqtt and peaq-os-sdk; pip install -r {REQUIREMENTS}"))
}

/// `cargo deb` and dpkg, for the package test.
fn deb_tools() -> Result<(), String> {
    let cargo_deb = crate::cargo()
        .args(["deb", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !cargo_deb {
        return Err("no cargo-deb: packaging/build-debs.sh installs it".to_owned());
    }
    find_program("dpkg-deb")
        .map(|_| ())
        .ok_or_else(|| "no dpkg-deb".to_owned())
}

/// libfaketime, for the agent's clock tests.
fn clock_probe() -> (Service, Result<String, String>) {
    (
        Service::Faketime,
        find_program("faketime")
            .map(|bin| format!("libfaketime ({})", bin.display()))
            .ok_or_else(|| "libfaketime (no faketime; the clock tests skip)".to_owned()),
    )
}

/// Headless Chromium and its WebDriver, for the console's browser test.
fn browser_probe() -> (Service, Result<String, String>) {
    (
        Service::Chromium,
        find_program("chromium")
            .zip(find_program("chromedriver"))
            .map(|(bin, _)| format!("headless Chromium ({})", bin.display()))
            .ok_or_else(|| {
                "headless Chromium (no chromium or chromedriver; the console's browser test skips)"
                    .to_owned()
            }),
    )
}
