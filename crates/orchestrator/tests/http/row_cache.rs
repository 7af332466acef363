//! The PostgreSQL row cache across two `peaqos-orchestrator` processes on
//! one schema: a change at one replica is read at the other within the
//! documented bound (`pg_changes::FRESH_FOR`), also while the other cannot
//! read the audit log or loses its connections; and at one replica a client
//! reads its own writes at once.
//!
//! A record read from memory is told apart from one read from the database
//! by changing the row behind the replicas' back (plain SQL, no audit
//! event): a replica that still shows the old value answered from memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use peaqos_orchestrator::store::pg_changes::FRESH_FOR;
use peaqos_protocol::Machine;
use serde_json::{Value, json};
use sqlx::{Executor as _, PgConnection};

use crate::pg::PgSchema;
use crate::replicas::Replica;
use crate::support::{TIMEOUT, expect_item, key, machine_body, registry_toml};

/// The application name of replica B's connections, to find them.
const B_NAME: &str = "peaqos-replica-b";

/// Replicas A and B on a fresh schema, and the path of one machine,
/// registered at `registered_at` (0: A, 1: B) and read at B until B has it
/// in memory.
async fn setup(test: &str, registered_at: usize) -> Option<Setup> {
    let schema = PgSchema::create(test).await?;
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("registry.toml");
    let k = key(0);
    std::fs::write(&registry, registry_toml(&[("did:peaq:1", &[&k][..])])).unwrap();
    let b_url = format!("{}&application_name={B_NAME}", schema.url);
    let (a, b) = tokio::join!(
        Replica::start(&schema.url, &registry),
        Replica::start(&b_url, &registry)
    );
    let (a, b) = (Arc::new(a), Arc::new(b));
    let at = if registered_at == 0 { &a } else { &b };
    let body = machine_body("did:peaq:1", at.proof("did:peaq:1", &k).await);
    let m: Machine = expect_item(at.post("/api/v1/machines", &body).await, 201).await;
    let s = Setup {
        path: format!("/api/v1/machines/{}", m.id),
        id: m.id,
        a,
        b,
        _dir: dir,
        schema,
    };
    s.until_b_answers_from_memory().await;
    Some(s)
}

struct Setup {
    path: String,
    id: String,
    a: Arc<Replica>,
    b: Arc<Replica>,
    _dir: tempfile::TempDir,
    schema: PgSchema,
}

impl Setup {
    /// The machine's name as `replica` reads it; `None` when the replica
    /// answered 503 (its database connections were cut).
    async fn name_at(&self, replica: &Replica) -> Option<String> {
        let r = replica.get(&self.path).await;
        match r.status().as_u16() {
            200 => {
                let body: Value = r.json().await.unwrap();
                Some(body["item"]["displayName"].as_str().unwrap().to_owned())
            }
            503 => None,
            status => panic!("{status}: {}", r.text().await.unwrap()),
        }
    }

    async fn rename_at(&self, replica: &Replica, name: &str) {
        let r = replica
            .patch(&self.path, &json!({ "displayName": name }))
            .await;
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }

    /// Renames the machine in the database directly: no replica writes it,
    /// no audit event tells them.
    async fn rename_behind(&self, conn: &mut PgConnection, name: &str) {
        let done = sqlx::query("UPDATE machines SET display_name = $1 WHERE id = $2")
            .bind(name)
            .bind(&self.id)
            .execute(&mut *conn)
            .await
            .unwrap();
        assert_eq!(done.rows_affected(), 1);
    }

