//! Load generator for the orchestrator: requests per second and latency
//! percentiles of each scenario, beside the trivial `/health` endpoint of the
//! same server measured in the same run (the ceiling).
//!
//! ```text
//! cargo run --release -p peaqos-orchestrator --example loadgen
//! cargo run --release -p peaqos-orchestrator --example loadgen -- --connections 64 --duration 10
//! ```
//!
//! By default the server runs in this process (its own runtime, on a file
//! SQLite database in a temporary directory, controllers from a registry
//! file that this tool writes), so the client and the server share the
//! machine's cores the way `wrk` beside a server does. `--url` (repeatable:
//! replicas behind one database) measures running servers instead; start
//! them with `--print-registry`'s output as `PEAQOS_MCR_REGISTRY_FILE`.
//!
//! Scenarios: `health` (the ceiling), `get` (GET /machines/:id, controller
//! resolution cached), `flow` (challenge, EIP-191 signature by the client,
//! create: the agent's registration), `list` (GET /machines?limit=500).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use peaqos_orchestrator::{Config, Server};
use peaqos_protocol::{Challenge, ItemResponse, Machine, SecretKey};
use serde_json::json;

/// First on-chain id of the machines the `flow` scenario registers.
const FLOW_BASE: u64 = 1_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Health,
    Get,
    Flow,
    List,
}

impl FromStr for Scenario {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "health" => Ok(Self::Health),
            "get" => Ok(Self::Get),
            "flow" => Ok(Self::Flow),
            "list" => Ok(Self::List),
            _ => Err(format!("unknown scenario {s:?} (health, get, flow, list)")),
        }
    }
}

impl Scenario {
    fn label(self) -> &'static str {
        match self {
            Self::Health => "GET /health (ceiling)",
            Self::Get => "GET /api/v1/machines/:id (controllers cached)",
            Self::Flow => "challenge -> sign -> POST /api/v1/machines",
            Self::List => "GET /api/v1/machines?limit=500",
        }
    }
}

#[derive(Debug, Parser)]
#[command(about = "Load generator for peaqos-orchestrator")]
struct Args {
    /// Base URL of a running server (repeat for replicas); default: start
    /// one in this process.
    #[arg(long)]
    url: Vec<String>,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Measured seconds per scenario.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Unmeasured seconds before each scenario.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Scenarios, in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "health,get,flow,list,health"
    )]
    scenarios: Vec<Scenario>,
    /// Machines created before measuring (read by `get` and `list`).
    #[arg(long, default_value_t = 1000)]
    machines: u64,
    /// Identities available to the `flow` scenario.
    #[arg(long, default_value_t = 200_000)]
    flow_identities: u64,
    /// Database of the in-process server (default: a file in a temporary
    /// directory).
    #[arg(long)]
    database_url: Option<String>,
    /// Worker threads of the in-process server (default: one per core).
    #[arg(long)]
    server_threads: Option<usize>,
    /// Worker threads of the load generator (default: one per core).
    #[arg(long)]
    client_threads: Option<usize>,
    /// Log filter of the in-process server.
    #[arg(long, default_value = "warn")]
    log: String,
    /// Print the registry file the scenarios need, then exit.
    #[arg(long)]
    print_registry: bool,
}

/// The controller key of every identity the load generator uses. A
/// benchmark key, worthless by design.
fn controller() -> SecretKey {
    SecretKey::from_hex("4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318")
        .expect("valid key")
}

fn registry(args: &Args) -> String {
    let address = controller().address().checksummed();
    let mut out = String::with_capacity(
        64 * usize::try_from(args.machines + args.flow_identities).unwrap_or(0),
    );
    out.push_str("[identities]\n");
    let ids = (1..=args.machines).chain(FLOW_BASE..FLOW_BASE + args.flow_identities);
    for id in ids {
        let _ = writeln!(out, "\"did:peaq:{id}\" = [\"{address}\"]");
    }
    out
}

/// One keep-alive HTTP/1.1 connection.
struct Conn {
    sender: SendRequest<Full<Bytes>>,
    host: String,
}

impl Conn {
    async fn open(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(Self {
            sender,
            host: addr.to_string(),
        })
    }

    async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        self.sender.ready().await?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.host);
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((status, bytes))
    }

    async fn expect<T: serde::de::DeserializeOwned>(
        &mut self,
        method: Method,
        path: &str,
        body: Option<String>,
        want: StatusCode,
    ) -> anyhow::Result<T> {
        let (status, bytes) = self.send(method, path, body).await?;
        if status != want {
            bail!("{path}: {status}: {}", String::from_utf8_lossy(&bytes));
        }
        Ok(serde_json::from_slice(&bytes)?)
    }
}

