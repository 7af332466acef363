//! The burst a fleet makes after a power cut: thousands of agents come back
//! within seconds of each other and each proves control of its identity
//! again (read its record, challenge, EIP-191 signature, `PATCH` with the
//! proof and `status: active`), each on a connection of its own. An agent
//! that gets a 503 or 429, or no connection, backs off as the agent does
//! (`src/backoff.rs`: the answer's `Retry-After` plus a jitter of at most a
//! tenth of it and at most 1 s; without one, exponential from 1 s with full
//! jitter) and tries again. `--retry-rule longer` is the agent's rule
//! before: the longer of the jittered exponential wait and `Retry-After`.

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
    pub(crate) rule: RetryRule,
}

/// How a refused agent picks its wait (`src/backoff.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum RetryRule {
    /// The agent's: a `Retry-After` of at least the initial delay is the
    /// schedule, plus a bounded jitter.
    Agent,
    /// The agent's before: the longer of full jitter under the doubling
    /// ceiling and `Retry-After`.
    Longer,
}

/// The agent's initial backoff (`renewal.backoff_initial`'s default).
const INITIAL: Duration = Duration::from_secs(1);
/// `renewal.backoff_max`'s default.
const CEILING_MAX: Duration = Duration::from_mins(5);
/// `backoff::MAX_RETRY_AFTER`.
const MAX_RETRY_AFTER: Duration = Duration::from_hours(1);
/// `backoff::RETRY_AFTER_JITTER`.
const RETRY_AFTER_JITTER: Duration = Duration::from_secs(1);

/// The wait after a refusal, as `Backoff::next_delay_with` computes it
/// (`ceiling` before doubling, `fraction` in [0, 1)).
fn delay(
    rule: RetryRule,
    ceiling: Duration,
    retry_after: Option<Duration>,
    fraction: f64,
) -> Duration {
    let retry_after = retry_after.map(|r| r.min(MAX_RETRY_AFTER));
    match (rule, retry_after) {
        (RetryRule::Agent, Some(r)) if r >= INITIAL => {
            r + (r / 10).min(RETRY_AFTER_JITTER).mul_f64(fraction)
        }
        _ => ceiling
            .mul_f64(fraction)
            .max(retry_after.unwrap_or_default())
            .max(INITIAL / 10),
    }
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
    /// Waits after an answer with `Retry-After`: what the server asked for,
    /// what the agents waited, and by how much they waited longer (ms,
    /// sorted).
    pub(crate) asked: Vec<u32>,
    pub(crate) waited: Vec<u32>,
    pub(crate) overshoot: Vec<u32>,
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
    asked: Vec<u32>,
    waited: Vec<u32>,
}

fn ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// One agent of the burst: back at `arrival`, then attempts until done,
/// failed, or past `deadline`.
async fn one_agent(
    addr: SocketAddr,
    agent: Seeded,
    key: Arc<SecretKey>,
    open: Arc<Semaphore>,
    arrival: Instant,
    deadline: Instant,
    rule: RetryRule,
) -> AgentOutcome {
    tokio::time::sleep_until(arrival.into()).await;
    let mut rng = 0x9E37_79B9_7F4A_7C15 ^ (agent.id.wrapping_mul(0x2545_F491_4F6C_DD1D));
    let mut ceiling = INITIAL;
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
                let wait = delay(rule, ceiling, retry_after, fraction(&mut rng));
                if let Some(r) = retry_after {
                    outcome.asked.push(ms(r));
                    outcome.waited.push(ms(wait));
                }
                ceiling = (ceiling * 2).min(CEILING_MAX);
                if Instant::now() + wait > deadline {
                    return outcome;
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
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
    let rule = plan.rule;
    for (i, agent) in agents.iter().enumerate() {
        let arrival = start + plan.spread.mul_f64(i as f64 / n as f64);
        let (addr, agent, key, open) = (
            addrs[i % addrs.len()],
            agent.clone(),
            Arc::clone(key),
            Arc::clone(&open),
        );
        tasks.spawn(one_agent(addr, agent, key, open, arrival, deadline, rule));
    }
    let mut totals = Vec::new();
    let mut attempts = Vec::new();
    let mut retries = 0;
    let mut causes = Causes::default();
    let mut failed = 0;
    let mut first_error = None;
    let mut last_done = start;
    let (mut asked, mut waited, mut overshoot) = (Vec::new(), Vec::new(), Vec::new());
    while let Some(done) = tasks.join_next().await {
        let Ok(o) = done else {
            failed += 1;
            continue;
        };
        retries += o.retries;
        overshoot.extend(o.asked.iter().zip(&o.waited).map(|(a, w)| w - a));
        asked.extend(o.asked);
        waited.extend(o.waited);
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
    for v in [&mut asked, &mut waited, &mut overshoot] {
        v.sort_unstable();
    }
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
        asked,
        waited,
        overshoot,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn the_agent_rule_waits_the_retry_after_and_the_old_one_the_ceiling() {
        let c = 32 * S;
        assert_eq!(
            delay(RetryRule::Agent, c, Some(3 * S), 0.5),
            3150 * S / 1000
        );
        assert_eq!(delay(RetryRule::Longer, c, Some(3 * S), 0.5), 16 * S);
        assert_eq!(
            delay(RetryRule::Agent, c, Some(Duration::ZERO), 0.0),
            S / 10
        );
        assert_eq!(delay(RetryRule::Agent, c, None, 0.5), 16 * S);
    }
}
