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

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use peaqos_protocol::{
    Address, Challenge, ChallengeMessage, CreateMachineRequest, ErrorCode, IdentityRef, Machine,
    MachineIdentityProofInput, MachineStatus, SecretKey, Timestamp, UpdateMachineRequest,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::{self, Backoff};
use crate::client::{self, Client, ClientError, Received, Response};
use crate::clock::ServerClock;
use crate::config::{MachineConfig, RenewalConfig};
use crate::state::{Loaded, ProofFacts, State, StateStore};
use crate::status::{AgentState, Command, LastError, StatusSnapshot};
use crate::systemd::Heartbeat;

/// How many state transitions one cycle may make (GET, re-register, take
/// back...) before it waits: a misbehaving server cannot spin the loop.
const MAX_STEPS: usize = 4;

/// Everything the loop needs, assembled by [`crate::run`].
#[derive(Debug)]
pub struct Registrar {
    identity: IdentityRef,
    machine: MachineConfig,
    renewal: RenewalConfig,
    key: SecretKey,
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
}

/// How a cycle ended well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    Active,
    Blocked,
    Archived,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailureKind {
    /// Orchestrator or its identity source unavailable: back off.
    Transient,
    /// Our key is not (or no longer) a controller of the identity.
    NotController,
    /// Something an operator must fix (API key, record fields, a server that
    /// sends challenges we refuse to sign): retried slowly.
    NeedsOperator,
}

#[derive(Debug)]
struct Failure {
    kind: FailureKind,
    code: String,
    message: String,
    retry_after: Option<Duration>,
}

impl Failure {
    fn new(kind: FailureKind, code: &str, message: impl Into<String>) -> Self {
        Self {
            kind,
            code: code.to_owned(),
            message: message.into(),
            retry_after: None,
        }
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let kind = if e.is_transient() || e.is(&ErrorCode::ProofExpired) {
            FailureKind::Transient
        } else if e.is(&ErrorCode::ProofInvalid) || e.is(&ErrorCode::NotActivated) {
            FailureKind::NotController
        } else {
            FailureKind::NeedsOperator
        };
        Self {
            kind,
            code: e.code().as_str().to_owned(),
            message: error_chain(&e),
            retry_after: e.retry_after(),
        }
    }
}

/// `error: cause: cause`, for reports (errors do not repeat their causes).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The renewal point of a proof, in server time: about two thirds into its
/// lifetime (or `renew_before` ahead of expiry), moved earlier by up to a
/// twelfth of the lifetime according to `jitter` in [0, 1], and never
/// earlier than a quarter of the lifetime, so that even a `renew_before`
/// longer than the lifetime cannot make the agent renew in a loop.
pub fn renewal_point(
    verified_at: Timestamp,
    expires_at: Timestamp,
    renew_before: Option<Duration>,
    jitter: f64,
) -> Timestamp {
    let v = verified_at.unix_millis();
    let lifetime = expires_at.unix_millis().saturating_sub(v).max(0);
    let base = match renew_before {
        None => v + lifetime * 2 / 3,
        Some(b) => expires_at
            .unix_millis()
            .saturating_sub(i64::try_from(b.as_millis()).unwrap_or(i64::MAX)),
    };
    #[allow(clippy::cast_possible_truncation)] // bounded by lifetime / 12
    let spread = ((lifetime / 12) as f64 * jitter.clamp(0.0, 1.0)) as i64;
    let point = (base - spread).max(v + lifetime / 4);
    Timestamp::from_unix_millis(point).unwrap_or(expires_at)
}

/// The fields of `[machine]` that differ from the record; empty when equal.
/// Lists and maps left out of the config are not managed.
pub fn field_changes(cfg: &MachineConfig, m: &Machine) -> UpdateMachineRequest {
    let differs = |want: &String, have: &String| (want != have).then(|| want.clone());
    UpdateMachineRequest {
        display_name: differs(&cfg.display_name, &m.display_name),
        owner_id: differs(&cfg.owner_id, &m.owner_id),
        machine_type: differs(&cfg.machine_type, &m.machine_type),
        runtime_profile: differs(&cfg.runtime_profile, &m.runtime_profile),
        capabilities: cfg
            .capabilities
            .as_ref()
            .filter(|c| **c != m.capabilities)
            .cloned(),
        labels: cfg.labels.as_ref().filter(|l| **l != m.labels).cloned(),
        skill_keys: cfg
            .skill_keys
            .as_ref()
            .filter(|s| **s != m.skill_keys)
            .cloned(),
        policy_ids: cfg
            .policy_ids
            .as_ref()
            .filter(|p| **p != m.policy_ids)
            .cloned(),
        ..UpdateMachineRequest::default()
    }
}

/// Why a challenge was not signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChallengeRefusal {
    /// Our address is not among the identity's controllers.
    NotController { controllers: Vec<Address> },
    /// The challenge is not for us, or its text is not a challenge message:
    /// the key must never sign arbitrary server text.
    Refused(String),
}

