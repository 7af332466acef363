//! The registration loop: gets the machine registered and active, and keeps
//! it so, unattended.
//!
//! Each *cycle* starts from what the agent knows (a machine id or not) and
//! brings the record to a settled state:
//!
//! - no machine id: challenge, sign, `POST /machines`, `PATCH {status: active}`;
//!   `MACHINE_IDENTITY_EXISTS` means the record is ours already: take it back;
//! - a machine id: `GET` it; `draft`, `degraded`, `MACHINE_NOT_ACTIVATED`,
//!   `MACHINE_IDENTITY_PROOF_EXPIRED` or a proof near its expiry: fresh
//!   challenge and `PATCH {identityProof, status: active}`; `404`: register
//!   again; `blocked`/`archived`: report, do not fight.
//!
//! Between cycles the loop sleeps on the monotonic clock until the next check,
//! the renewal point, or the end of a backoff, and wakes early for a
//! `Reregister` command. A failed cycle never ends the loop: transient
//! failures back off exponentially with jitter, problems an operator must fix
//! are retried slowly.

pub mod challenge;
mod cycle;
mod failure;
pub mod policy;
mod probe;
mod rotate;

use std::sync::Arc;
use std::time::Duration;

use peaqos_protocol::{IdentityRef, Timestamp};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::{self, Backoff};
use crate::client::Client;
use crate::clock::ServerClock;
use crate::config::{MachineConfig, RenewalConfig};
use crate::signer::Signer;
use crate::state::{Loaded, State, StateStore};
use crate::status::{AgentState, Command, LastError, StatusSnapshot, status_line};
use crate::systemd::Heartbeat;
use challenge::EffectivePolicy;
use failure::{Failure, FailureKind};
pub use policy::{field_changes, renewal_point};
pub use probe::Readiness;
use probe::{Probe, Prober};
pub use rotate::Rotation;

/// How many cycles may talk to the orchestrator at once, across all the
/// machines of one agent: registration of many is fast, and a gateway's
/// boot is not a herd.
pub const CONCURRENT_CYCLES: usize = 16;

/// What paces the loops of one agent against their one orchestrator: the
/// shared readiness probe and the bound on cycles in flight. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Pacing {
    pub readiness: Arc<Readiness>,
    pub cycles: Arc<Semaphore>,
}

impl Pacing {
    pub fn new(renewal: &RenewalConfig) -> Self {
        Self {
            readiness: Arc::new(Readiness::new(renewal.probe_interval)),
            cycles: Arc::new(Semaphore::new(CONCURRENT_CYCLES)),
        }
    }
}

/// Everything the loop needs, assembled by [`crate::run`].
#[derive(Debug)]
pub struct Registrar {
    identity: IdentityRef,
    machine: MachineConfig,
    renewal: RenewalConfig,
    /// Which challenges the key signs.
    policy: EffectivePolicy,
    /// The orchestrator's host, for the policy's Sign-In-With-Ethereum rule.
    host: String,
    /// The controller key (a file's, or a token's).
    key: Signer,
    client: Client,
    store: StateStore,
    state: State,
    clock: ServerClock,
    backoff: Backoff,
    status: watch::Sender<StatusSnapshot>,
    /// Config fields already pushed to the record since start.
    fields_pushed: bool,
    /// Drawn once per confirmed proof, so a fleet spreads its renewals.
    renew_jitter: f64,
    /// Tells the systemd watchdog this loop is alive.
    heartbeat: Heartbeat,
    /// Cheap readiness probes that may end a backoff early.
    prober: Prober,
    pacing: Pacing,
    /// Key rotation: the successor, and the record of its steps.
    rotation: Box<Rotation>,
}

/// How a cycle ended well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    Active,
    Blocked,
    Archived,
}

