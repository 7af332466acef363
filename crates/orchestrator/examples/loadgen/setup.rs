//! What a run needs before it measures: a database (a fresh PostgreSQL
//! schema, or a SQLite file), machines in it, the registry naming their
//! controller, and the servers.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use peaqos_orchestrator::store::{self, Backend, MachineRecord, PoolSettings, StoredStatus};
use peaqos_orchestrator::{Config, Server, ids};
use peaqos_protocol::{
    IdentityRef, MachineIdentityProof, ProofMethod, ResolutionSource, SecretKey, Timestamp,
};
use sqlx::{AssertSqlSafe, Connection as _, Executor as _};

/// First on-chain id of the identities the `flow` scenario registers (the
/// seeded machines are `did:peaq:1..=machines`).
pub(crate) const FLOW_BASE: u64 = 10_000_000;

/// The controller key of every identity the load generator uses. A
/// benchmark key, worthless by design.
pub(crate) fn controller() -> SecretKey {
    SecretKey::from_hex("4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318")
        .expect("valid key")
}

/// The registry file: every identity controlled by [`controller`].
pub(crate) fn registry(machines: u64, flow_identities: u64) -> String {
    let address = controller().address().checksummed();
    let lines = usize::try_from(machines + flow_identities).unwrap_or(0);
    let mut out = String::with_capacity(64 * lines);
    out.push_str("[identities]\n");
    for id in (1..=machines).chain(FLOW_BASE..FLOW_BASE + flow_identities) {
        let _ = writeln!(out, "\"did:peaq:{id}\" = [\"{address}\"]");
    }
    out
}

/// A PostgreSQL schema of its own for one run, dropped at the end.
pub(crate) struct PgSchema {
    base: String,
    name: String,
    pub(crate) url: String,
}

impl PgSchema {
    pub(crate) async fn create(base: &str) -> anyhow::Result<Self> {
        let mut random = [0u8; 4];
        getrandom::fill(&mut random).context("random")?;
        let name = format!("bench_{}", hex::encode(random));
        let mut conn = sqlx::PgConnection::connect(base)
            .await
            .context("cannot connect to PostgreSQL")?;
        conn.execute(AssertSqlSafe(format!("CREATE SCHEMA {name}")))
            .await?;
        let _ = conn.close().await;
        let separator = if base.contains('?') { '&' } else { '?' };
        Ok(Self {
            url: format!("{base}{separator}options[search_path]={name}"),
            base: base.to_owned(),
            name,
        })
    }

    pub(crate) async fn drop_schema(self) -> anyhow::Result<()> {
        let mut conn = sqlx::PgConnection::connect(&self.base).await?;
        conn.execute(AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            self.name
        )))
        .await?;
        let _ = conn.close().await;
        Ok(())
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }
}

/// A seeded machine: on-chain id and machine id.
#[derive(Debug, Clone)]
pub(crate) struct Seeded {
    pub(crate) id: u64,
    pub(crate) machine_id: String,
}

/// Writes `count` active machines (`did:peaq:1..=count`, each with a proof
/// signed by [`controller`]) straight into the store: registering 100,000
/// machines over HTTP would take longer than measuring them. The records
/// are what registration writes; creation times are one millisecond apart,
/// in the past.
pub(crate) async fn seed(url: &str, count: u64) -> anyhow::Result<Vec<Seeded>> {
    let started = Instant::now();
    let store = store::open(url, &PoolSettings::default())
        .await
        .context("cannot open the database to seed it")?;
    let address = controller().address();
    let now = Timestamp::now();
    let first = now.unix_millis() - i64::try_from(count)? - 60_000;
    let mut records = Vec::with_capacity(usize::try_from(count)?);
    for id in 1..=count {
        let identity = IdentityRef::parse(&format!("did:peaq:{id}"))?;
        let at = Timestamp::from_unix_millis(first + i64::try_from(id)?).context("time")?;
        records.push(MachineRecord {
            id: ids::machine_id()?,
            status: StoredStatus::Active,
            display_name: format!("Robot {id}"),
            owner_id: "fleet-1".into(),
            machine_type: "amr".into(),
            runtime_profile: "ros2".into(),
            capabilities: vec!["lidar".into(), "camera".into()],
            labels: [("site".to_owned(), "berlin".to_owned())].into(),
            policy_ids: vec![],
            skill_keys: vec![],
            proof: Some(MachineIdentityProof {
                method: ProofMethod::Eip191,
                identity_ref: identity.clone(),
                signer_address: address,
                challenge_id: ids::challenge_id()?,
                verified_at: at,
                challenge_expires_at: at.saturating_add(Duration::from_mins(5)),
                controller_addresses: vec![address],
                resolution_source: ResolutionSource::PeaqosMcr,
                expires_at: None,
            }),
            identity,
            created_at: at,
            updated_at: at,
        });
    }
    let seeded: Vec<Seeded> = records
        .iter()
        .enumerate()
        .map(|(i, r)| Seeded {
            id: u64::try_from(i).unwrap_or(0) + 1,
            machine_id: r.id.clone(),
        })
        .collect();
    let records = Arc::new(records);
    let writers = 16;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let (store, records) = (Arc::clone(&store), Arc::clone(&records));
        tasks.spawn(async move {
            for r in records.iter().skip(w).step_by(writers) {
                store.insert_machine(r, None, None).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    store.close().await;
    drop(store);
    eprintln!(
        "seeded {count} machines in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(seeded)
}

/// How the in-process servers run.
pub(crate) struct ServerSetup<'a> {
    pub(crate) database_url: &'a str,
    pub(crate) registry_file: &'a std::path::Path,
    pub(crate) replicas: usize,
    pub(crate) threads: Option<usize>,
    pub(crate) log: &'a str,
    /// `false`: the baseline of the audit trail's cost.
    pub(crate) audit_trail: bool,
    /// `PEAQOS_PG_ROW_CACHE` (`None`: the default).
    pub(crate) pg_row_cache: Option<u32>,
}

/// Starts `replicas` servers in this process, each on its own runtime and
/// threads as a separate process would have, all on one database; returns
/// their addresses.
pub(crate) fn start_servers(setup: &ServerSetup<'_>) -> anyhow::Result<Vec<SocketAddr>> {
    if setup.replicas > 1 && Backend::of(setup.database_url) != Some(Backend::Postgres) {
        bail!("several replicas share a PostgreSQL database; SQLite is one process per file");
    }
    let _ = peaqos_logging::init(Some(setup.log));
    let mut addrs = Vec::new();
    for _ in 0..setup.replicas {
        let config = Config {
            database_url: setup.database_url.to_owned(),
            registry_file: Some(setup.registry_file.to_owned()),
            // The cache stays warm over the run; a production TTL of seconds
            // adds one look-up per identity per TTL, nothing per request.
            mcr_cache_ttl: Duration::from_mins(10),
            // Every simulated agent comes from 127.0.0.1.
            challenge_rate_per_minute: u32::MAX,
            challenge_burst: u32::MAX,
            audit_trail: setup.audit_trail,
            pg_row_cache: setup.pg_row_cache.unwrap_or(Config::default().pg_row_cache),
            ..Config::default()
        };
        addrs.push(start_one(config, setup.threads)?);
    }
    Ok(addrs)
}

fn start_one(config: Config, threads: Option<usize>) -> anyhow::Result<SocketAddr> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("server");
    if let Some(n) = threads {
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
    rx.recv_timeout(Duration::from_mins(2))
        .context("the in-process server did not start")?
}
