//! The orchestrator's container image, as an operator gets it: `cargo xtask
//! image` builds it (FROM scratch, offline; a second build reuses the
//! cached musl build and layers), then:
//! - its metadata: two layers, a non-root user, the binary as entrypoint,
//!   port 8080 from `PEAQOS_LISTEN_ADDR`, the `healthcheck` subcommand as
//!   HEALTHCHECK, a volume for the data, OCI labels, a size bound;
//! - its files (`podman export`): exactly the binary, the CA bundle,
//!   passwd/group and the data directory, owned as they must be;
//! - the orchestrator it holds, started the way the image says (its
//!   entrypoint, environment and user), with a read-only root, the data
//!   directory as the only writable place, its database URL and API keys
//!   from secret files: `/api/v1/health`, the image's health check, and one
//!   registration (challenge, EIP-191 signature, create, activate).
//!
//! It runs the container with `podman run` where podman can run one. Where
//! it cannot (podman's runtime needs rlimits and cgroups a sandbox may
//! refuse) it says so in one line and runs the entrypoint from the exported
//! filesystem instead: as root, chrooted into a read-only bind mount of it
//! in a private mount namespace, as the image's user; otherwise directly.
//!
//! Needs podman and musl-gcc (.ci/install-tools installs them); without
//! them one skip line, unless `PEAQOS_TEST_REQUIRE` names `podman`.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use peaqos_protocol::SecretKey;
use peaqos_testkit::{Service, available_or_skip, find_program, free_port};
use serde_json::{Value, json};

const TEST: &str = "container_image";
const IMAGE: &str = "localhost/peaqos-orchestrator:test";
const ENTRYPOINT: &str = "/usr/bin/peaqos-orchestrator";
const DATA: &str = "/var/lib/peaqos-orchestrator";
const USER: &str = "10001:10001";
const API_KEY: &str = "image-test-key-0123456789abcdef";
/// The first build compiles the orchestrator for musl (minutes on a busy
/// two-core machine); later ones reuse it.
const BUILD_BOUND: Duration = Duration::from_secs(1800);
/// From start to `listening`, and for each request.
const START_BOUND: Duration = Duration::from_secs(30);
/// A stripped static orchestrator with CA certificates: about 13 MiB
/// (docs/orchestrator.md); the bound catches a debug build or a base image.
const SIZE_BOUND: u64 = 30 * 1024 * 1024;

#[test]
fn image_is_built_from_scratch_runs_read_only_as_a_user_and_registers_a_machine() {
    let found = find_program("podman").zip(find_program("musl-gcc"));
    let Some((podman, _)) = available_or_skip(
        Service::Podman,
        TEST,
        found,
        "no podman or musl-gcc; .ci/install-tools installs them",
    ) else {
        return;
    };
    build_image();
    let inspect = inspect(&podman);
    check_metadata(&inspect);

    let work = tempfile::tempdir().unwrap();
    let rootfs = export(&podman, work.path());
    let data = work.path().join("data");
    let secrets = work.path().join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(
        secrets.join("database-url"),
        format!("sqlite://{DATA}/orchestrator.db\n"),
    )
    .unwrap();
    std::fs::write(secrets.join("api-keys"), format!("{API_KEY}\n")).unwrap();
    std::fs::create_dir_all(&data).unwrap();
    // The image's user owns its volume, as podman makes a fresh volume.
    let _ = Command::new("chown").args([USER]).arg(&data).status();

    let mut env = image_env(&inspect);
    env.insert(
        "DATABASE_URL_FILE".into(),
        "/run/secrets/database-url".into(),
    );
    env.insert(
        "PEAQOS_API_KEYS_FILE".into(),
        "/run/secrets/api-keys".into(),
    );
    env.insert("PEAQOS_REQUIRE_API_AUTH".into(), "true".into());

    if let Some(ran) = podman_run(&podman, &env, &data, &secrets) {
        ran.check_and_stop(&podman);
        return;
    }
    let how = Contained::choose(&rootfs, &data, &secrets);
    let port = free_port();
    env.insert("PEAQOS_LISTEN_ADDR".into(), format!("127.0.0.1:{port}"));
    let mut server = how
        .command(&env, &[])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let base = wait_listening(&mut server);
    assert_eq!(base, format!("http://127.0.0.1:{port}"));
    check_serves(&base);
    // The HEALTHCHECK, as the runtime runs it: the image's binary in the
    // container's environment.
    let health = how
        .command(&env, &["healthcheck"])
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert_healthy(&health);
    stop(server);
    // The database went to the volume: the one writable place.
    assert!(data.join("orchestrator.db").exists());
}