impl Registrar {
    /// Assembles the loop. `loaded` is what the state store found.
    #[allow(clippy::too_many_arguments)] // one call site, all distinct parts
    pub fn new(
        identity: IdentityRef,
        machine: MachineConfig,
        renewal: RenewalConfig,
        policy: EffectivePolicy,
        key: Signer,
        client: Client,
        store: StateStore,
        loaded: Loaded,
        status: watch::Sender<StatusSnapshot>,
        heartbeat: Heartbeat,
        pacing: Pacing,
        rotation: Rotation,
    ) -> Self {
        let canonical = identity.canonical();
        let orchestrator = client.base().to_owned();
        let state = match loaded {
            Loaded::Found(s) => {
                tracing::info!(machine_id = ?s.machine_id, "loaded state");
                s
            }
            Loaded::Missing => State::new(canonical, orchestrator),
            Loaded::Foreign(old) => {
                tracing::warn!(
                    old_identity = %old.identity,
                    old_orchestrator = %old.orchestrator,
                    "state file belongs to another identity or orchestrator; starting afresh"
                );
                State::new(canonical, orchestrator)
            }
            Loaded::Corrupt { moved_to, reason } => {
                tracing::warn!(
                    %reason,
                    moved_to = ?moved_to,
                    "state file unusable; starting afresh (the record will be found again)"
                );
                State::new(canonical, orchestrator)
            }
        };
        let backoff = Backoff::new(renewal.backoff_initial, renewal.backoff_max);
        let prober = Prober::new(renewal.probe_interval);
        let host = challenge::authority(client.base());
        tracing::info!(policy = %policy.policy, "challenge signing policy: {policy}");
        let me = Self {
            identity,
            machine,
            renewal,
            policy,
            host,
            key,
            client,
            store,
            state,
            clock: ServerClock::new(),
            backoff,
            status,
            fields_pushed: false,
            renew_jitter: backoff::random_fraction(),
            heartbeat,
            prober,
            pacing,
            rotation: Box::new(rotation),
        };
        let (id, proof) = (me.state.machine_id.clone(), me.state.proof.clone());
        me.publish(AgentState::Starting, |s| {
            s.machine_id = id;
            s.proof_verified_at = proof.as_ref().map(|p| p.verified_at);
            s.proof_expires_at = proof.and_then(|p| p.expires_at);
        });
        me
    }

