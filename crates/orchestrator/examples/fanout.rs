//! Fan-out of the live event stream: `--subscribers` clients follow
//! `GET /api/v1/events` on a real `peaqos-orchestrator` process while one
//! writer changes machines at `--rate` per second; reports the deliveries
//! per second, the delay from a write's answer to each delivery (p50, p99,
//! max), the stream's "too slow" disconnections, and the server's memory
//! (VmRSS, VmHWM) idle, with the subscribers connected, and at the end.
//!
//! ```text
//! cargo build --release -p peaqos-orchestrator --bin peaqos-orchestrator --example fanout
//! target/release/examples/fanout --subscribers 1000 --rate 100 --seconds 10
//! target/release/examples/fanout --database-url postgres://postgres@127.0.0.1:5432/test
//! ```
//!
//! The server runs with identity verification off (development mode), so
//! that the writer's cost is the write, not signing; it is started from
//! `--server` (default `target/release/peaqos-orchestrator`) on SQLite in a
//! temporary directory, or on the PostgreSQL database named (a fresh schema,
//! left for the operator to drop: `DROP SCHEMA fanout_... CASCADE`).

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value = "target/release/peaqos-orchestrator")]
    server: String,
    /// `postgres://...` (a fresh schema there); default: SQLite in a
    /// temporary directory.
    #[arg(long)]
    database_url: Option<String>,
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Machine writes per second.
    #[arg(long, default_value_t = 100)]
    rate: u64,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

/// Kilobytes of `VmRSS` and `VmHWM` of a process.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Per subscriber: when each event id arrived.
type Arrivals = Arc<Mutex<Vec<(u64, Instant)>>>;

async fn subscribe(
    client: reqwest::Client,
    url: String,
    arrivals: Arrivals,
    too_slow: Arc<std::sync::atomic::AtomicU64>,
    connected: tokio::sync::mpsc::Sender<()>,
) -> anyhow::Result<()> {
    let mut response = client.get(url).send().await?;
    if response.status() != 200 {
        bail!("subscribe: {}", response.status());
    }
    let _ = connected.send(()).await;
    let mut buffer = String::new();
    let mut local = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let now = Instant::now();
        buffer.push_str(std::str::from_utf8(&chunk)?);
        while let Some(end) = buffer.find("\n\n") {
            let frame: String = buffer.drain(..end + 2).collect();
            if frame.contains("event: too_slow") {
                too_slow.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            if let Some(id) = frame
                .lines()
                .find_map(|l| l.strip_prefix("id: "))
                .and_then(|v| v.trim().parse().ok())
            {
                local.push((id, now));
            }
        }
        if !local.is_empty() {
            arrivals.lock().unwrap().append(&mut local);
        }
    }
    arrivals.lock().unwrap().append(&mut local);
    Ok(())
}

fn percentile(sorted: &[Duration], per_mille: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (per_mille * sorted.len())
        .div_ceil(1000)
        .clamp(1, sorted.len());
    sorted[rank - 1]
}

