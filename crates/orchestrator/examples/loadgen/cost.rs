//! What a step cost, for the capacity model in docs/performance.md: CPU
//! seconds of the servers' threads, of the load generator's own, and of
//! PostgreSQL's processes on this machine, and the WAL PostgreSQL wrote.
//!
//! Threads are told apart by name: the in-process servers' runtimes name
//! theirs `server`, and SQLite's connection threads are sqlx's; everything
//! else in this process is the load generator. PostgreSQL's CPU is the sum
//! over processes named `postgres` (its backends outlive the step, as the
//! pools keep their connections); WAL is the cluster's, so another
//! database's writes at the same time would count too.

use anyhow::Context as _;
use sqlx::Connection as _;

/// Linux reports /proc times in USER_HZ, 100 a second on every
/// architecture it runs on.
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Snapshot {
    pub(crate) server_cpu: f64,
    pub(crate) client_cpu: f64,
    pub(crate) postgres_cpu: f64,
    /// Bytes of WAL since the cluster began (PostgreSQL only).
    pub(crate) wal: Option<i64>,
}

impl Snapshot {
    pub(crate) async fn take(database_url: Option<&str>) -> anyhow::Result<Self> {
        let (mut server_cpu, mut client_cpu) = (0.0, 0.0);
        for (name, seconds) in tasks("/proc/self/task") {
            if name.starts_with("server") || name.starts_with("sqlx-sqlite") {
                server_cpu += seconds;
            } else {
                client_cpu += seconds;
            }
        }
        let postgres_cpu = tasks("/proc")
            .filter(|(name, _)| name == "postgres")
            .map(|(_, seconds)| seconds)
            .sum();
        let wal = match database_url {
            Some(url) if url.starts_with("postgres") => {
                let mut conn = sqlx::PgConnection::connect(url).await?;
                let bytes: i64 = sqlx::query_scalar(
                    "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint",
                )
                .fetch_one(&mut conn)
                .await
                .context("pg_current_wal_lsn")?;
                Some(bytes)
            }
            _ => None,
        };
        Ok(Self {
            server_cpu,
            client_cpu,
            postgres_cpu,
            wal,
        })
    }

    /// What happened between `self` and `later`.
    pub(crate) fn until(self, later: Self) -> Self {
        Self {
            server_cpu: later.server_cpu - self.server_cpu,
            client_cpu: later.client_cpu - self.client_cpu,
            postgres_cpu: later.postgres_cpu - self.postgres_cpu,
            wal: later.wal.zip(self.wal).map(|(b, a)| b - a),
        }
    }
}

/// `(name, CPU seconds)` of every numbered entry of `dir` (processes, or a
/// process's threads).
fn tasks(dir: &str) -> impl Iterator<Item = (String, f64)> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|stat| {
            // "pid (name) state ppid ... utime stime ...": the name may
            // hold spaces, so split after its closing parenthesis.
            let open = stat.find('(')?;
            let close = stat.rfind(')')?;
            let name = stat[open + 1..close].to_owned();
            let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
            // utime and stime are fields 14 and 15; `fields` starts at 3.
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((name, (utime + stime) / TICKS_PER_SECOND))
        })
}
