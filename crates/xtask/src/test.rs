//! `cargo xtask test`: probes for the real servers the suite can use, says in
//! one line which it found, then runs `cargo test --workspace`.

use std::path::{Path, PathBuf};
use std::process::Command;

use peaqos_testkit::{Service, mosquitto_binary, required};

const VENV: &str = "target/interop-venv";
const REQUIREMENTS: &str = "tests/interop/requirements.txt";
const PY_MODULES: &str = "import eth_account, paho.mqtt.client, peaq_os_sdk";

pub(crate) fn run(extra: &[String]) -> Result<(), String> {
    let root = crate::workspace_root();
    std::env::set_current_dir(&root).map_err(|e| format!("cd {}: {e}", root.display()))?;

    let mut used = Vec::new();
    let mut missing = Vec::new();

    match mosquitto_binary() {
        Some(bin) => used.push(format!("mosquitto ({})", bin.display())),
        None => missing.push("mosquitto (no binary; MQTT tests skip)".to_owned()),
    }
    match postgres_reachable() {
        Ok(url) => used.push(format!("postgresql ({url})")),
        Err(why) => missing.push(format!("postgresql ({why}; PostgreSQL tests skip)")),
    }
    let mut envs: Vec<(String, String)> = Vec::new();
    match python(required(Service::Python)) {
        Ok(py) => {
            used.push(format!("python interop ({})", py.display()));
            envs.push(("PEAQOS_PYTHON".into(), py.display().to_string()));
        }
        Err(why) => missing.push(format!("python interop ({why})")),
    }

    println!(
        "real servers used: {}; not used: {}",
        if used.is_empty() {
            "none".to_owned()
        } else {
            used.join(", ")
        },
        if missing.is_empty() {
            "none".to_owned()
        } else {
            missing.join(", ")
        }
    );
    for service in [Service::Mosquitto, Service::Postgres, Service::Python] {
        let absent = missing
            .iter()
            .any(|m| m.starts_with(service_prefix(service)));
        if required(service) && absent {
            return Err(format!(
                "{} is required by PEAQOS_TEST_REQUIRE but not available",
                service.name()
            ));
        }
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

fn service_prefix(service: Service) -> &'static str {
    match service {
        Service::Mosquitto => "mosquitto",
        Service::Postgres => "postgresql",
        Service::Python => "python",
        // Not probed here: their tests say themselves what they skipped.
        Service::Systemd => "systemd",
        Service::Deb => "deb",
    }
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
    if !venv_python.exists() && create {
        let ok = Command::new("python3")
            .args(["-m", "venv", VENV])
            .status()
            .is_ok_and(|s| s.success())
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
        if !ok {
            return Err(format!("could not create {VENV} from {REQUIREMENTS}"));
        }
    }
    let candidates = [
        venv_python.canonicalize().ok(),
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
