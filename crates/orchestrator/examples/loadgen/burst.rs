//! The burst a fleet makes after a power cut: thousands of agents come back
//! within seconds of each other and each proves control of its identity
//! again (read its record, challenge, EIP-191 signature, `PATCH` with the
//! proof and `status: active`), each on a connection of its own. An agent
//! that gets a 503 or 429, or no connection, backs off as the agent does
//! (exponential from 1 s, full jitter, never shorter than the answer's
//! `Retry-After`: `src/backoff.rs`) and tries again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use peaqos_protocol::SecretKey;
use tokio::sync::Semaphore;

use crate::client::{Conn, Unexpected};
use crate::scenarios::percentile;
use crate::setup::Seeded;

pub(crate) struct Plan {
    /// Agents come back evenly spread over this time.
    pub(crate) spread: Duration,
    /// Agents still trying after this are counted as failed.
    pub(crate) deadline: Duration,
    /// Connections open at once at most (file descriptors: the client and
    /// the in-process server share this process's limit).
    pub(crate) max_open: usize,
}

pub(crate) struct Report {
    pub(crate) agents: usize,
    pub(crate) done: usize,
    pub(crate) failed: usize,
    /// From the first agent's return to the last one's success.
    pub(crate) wall: Duration,
    /// Agent's return to its success, retries included.
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
    /// One successful attempt (three requests).
    pub(crate) attempt_p99: Duration,
    pub(crate) retries: u64,
    /// Retries by cause.
    pub(crate) causes: Causes,
    pub(crate) first_error: Option<String>,
}

/// What made agents retry: the goal is none for 503 (requests dying in the
/// server), while 429 with `Retry-After` is the server pacing the herd.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Causes {
    pub(crate) unavailable_503: u64,
    pub(crate) rate_limited_429: u64,
    pub(crate) connection: u64,
}

impl Causes {
    fn count(&mut self, status: Option<u16>) {
        match status {
            Some(503) => self.unavailable_503 += 1,
            Some(_) => self.rate_limited_429 += 1,
            None => self.connection += 1,
        }
    }

    fn add(&mut self, other: Self) {
        self.unavailable_503 += other.unavailable_503;
        self.rate_limited_429 += other.rate_limited_429;
        self.connection += other.connection;
    }
}

enum Attempt {
    Done(Duration),
    Retry {
        error: String,
        status: Option<u16>,
        retry_after: Option<Duration>,
    },
    Fail(String),
}

async fn attempt(addr: SocketAddr, key: &SecretKey, agent: &Seeded) -> Attempt {
    let began = Instant::now();
    let result = async {
        let mut conn = Conn::open(addr).await?;
        conn.reprove(key, agent.id, &agent.machine_id).await
    }
    .await;
    match result {
        Ok(()) => Attempt::Done(began.elapsed()),
        Err(e) => {
            let (retryable, status, retry_after) = match e.downcast_ref::<Unexpected>() {
                Some(u) => (
                    u.status.as_u16() == 503 || u.status.as_u16() == 429,
                    Some(u.status.as_u16()),
                    u.retry_after.map(Duration::from_secs),
                ),
                // No connection, or it broke: the agent retries.
                None => (true, None, None),
            };
            if retryable {
                Attempt::Retry {
                    error: format!("{e:#}"),
                    status,
                    retry_after,
                }
            } else {
                Attempt::Fail(format!("{e:#}"))
            }
        }
    }
}

/// A pseudo-random fraction in [0, 1) (xorshift; jitter needs no more).
fn fraction(state: &mut u64) -> f64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state >> 11) as f64 / (1u64 << 53) as f64
}

#[derive(Default)]
struct AgentOutcome {
    finished: Option<Instant>,
    total: Option<Duration>,
    attempt: Option<Duration>,
    retries: u64,
    causes: Causes,
    error: Option<String>,
}

pub(crate) async fn run(
    addrs: &[SocketAddr],
    agents: &[Seeded],
    key: &Arc<SecretKey>,
    plan: &Plan,
) -> Report {
    let start = Instant::now();
    let deadline = start + plan.deadline;
    let open = Arc::new(Semaphore::new(plan.max_open));
    let mut tasks = tokio::task::JoinSet::new();
    let n = agents.len().max(1);
    for (i, agent) in agents.iter().enumerate() {
        let arrival = start + plan.spread.mul_f64(i as f64 / n as f64);
        let (addr, agent, key, open) = (
            addrs[i % addrs.len()],
            agent.clone(),
            Arc::clone(key),
            Arc::clone(&open),
        );
        tasks.spawn(async move {
            tokio::time::sleep_until(arrival.into()).await;
            let mut rng = 0x9E37_79B9_7F4A_7C15 ^ (agent.id.wrapping_mul(0x2545_F491_4F6C_DD1D));
            let mut ceiling = Duration::from_secs(1);
            let mut outcome = AgentOutcome::default();
            loop {
                let result = {
                    let _permit = open.acquire().await;
                    attempt(addr, &key, &agent).await
                };
                match result {
                    Attempt::Done(took) => {
                        outcome.finished = Some(Instant::now());
                        outcome.total = Some(arrival.elapsed());
                        outcome.attempt = Some(took);
                        return outcome;
                    }
                    Attempt::Fail(e) => {
                        outcome.error = Some(e);
                        return outcome;
                    }
                    Attempt::Retry {
                        error,
                        status,
                        retry_after,
                    } => {
                        outcome.retries += 1;
                        outcome.causes.count(status);
                        outcome.error.get_or_insert(error);
                        // Full jitter under the ceiling, at least a tenth of
                        // a second and at least the server's Retry-After;
                        // the ceiling doubles.
                        let wait = ceiling
                            .mul_f64(fraction(&mut rng))
                            .max(Duration::from_millis(100))
                            .max(retry_after.unwrap_or_default());
                        ceiling = (ceiling * 2).min(Duration::from_mins(5));
                        if Instant::now() + wait > deadline {
                            return outcome;
                        }
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        });
    }
    let mut totals = Vec::new();
    let mut attempts = Vec::new();
    let mut retries = 0;
    let mut causes = Causes::default();
    let mut failed = 0;
    let mut first_error = None;
    let mut last_done = start;
    while let Some(done) = tasks.join_next().await {
        let Ok(o) = done else {
            failed += 1;
            continue;
        };
        retries += o.retries;
        causes.add(o.causes);
        if first_error.is_none() {
            first_error.clone_from(&o.error);
        }
        match (o.total, o.attempt, o.finished) {
            (Some(total), Some(attempt), Some(finished)) => {
                totals.push(u32::try_from(total.as_micros()).unwrap_or(u32::MAX));
                attempts.push(u32::try_from(attempt.as_micros()).unwrap_or(u32::MAX));
                last_done = last_done.max(finished);
            }
            _ => failed += 1,
        }
    }
    totals.sort_unstable();
    attempts.sort_unstable();
    Report {
        agents: agents.len(),
        done: totals.len(),
        failed,
        wall: last_done - start,
        p50: percentile(&totals, 500),
        p99: percentile(&totals, 990),
        attempt_p99: percentile(&attempts, 990),
        retries,
        causes,
        first_error,
    }
}