/// Checks a challenge before our key signs it: the message must parse as a
/// challenge message naming our canonical identity and this challenge's id,
/// and our address must be among the controllers the server resolved.
pub fn vet_challenge(
    challenge: &Challenge,
    identity: &IdentityRef,
    ours: Address,
) -> Result<ChallengeMessage, ChallengeRefusal> {
    let refuse = |why: &str| ChallengeRefusal::Refused(why.to_owned());
    if &challenge.identity_ref != identity {
        return Err(refuse("challenge is for another identity"));
    }
    let message = ChallengeMessage::parse(&challenge.message)
        .map_err(|e| ChallengeRefusal::Refused(format!("refusing to sign: {e}")))?;
    if &message.identity != identity {
        return Err(refuse("refusing to sign: message names another identity"));
    }
    if message.challenge_id != challenge.challenge_id {
        return Err(refuse("refusing to sign: message names another challenge"));
    }
    if !challenge.controller_addresses.contains(&ours) {
        return Err(ChallengeRefusal::NotController {
            controllers: challenge.controller_addresses.clone(),
        });
    }
    Ok(message)
}

fn update_is_empty(u: &UpdateMachineRequest) -> bool {
    *u == UpdateMachineRequest::default()
}

/// The machine id named by a `MACHINE_IDENTITY_EXISTS` error, if any.
fn existing_machine_id(details: Option<&serde_json::Value>) -> Option<String> {
    let details = details?;
    ["machineId", "existingMachineId", "machine_id", "id"]
        .iter()
        .find_map(|k| details.get(*k).and_then(|v| v.as_str()))
        .filter(|id| client::is_valid_machine_id(id))
        .map(str::to_owned)
}