/// One registration, as the agent does it.
async fn register(conn: &mut Conn, key: &SecretKey, id: u64) -> anyhow::Result<Machine> {
    let identity = format!("did:peaq:{id}");
    let challenge: ItemResponse<Challenge> = conn
        .expect(
            Method::POST,
            "/api/v1/machine-identity/challenges",
            Some(json!({ "identityRef": identity }).to_string()),
            StatusCode::CREATED,
        )
        .await?;
    let c = challenge.item;
    let signature = key.sign_personal(c.message.as_bytes()).to_hex();
    let body = json!({
        "displayName": format!("Robot {id}"),
        "ownerId": "fleet-1",
        "machineType": "amr",
        "runtimeProfile": "ros2",
        "identityRef": identity,
        "identityProof": {"challengeId": c.challenge_id, "signature": signature},
        "capabilities": ["lidar", "camera"],
        "labels": {"site": "berlin"},
    });
    let created: ItemResponse<Machine> = conn
        .expect(
            Method::POST,
            "/api/v1/machines",
            Some(body.to_string()),
            StatusCode::CREATED,
        )
        .await?;
    Ok(created.item)
}

#[derive(Debug, Default)]
struct Stats {
    operations: u64,
    /// Microseconds.
    latencies: Vec<u32>,
    errors: u64,
}

impl Stats {
    fn percentile(sorted: &[u32], per_mille: usize) -> Duration {
        if sorted.is_empty() {
            return Duration::ZERO;
        }
        // Nearest rank: the smallest value with at least this share of the
        // samples at or below it.
        let rank = (per_mille * sorted.len())
            .div_ceil(1000)
            .clamp(1, sorted.len());
        Duration::from_micros(u64::from(sorted[rank - 1]))
    }
}

struct Shared {
    machine_ids: Vec<String>,
    next_flow_id: AtomicU64,
    flow_end: u64,
    key: SecretKey,
}

async fn worker(
    addr: SocketAddr,
    scenario: Scenario,
    shared: Arc<Shared>,
    start_measuring: Instant,
    stop: Instant,
    seed: usize,
) -> anyhow::Result<Stats> {
    let mut conn = Conn::open(addr).await?;
    let mut stats = Stats::default();
    let mut i = seed;
    loop {
        let began = Instant::now();
        if began >= stop {
            return Ok(stats);
        }
        let ok = match scenario {
            Scenario::Health => conn
                .send(Method::GET, "/health", None)
                .await
                .is_ok_and(|(s, _)| s == StatusCode::OK),
            Scenario::Get => {
                let id = &shared.machine_ids[i % shared.machine_ids.len()];
                conn.send(Method::GET, &format!("/api/v1/machines/{id}"), None)
                    .await
                    .is_ok_and(|(s, _)| s == StatusCode::OK)
            }
            Scenario::List => conn
                .send(Method::GET, "/api/v1/machines?limit=500", None)
                .await
                .is_ok_and(|(s, b)| s == StatusCode::OK && b.len() > 1000),
            Scenario::Flow => {
                let id = shared.next_flow_id.fetch_add(1, Ordering::Relaxed);
                if id >= shared.flow_end {
                    bail!("out of flow identities: raise --flow-identities");
                }
                register(&mut conn, &shared.key, id).await.is_ok()
            }
        };
        i = i.wrapping_add(7919);
        if began < start_measuring {
            continue;
        }
        if ok {
            stats.operations += 1;
            let us = began.elapsed().as_micros();
            stats.latencies.push(u32::try_from(us).unwrap_or(u32::MAX));
        } else {
            stats.errors += 1;
            if stats.errors == 1 {
                // Reconnect: the server may have closed the connection.
                conn = Conn::open(addr).await?;
            }
        }
    }
}

struct Outcome {
    scenario: Scenario,
    per_second: f64,
    p50: Duration,
    p99: Duration,
    errors: u64,
}

async fn measure(
    addrs: &[SocketAddr],
    scenario: Scenario,
    shared: &Arc<Shared>,
    args: &Args,
) -> anyhow::Result<Outcome> {
    let start_measuring = Instant::now() + Duration::from_secs(args.warmup);
    let measured = Duration::from_secs(args.duration);
    let stop = start_measuring + measured;
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..args.connections {
        let addr = addrs[c % addrs.len()];
        tasks.spawn(worker(
            addr,
            scenario,
            Arc::clone(shared),
            start_measuring,
            stop,
            c,
        ));
    }
    let mut all = Stats::default();
    while let Some(done) = tasks.join_next().await {
        let s = done??;
        all.operations += s.operations;
        all.errors += s.errors;
        all.latencies.extend(s.latencies);
    }
    all.latencies.sort_unstable();
    Ok(Outcome {
        scenario,
        per_second: all.operations as f64 / measured.as_secs_f64(),
        p50: Stats::percentile(&all.latencies, 500),
        p99: Stats::percentile(&all.latencies, 990),
        errors: all.errors,
    })
}

