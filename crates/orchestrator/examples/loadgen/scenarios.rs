//! Closed-loop scenarios: every connection sends its next request as soon
//! as the last one answered, for a fixed time; and the walk through every
//! page of the machine list.

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use hyper::{Method, StatusCode};
use peaqos_protocol::{ListResponse, Machine, SecretKey};

use crate::client::Conn;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scenario {
    Health,
    Get,
    Flow,
    /// The same registrations on servers with the audit trail off (their
    /// own database, seeded alike): the trail's baseline.
    FlowUntrailed,
    List,
}

impl FromStr for Scenario {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "health" => Ok(Self::Health),
            "get" => Ok(Self::Get),
            "flow" => Ok(Self::Flow),
            "flow-untrailed" => Ok(Self::FlowUntrailed),
            "list" => Ok(Self::List),
            _ => Err(format!(
                "unknown scenario {s:?} (health, get, flow, flow-untrailed, list)"
            )),
        }
    }
}

impl Scenario {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Health => "`GET /health` (ceiling)",
            Self::Get => "`GET /api/v1/machines/:id`",
            Self::Flow => "registration: challenge, sign, create, activate",
            Self::FlowUntrailed => "registration, audit trail off (baseline)",
            Self::List => "`GET /api/v1/machines?limit=500` (any page)",
        }
    }

    /// HTTP requests per operation.
    pub(crate) fn requests(self) -> u64 {
        match self {
            Self::Flow | Self::FlowUntrailed => 3,
            _ => 1,
        }
    }
}

/// What the workers share.
pub(crate) struct Shared {
    pub(crate) machine_ids: Vec<String>,
    /// `None` for the first page, then the cursor of every later page.
    pub(crate) cursors: Vec<Option<String>>,
    pub(crate) next_flow_id: AtomicU64,
    pub(crate) flow_end: u64,
    pub(crate) key: SecretKey,
}

#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) operations: u64,
    /// Microseconds.
    pub(crate) latencies: Vec<u32>,
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
}

/// Nearest rank: the smallest value with at least this share of the
/// samples at or below it.
pub(crate) fn percentile(sorted: &[u32], per_mille: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (per_mille * sorted.len())
        .div_ceil(1000)
        .clamp(1, sorted.len());
    Duration::from_micros(u64::from(sorted[rank - 1]))
}

async fn one(conn: &mut Conn, scenario: Scenario, shared: &Shared, i: usize) -> anyhow::Result<()> {
    let ok = |status: StatusCode, path: &str| {
        if status == StatusCode::OK {
            Ok(())
        } else {
            Err(anyhow::anyhow!("{path}: {status}"))
        }
    };
    match scenario {
        Scenario::Health => {
            let (status, _) = conn.send(Method::GET, "/health", None).await?;
            ok(status, "/health")
        }
        Scenario::Get => {
            let id = &shared.machine_ids[i % shared.machine_ids.len()];
            let path = format!("/api/v1/machines/{id}");
            let (status, _) = conn.send(Method::GET, &path, None).await?;
            ok(status, &path)
        }
        Scenario::List => {
            let path = match &shared.cursors[i % shared.cursors.len()] {
                None => "/api/v1/machines?limit=500".to_owned(),
                Some(c) => format!("/api/v1/machines?limit=500&cursor={c}"),
            };
            let (status, body) = conn.send(Method::GET, &path, None).await?;
            ok(status, &path)?;
            if body.len() < 1000 {
                bail!("{path}: a short page");
            }
            Ok(())
        }
        Scenario::Flow | Scenario::FlowUntrailed => {
            let id = shared.next_flow_id.fetch_add(1, Ordering::Relaxed);
            if id >= shared.flow_end {
                bail!("out of flow identities: raise --flow-identities");
            }
            conn.register(&shared.key, id).await.map(|_| ())
        }
    }
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
    // Spread the workers over the machines and pages.
    let mut i = seed.wrapping_mul(7919);
    loop {
        let began = Instant::now();
        if began >= stop {
            return Ok(stats);
        }
        let result = one(&mut conn, scenario, &shared, i).await;
        i = i.wrapping_add(7919);
        if began < start_measuring {
            continue;
        }
        match result {
            Ok(()) => {
                stats.operations += 1;
                let us = began.elapsed().as_micros();
                stats.latencies.push(u32::try_from(us).unwrap_or(u32::MAX));
            }
            Err(e) => {
                stats.errors += 1;
                if stats.first_error.is_none() {
                    stats.first_error = Some(format!("{e:#}"));
                }
                // The server may have closed the connection.
                conn = Conn::open(addr).await?;
            }
        }
    }
}