#[tokio::main]
#[allow(clippy::too_many_lines, reason = "one measurement, step by step")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    peaqos_orchestrator::install_crypto_provider();
    let dir = tempfile::tempdir()?;
    let database_url = match &args.database_url {
        Some(url) => {
            let mut random = [0u8; 4];
            getrandom::fill(&mut random).context("random")?;
            let schema = format!("fanout_{}", hex::encode(random));
            let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(url).await?;
            sqlx::Executor::execute(
                &mut conn,
                sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")),
            )
            .await?;
            eprintln!("schema {schema}");
            let separator = if url.contains('?') { '&' } else { '?' };
            format!("{url}{separator}options[search_path]={schema}")
        }
        None => format!("sqlite://{}/orchestrator.db", dir.path().display()),
    };
    let mut server = tokio::process::Command::new(&args.server)
        .env_clear()
        .env("PEAQOS_LISTEN_ADDR", "127.0.0.1:0")
        .env("DATABASE_URL", &database_url)
        .env("PEAQOS_MACHINE_IDENTITY_VERIFICATION", "disabled")
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {} (build it first)", args.server))?;
    let pid = server.id().context("server pid")?;
    let mut lines = BufReader::new(server.stdout.take().context("stdout")?).lines();
    let base = loop {
        let line = lines.next_line().await?.context("the server exited")?;
        if let Some(url) = line.strip_prefix("listening on ") {
            break url.to_owned();
        }
    };
    let idle = memory(pid);

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.subscribers + 8)
        .build()?;
    let created: Value = client
        .post(format!("{base}/api/v1/machines"))
        .json(
            &json!({"displayName": "fan-out", "ownerId": "o", "machineType": "t",
            "runtimeProfile": "p", "identityRef": "did:peaq:1"}),
        )
        .send()
        .await?
        .json()
        .await?;
    let path = format!(
        "{base}/api/v1/machines/{}",
        created["item"]["id"].as_str().context("created")?
    );

    let arrivals: Arrivals = Arc::default();
    let too_slow = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (connected_tx, mut connected) = tokio::sync::mpsc::channel(args.subscribers);
    let mut subscribers = tokio::task::JoinSet::new();
    for _ in 0..args.subscribers {
        subscribers.spawn(subscribe(
            client.clone(),
            format!("{base}/api/v1/events"),
            Arc::clone(&arrivals),
            Arc::clone(&too_slow),
            connected_tx.clone(),
        ));
    }
    for _ in 0..args.subscribers {
        connected.recv().await.context("a subscriber failed")?;
    }
    let with_subscribers = memory(pid);

    // One writer at a fixed rate; event ids follow the writes (the create
    // was event 1).
    let mut written: HashMap<u64, Instant> = HashMap::new();
    let total = args.rate * args.seconds;
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate as f64));
    let started = Instant::now();
    for n in 0..total {
        ticks.tick().await;
        let r = client
            .patch(&path)
            .json(&json!({"displayName": format!("write {n}")}))
            .send()
            .await?;
        if r.status() != 200 {
            bail!("write {n}: {}", r.status());
        }
        written.insert(n + 2, Instant::now());
    }
    let last = total + 1;
    // Wait until every subscriber has the last event, or 10 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let have = arrivals
            .lock()
            .unwrap()
            .iter()
            .filter(|(id, _)| *id == last)
            .count();
        if have + usize::try_from(too_slow.load(std::sync::atomic::Ordering::Relaxed))?
            >= args.subscribers
            || Instant::now() > deadline
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let at_end = memory(pid);
    subscribers.abort_all();
    let arrivals = std::mem::take(&mut *arrivals.lock().unwrap());
    let mut delays: Vec<Duration> = arrivals
        .iter()
        .filter_map(|(id, at)| written.get(id).map(|w| at.saturating_duration_since(*w)))
        .collect();
    delays.sort_unstable();
    // From the first write to the last delivery.
    let wall = arrivals
        .iter()
        .map(|(_, at)| at.saturating_duration_since(started))
        .max()
        .unwrap_or_default();
    let expected = usize::try_from(total)? * args.subscribers;
    println!(
        "{} subscribers, {} writes at {}/s on {}: {} of {} deliveries ({:.0}/s over {:.1} s); \
         write to delivery p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {} too slow",
        args.subscribers,
        total,
        args.rate,
        if args.database_url.is_some() {
            "PostgreSQL"
        } else {
            "SQLite"
        },
        delays.len(),
        expected,
        delays.len() as f64 / wall.as_secs_f64(),
        wall.as_secs_f64(),
        percentile(&delays, 500).as_secs_f64() * 1e3,
        percentile(&delays, 990).as_secs_f64() * 1e3,
        delays.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        too_slow.load(std::sync::atomic::Ordering::Relaxed),
    );
    println!(
        "server memory: idle VmRSS {} KiB; {} subscribers connected {} KiB; after the run {} KiB (VmHWM {} KiB)",
        idle.0, args.subscribers, with_subscribers.0, at_end.0, at_end.1
    );
    let _ = server.kill().await;
    Ok(())
}