impl Registrar {
    /// Assembles the loop. `loaded` is what the state store found.
    #[allow(clippy::too_many_arguments)] // one call site, all distinct parts
    pub fn new(
        identity: IdentityRef,
        machine: MachineConfig,
        renewal: RenewalConfig,
        key: SecretKey,
        client: Client,
        store: StateStore,
        loaded: Loaded,
        status: watch::Sender<StatusSnapshot>,
        heartbeat: Heartbeat,
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
        let me = Self {
            identity,
            machine,
            renewal,
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
    pub async fn run(mut self, mut commands: mpsc::Receiver<Command>, shutdown: CancellationToken) {
        let mut replies: Vec<oneshot::Sender<Result<(), String>>> = Vec::new();
        let mut force_renew = false;
        // Without a watchdog nobody reads the heartbeat: no need to wake.
        let beat_every = crate::systemd::beat_interval().unwrap_or(Duration::MAX);
        let heartbeat = self.heartbeat.clone();
        loop {
            heartbeat.beat();
            // A cycle makes several requests, each bounded by the request
            // timeout; beating while it awaits them keeps a slow (but
            // progressing) orchestrator from tripping the watchdog, which is
            // there to catch a stuck process, not a slow network.
            let result = {
                let cycle = self.cycle(force_renew);
                tokio::pin!(cycle);
                loop {
                    tokio::select! {
                        biased;
                        () = shutdown.cancelled() => break None,
                        r = &mut cycle => break Some(r),
                        () = tokio::time::sleep(beat_every) => heartbeat.beat(),
                    }
                }
            };
            let Some(result) = result else { break };
            let renewed_on_request = force_renew;
            force_renew = false;
            let wait = match result {
                Ok(settled) => {
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
                    self.settled_wait(settled)
                }
                Err(failure) => {
                    for r in replies.drain(..) {
                        let _ = r.send(Err(format!("{}: {}", failure.code, failure.message)));
                    }
                    self.failed_wait(failure)
                }
            };
            let deadline = Instant::now() + wait;
            loop {
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => return self.stopping(replies),
                    () = tokio::time::sleep_until(deadline) => break,
                    () = tokio::time::sleep(beat_every) => self.heartbeat.beat(),
                    cmd = commands.recv() => match cmd {
                        Some(Command::Reregister { reply }) => {
                            tracing::info!("renewal requested");
                            replies.push(reply);
                            // Take every queued request; one renewal answers all.
                            while let Ok(Command::Reregister { reply }) = commands.try_recv() {
                                replies.push(reply);
                            }
                            force_renew = true;
                            break;
                        }
                        // No sender left: only the timers and shutdown wake us.
                        None => loop {
                            tokio::select! {
                                biased;
                                () = shutdown.cancelled() => return self.stopping(replies),
                                () = tokio::time::sleep_until(deadline) => break,
                                () = tokio::time::sleep(beat_every) => self.heartbeat.beat(),
                            }
                        },
                    },
                }
                if Instant::now() >= deadline {
                    break;
                }
            }
        }
        self.stopping(replies);
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
            FailureKind::NeedsOperator => (AgentState::Backoff, self.renewal.slow_retry),
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
            code: failure.code,
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
        self.clock.until(point)
    }

    /// One pass from what we know to a settled record.
    async fn cycle(&mut self, force_renew: bool) -> Result<Settled, Failure> {
        let mut just_proved = false;
        for _ in 0..MAX_STEPS {
            let Some(id) = self.state.machine_id.clone() else {
                self.register().await?;
                just_proved = true;
                continue;
            };
            let machine = match self.client.get_machine(&id).await {
                Ok(r) => self.observe(r),
                Err(e) if e.status() == Some(404) => {
                    tracing::warn!(machine_id = %id, "record not found; registering again");
                    self.forget_machine()?;
                    continue;
                }
                Err(e) if e.is(&ErrorCode::NotActivated) || e.is(&ErrorCode::ProofExpired) => {
                    tracing::info!(machine_id = %id, error_code = %e.code(), "record needs a fresh proof");
                    self.prove(&id, AgentState::Activating, None).await?;
                    return Ok(Settled::Active);
                }
                Err(e) => return Err(e.into()),
            };
            if machine.identity_ref != self.identity {
                tracing::warn!(machine_id = %id, "record is for another identity; registering again");
                self.forget_machine()?;
                continue;
            }
            self.remember_record(&machine, false)?;
            return match machine.status {
                MachineStatus::Blocked => Ok(Settled::Blocked),
                MachineStatus::Archived => Ok(Settled::Archived),
                MachineStatus::Draft | MachineStatus::Degraded => {
                    self.prove(&id, AgentState::Activating, Some(&machine))
                        .await?;
                    Ok(Settled::Active)
                }
                MachineStatus::Active => {
                    let due = self.until_renewal().is_some_and(|d| d.is_zero());
                    if (force_renew && !just_proved) || due {
                        self.prove(&id, AgentState::Renewing, Some(&machine))
                            .await?;
                    } else if !self.fields_pushed {
                        self.push_fields(&id, &machine).await?;
                    }
                    Ok(Settled::Active)
                }
            };
        }
        Err(Failure::new(
            FailureKind::Transient,
            "BAD_RESPONSE",
            "the orchestrator's answers keep changing; waiting before trying again",
        ))
    }

    /// Creates the record, or takes back the one that already holds our
    /// identity. Leaves `machine_id` set on success.
    async fn register(&mut self) -> Result<(), Failure> {
        self.publish(AgentState::Registering, |s| s.next_attempt_at = None);
        let m = &self.machine;
        let mut request = CreateMachineRequest {
            display_name: m.display_name.clone(),
            owner_id: m.owner_id.clone(),
            machine_type: m.machine_type.clone(),
            runtime_profile: m.runtime_profile.clone(),
            identity_ref: self.identity.clone(),
            identity_proof: None,
            capabilities: m.capabilities.clone(),
            labels: m.labels.clone(),
            policy_ids: m.policy_ids.clone(),
            skill_keys: m.skill_keys.clone(),
        };
        let mut retried = false;
        let created = loop {
            let (proof, expires_at) = self.fresh_proof().await?;
            request.identity_proof = Some(proof);
            match self.client.create_machine(&request).await {
                Ok(r) => break self.observe(r),
                Err(e) if !retried && self.expired_in_transit(&e, expires_at) => {
                    tracing::info!("challenge expired before it was submitted; retrying once");
                    retried = true;
                }
                Err(ClientError::Api {
                    code: ErrorCode::IdentityExists,
                    details,
                    ..
                }) => return self.take_back(details.as_ref()).await,
                Err(e) => return Err(e.into()),
            }
        };
        tracing::info!(machine_id = %created.id, "machine record created");
        self.fields_pushed = true;
        self.remember_record(&created, true)?;
        // The new record holds a proof verified a moment ago: activating
        // reuses it.
        self.publish(AgentState::Activating, |s| {
            s.machine_id = Some(created.id.clone());
        });
        let activate = UpdateMachineRequest {
            status: Some(MachineStatus::Active),
            ..UpdateMachineRequest::default()
        };
        let r = self.client.update_machine(&created.id, &activate).await?;
        let active = self.observe(r);
        self.remember_record(&active, false)?;
        tracing::info!(machine_id = %active.id, status = %active.status, "machine record activated");
        Ok(())
    }

    /// `MACHINE_IDENTITY_EXISTS`: the record is ours (we can sign for the
    /// identity); remember its id and let the next step re-prove it, after
    /// reading it (an operator may have blocked or archived it).
    async fn take_back(&mut self, details: Option<&serde_json::Value>) -> Result<(), Failure> {
        let id = match existing_machine_id(details) {
            Some(id) => id,
            None => self.find_own_record().await?,
        };
        tracing::info!(machine_id = %id, "identity already has a record; taking it back");
        self.state.machine_id = Some(id.clone());
        self.state.proof = None;
        self.save()?;
        let r = self.client.get_machine(&id).await;
        let needs_proof = match r {
            Ok(r) => {
                let m = self.observe(r);
                match m.status {
                    MachineStatus::Blocked | MachineStatus::Archived => {
                        self.remember_record(&m, false)?;
                        return Ok(());
                    }
                    _ => Some(m),
                }
            }
            Err(e) if e.is(&ErrorCode::NotActivated) || e.is(&ErrorCode::ProofExpired) => None,
            Err(e) => return Err(e.into()),
        };
        self.prove(&id, AgentState::Activating, needs_proof.as_ref())
            .await
    }

    /// Pages through `GET /machines` for our identity's record, when a
    /// server's `MACHINE_IDENTITY_EXISTS` does not name it.
    async fn find_own_record(&mut self) -> Result<String, Failure> {
        let mut cursor: Option<String> = None;
        for _ in 0..100 {
            let page = self.client.list_machines(cursor.as_deref()).await?;
            let page = page.value;
            if let Some(m) = page.items.iter().find(|m| m.identity_ref == self.identity) {
                return Ok(m.id.clone());
            }
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        Err(Failure::new(
            FailureKind::NeedsOperator,
            "MACHINE_IDENTITY_EXISTS",
            "the identity already has a record, but the orchestrator does not say which",
        ))
    }

    /// Fresh challenge, then `PATCH {identityProof, status: active}` (plus
    /// config fields that differ). One immediate retry when the challenge
    /// expires before it arrives.
    async fn prove(
        &mut self,
        id: &str,
        state: AgentState,
        record: Option<&Machine>,
    ) -> Result<(), Failure> {
        self.publish(state, |s| s.next_attempt_at = None);
        let mut update = match record {
            Some(m) if !self.fields_pushed => field_changes(&self.machine, m),
            _ => UpdateMachineRequest::default(),
        };
        update.status = Some(MachineStatus::Active);
        let mut retried = false;
        let machine = loop {
            let (proof, expires_at) = self.fresh_proof().await?;
            update.identity_proof = Some(proof);
            match self.client.update_machine(id, &update).await {
                Ok(r) => break self.observe(r),
                Err(e) if !retried && self.expired_in_transit(&e, expires_at) => {
                    tracing::info!("challenge expired before it was submitted; retrying once");
                    retried = true;
                }
                Err(e) if e.status() == Some(404) => {
                    self.forget_machine()?;
                    return Err(Failure::new(
                        FailureKind::Transient,
                        "NOT_FOUND",
                        "the record disappeared; registering again",
                    ));
                }
                Err(e) => return Err(e.into()),
            }
        };
        // Without the record in hand no fields went with the proof; the
        // next read of the record pushes them.
        self.fields_pushed |= record.is_some();
        self.remember_record(&machine, true)?;
        tracing::info!(
            machine_id = %machine.id,
            status = %machine.status,
            state = %state,
            "identity proof accepted"
        );
        if machine.status == MachineStatus::Active {
            Ok(())
        } else {
            Err(Failure::new(
                FailureKind::Transient,
                "BAD_RESPONSE",
                format!("record is {} after activation", machine.status),
            ))
        }
    }

    /// Pushes changed `[machine]` fields to an active record.
    async fn push_fields(&mut self, id: &str, record: &Machine) -> Result<(), Failure> {
        let update = field_changes(&self.machine, record);
        if !update_is_empty(&update) {
            tracing::info!(machine_id = %id, "pushing changed machine fields");
            let r = self.client.update_machine(id, &update).await?;
            let m = self.observe(r);
            self.remember_record(&m, false)?;
        }
        self.fields_pushed = true;
        Ok(())
    }

    /// Whether a refused submission failed because its challenge expired on
    /// the way: the server says so (`..._PROOF_EXPIRED`), or it calls the
    /// challenge unknown (`..._PROOF_INVALID`, as a server that has already
    /// purged expired challenges does) while its clock, as measured here,
    /// is past the challenge's expiry.
    fn expired_in_transit(&mut self, e: &ClientError, challenge_expires_at: Timestamp) -> bool {
        if e.is(&ErrorCode::ProofExpired) {
            return true;
        }
        e.is(&ErrorCode::ProofInvalid)
            && self
                .clock
                .server_now()
                .is_some_and(|now| now >= challenge_expires_at)
    }

    /// Asks for a challenge, vets it and signs it. Returns the proof and the
    /// challenge's expiry (server time).
    async fn fresh_proof(&mut self) -> Result<(MachineIdentityProofInput, Timestamp), Failure> {
        let r = self.client.create_challenge(&self.identity).await?;
        let received = r.received;
        let challenge = self.observe(r);
        match vet_challenge(&challenge, &self.identity, self.key.address()) {
            Ok(message) => {
                // The issue time is the server's "now", to the millisecond.
                self.clock
                    .observe_precise(message.issued_at, received.at, received.local);
                let signature = self.key.sign_personal(challenge.message.as_bytes());
                tracing::debug!(challenge_id = %challenge.challenge_id, "challenge signed");
                Ok((
                    MachineIdentityProofInput {
                        challenge_id: challenge.challenge_id,
                        signature: signature.to_hex(),
                    },
                    challenge.expires_at,
                ))
            }
            Err(ChallengeRefusal::NotController { controllers }) => {
                let list: Vec<String> = controllers.iter().map(Address::checksummed).collect();
                Err(Failure::new(
                    FailureKind::NotController,
                    ErrorCode::ProofInvalid.as_str(),
                    format!(
                        "our address {} is not among the controllers of {} ({}); \
                         add it to the identity's controller record",
                        self.key.address().checksummed(),
                        self.identity,
                        if list.is_empty() {
                            "none".to_owned()
                        } else {
                            list.join(", ")
                        }
                    ),
                ))
            }
            Err(ChallengeRefusal::Refused(why)) => Err(Failure::new(
                FailureKind::NeedsOperator,
                "BAD_CHALLENGE",
                why,
            )),
        }
    }

    /// Takes the clock evidence of a response and returns its value.
    fn observe<T>(&mut self, r: Response<T>) -> T {
        let Received { at, local, date } = r.received;
        if let Some(date) = date {
            self.clock.observe_date(date, at, local);
        }
        r.value
    }

    /// Updates state and status from a record the server sent. With `fresh`
    /// the record carries a proof verified while answering us, whose
    /// `verifiedAt` is a precise reading of the server's clock.
    fn remember_record(&mut self, m: &Machine, fresh: bool) -> Result<(), Failure> {
        let proof = m.identity_proof.as_ref().map(|p| ProofFacts {
            challenge_id: p.challenge_id.clone(),
            signer_address: p.signer_address,
            verified_at: p.verified_at,
            expires_at: p.expires_at,
            clock_skew_ms: self.clock.skew_ms(),
        });
        if fresh && let Some(p) = &proof {
            // verifiedAt was stamped moments before the response left.
            self.clock
                .observe_precise(p.verified_at, Instant::now(), SystemTime::now());
        }
        let proof_changed = self.state.proof.as_ref().map(|p| &p.challenge_id)
            != proof.as_ref().map(|p| &p.challenge_id);
        if proof_changed {
            self.renew_jitter = backoff::random_fraction();
        }
        let changed = self.state.machine_id.as_deref() != Some(m.id.as_str()) || proof_changed;
        self.state.machine_id = Some(m.id.clone());
        if let Some(p) = proof {
            self.state.proof = Some(p);
        }
        if changed {
            self.save()?;
        }
        let (id, status, facts, skew) = (
            m.id.clone(),
            m.status,
            self.state.proof.clone(),
            self.clock.skew_ms(),
        );
        self.status.send_modify(|s| {
            s.machine_id = Some(id);
            s.record_status = Some(status);
            s.proof_verified_at = facts.as_ref().map(|p| p.verified_at);
            s.proof_expires_at = facts.and_then(|p| p.expires_at);
            s.clock_skew_ms = skew;
        });
        Ok(())
    }

    fn forget_machine(&mut self) -> Result<(), Failure> {
        self.state.machine_id = None;
        self.state.proof = None;
        self.fields_pushed = false;
        self.status.send_modify(|s| {
            s.machine_id = None;
            s.record_status = None;
            s.proof_verified_at = None;
            s.proof_expires_at = None;
        });
        self.save()
    }

    fn save(&mut self) -> Result<(), Failure> {
        self.state.saved_at = Timestamp::now();
        self.store
            .save(&self.state)
            .map_err(|e| Failure::new(FailureKind::NeedsOperator, "STATE_WRITE", error_chain(&e)))
    }

    /// Publishes a state change (and the systemd status line).
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
            s.seq += 1;
            s.timestamp = Timestamp::now();
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
            crate::systemd::notify_status(&line);
        }
    }
}

