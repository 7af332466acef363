//! Shared test helpers.
//!
//! Tests use real, independent servers and clients when the machine has
//! them (Mosquitto and its clients, PostgreSQL, Python's `eth-account` and
//! the peaqOS SDK). On a machine without them a test prints one line saying
//! what it skipped and passes; with `PEAQOS_TEST_REQUIRE` naming the service
//! (CI sets `mosquitto,postgres,python,systemd,deb,softhsm,root,chromium`), a missing service fails the test.

pub mod child_log;
pub mod man;
pub mod softhsm;

pub use child_log::ChildLog;
pub use softhsm::SoftHsm;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A service a test may need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Mosquitto,
    Postgres,
    Python,
    /// systemd's offline tools (`systemd-analyze`, `systemd-sysusers`).
    Systemd,
    /// Debian packaging: `cargo deb`, `dpkg-deb`, `dpkg`, root for `dpkg --root`.
    Deb,
    /// SoftHSM2 (its PKCS#11 module and `softhsm2-util`) and OpenSC's
    /// `pkcs11-tool`.
    Softhsm,
    /// Root with `unshare`: a private mount namespace in which a test may
    /// mount a tmpfs (a full file system, say) without touching the host.
    Root,
    /// libfaketime (Debian's `faketime`): a process's wall clock set apart.
    Faketime,
    /// Headless Chromium and its WebDriver (`chromium`, `chromedriver`).
    Chromium,
    /// podman (build, inspect, create, export) and the musl target the
    /// orchestrator's image is built with (`cargo xtask image`).
    Podman,
}

impl Service {
    pub fn name(self) -> &'static str {
        match self {
            Self::Mosquitto => "mosquitto",
            Self::Postgres => "postgres",
            Self::Python => "python",
            Self::Systemd => "systemd",
            Self::Deb => "deb",
            Self::Softhsm => "softhsm",
            Self::Root => "root",
            Self::Faketime => "faketime",
            Self::Chromium => "chromium",
            Self::Podman => "podman",
        }
    }
}

/// Whether `PEAQOS_TEST_REQUIRE` makes `service` mandatory.
pub fn required(service: Service) -> bool {
    std::env::var("PEAQOS_TEST_REQUIRE").is_ok_and(|v| {
        v.split(',')
            .any(|s| s.trim() == service.name() || s.trim() == "all")
    })
}

/// Returns `Some(value)` if the service is available. Otherwise panics when
/// the service is required, or prints one skip line and returns `None`.
pub fn available_or_skip<T>(
    service: Service,
    test: &str,
    found: Option<T>,
    why: &str,
) -> Option<T> {
    if found.is_some() {
        return found;
    }
    assert!(
        !required(service),
        "{test}: {} is required (PEAQOS_TEST_REQUIRE) but not available: {why}",
        service.name()
    );
    eprintln!("skipped {test}: {} not available ({why})", service.name());
    None
}

/// A port that was free a moment ago, for servers we start as child
/// processes and that cannot be handed a listening socket.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// Polls until `addr` accepts TCP connections, up to `timeout`.
pub fn wait_for_port(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Finds an executable on `PATH` or in the sbin directories, where Debian
/// installs daemons such as `mosquitto`.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            ["/usr/sbin", "/usr/local/sbin", "/sbin"]
                .iter()
                .map(PathBuf::from),
        )
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The Mosquitto broker binary (`PEAQOS_MOSQUITTO` overrides the search).
pub fn mosquitto_binary() -> Option<PathBuf> {
    std::env::var_os("PEAQOS_MOSQUITTO")
        .map(PathBuf::from)
        .or_else(|| find_program("mosquitto"))
}