    /// Reads at B until a change made behind its back stays unseen: B
    /// answers from memory. The database is left as it was.
    async fn until_b_answers_from_memory(&self) {
        let mut conn = self.schema.connect().await;
        let original = self.name_at(&self.a).await.unwrap();
        tokio::time::timeout(TIMEOUT, async {
            loop {
                if self.name_at(&self.b).await.as_ref() != Some(&original) {
                    // Not yet dropped after the write below.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                self.rename_behind(&mut conn, "behind").await;
                if self.name_at(&self.b).await.as_ref() == Some(&original) {
                    self.rename_behind(&mut conn, &original).await;
                    return;
                }
                // B read the row from the database, and may have kept it:
                // a write with its event puts it back everywhere.
                self.rename_at(&self.a, &original).await;
            }
        })
        .await
        .expect("B keeps the record in memory");
    }

    /// Reads at B until it shows `name`, written (committed) before
    /// `written`; fails if a read that began [`FRESH_FOR`] after that still
    /// shows something else. Returns how long the change took to show.
    /// A 503 (connections cut) is no answer, and not stale.
    async fn read_at_b_within_bound(&self, name: &str, written: Instant) -> Duration {
        tokio::time::timeout(TIMEOUT, async {
            loop {
                let began = Instant::now();
                match self.name_at(&self.b).await {
                    Some(seen) if seen == name => return written.elapsed(),
                    Some(seen) => assert!(
                        began < written + FRESH_FOR,
                        "B read {seen:?} instead of {name:?} {:?} after the change committed",
                        began - written
                    ),
                    None => {}
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
        .expect("B answers")
    }
}

/// Closes every database connection of replica B.
async fn cut_b(conn: &mut PgConnection) {
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(B_NAME)
    .execute(conn)
    .await
    .unwrap();
}

fn summary(mut delays: Vec<Duration>) -> String {
    delays.sort_unstable();
    format!(
        "min {:?}, median {:?}, max {:?} over {}",
        delays[0],
        delays[delays.len() / 2],
        delays[delays.len() - 1],
        delays.len()
    )
}

#[tokio::test]
async fn a_change_at_one_replica_is_read_at_the_other_within_the_bound() {
    let Some(s) = setup(
        "a_change_at_one_replica_is_read_at_the_other_within_the_bound",
        0,
    )
    .await
    else {
        return;
    };
    let mut delays = Vec::new();
    for n in 0..20 {
        let name = format!("a {n}");
        s.rename_at(&s.a, &name).await;
        let written = Instant::now();
        delays.push(s.read_at_b_within_bound(&name, written).await);
        // Cached again before the next change, so that each is a change
        // to a record B holds in memory.
        s.until_b_answers_from_memory().await;
    }
    eprintln!("written at A, read at B after: {}", summary(delays));
}

#[tokio::test]
async fn a_replica_that_cannot_follow_the_log_reads_the_database() {
    let Some(s) = setup("a_replica_that_cannot_follow_the_log_reads_the_database", 0).await else {
        return;
    };
    // The log locked: B's reads of it wait (as on a stalled connection).
    let mut lock = s.schema.connect().await;
    lock.execute("BEGIN").await.unwrap();
    lock.execute("LOCK TABLE audit_events IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let mut conn = s.schema.connect().await;
    s.rename_behind(&mut conn, "while B is blind").await;
    let changed = Instant::now();
    let delay = s.read_at_b_within_bound("while B is blind", changed).await;
    eprintln!("B blind: read from the database after {delay:?}");
    lock.execute("ROLLBACK").await.unwrap();
    s.rename_at(&s.a, "seen again").await;
    let written = Instant::now();
    s.read_at_b_within_bound("seen again", written).await;

    // B's connections cut, again and again, while A writes: B may answer
    // 503 meanwhile, never a change older than the bound.
    let killing = Arc::new(AtomicBool::new(true));
    let killer = {
        let killing = Arc::clone(&killing);
        let mut conn = s.schema.connect().await;
        tokio::spawn(async move {
            while killing.load(Ordering::Relaxed) {
                cut_b(&mut conn).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let mut delays = Vec::new();
    for n in 0..20 {
        let name = format!("cut {n}");
        s.rename_at(&s.a, &name).await;
        let written = Instant::now();
        // Cut at once too, so that B's next read of the log fails.
        cut_b(&mut conn).await;
        delays.push(s.read_at_b_within_bound(&name, written).await);
    }
    killing.store(false, Ordering::Relaxed);
    killer.await.unwrap();
    eprintln!("with B's connections cut every 10 ms: {}", summary(delays));
    // Back to normal: B answers from memory again.
    s.until_b_answers_from_memory().await;
}

#[tokio::test]
async fn a_client_reads_its_own_writes_at_one_replica() {
    let Some(s) = setup("a_client_reads_its_own_writes_at_one_replica", 1).await else {
        return;
    };
    let s = Arc::new(s);
    // Other clients read the record all along, so that reads race with
    // the writes and try to cache what they read.
    let reading = Arc::new(AtomicBool::new(true));
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (s, reading) = (Arc::clone(&s), Arc::clone(&reading));
            tokio::spawn(async move {
                while reading.load(Ordering::Relaxed) {
                    s.name_at(&s.b).await;
                }
            })
        })
        .collect();
    for n in 0..30 {
        let name = format!("own {n}");
        s.rename_at(&s.b, &name).await;
        assert_eq!(
            s.name_at(&s.b).await.as_deref(),
            Some(name.as_str()),
            "round {n}"
        );
    }
    reading.store(false, Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    s.until_b_answers_from_memory().await;
}