fn resolve(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url
        .strip_prefix("http://")
        .context("only http:// URLs are supported")?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    std::net::ToSocketAddrs::to_socket_addrs(hostport)?
        .next()
        .with_context(|| format!("cannot resolve {hostport}"))
}

/// Starts the server on its own runtime and threads; returns its address.
fn start_in_process(args: &Args, dir: &tempfile::TempDir) -> anyhow::Result<SocketAddr> {
    let registry_file = dir.path().join("registry.toml");
    std::fs::write(&registry_file, registry(args))?;
    let database_url = args
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("orchestrator.db").display()));
    let config = Config {
        database_url,
        registry_file: Some(registry_file),
        // The cache stays warm over the run; a production TTL of seconds
        // adds one look-up per identity per TTL, nothing per request.
        mcr_cache_ttl: Duration::from_secs(600),
        challenge_rate_per_minute: u32::MAX,
        challenge_burst: u32::MAX,
        max_pending_challenges: 1_000_000,
        ..Config::default()
    };
    let _ = peaqos_logging::init(Some(&args.log));
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("server");
    if let Some(n) = args.server_threads {
        builder.worker_threads(n);
    }
    let runtime = builder.build()?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        runtime.block_on(async move {
            let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(anyhow::Error::from(e)));
                    return;
                }
            };
            let ready = tx.clone();
            let served = Server::new(config)
                .on_ready(move |addr| {
                    let _ = ready.send(Ok(addr));
                })
                .run(listener, std::future::pending())
                .await;
            if let Err(e) = served {
                let _ = tx.send(Err(e.into()));
            }
        });
    });
    rx.recv_timeout(Duration::from_secs(60))
        .context("the in-process server did not start")?
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.print_registry {
        print!("{}", registry(&args));
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let addrs: Vec<SocketAddr> = if args.url.is_empty() {
        vec![start_in_process(&args, &dir)?]
    } else {
        args.url
            .iter()
            .map(|u| resolve(u))
            .collect::<anyhow::Result<_>>()?
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("loadgen");
    if let Some(n) = args.client_threads {
        builder.worker_threads(n);
    }
    builder.build()?.block_on(drive(&args, &addrs))
}

async fn drive(args: &Args, addrs: &[SocketAddr]) -> anyhow::Result<()> {
    let key = controller();
    // Machines for `get` and `list`: registered, activated, read once (so
    // that controller data is cached).
    let mut ids = Vec::new();
    let mut conn = Conn::open(addrs[0]).await?;
    let setup = Instant::now();
    for id in 1..=args.machines {
        let m = register(&mut conn, &key, id).await?;
        let _: ItemResponse<Machine> = conn
            .expect(
                Method::PATCH,
                &format!("/api/v1/machines/{}", m.id),
                Some(json!({"status": "active"}).to_string()),
                StatusCode::OK,
            )
            .await?;
        ids.push(m.id);
    }
    for id in &ids {
        conn.send(Method::GET, &format!("/api/v1/machines/{id}"), None)
            .await?;
    }
    eprintln!(
        "setup: {} machines in {:.1} s",
        ids.len(),
        setup.elapsed().as_secs_f64()
    );
    let shared = Arc::new(Shared {
        machine_ids: ids,
        next_flow_id: AtomicU64::new(FLOW_BASE),
        flow_end: FLOW_BASE + args.flow_identities,
        key,
    });

    let mut outcomes = Vec::new();
    for &scenario in &args.scenarios {
        let o = measure(addrs, scenario, &shared, args).await?;
        eprintln!(
            "{:<48} {:>10.0}/s  p50 {:>8.2} ms  p99 {:>8.2} ms  errors {}",
            scenario.label(),
            o.per_second,
            o.p50.as_secs_f64() * 1e3,
            o.p99.as_secs_f64() * 1e3,
            o.errors
        );
        outcomes.push(o);
    }

    // The ceiling: the best /health figure of the run.
    let ceiling = outcomes
        .iter()
        .filter(|o| o.scenario == Scenario::Health)
        .map(|o| o.per_second)
        .fold(0.0, f64::max);
    println!(
        "\n{} connections, {} s per scenario after {} s warm-up, {} cores\n",
        args.connections,
        args.duration,
        args.warmup,
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    println!("| scenario | per second | p50 | p99 | vs /health |");
    println!("|---|---:|---:|---:|---:|");
    for o in &outcomes {
        let ratio = if ceiling > 0.0 {
            o.per_second / ceiling
        } else {
            0.0
        };
        println!(
            "| {} | {:.0} | {:.2} ms | {:.2} ms | {:.2} |",
            o.scenario.label(),
            o.per_second,
            o.p50.as_secs_f64() * 1e3,
            o.p99.as_secs_f64() * 1e3,
            ratio
        );
        if o.errors > 0 {
            println!("|   ({} errors) | | | | |", o.errors);
        }
    }
    Ok(())
}