/// A private Mosquitto instance on its own port, stopped on drop, so that a
/// test can stop and restart its broker without touching anyone else's.
#[derive(Debug)]
pub struct Mosquitto {
    binary: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl Mosquitto {
    /// Starts a broker with anonymous access and `extra_config` appended
    /// (for example an `acl_file` line). `None` when Mosquitto is absent.
    pub fn start(test: &str, extra_config: &str) -> Option<Self> {
        let binary = available_or_skip(
            Service::Mosquitto,
            test,
            mosquitto_binary(),
            "no mosquitto binary on PATH or in /usr/sbin",
        )?;
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{extra_config}\n"
        );
        std::fs::write(dir.path().join("mosquitto.conf"), conf).unwrap();
        let mut broker = Self {
            binary,
            dir,
            port,
            child: None,
        };
        broker.restart();
        Some(broker)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Every retained message under `filter` (topic to payload), as a
    /// fresh subscriber sees it within a second, read with `mosquitto_sub`.
    pub fn retained(
        &self,
        mosquitto_sub: &Path,
        filter: &str,
    ) -> std::collections::BTreeMap<String, String> {
        let out = Command::new(mosquitto_sub)
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args([
                "-t",
                filter,
                "--retained-only",
                "-W",
                "1",
                "-F",
                "%t\u{1f}%p",
            ])
            .stderr(Stdio::null())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| line.split_once('\u{1f}'))
            .map(|(t, p)| (t.to_owned(), p.to_owned()))
            .collect()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the broker (as a crash would: no clean goodbye to clients).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// (Re)starts the broker on the same port and waits until it listens.
    pub fn restart(&mut self) {
        self.stop();
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto");
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        assert!(
            wait_for_port(addr, Duration::from_secs(10)),
            "mosquitto did not start on {addr}"
        );
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The PostgreSQL server for tests: `PEAQOS_TEST_POSTGRES_URL`, by default
/// `postgres://postgres@127.0.0.1:5432/test`. `None` (with a skip line) if
/// nothing listens there.
pub fn postgres_url(test: &str) -> Option<String> {
    let url = std::env::var("PEAQOS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let hostport = url
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("127.0.0.1:5432")
        .to_owned();
    let reachable = hostport
        .parse::<SocketAddr>()
        .ok()
        .is_some_and(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok());
    available_or_skip(
        Service::Postgres,
        test,
        reachable.then_some(url),
        &format!("nothing listens at {hostport}"),
    )
}

/// A Python interpreter that can import all of `modules`
/// (`PEAQOS_PYTHON` overrides `python3`).
pub fn python_with(test: &str, modules: &[&str]) -> Option<PathBuf> {
    let python =
        std::env::var_os("PEAQOS_PYTHON").map_or_else(|| PathBuf::from("python3"), PathBuf::from);
    let imports = modules
        .iter()
        .map(|m| format!("import {m}"))
        .collect::<Vec<_>>()
        .join("; ");
    let ok = Command::new(&python)
        .args(["-c", &imports])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    available_or_skip(
        Service::Python,
        test,
        ok.then_some(python),
        &format!(
            "python cannot import {} (pip install -r tests/interop/requirements.txt)",
            modules.join(", ")
        ),
    )
}

/// `unshare`, when this process is root and can use it for a private mount
/// namespace (see [`Service::Root`]); otherwise one skip line and `None`.
pub fn root_unshare(test: &str) -> Option<PathBuf> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    available_or_skip(
        Service::Root,
        test,
        find_program("unshare").filter(|_| root),
        "needs root and unshare (util-linux) for a private mount namespace",
    )
}

/// Whether Home Assistant would show an entity available, given its
/// discovery config (JSON) and the retained payloads by topic: every topic
/// of its `availability` list says `online` (mode `all`, which the agent's
/// discovery always sets).
pub fn ha_available(
    discovery: &str,
    retained: &std::collections::BTreeMap<String, String>,
) -> bool {
    let config: serde_json::Value = serde_json::from_str(discovery).expect("discovery is JSON");
    assert_eq!(config["availability_mode"], "all", "{config}");
    config["availability"]
        .as_array()
        .expect("an availability list")
        .iter()
        .map(|a| a["topic"].as_str().expect("a topic"))
        .all(|t| retained.get(t).is_some_and(|p| p == "online"))
}