    /// Runs until `shutdown`. In-flight requests are abandoned at shutdown;
    /// the state file is only ever replaced whole, so nothing is corrupted.
    /// `commands` is the machine's command queue, when it has one.
    pub async fn run(
        mut self,
        mut commands: Option<mpsc::Receiver<Command>>,
        shutdown: CancellationToken,
    ) {
        let mut replies: Vec<oneshot::Sender<Result<(), String>>> = Vec::new();
        let mut force_renew = false;
        let mut commands_open = commands.is_some();
        // Without a watchdog nobody reads the heartbeat: no need to wake.
        let beat_every = crate::systemd::beat_interval().unwrap_or(Duration::MAX);
        let heartbeat = self.heartbeat.clone();
        if let Some(id) = &self.state.machine_id {
            note_machine_id(id);
        }
        loop {
            heartbeat.beat();
            let result = self.paced_cycle(force_renew, &shutdown, beat_every).await;
            let Some(result) = result else { break };
            let renewed_on_request = force_renew;
            force_renew = false;
            let (wait, probing) = match result {
                Ok(settled) => {
                    self.prober.arm(None);
                    self.backoff.reset();
                    let reply = match settled {
                        Settled::Active => Ok(()),
                        Settled::Blocked => Err("the record is blocked by an operator".to_owned()),
                        Settled::Archived => {
                            Err("the record is archived by an operator".to_owned())
                        }
                    };
                    if renewed_on_request {
                        for r in replies.drain(..) {
                            let _ = r.send(reply.clone());
                        }
                    }
                    (self.settled_wait(settled), false)
                }
                Err(failure) => {
                    for r in replies.drain(..) {
                        let _ = r.send(Err(format!("{}: {}", failure.code, failure.message)));
                    }
                    let probing = self.prober.arm(Some(&failure));
                    (self.failed_wait(failure), probing)
                }
            };
            let deadline = Instant::now() + wait;
            let mut next_probe = probing
                .then(|| self.prober.next(Instant::now(), deadline))
                .flatten();
            loop {
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => return self.stopping(replies),
                    () = tokio::time::sleep_until(deadline) => break,
                    () = tokio::time::sleep(beat_every) => self.heartbeat.beat(),
                    () = sleep_until(next_probe), if next_probe.is_some() => {
                        let answer = tokio::select! {
                            biased;
                            () = shutdown.cancelled() => return self.stopping(replies),
                            // Boxed, as the cycle is (`paced_cycle`).
                            answer = tokio::time::timeout_at(
                                deadline,
                                Box::pin(self.pacing.readiness.ask(&self.client)),
                            ) => answer,
                        };
                        let Ok(answer) = answer else { break };
                        if answer == Probe::Up {
                            tracing::info!("the orchestrator answers again; retrying now");
                            self.prober.cut_short();
                            break;
                        }
                        tracing::debug!("probe: the orchestrator is still unavailable");
                        next_probe = self.prober.next(Instant::now(), deadline);
                    }
                    cmd = crate::machine::next_command(&mut commands), if commands_open => match cmd {
                        Some(Command::RotateKey { reply }) => {
                            tracing::info!("key rotation requested");
                            let _ = reply.send(self.prepare_rotation().await);
                        }
                        Some(Command::Reregister { reply }) => {
                            tracing::info!("renewal requested");
                            replies.push(reply);
                            // Take every queued request; one renewal answers all.
                            while let Some(Ok(queued)) =
                                commands.as_mut().map(mpsc::Receiver::try_recv)
                            {
                                match queued {
                                    Command::Reregister { reply } => replies.push(reply),
                                    other @ Command::RotateKey { .. } => other.refuse("busy: a renewal is starting".to_owned()),
                                }
                            }
                            force_renew = true;
                            break;
                        }
                        // No sender left (no MQTT): only the timers, the
                        // probes and shutdown wake us.
                        None => commands_open = false,
                    },
                }
                if Instant::now() >= deadline {
                    break;
                }
            }
        }
        self.stopping(replies);
    }

    /// One cycle, in turn with the other loops of the agent; `None` when
    /// `shutdown` came first. A cycle makes several requests, each bounded
    /// by the request timeout; beating while it awaits them keeps a slow
    /// (but progressing) orchestrator from tripping the watchdog, which is
    /// there to catch a stuck process, not a slow network.
    async fn paced_cycle(
        &mut self,
        force_renew: bool,
        shutdown: &CancellationToken,
        beat_every: Duration,
    ) -> Option<Result<Settled, Failure>> {
        let heartbeat = self.heartbeat.clone();
        let cycles = self.pacing.cycles.clone();
        // The turn first, then the cycle: loops waiting for their turn (a
        // gateway's start) hold no cycle yet.
        let permit = loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return None,
                // Never closed: the permit is always granted in turn.
                permit = cycles.acquire() => break permit.ok(),
                () = tokio::time::sleep(beat_every) => heartbeat.beat(),
            }
        };
        // Boxed: a cycle's requests (reqwest, serde) make its future several
        // KiB, and a gateway keeps a thousand loops that spend nearly all
        // their time asleep between cycles. On the heap only while it runs,
        // it is not part of every idle loop's task (docs/performance.md).
        let mut cycle = Box::pin(async move {
            let _permit = permit;
            self.cycle(force_renew).await
        });
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break None,
                r = &mut cycle => break Some(r),
                () = tokio::time::sleep(beat_every) => heartbeat.beat(),
            }
        }
    }

    fn stopping(&self, replies: Vec<oneshot::Sender<Result<(), String>>>) {
        for r in replies {
            let _ = r.send(Err("the agent is stopping".to_owned()));
        }
        self.publish(AgentState::Stopping, |s| s.next_attempt_at = None);
    }

    /// What to do after a good cycle: sleep until the next check or the
    /// renewal point, whichever comes first.
    fn settled_wait(&self, settled: Settled) -> Duration {
        let mut wait = self.renewal.check_interval;
        let state = match settled {
            Settled::Active => {
                if let Some(until) = self.until_renewal() {
                    // A server that hands out proofs expiring at once must
                    // not make the agent renew in a tight loop.
                    wait = wait.min(until.max(self.renewal.backoff_initial));
                }
                AgentState::Active
            }
            Settled::Blocked => AgentState::Blocked,
            Settled::Archived => AgentState::Archived,
        };
        let next = self.next_attempt_at(wait);
        self.publish(state, |s| {
            s.next_attempt_at = Some(next);
            if state == AgentState::Active {
                s.last_error = None;
            }
        });
        tracing::debug!(state = %state, wait_ms = wait.as_millis(), "settled");
        wait
    }

    fn failed_wait(&mut self, failure: Failure) -> Duration {
        let (state, wait) = match failure.kind {
            FailureKind::Transient => (
                AgentState::Backoff,
                self.backoff.next_delay(failure.retry_after),
            ),
            FailureKind::NotController => (AgentState::NotController, self.renewal.slow_retry),
            FailureKind::ChallengeRefused => {
                (AgentState::ChallengeRefused, self.renewal.slow_retry)
            }
            FailureKind::NeedsOperator => (AgentState::Backoff, self.renewal.slow_retry),
            FailureKind::Clock => (
                AgentState::Backoff,
                failure::CLOCK_RETRY.min(self.renewal.slow_retry),
            ),
            // A token that went away is looked for again like an outage; a
            // token that refuses the PIN or lost the key needs an operator.
            FailureKind::KeyUnavailable { transient: true } => {
                (AgentState::KeyUnavailable, self.backoff.next_delay(None))
            }
            FailureKind::KeyUnavailable { transient: false } => {
                (AgentState::KeyUnavailable, self.renewal.slow_retry)
            }
        };
        tracing::warn!(
            state = %state,
            machine_id = self.state.machine_id.as_deref().unwrap_or(""),
            error_code = %failure.code,
            retry_in_ms = wait.as_millis(),
            "{}",
            failure.message
        );
        let next = self.next_attempt_at(wait);
        let error = LastError {
            code: failure.code.as_str().to_owned(),
            message: failure.message,
            at: Timestamp::now(),
        };
        self.publish(state, |s| {
            s.next_attempt_at = Some(next);
            s.last_error = Some(error);
        });
        wait
    }

    /// Next attempt in server time when known (what operators compare with
    /// the orchestrator's logs), else local time.
    fn next_attempt_at(&self, wait: Duration) -> Timestamp {
        self.clock
            .server_now()
            .unwrap_or_else(Timestamp::now)
            .saturating_add(wait)
    }

    fn until_renewal(&self) -> Option<Duration> {
        let proof = self.state.proof.as_ref()?;
        let expires = proof.expires_at?;
        let point = renewal_point(
            proof.verified_at,
            expires,
            self.renewal.renew_before,
            self.renew_jitter,
        );
        Some(self.clock.until_or_local(point))
    }

    /// Changes facts in the snapshot without changing the state. Readers
    /// see every change the channel carries (MQTT republishes it), so each
    /// one gets its own `seq`; a change that changes nothing is not sent.
    fn update_status(&self, f: impl FnOnce(&mut StatusSnapshot)) {
        self.status.send_if_modified(|s| {
            let before = s.clone();
            f(s);
            let modified = *s != before;
            if modified {
                next_seq(s);
            }
            modified
        });
    }

    /// Publishes a state change (systemd's `STATUS=` follows the channel).
    fn publish(&self, state: AgentState, f: impl FnOnce(&mut StatusSnapshot)) {
        let skew = self.clock.skew_ms();
        let mut line = None;
        self.status.send_modify(|s| {
            let changed = s.state != state;
            s.state = state;
            f(s);
            if skew.is_some() {
                s.clock_skew_ms = skew;
            }
            next_seq(s);
            if changed {
                line = Some(status_line(s));
            }
        });
        if let Some(line) = line {
            // Working states come and go with every retry; the failure
            // itself is logged as a warning. Settled states are news.
            if matches!(
                state,
                AgentState::Registering | AgentState::Activating | AgentState::Renewing
            ) {
                tracing::debug!(state = %state, "{line}");
            } else {
                tracing::info!(state = %state, "{line}");
            }
        }
    }
}

/// Puts the record's id on the loop's span (`machine_id`, declared empty
/// by [`crate::machine`]), so that every journal entry of the loop from
/// now on carries `MACHINE_ID=`.
fn note_machine_id(id: &str) {
    tracing::Span::current().record("machine_id", tracing::field::display(id));
}

/// Marks a snapshot as a new one: `seq` names one payload, never two.
fn next_seq(s: &mut StatusSnapshot) {
    s.seq += 1;
    s.timestamp = Timestamp::now();
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
