//! Load generator for the orchestrator: requests per second and latency
//! percentiles of each scenario, beside the trivial `/health` endpoint of the
//! same servers measured in the same run (the ceiling); a walk through every
//! page of the machine list; and the registration burst of a fleet coming
//! back after a power cut.
//!
//! ```text
//! cargo run --release -p peaqos-orchestrator --example loadgen
//! cargo run --release -p peaqos-orchestrator --example loadgen -- \
//!     --database-url postgres://postgres@127.0.0.1:5432/test --replicas 2 \
//!     --machines 100000 --scenarios health,get,list,flow,burst,health
//! ```
//!
//! `flow-untrailed` runs the registrations of `flow` on a second set of
//! servers with the audit trail off (`PEAQOS_AUDIT_TRAIL=false`), on a
//! database of their own seeded alike: alternate the two
//! (`--scenarios flow,flow-untrailed,flow,flow-untrailed`) and the report
//! gives the trail's cost as a ratio measured in one run.
//!
//! By default the servers run in this process (each replica on its own
//! runtime and threads, as a process of its own would be), so that load
//! generator and servers share the machine's cores the way `wrk` beside a
//! server does. Their database is a SQLite file in a temporary directory,
//! or, with a `postgres://` URL, a fresh schema in that database, dropped at
//! the end. Machines are written straight into the store before the servers
//! start (registering 100,000 over HTTP would take longer than measuring
//! them); controllers come from a registry file this tool writes.
//!
//! `--url` (repeatable: replicas behind one database) measures running
//! servers instead, after registering `--machines` over HTTP; start them
//! with `--print-registry`'s output as `PEAQOS_MCR_REGISTRY_FILE` and
//! generous challenge rate limits (every simulated agent is one address).

mod burst;
mod client;
mod cost;
mod report;
mod scenarios;
mod setup;

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use hyper::{Method, StatusCode};
use peaqos_orchestrator::store::Backend;

use crate::client::Conn;
use crate::scenarios::{Scenario, Shared};
use crate::setup::{FLOW_BASE, PgSchema, Seeded};

/// A step of the run, in `--scenarios` order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Measure(Scenario),
    /// The power-cut burst.
    Burst,
}

impl FromStr for Step {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "burst" {
            Ok(Self::Burst)
        } else {
            s.parse()
                .map(Self::Measure)
                .map_err(|e| format!("{e} or burst"))
        }
    }
}

#[derive(Debug, Parser)]
#[command(about = "Load generator for peaqos-orchestrator")]
struct Args {
    /// Base URL of a running server (repeat for replicas); default: start
    /// servers in this process.
    #[arg(long)]
    url: Vec<String>,
    /// Database of the in-process servers: `sqlite://...`, or
    /// `postgres://...` (a fresh schema there). Default: a SQLite file in a
    /// temporary directory.
    #[arg(long)]
    database_url: Option<String>,
    /// In-process replicas sharing the database (PostgreSQL only); the
    /// client spreads its connections over them round-robin.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Concurrent keep-alive connections of the closed-loop scenarios.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Measured seconds per scenario.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Unmeasured seconds before each scenario.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Steps, in order: health, get, list, flow, flow-untrailed, burst.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "health,get,list,flow,burst,health"
    )]
    scenarios: Vec<Step>,
    /// Machines in the store before measuring (read by `get`, `list` and
    /// the walk; the burst re-proves the first `--burst-agents` of them).
    #[arg(long, default_value_t = 10_000)]
    machines: u64,
    /// Identities available to the `flow` scenario.
    #[arg(long, default_value_t = 100_000)]
    flow_identities: u64,
    /// Agents in the power-cut burst.
    #[arg(long, default_value_t = 10_000)]
    burst_agents: usize,
    /// Seconds over which the burst's agents come back.
    #[arg(long, default_value_t = 10)]
    burst_spread: u64,
    /// Seconds after which agents still trying count as failed (default:
    /// 120, and 12 more per 1,000 agents past 10,000, so that a herd
    /// several times larger is not cut off at the time of a smaller one).
    #[arg(long)]
    burst_deadline: Option<u64>,
    /// How a refused agent of the burst picks its wait: `agent` (the
    /// agent's rule) or `longer` (its rule before: the longer of the
    /// jittered backoff and `Retry-After`).
    #[arg(long, value_enum, default_value = "agent")]
    retry_rule: burst::RetryRule,
    /// Worker threads of each in-process server (default: one per core).
    #[arg(long)]
    server_threads: Option<usize>,
    /// Worker threads of the load generator (default: one per core).
    #[arg(long)]
    client_threads: Option<usize>,
    /// Machine records each in-process PostgreSQL server keeps in memory
    /// (`PEAQOS_PG_ROW_CACHE`; 0: none, the figures before the cache).
    #[arg(long)]
    pg_row_cache: Option<u32>,
    /// Log filter of the in-process servers.
    #[arg(long, default_value = "warn")]
    log: String,
    /// Keep the PostgreSQL schema after the run.
    #[arg(long)]
    keep_schema: bool,
    /// Print the registry file the scenarios need, then exit.
    #[arg(long)]
    print_registry: bool,
}

