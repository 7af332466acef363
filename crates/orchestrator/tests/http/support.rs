//! Test harness: the orchestrator on 127.0.0.1:0 in this process, a
//! registry file it reads, a clock the test moves, and controller keys.
//!
//! Keys are the eth-account-made interop fixture keys of `peaqos-protocol`.
//! Challenges are signed by eth-account itself (a Python child process)
//! when Python with eth-account is available (always in CI); otherwise by
//! our own signer, with one line saying so.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use peaqos_orchestrator::{Config, ManualClock, Server};
use peaqos_protocol::{Challenge, ErrorResponse, ItemResponse, Machine, SecretKey};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Every request in the tests gives up after this.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(20);

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Vector {
    private_key: String,
    address: String,
}

#[derive(serde::Deserialize)]
struct Fixture {
    vectors: Vec<Vector>,
}

/// A controller key from the eth-account fixtures.
#[derive(Debug, Clone)]
pub(crate) struct Key {
    pub(crate) private_key: String,
    /// EIP-55, as eth-account printed it.
    pub(crate) address: String,
}

/// The distinct fixture keys (four), in file order.
pub(crate) fn keys() -> Vec<Key> {
    let fixture: Fixture = serde_json::from_str(include_str!(
        "../../../protocol/tests/fixtures/eip191_vectors.json"
    ))
    .unwrap();
    let mut out: Vec<Key> = Vec::new();
    for v in fixture.vectors {
        if !out.iter().any(|k| k.address == v.address) {
            out.push(Key {
                private_key: v.private_key,
                address: v.address,
            });
        }
    }
    assert!(out.len() >= 3, "fixture has too few keys");
    out
}

pub(crate) fn key(i: usize) -> Key {
    keys()[i].clone()
}

const SIGNER_PY: &str = r#"
import json, sys
from eth_account import Account
from eth_account.messages import encode_defunct
for line in sys.stdin:
    req = json.loads(line)
    signed = Account.sign_message(encode_defunct(text=req["message"]), req["key"])
    sig = "0x" + bytes(signed.signature).hex().removeprefix("0x")
    sys.stdout.write(json.dumps({"signature": sig}) + "\n")
    sys.stdout.flush()
"#;

struct EthAccount {
    _child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

fn eth_account() -> Option<&'static Mutex<EthAccount>> {
    static SIGNER: OnceLock<Option<Mutex<EthAccount>>> = OnceLock::new();
    SIGNER
        .get_or_init(|| {
            let python = peaqos_testkit::python_with(
                "orchestrator http tests (eth-account signer)",
                &["eth_account"],
            )?;
            let mut child = Command::new(python)
                .args(["-c", SIGNER_PY])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn the eth-account signer");
            let stdin = child.stdin.take().unwrap();
            let stdout = BufReader::new(child.stdout.take().unwrap());
            Some(Mutex::new(EthAccount {
                _child: child,
                stdin,
                stdout,
            }))
        })
        .as_ref()
}

/// Signs `message` with EIP-191 `personal_sign`: by eth-account when
/// available, else by our own signer.
pub(crate) fn sign(key: &Key, message: &str) -> String {
    if let Some(signer) = eth_account() {
        let mut s = signer.lock().unwrap();
        let line = json!({"key": key.private_key, "message": message}).to_string();
        writeln!(s.stdin, "{line}").unwrap();
        s.stdin.flush().unwrap();
        let mut answer = String::new();
        s.stdout.read_line(&mut answer).unwrap();
        let v: Value = serde_json::from_str(&answer).expect("signer answer");
        return v["signature"].as_str().unwrap().to_owned();
    }
    SecretKey::from_hex(&key.private_key)
        .unwrap()
        .sign_personal(message.as_bytes())
        .to_hex()
}

/// A registry file body mapping identities to fixture keys' addresses.
pub(crate) fn registry_toml(entries: &[(&str, &[&Key])]) -> String {
    let mut out = String::from("[identities]\n");
    for (identity, keys) in entries {
        let list: Vec<String> = keys.iter().map(|k| format!("\"{}\"", k.address)).collect();
        let _ = writeln!(out, "\"{identity}\" = [{}]", list.join(", "));
    }
    out
}

/// Writes a registry file so that the server notices the change even
/// within one timestamp tick: a new inode by write-and-rename.
pub(crate) fn write_registry(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A `database_url` that [`TestServer`] points at a SQLite file in its
/// temporary directory.
pub(crate) const FILE_DB: &str = "sqlite://{dir}/state/orchestrator.db";

/// The orchestrator running in this process.
pub(crate) struct TestServer {
    pub(crate) base: String,
    pub(crate) client: reqwest::Client,
    pub(crate) clock: Arc<ManualClock>,
    pub(crate) registry: PathBuf,
    pub(crate) dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), peaqos_orchestrator::Error>>>,
}

/// The configuration tests start from: in-memory database, a registry file
/// in a temporary directory, generous rate limits.
pub(crate) fn test_config(registry: &Path) -> Config {
    Config {
        database_url: "sqlite::memory:".into(),
        registry_file: Some(registry.to_owned()),
        orchestrator_name: "http://127.0.0.1 (test)".into(),
        challenge_rate_per_minute: 10_000,
        challenge_burst: 10_000,
        mcr_cache_ttl: Duration::from_secs(10),
        ..Config::default()
    }
}

impl TestServer {
    /// Starts a server whose registry lists `did:peaq:1`..`did:peaq:3`
    /// controlled by fixture keys 0..2; `adjust` changes the configuration.
    pub(crate) async fn start(adjust: impl FnOnce(&mut Config)) -> Self {
        let k = keys();
        Self::start_with_registry(
            &registry_toml(&[
                ("did:peaq:1", &[&k[0]]),
                ("did:peaq:2", &[&k[1]]),
                ("did:peaq:3", &[&k[2], &k[0]]),
            ]),
            adjust,
        )
        .await
    }