pub(crate) struct Outcome {
    pub(crate) scenario: Scenario,
    pub(crate) per_second: f64,
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
    /// What the measured seconds cost (not the warm-up's).
    pub(crate) spent: crate::cost::Snapshot,
    pub(crate) operations: u64,
}

/// Runs `scenario` on `connections` connections spread round-robin over
/// `addrs` (the replicas).
pub(crate) async fn measure(
    addrs: &[SocketAddr],
    scenario: Scenario,
    shared: &Arc<Shared>,
    connections: usize,
    warmup: Duration,
    measured: Duration,
    database_url: Option<&str>,
) -> anyhow::Result<Outcome> {
    let start_measuring = Instant::now() + warmup;
    let stop = start_measuring + measured;
    // The cost of the measured window only: the workers count operations
    // that began in it, so the CPU is read at its edges too.
    let url = database_url.map(str::to_owned);
    let cost = tokio::spawn(async move {
        tokio::time::sleep_until(start_measuring.into()).await;
        let before = crate::cost::Snapshot::take(url.as_deref()).await?;
        tokio::time::sleep_until(stop.into()).await;
        Ok::<_, anyhow::Error>(before.until(crate::cost::Snapshot::take(url.as_deref()).await?))
    });
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..connections {
        tasks.spawn(worker(
            addrs[c % addrs.len()],
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
        all.first_error = all.first_error.or(s.first_error);
    }
    all.latencies.sort_unstable();
    let spent = cost.await??;
    Ok(Outcome {
        scenario,
        spent,
        operations: all.operations,
        per_second: all.operations as f64 / measured.as_secs_f64(),
        p50: percentile(&all.latencies, 500),
        p99: percentile(&all.latencies, 990),
        errors: all.errors,
        first_error: all.first_error,
    })
}

/// One client reading every page of the list, as an operator's export
/// would.
pub(crate) struct Walk {
    pub(crate) machines: usize,
    pub(crate) pages: usize,
    pub(crate) total: Duration,
    /// Mean time per page over the first and the last tenth of the pages:
    /// equal when a page costs the same wherever it is.
    pub(crate) first_tenth: Duration,
    pub(crate) last_tenth: Duration,
    /// The cursors of full pages (`None`: the first page).
    pub(crate) cursors: Vec<Option<String>>,
}

pub(crate) async fn walk(addrs: &[SocketAddr]) -> anyhow::Result<Walk> {
    let mut conns = Vec::new();
    for addr in addrs {
        conns.push(Conn::open(*addr).await?);
    }
    let mut cursor: Option<String> = None;
    let mut cursors = Vec::new();
    let mut times = Vec::new();
    let mut machines = 0;
    let mut requests = 0;
    let started = Instant::now();
    loop {
        // Page after page, alternating replicas: a cursor is good anywhere.
        let conn = &mut conns[requests % addrs.len()];
        requests += 1;
        let path = match &cursor {
            None => "/api/v1/machines?limit=500".to_owned(),
            Some(c) => format!("/api/v1/machines?limit=500&cursor={c}"),
        };
        let began = Instant::now();
        let page: ListResponse<Machine> = conn
            .expect(Method::GET, &path, None, StatusCode::OK)
            .await?;
        let took = began.elapsed();
        machines += page.items.len();
        // The answer after the last full page may be empty: not a page.
        if !page.items.is_empty() {
            times.push(took);
        }
        if page.items.len() == 500 {
            cursors.push(cursor.clone());
        }
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    if times.is_empty() || cursors.is_empty() {
        bail!("the list is empty: nothing to measure");
    }
    let total = started.elapsed();
    let tenth = (times.len() / 10).max(1);
    let mean = |slice: &[Duration]| {
        slice.iter().sum::<Duration>() / u32::try_from(slice.len()).unwrap_or(1).max(1)
    };
    Ok(Walk {
        machines,
        pages: times.len(),
        total,
        first_tenth: mean(&times[..tenth]),
        last_tenth: mean(&times[times.len() - tenth..]),
        cursors,
    })
}
