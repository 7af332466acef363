//! What a pooled PostgreSQL operation costs: one single-row select by
//! primary key, as many as 64 tasks manage in a few seconds, through
//!
//! - 16 connections of their own, one per task (the floor: one round trip
//!   per operation),
//! - the orchestrator's pool ([`PgPool`], 16 connections, 64 tasks), and
//! - sqlx's pool (16 connections, 64 tasks), which pings every connection
//!   it takes back.
//!
//! ```text
//! cargo run --release -p peaqos-orchestrator --example pgpool -- postgres://postgres@127.0.0.1:5432/test
//! ```

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use peaqos_orchestrator::store::PoolSettings;
use peaqos_orchestrator::store::pg_pool::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection as _, PgConnection};

const QUERY: &str = "SELECT oid, relname FROM pg_class WHERE oid = $1";
const SECONDS: u64 = 4;
const CONNECTIONS: u32 = 16;
const TASKS: usize = 64;

/// Runs `tasks` copies of `op` until the time is up; operations per second.
async fn rate<F, Fut>(tasks: usize, op: F) -> u64
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let done = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs(SECONDS);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..tasks {
        let (done, op) = (Arc::clone(&done), op.clone());
        set.spawn(async move {
            while Instant::now() < stop {
                op(i).await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    set.join_all().await;
    done.load(Ordering::Relaxed) / SECONDS
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let options = PgConnectOptions::from_str(&url)?;

    let mut own = Vec::new();
    for _ in 0..CONNECTIONS {
        own.push(Arc::new(tokio::sync::Mutex::new(
            PgConnection::connect_with(&options).await?,
        )));
    }
    let ours = PgPool::new(
        options.clone(),
        &PoolSettings {
            max_connections: CONNECTIONS,
            ..PoolSettings::default()
        },
    );
    let theirs = PgPoolOptions::new()
        .max_connections(CONNECTIONS)
        .test_before_acquire(false)
        .connect_with(options)
        .await?;

    for round in 1..=2 {
        let floor = {
            let own = own.clone();
            rate(own.len(), move |i| {
                let conn = Arc::clone(&own[i]);
                async move {
                    let mut conn = conn.lock().await;
                    let q = sqlx::query(QUERY).bind(1259_i32);
                    q.fetch_optional(&mut *conn).await.expect("select");
                }
            })
            .await
        };
        let pooled = {
            let ours = ours.clone();
            rate(TASKS, move |_| {
                let ours = ours.clone();
                async move {
                    let q = sqlx::query(QUERY).bind(1259_i32);
                    ours.run(|c| Box::pin(q.fetch_optional(c)))
                        .await
                        .expect("select");
                }
            })
            .await
        };
        let sqlx_pooled = {
            let theirs = theirs.clone();
            rate(TASKS, move |_| {
                let theirs = theirs.clone();
                async move {
                    let q = sqlx::query(QUERY).bind(1259_i32);
                    q.fetch_optional(&theirs).await.expect("select");
                }
            })
            .await
        };
        println!(
            "round {round}: own connections {floor}/s (1.00), orchestrator pool {pooled}/s ({:.2}), \
             sqlx pool {sqlx_pooled}/s ({:.2})",
            pooled as f64 / floor as f64,
            sqlx_pooled as f64 / floor as f64
        );
    }
    Ok(())
}