impl Args {
    fn burst_deadline(&self) -> Duration {
        let agents = u64::try_from(self.burst_agents).unwrap_or(u64::MAX);
        Duration::from_secs(
            self.burst_deadline
                .unwrap_or_else(|| 120 + agents.saturating_sub(10_000) * 12 / 1_000),
        )
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.print_registry {
        print!("{}", setup::registry(args.machines, args.flow_identities));
        return Ok(());
    }
    let wants_burst = args.scenarios.contains(&Step::Burst);
    if wants_burst && args.burst_agents as u64 > args.machines {
        bail!("the burst re-proves seeded machines: --machines must be at least --burst-agents");
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("loadgen");
    if let Some(n) = args.client_threads {
        builder.worker_threads(n);
    }
    let client = builder.build()?;
    let dir = tempfile::tempdir()?;

    let wants_baseline = args
        .scenarios
        .contains(&Step::Measure(Scenario::FlowUntrailed));
    let mut schemas = Vec::new();
    let mut baseline = Vec::new();
    let (addrs, seeded, backend) = if args.url.is_empty() {
        let registry_file = dir.path().join("registry.toml");
        std::fs::write(
            &registry_file,
            setup::registry(args.machines, args.flow_identities),
        )?;
        let (database_url, schema) = client.block_on(database(&args, &dir, "orchestrator"))?;
        schemas.extend(schema);
        let backend = Backend::of(&database_url).context("unsupported --database-url")?;
        let seeded = client.block_on(setup::seed(&database_url, args.machines))?;
        let servers = |database_url: &str, audit_trail: bool| {
            setup::start_servers(&setup::ServerSetup {
                database_url,
                registry_file: &registry_file,
                replicas: args.replicas,
                threads: args.server_threads,
                log: &args.log,
                audit_trail,
                pg_row_cache: args.pg_row_cache,
            })
        };
        let addrs = servers(&database_url, true)?;
        if wants_baseline {
            let (url, schema) = client.block_on(database(&args, &dir, "untrailed"))?;
            schemas.extend(schema);
            client.block_on(setup::seed(&url, args.machines))?;
            baseline = servers(&url, false)?;
        }
        (addrs, seeded, Some(backend))
    } else {
        if wants_baseline {
            bail!("flow-untrailed starts servers of its own: it cannot run with --url");
        }
        let addrs: Vec<SocketAddr> = args
            .url
            .iter()
            .map(|u| resolve(u))
            .collect::<anyhow::Result<_>>()?;
        let seeded = client.block_on(register_over_http(addrs[0], args.machines))?;
        (addrs, seeded, None)
    };

    let result = client.block_on(drive(&args, &addrs, &baseline, seeded, backend));
    for schema in schemas {
        if args.keep_schema {
            eprintln!("kept schema {}", schema.name());
        } else {
            client.block_on(schema.drop_schema())?;
        }
    }
    result
}

/// The in-process servers' database: a fresh PostgreSQL schema, a given
/// SQLite URL (the first set of servers only), or a SQLite file `name` in
/// `dir`.
async fn database(
    args: &Args,
    dir: &tempfile::TempDir,
    name: &str,
) -> anyhow::Result<(String, Option<PgSchema>)> {
    match args.database_url.as_deref() {
        Some(url) if Backend::of(url) == Some(Backend::Postgres) => {
            let schema = PgSchema::create(url).await?;
            Ok((schema.url.clone(), Some(schema)))
        }
        Some(url) if name == "orchestrator" => Ok((url.to_owned(), None)),
        _ => Ok((
            format!(
                "sqlite://{}",
                dir.path().join(format!("{name}.db")).display()
            ),
            None,
        )),
    }
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

/// Machines for `get`, `list` and the burst on servers we did not start:
/// registered and activated the agent's way.
async fn register_over_http(addr: SocketAddr, count: u64) -> anyhow::Result<Vec<Seeded>> {
    let key = setup::controller();
    let mut conn = Conn::open(addr).await?;
    let started = Instant::now();
    let mut out = Vec::new();
    for id in 1..=count {
        let m = conn.register(&key, id).await?;
        out.push(Seeded {
            id,
            machine_id: m.id,
        });
    }
    eprintln!(
        "registered {count} machines in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(out)
}

async fn drive(
    args: &Args,
    addrs: &[SocketAddr],
    baseline: &[SocketAddr],
    seeded: Vec<Seeded>,
    backend: Option<Backend>,
) -> anyhow::Result<()> {
    let key = Arc::new(setup::controller());
    let database_url = args.database_url.as_deref();
    // First, every page once (before anything else has been read, so that
    // every page costs the same on every store): the walk's figures, the
    // cursors of the `list` scenario, and controller data cached for every
    // machine, as in a server that has been up for a while.
    let walk = scenarios::walk(addrs).await?;
    eprintln!(
        "walk: {} machines in {} pages, {:.2} s",
        walk.machines,
        walk.pages,
        walk.total.as_secs_f64()
    );
    let shared = Arc::new(Shared {
        machine_ids: seeded.iter().map(|s| s.machine_id.clone()).collect(),
        cursors: walk.cursors.clone(),
        next_flow_id: AtomicU64::new(FLOW_BASE),
        flow_end: FLOW_BASE + args.flow_identities,
        key: setup::controller(),
    });

    let mut outcomes = Vec::new();
    let mut burst = None;
    for &step in &args.scenarios {
        match step {
            Step::Measure(scenario) => {
                let servers = if scenario == Scenario::FlowUntrailed {
                    baseline
                } else {
                    addrs
                };
                let o = scenarios::measure(
                    servers,
                    scenario,
                    &shared,
                    args.connections,
                    Duration::from_secs(args.warmup),
                    Duration::from_secs(args.duration),
                    database_url,
                )
                .await?;
                report::progress(&o);
                outcomes.push(o);
            }
            Step::Burst => {
                let agents = &seeded[..args.burst_agents];
                let plan = burst::Plan {
                    spread: Duration::from_secs(args.burst_spread),
                    deadline: args.burst_deadline(),
                    max_open: max_open_connections(),
                    rule: args.retry_rule,
                };
                let before = cost::Snapshot::take(database_url).await?;
                let r = burst::run(addrs, agents, &key, &plan).await;
                let spent = before.until(cost::Snapshot::take(database_url).await?);
                report::burst_progress(&r);
                report::burst_cost(&r, &spent);
                burst = Some((r, plan, spent));
            }
        }
    }
    report::print(&report::Run {
        backend,
        replicas: addrs.len(),
        machines: seeded.len(),
        connections: args.connections,
        duration: args.duration,
        warmup: args.warmup,
        outcomes: &outcomes,
        walk: &walk,
        burst: burst.as_ref(),
    });
    // The run touched the servers: check they still answer.
    let mut conn = Conn::open(addrs[0]).await?;
    let (status, _) = conn
        .send(Method::GET, "/ready", None)
        .await
        .context("ready")?;
    if status != StatusCode::OK {
        bail!("the server is not ready after the run: {status}");
    }
    Ok(())
}

/// Connections the burst may hold open at once: client and in-process
/// server sockets both count against this process's file limit, which is
/// raised to the hard limit first.
fn max_open_connections() -> usize {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        let _ = setrlimit(Resource::Nofile, limit);
    }
    let current = getrlimit(Resource::Nofile).current.unwrap_or(1024);
    usize::try_from(current.saturating_sub(1_000) / 2)
        .unwrap_or(1)
        .max(1)
}
