//! The real orchestrator (`peaqos-orchestrator`), in-process on 127.0.0.1
//! with its SQLite file and controller registry in a temp dir, stoppable and
//! restartable on the same port; plus a fake MCR API that can go down, and
//! a forwarding proxy that can hold requests back (a slow link).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use peaqos_orchestrator::Config;
use peaqos_protocol::Address;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub(crate) struct Orchestrator {
    /// Holds the database and the registry file.
    _dir: tempfile::TempDir,
    pub(crate) addr: SocketAddr,
    config: Config,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Orchestrator {
    /// Starts with a registry file; `tune` adjusts the configuration.
    pub(crate) async fn start(tune: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let registry = dir.path().join("registry.toml");
        std::fs::write(&registry, "[identities]\n").unwrap();
        let mut config = Config {
            database_url: format!("sqlite://{}", dir.path().join("orchestrator.db").display()),
            registry_file: Some(registry),
            mcr_cache_ttl: Duration::from_millis(50),
            challenge_rate_per_minute: 60_000,
            challenge_burst: 10_000,
            orchestrator_name: "e2e-orchestrator".into(),
            ..Config::default()
        };
        tune(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut me = Self {
            _dir: dir,
            addr,
            config,
            stop: CancellationToken::new(),
            task: None,
        };
        me.serve(listener);
        me
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let stop = CancellationToken::new();
        self.stop = stop.clone();
        let config = self.config.clone();
        self.task = Some(tokio::spawn(async move {
            peaqos_orchestrator::run(listener, config, async move { stop.cancelled().await })
                .await
                .expect("orchestrator runs");
        }));
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the server (in-flight requests finish) and waits for it.
    pub(crate) async fn stop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("orchestrator stops")
                .unwrap();
        }
    }

    /// Starts again on the same port, with the same database.
    pub(crate) async fn restart(&mut self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "rebind {}: {e}",
                        self.addr
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        self.serve(listener);
    }

    /// Rewrites the registry (atomically, so a reader never sees half).
    pub(crate) fn set_controllers(&self, identity: &str, controllers: &[Address]) {
        let list: Vec<String> = controllers
            .iter()
            .map(|a| format!("\"{}\"", a.checksummed()))
            .collect();
        let text = format!("[identities]\n\"{identity}\" = [{}]\n", list.join(", "));
        let path = self.config.registry_file.clone().unwrap();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }

    /// Rewrites the registry with many identities, each with its
    /// controllers.
    pub(crate) fn set_registry(&self, identities: &[(String, Address)]) {
        use std::fmt::Write as _;
        let mut text = "[identities]\n".to_owned();
        for (identity, controller) in identities {
            let _ = writeln!(text, "\"{identity}\" = [\"{}\"]", controller.checksummed());
        }
        let path = self.config.registry_file.clone().unwrap();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }

    /// `GET /api/v1/machines/{id}` as an independent client sees it.
    pub(crate) async fn machine(&self, id: &str) -> (u16, serde_json::Value) {
        let r = http()
            .get(format!("{}/api/v1/machines/{id}", self.url()))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or_default())
    }

    /// The machine's audit trail, oldest first (one page: tests stay well
    /// under its 500 events).
    pub(crate) async fn audit_events(&self, id: &str) -> Vec<serde_json::Value> {
        let v: serde_json::Value = http()
            .get(format!(
                "{}/api/v1/audit-events?machine_id={id}&limit=500",
                self.url()
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["items"].as_array().cloned().unwrap_or_default()
    }

    /// Ids of every machine in the list (all pages).
    pub(crate) async fn machine_ids(&self) -> Vec<String> {
        let v: serde_json::Value = http()
            .get(format!("{}/api/v1/machines?limit=500", self.url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// An operator's PATCH.
    pub(crate) async fn patch(&self, id: &str, body: serde_json::Value) -> u16 {
        http()
            .patch(format!("{}/api/v1/machines/{id}", self.url()))
            .json(&body)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }
}

impl Drop for Orchestrator {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn http() -> reqwest::Client {
    peaqos_agent::client::install_tls_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// A fake MCR API: `GET /machine/{did}` answers a profile naming `operator`
/// as the controller, or 503 while `down`.
pub(crate) struct FakeMcr {
    pub(crate) addr: SocketAddr,
    pub(crate) down: Arc<AtomicBool>,
    stop: CancellationToken,
}

impl FakeMcr {
    pub(crate) async fn start(machine_id: &str, operator: Address) -> Self {
        let down = Arc::new(AtomicBool::new(false));
        let d = down.clone();
        let machine_id = machine_id.to_owned();
        let app = axum::Router::new().fallback(move || {
            let (d, machine_id) = (d.clone(), machine_id.clone());
            async move {
                if d.load(Ordering::SeqCst) {
                    return (StatusCode::SERVICE_UNAVAILABLE, "maintenance").into_response();
                }
                axum::Json(serde_json::json!({
                    "schema_version": "1",
                    "name": "robot",
                    "peaqos": {
                        "machine_id": machine_id,
                        "did": format!("did:peaq:{machine_id}"),
                        "operator": operator.checksummed(),
                    }
                }))
                .into_response()
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { s.cancelled().await })
                .await
                .unwrap();
        });
        Self { addr, down, stop }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for FakeMcr {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A forwarding proxy in front of an orchestrator that can hold back the
/// next N requests carrying an identity proof (a slow uplink).
pub(crate) struct SlowLink {
    pub(crate) addr: SocketAddr,
    pub(crate) hold_next_proofs: Arc<AtomicUsize>,
    /// (method, path) of every request answered, in order.
    pub(crate) seen: Arc<Mutex<Vec<(String, String)>>>,
    /// Every answered exchange: path, request body, response body.
    #[cfg_attr(not(feature = "pkcs11"), allow(dead_code))]
    pub(crate) exchanges: Arc<Mutex<Vec<Exchange>>>,
    /// Bumped as each request has been answered (so the agent has its
    /// answer, or is about to).
    answered: watch::Receiver<u64>,
    stop: CancellationToken,
}

#[derive(Clone)]
struct LinkState {
    upstream: String,
    hold_next_proofs: Arc<AtomicUsize>,
    hold_for: Duration,
    seen: Arc<Mutex<Vec<(String, String)>>>,
    exchanges: Arc<Mutex<Vec<Exchange>>>,
    answered: Arc<watch::Sender<u64>>,
    client: reqwest::Client,
}

/// A request and its answer as they passed through the link.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "pkcs11"), allow(dead_code))]
pub(crate) struct Exchange {
    pub(crate) path: String,
    pub(crate) request: Bytes,
    pub(crate) response: Bytes,
}

async fn forward(State(link): State<LinkState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body: Bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
    if body.windows(13).any(|w| w == b"identityProof")
        && link
            .hold_next_proofs
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    {
        tokio::time::sleep(link.hold_for).await;
    }
    let url = format!("{}{}", link.upstream, parts.uri);
    let mut req = link
        .client
        .request(parts.method.clone(), url)
        .body(body.clone());
    for (name, value) in &parts.headers {
        if name != "host" && name != "content-length" {
            req = req.header(name, value);
        }
    }
    let Ok(resp) = req.send().await else {
        link.answered(&parts);
        return StatusCode::BAD_GATEWAY.into_response();
    };
    let mut out = Response::builder().status(resp.status().as_u16());
    for (name, value) in resp.headers() {
        if name != "content-length" && name != "transfer-encoding" {
            out = out.header(name, value);
        }
    }
    let answer = resp.bytes().await.unwrap();
    link.exchanges.lock().unwrap().push(Exchange {
        path: parts.uri.path().to_owned(),
        request: body,
        response: answer.clone(),
    });
    let response = out.body(axum::body::Body::from(answer)).unwrap();
    link.answered(&parts);
    response
}

impl LinkState {
    fn answered(&self, request: &axum::http::request::Parts) {
        self.seen
            .lock()
            .unwrap()
            .push((request.method.to_string(), request.uri.path().to_owned()));
        self.answered.send_modify(|n| *n += 1);
    }
}

impl SlowLink {
    pub(crate) async fn start(upstream: &str, hold_for: Duration) -> Self {
        let (answered_tx, answered) = watch::channel(0);
        let state = LinkState {
            upstream: upstream.to_owned(),
            hold_next_proofs: Arc::new(AtomicUsize::new(0)),
            hold_for,
            seen: Arc::new(Mutex::new(Vec::new())),
            exchanges: Arc::new(Mutex::new(Vec::new())),
            answered: Arc::new(answered_tx),
            client: http(),
        };
        let app = axum::Router::new()
            .fallback(forward)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { s.cancelled().await })
                .await
                .unwrap();
        });
        Self {
            addr,
            hold_next_proofs: state.hold_next_proofs,
            seen: state.seen,
            exchanges: state.exchanges,
            answered,
            stop,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) fn count(&self, method: &str, path: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, p)| m == method && p == path)
            .count()
    }
}

impl SlowLink {
    /// Waits until `method path` has been answered at least `n` times in
    /// all; panics after `timeout`.
    pub(crate) async fn wait_count(&self, method: &str, path: &str, n: usize, timeout: Duration) {
        let waited = self
            .wait_until(timeout, || self.count(method, path) >= n)
            .await;
        assert!(
            waited,
            "timed out after {timeout:?} waiting for {n} × {method} {path}; seen: {:?}",
            self.seen.lock().unwrap()
        );
    }

    /// Waits until `done()` holds, looking again after each answered
    /// request; false after `timeout`.
    pub(crate) async fn wait_until(&self, timeout: Duration, done: impl Fn() -> bool) -> bool {
        let mut answered = self.answered.clone();
        tokio::time::timeout(timeout, async {
            loop {
                if done() {
                    return;
                }
                answered.changed().await.unwrap();
            }
        })
        .await
        .is_ok()
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Where the state file of a test agent lives.
pub(crate) fn state_file(dir: &std::path::Path) -> PathBuf {
    dir.join("state").join("state.json")
}