    pub(crate) async fn start_with_registry(
        registry: &str,
        adjust: impl FnOnce(&mut Config),
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let registry_path = dir.path().join("registry.toml");
        std::fs::write(&registry_path, registry).unwrap();
        let mut config = test_config(&registry_path);
        adjust(&mut config);
        config.database_url = config
            .database_url
            .replace("{dir}", &dir.path().display().to_string());
        Self::start_config(config, dir, registry_path).await
    }

    pub(crate) async fn start_config(
        config: Config,
        dir: tempfile::TempDir,
        registry: PathBuf,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let clock = Arc::new(ManualClock::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let server = Server::new(config).clock(clock.clone());
        let task = tokio::spawn(server.run(listener, async {
            let _ = stopped.await;
        }));
        peaqos_orchestrator::install_crypto_provider();
        let client = reqwest::Client::builder().timeout(TIMEOUT).build().unwrap();
        let this = Self {
            base,
            client,
            clock,
            registry,
            dir,
            stop: Some(stop),
            task: Some(task),
        };
        this.wait_ready().await;
        this
    }

    /// Polls `/health` until the server answers, with a deadline.
    async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            if let Ok(r) = self.client.get(self.url("/health")).send().await
                && r.status() == 200
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "server did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Stops the server gracefully and returns how `run` ended.
    pub(crate) async fn stop(mut self) -> Result<(), peaqos_orchestrator::Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().unwrap();
        tokio::time::timeout(TIMEOUT, task)
            .await
            .expect("server stops in time")
            .unwrap()
    }

    pub(crate) async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub(crate) async fn patch(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .patch(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub(crate) async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    pub(crate) async fn delete(&self, path: &str) -> reqwest::Response {
        self.client.delete(self.url(path)).send().await.unwrap()
    }

    /// A challenge for `identity` (any accepted form); panics unless 201.
    pub(crate) async fn challenge(&self, identity: &str) -> Challenge {
        let r = self
            .post(
                "/api/v1/machine-identity/challenges",
                &json!({ "identityRef": identity }),
            )
            .await;
        assert_eq!(
            r.status(),
            201,
            "challenge for {identity}: {}",
            r.text().await.unwrap()
        );
        r.json::<ItemResponse<Challenge>>().await.unwrap().item
    }

    /// `{challengeId, signature}` for a fresh challenge signed by `key`.
    pub(crate) async fn proof(&self, identity: &str, key: &Key) -> Value {
        let c = self.challenge(identity).await;
        json!({ "challengeId": c.challenge_id, "signature": sign(key, &c.message) })
    }

    /// Creates a machine with a fresh proof; panics unless 201.
    pub(crate) async fn create(&self, identity: &str, key: &Key) -> Machine {
        let proof = self.proof(identity, key).await;
        let r = self
            .post("/api/v1/machines", &machine_body(identity, proof))
            .await;
        assert_eq!(
            r.status(),
            201,
            "create {identity}: {}",
            r.text().await.unwrap()
        );
        r.json::<ItemResponse<Machine>>().await.unwrap().item
    }

    /// Creates and activates a machine.
    pub(crate) async fn create_active(&self, identity: &str, key: &Key) -> Machine {
        let m = self.create(identity, key).await;
        let r = self
            .patch(
                &format!("/api/v1/machines/{}", m.id),
                &json!({"status": "active"}),
            )
            .await;
        assert_eq!(r.status(), 200, "activate: {}", r.text().await.unwrap());
        r.json::<ItemResponse<Machine>>().await.unwrap().item
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A complete create body.
pub(crate) fn machine_body(identity: &str, proof: impl Into<Value>) -> Value {
    let proof: Value = proof.into();
    json!({
        "displayName": "Robot 1",
        "ownerId": "owner-1",
        "machineType": "amr",
        "runtimeProfile": "ros2",
        "identityRef": identity,
        "identityProof": proof,
        "capabilities": ["lidar"],
        "labels": {"site": "berlin"},
    })
}

/// Asserts an error response: status, `{error: {code, message}}` envelope,
/// and returns the body.
pub(crate) async fn expect_error(r: reqwest::Response, status: u16, code: &str) -> ErrorResponse {
    let got = r.status().as_u16();
    let text = r.text().await.unwrap();
    assert_eq!(got, status, "status for {code}: {text}");
    let body: ErrorResponse = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("not an error envelope ({e}): {text}"));
    assert_eq!(body.error.code.as_str(), code, "{text}");
    assert!(!body.error.message.is_empty());
    body
}

/// The item of a 200/201 response.
pub(crate) async fn expect_item<T: serde::de::DeserializeOwned>(
    r: reqwest::Response,
    status: u16,
) -> T {
    let got = r.status().as_u16();
    let text = r.text().await.unwrap();
    assert_eq!(got, status, "{text}");
    serde_json::from_str::<ItemResponse<T>>(&text)
        .unwrap_or_else(|e| panic!("not an item envelope ({e}): {text}"))
        .item
}

/// Runs a Python peer (the SDK, the CLI) to its end, bounded in time. It
/// sends usage analytics unless told not to; tests stay on loopback.
pub(crate) async fn run_python_peer(
    mut command: tokio::process::Command,
    what: &str,
) -> std::process::Output {
    let child = command
        .env("DO_NOT_TRACK", "1")
        .env("PEAQOS_TELEMETRY", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    tokio::time::timeout(TIMEOUT * 3, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish in time"))
        .unwrap()
}