/// `cargo xtask image --tag test` (the test's xtask binary).
fn build_image() {
    let started = Instant::now();
    let out = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_xtask")).args(["image", "--tag", "test"]),
        BUILD_BOUND,
    );
    assert!(
        out.status.success(),
        "cargo xtask image failed ({}):\n{}",
        out.status,
        text(&out.stderr)
    );
    eprintln!(
        "{TEST}: image built in {:.0?}: {}",
        started.elapsed(),
        text(&out.stderr).lines().last().unwrap_or_default()
    );
}

fn inspect(podman: &Path) -> Value {
    let out = run_ok(Command::new(podman).args(["image", "inspect", IMAGE]));
    let all: Value = serde_json::from_slice(&out.stdout).unwrap();
    all[0].clone()
}

fn check_metadata(image: &Value) {
    let config = &image["Config"];
    assert_eq!(config["User"], USER, "not the image's non-root user");
    assert_eq!(config["Entrypoint"], json!([ENTRYPOINT]));
    assert!(config["Cmd"].is_null(), "no command: {}", config["Cmd"]);
    assert!(config["ExposedPorts"].get("8080/tcp").is_some(), "{config}");
    assert!(config["Volumes"].get(DATA).is_some(), "{config}");
    assert_eq!(config["WorkingDir"], DATA);
    let env = image_env(image);
    assert_eq!(env["PEAQOS_LISTEN_ADDR"], "0.0.0.0:8080");
    assert_eq!(env["SSL_CERT_FILE"], "/etc/ssl/certs/ca-certificates.crt");
    assert_eq!(
        image["Healthcheck"]["Test"],
        json!(["CMD", ENTRYPOINT, "healthcheck"]),
        "{}",
        image["Healthcheck"]
    );
    // Root-owned files, then the service user's data directory.
    assert_eq!(image["RootFS"]["Layers"].as_array().unwrap().len(), 2);
    let labels = &config["Labels"];
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(
        labels["org.opencontainers.image.title"],
        "peaqos-orchestrator"
    );
    assert_eq!(labels["org.opencontainers.image.licenses"], "Apache-2.0");
    let size = image["Size"].as_u64().unwrap();
    eprintln!(
        "{TEST}: {IMAGE} is {size} B ({:.1} MiB)",
        size as f64 / 1024.0 / 1024.0
    );
    assert!(size < SIZE_BOUND, "image of {size} B");
}

/// The image's filesystem, exported from a created (never started)
/// container and unpacked; its listing checked.
fn export(podman: &Path, work: &Path) -> PathBuf {
    let id = text(&run_ok(Command::new(podman).args(["create", IMAGE])).stdout)
        .trim()
        .to_owned();
    let tar = work.join("rootfs.tar");
    let exported = Command::new(podman)
        .arg("export")
        .arg("--output")
        .arg(&tar)
        .arg(&id)
        .output()
        .unwrap();
    run_ok(Command::new(podman).args(["rm", &id]));
    assert!(exported.status.success(), "{}", text(&exported.stderr));

    let listing = text(
        &run_ok(
            Command::new("tar")
                .args(["--numeric-owner", "-tvf"])
                .arg(&tar),
        )
        .stdout,
    );
    let entries: BTreeMap<String, (String, String)> = listing
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let name = fields[5].trim_end_matches('/').to_owned();
            (name, (fields[0].to_owned(), fields[1].to_owned()))
        })
        .collect();
    let names: Vec<&str> = entries.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "etc",
            "etc/group",
            "etc/passwd",
            "etc/ssl",
            "etc/ssl/certs",
            "etc/ssl/certs/ca-certificates.crt",
            "usr",
            "usr/bin",
            "usr/bin/peaqos-orchestrator",
            "var",
            "var/lib",
            "var/lib/peaqos-orchestrator",
        ],
        "{listing}"
    );
    let owner = |name: &str| entries[name].1.clone();
    assert_eq!(entries["usr/bin/peaqos-orchestrator"].0, "-rwxr-xr-x");
    assert_eq!(owner("usr/bin/peaqos-orchestrator"), "0/0");
    assert_eq!(owner("var/lib"), "0/0");
    assert_eq!(owner("var/lib/peaqos-orchestrator"), "10001/10001");

    let rootfs = work.join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    run_ok(
        Command::new("tar")
            .arg("-xf")
            .arg(&tar)
            .arg("-C")
            .arg(&rootfs),
    );
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    assert!(passwd.contains(":10001:10001:"), "{passwd}");
    rootfs
}