/// The one-line summary for systemd's `STATUS=` and the log.
pub fn status_line(s: &StatusSnapshot) -> String {
    let mut line = format!("{}", s.state);
    if let Some(id) = &s.machine_id {
        let _ = write!(line, " machine {id}");
    }
    if let (Some(e), AgentState::Backoff | AgentState::NotController) = (&s.last_error, s.state) {
        let _ = write!(line, " ({})", e.code);
    }
    line
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use peaqos_protocol::{MachineIdentityProof, ProofMethod, ResolutionSource};

    use super::*;

    const DOC_KEY: &str = "b25c7db31feed9122727bf0939dc769a96564b2de4c4726d035b36ecf1e5b364";

    fn ts(ms: i64) -> Timestamp {
        Timestamp::from_unix_millis(ms).unwrap()
    }

    #[test]
    fn renewal_is_at_two_thirds_with_bounded_jitter() {
        let v = ts(1_000_000);
        let e = ts(1_000_000 + 90_000);
        assert_eq!(renewal_point(v, e, None, 0.0), ts(1_060_000));
        assert_eq!(renewal_point(v, e, None, 1.0), ts(1_060_000 - 7_500));
        assert_eq!(
            renewal_point(v, e, Some(Duration::from_secs(10)), 0.0),
            ts(1_080_000)
        );
        // A renew_before longer than the lifetime still leaves a quarter.
        assert_eq!(
            renewal_point(v, e, Some(Duration::from_secs(3600)), 1.0),
            ts(1_022_500)
        );
    }

    fn challenge(key: &SecretKey, identity: &str) -> Challenge {
        let identity = IdentityRef::parse(identity).unwrap();
        let message = ChallengeMessage {
            orchestrator: "test".into(),
            identity: identity.clone(),
            challenge_id: "chl_1".into(),
            nonce: "ab".repeat(16),
            issued_at: ts(1_000),
            expires_at: ts(301_000),
        };
        Challenge {
            challenge_id: "chl_1".into(),
            identity_ref: identity,
            message: message.render(),
            expires_at: ts(301_000),
            verification_method: ProofMethod::Eip191,
            controller_addresses: vec![key.address()],
        }
    }

    #[test]
    fn only_our_own_challenges_are_signed() {
        let key = SecretKey::from_hex(DOC_KEY).unwrap();
        let ours = IdentityRef::parse("did:peaq:4242").unwrap();
        let good = challenge(&key, "did:peaq:4242");
        assert!(vet_challenge(&good, &ours, key.address()).is_ok());

        let mut foreign_text = good.clone();
        foreign_text.message = "Transfer 1000 tokens to 0xabc".into();
        assert!(matches!(
            vet_challenge(&foreign_text, &ours, key.address()),
            Err(ChallengeRefusal::Refused(_))
        ));

        let mut other_identity = challenge(&key, "did:peaq:7");
        other_identity.identity_ref = ours.clone();
        assert!(matches!(
            vet_challenge(&other_identity, &ours, key.address()),
            Err(ChallengeRefusal::Refused(_))
        ));

        let mut other_id = good.clone();
        other_id.challenge_id = "chl_2".into();
        assert!(matches!(
            vet_challenge(&other_id, &ours, key.address()),
            Err(ChallengeRefusal::Refused(_))
        ));

        let mut not_ours = good;
        not_ours.controller_addresses =
            vec![Address::parse("0x0000000000000000000000000000000000000001").unwrap()];
        assert!(matches!(
            vet_challenge(&not_ours, &ours, key.address()),
            Err(ChallengeRefusal::NotController { .. })
        ));
    }

    fn record(cfg: &MachineConfig) -> Machine {
        Machine {
            id: "mach_1".into(),
            display_name: cfg.display_name.clone(),
            status: MachineStatus::Active,
            owner_id: cfg.owner_id.clone(),
            identity_ref: IdentityRef::parse("did:peaq:1").unwrap(),
            identity_proof: Some(MachineIdentityProof {
                method: ProofMethod::Eip191,
                identity_ref: IdentityRef::parse("did:peaq:1").unwrap(),
                signer_address: Address::parse("0x0000000000000000000000000000000000000001")
                    .unwrap(),
                challenge_id: "chl_1".into(),
                verified_at: ts(0),
                challenge_expires_at: ts(0),
                controller_addresses: vec![],
                resolution_source: ResolutionSource::PeaqosMcr,
                expires_at: None,
            }),
            machine_type: cfg.machine_type.clone(),
            runtime_profile: cfg.runtime_profile.clone(),
            capabilities: vec!["lidar".into()],
            labels: BTreeMap::new(),
            policy_ids: vec![],
            skill_keys: vec![],
            created_at: ts(0),
            updated_at: ts(0),
        }
    }

    #[test]
    fn only_changed_and_managed_fields_are_pushed() {
        let mut cfg = MachineConfig {
            display_name: "robot".into(),
            owner_id: "o".into(),
            machine_type: "t".into(),
            runtime_profile: "r".into(),
            capabilities: None,
            labels: None,
            skill_keys: None,
            policy_ids: None,
        };
        let m = record(&cfg);
        assert!(
            update_is_empty(&field_changes(&cfg, &m)),
            "unmanaged lists left alone"
        );
        cfg.display_name = "robot 2".into();
        cfg.labels = Some(BTreeMap::from([("site".into(), "b".into())]));
        cfg.capabilities = Some(vec!["lidar".into()]);
        let u = field_changes(&cfg, &m);
        assert_eq!(u.display_name.as_deref(), Some("robot 2"));
        assert_eq!(u.labels, cfg.labels);
        assert_eq!(u.capabilities, None, "equal list not sent");
        assert_eq!(u.status, None);
    }

    #[test]
    fn existing_record_id_is_read_from_details_and_validated() {
        let d = serde_json::json!({"machineId": "mach_9"});
        assert_eq!(existing_machine_id(Some(&d)).as_deref(), Some("mach_9"));
        let d = serde_json::json!({"machineId": "../x"});
        assert_eq!(existing_machine_id(Some(&d)), None);
        assert_eq!(existing_machine_id(None), None);
    }
}