/// The image's environment (`NAME=value` lines) by name.
fn image_env(image: &Value) -> BTreeMap<String, String> {
    image["Config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str()?.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// A container podman started.
struct Ran {
    name: String,
    base: String,
}

impl Ran {
    fn check_and_stop(self, podman: &Path) {
        check_serves(&self.base);
        let health = Command::new(podman)
            .args(["healthcheck", "run", &self.name])
            .output()
            .unwrap();
        let stopped = Command::new(podman)
            .args(["stop", "--time", "10", &self.name])
            .output()
            .unwrap();
        assert_healthy(&health);
        assert!(stopped.status.success(), "{}", text(&stopped.stderr));
    }
}

/// `podman run --read-only` of the image; `None` (after one line saying
/// why) when podman cannot run containers here.
fn podman_run(
    podman: &Path,
    env: &BTreeMap<String, String>,
    data: &Path,
    secrets: &Path,
) -> Option<Ran> {
    let port = free_port();
    let name = format!("peaqos-image-test-{}", std::process::id());
    let mut command = Command::new(podman);
    command
        .args(["run", "--detach", "--rm", "--read-only", "--name", &name])
        .arg(format!("--publish=127.0.0.1:{port}:8080"))
        .arg(format!("--volume={}:{DATA}", data.display()))
        .arg(format!("--volume={}:/run/secrets:ro", secrets.display()));
    for (k, v) in env {
        if k != "PATH" {
            command.arg(format!("--env={k}={v}"));
        }
    }
    let out = run_bounded(command.arg(IMAGE), START_BOUND);
    if !out.status.success() {
        let stderr = text(&out.stderr);
        let why = stderr
            .lines()
            .rfind(|l| l.starts_with("Error"))
            .unwrap_or("podman run failed");
        let _ = Command::new(podman).args(["rm", "--force", &name]).output();
        eprintln!(
            "skipped {TEST} under podman run: podman cannot run containers here ({why}); \
             running the image's entrypoint from its exported filesystem instead"
        );
        return None;
    }
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + START_BOUND;
    while request(&base, "GET", "/ready", None).map(|r| r.0) != Some(200) {
        assert!(
            Instant::now() < deadline,
            "the container never became ready"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("{TEST}: ran the image with podman run --read-only");
    Some(Ran { name, base })
}

/// How the entrypoint runs outside podman.
enum Contained {
    /// Root: `unshare --mount`, the exported tree bind-mounted read-only,
    /// the data directory and secrets bound in, `chroot --userspec`.
    Chroot {
        rootfs: PathBuf,
        data: PathBuf,
        secrets: PathBuf,
    },
    /// Not root: the binary itself, with the image's paths (data
    /// directory, secrets) pointing at the test's directories.
    Direct {
        rootfs: PathBuf,
        data: PathBuf,
        secrets: PathBuf,
    },
}

impl Contained {
    fn choose(rootfs: &Path, data: &Path, secrets: &Path) -> Self {
        let root = text(&run_ok(Command::new("id").arg("-u")).stdout).trim() == "0";
        let unshare = Command::new("unshare")
            .args(["--mount", "true"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if root && unshare {
            // Mount points a runtime provides; the image has none.
            std::fs::create_dir_all(rootfs.join("run/secrets")).unwrap();
            eprintln!(
                "{TEST}: the image's entrypoint runs as {USER} in a chroot of its exported \
                 filesystem, bind-mounted read-only, with {DATA} the one writable mount"
            );
            Self::Chroot {
                rootfs: rootfs.to_owned(),
                data: data.to_owned(),
                secrets: secrets.to_owned(),
            }
        } else {
            eprintln!(
                "skipped {TEST} read-only root: not root with unshare; running the exported \
                 binary directly"
            );
            std::fs::write(
                secrets.join("database-url"),
                format!("sqlite://{}/orchestrator.db", data.display()),
            )
            .unwrap();
            Self::Direct {
                rootfs: rootfs.to_owned(),
                data: data.to_owned(),
                secrets: secrets.to_owned(),
            }
        }
    }

    /// The image's entrypoint with `args`, in `env` and nothing else.
    fn command(&self, env: &BTreeMap<String, String>, args: &[&str]) -> Command {
        let mut command;
        match self {
            Self::Chroot {
                rootfs,
                data,
                secrets,
            } => {
                command = Command::new("unshare");
                command
                    .args(["--mount", "--propagation", "private", "sh", "-euc"])
                    .arg(
                        r#"root=$1 data=$2 secrets=$3; shift 3
mount --bind "$root" "$root"
mount -o remount,bind,ro "$root"
mount --bind "$data" "$root/var/lib/peaqos-orchestrator"
mount --bind -o ro "$secrets" "$root/run/secrets"
exec chroot --userspec=10001:10001 "$root" "$@""#,
                    )
                    .args(["sh"])
                    .arg(rootfs)
                    .arg(data)
                    .arg(secrets)
                    .arg(ENTRYPOINT)
                    .args(args);
                command.env_clear().envs(env);
            }
            Self::Direct {
                rootfs,
                data,
                secrets,
            } => {
                command = Command::new(rootfs.join(ENTRYPOINT.trim_start_matches('/')));
                let (data, secrets) = (data.display().to_string(), secrets.display().to_string());
                command.args(args).env_clear().envs(
                    env.iter().map(|(k, v)| {
                        (k, v.replace(DATA, &data).replace("/run/secrets", &secrets))
                    }),
                );
            }
        }
        command.stdin(Stdio::null());
        command
    }
}

/// The base URL the server printed (`listening on http://...`).
fn wait_listening(server: &mut Child) -> String {
    let stdout = server.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("listening on ") {
                let _ = tx.send(url.to_owned());
            }
        }
    });
    rx.recv_timeout(START_BOUND).unwrap_or_else(|_| {
        let _ = server.kill();
        let status = server.wait().unwrap();
        panic!("the image's orchestrator did not start ({status}); its stderr is above");
    })
}

/// Health, then one registration as an agent makes it, with the API key
/// the secret file holds.
fn check_serves(base: &str) {
    let (status, body) = request(base, "GET", "/api/v1/health", None).unwrap();
    assert_eq!((status, body["ok"].clone()), (200, json!(true)), "{body}");
    let (status, _) = request(base, "GET", "/ready", None).unwrap();
    assert_eq!(status, 200);

    let key = SecretKey::generate().unwrap();
    let identity = format!("did:peaq:{}", key.address().checksummed());
    let (status, body) = request(
        base,
        "POST",
        "/api/v1/machine-identity/challenges",
        Some(&json!({ "identityRef": identity })),
    )
    .unwrap();
    assert_eq!(status, 201, "{body}");
    let challenge = &body["item"];
    let signature = key
        .sign_personal(challenge["message"].as_str().unwrap().as_bytes())
        .to_hex();
    let machine = json!({
        "displayName": "Image test robot",
        "ownerId": "owner-1",
        "machineType": "amr",
        "runtimeProfile": "ros2",
        "identityRef": identity,
        "identityProof": { "challengeId": challenge["challengeId"], "signature": signature },
        "capabilities": ["lidar"],
        "labels": {},
    });
    let (status, body) = request(base, "POST", "/api/v1/machines", Some(&machine)).unwrap();
    assert_eq!(status, 201, "{body}");
    let id = body["item"]["id"].as_str().unwrap().to_owned();
    let (status, body) = request(
        base,
        "PATCH",
        &format!("/api/v1/machines/{id}"),
        Some(&json!({ "status": "active" })),
    )
    .unwrap();
    assert_eq!(
        (status, body["item"]["status"].clone()),
        (200, json!("active")),
        "{body}"
    );
}

/// One HTTP/1.1 request with the API key; `None` when nothing answers.
fn request(base: &str, method: &str, path: &str, body: Option<&Value>) -> Option<(u16, Value)> {
    let host = base.strip_prefix("http://").unwrap();
    let mut stream = TcpStream::connect(host).ok()?;
    stream.set_read_timeout(Some(START_BOUND)).unwrap();
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nx-api-key: {API_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let status = answer.split(' ').nth(1)?.parse().ok()?;
    let (_, body) = answer.split_once("\r\n\r\n")?;
    Some((status, serde_json::from_str(body).unwrap_or(Value::Null)))
}

/// SIGTERM, and a clean exit within the bound.
fn stop(mut server: Child) {
    let pid = rustix::process::Pid::from_raw(i32::try_from(server.id()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let deadline = Instant::now() + START_BOUND;
    loop {
        if let Some(status) = server.try_wait().unwrap() {
            assert!(
                status.success(),
                "the orchestrator exited {status} on SIGTERM"
            );
            return;
        }
        if Instant::now() > deadline {
            let _ = server.kill();
            panic!("the orchestrator did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The image's health check passed.
fn assert_healthy(check: &Output) {
    assert!(
        check.status.success(),
        "healthcheck: {}",
        text(&check.stderr)
    );
}

fn run_ok(command: &mut Command) -> Output {
    let out = command.stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "{command:?} failed ({}): {}",
        out.status,
        text(&out.stderr)
    );
    out
}

/// Runs to the end, or is killed at `bound`.
fn run_bounded(command: &mut Command, bound: Duration) -> Output {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let out = child.wait_with_output();
        let _ = tx.send(());
        out
    });
    if rx.recv_timeout(bound).is_err() {
        let pid = rustix::process::Pid::from_raw(i32::try_from(pid).unwrap()).unwrap();
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
    waiter.join().unwrap().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
