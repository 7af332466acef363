//! A small in-test orchestrator that follows the wire contract and can be
//! told to misbehave in ways the real one never does on purpose: answer 429
//! with `Retry-After`, send a challenge text that is not a challenge, stall a
//! response, let a challenge expire in transit. Tests of the normal flows run
//! against the real orchestrator (`e2e.rs`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use peaqos_protocol::{
    Address, Challenge, ChallengeMessage, CreateChallengeRequest, CreateMachineRequest,
    IdentityRef, Machine, MachineIdentityProof, MachineIdentityProofInput, MachineStatus,
    ProofMethod, ResolutionSource, Signature, Timestamp, UpdateMachineRequest,
};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A fault to answer every API request with, until cleared.
#[derive(Debug, Clone)]
pub(crate) struct Fault {
    pub(crate) status: u16,
    pub(crate) code: &'static str,
    pub(crate) retry_after: Option<u64>,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// API requests received (counted before any delay or fault).
    pub(crate) requests: usize,
    /// When each of them arrived.
    pub(crate) arrivals: Vec<std::time::Instant>,
    pub(crate) challenges: usize,
    pub(crate) creates: usize,
    pub(crate) gets: usize,
    pub(crate) patches: usize,
    pub(crate) patches_with_proof: usize,
    /// Challenge messages the fake issued and saw signed.
    pub(crate) signed_hostile: usize,
}

struct Stored {
    machine: Machine,
}

struct Issued {
    identity: IdentityRef,
    message: String,
    expires_at: Timestamp,
    used: bool,
}

pub(crate) struct FakeState {
    pub(crate) controllers: HashMap<IdentityRef, Vec<Address>>,
    pub(crate) proof_max_age: Option<Duration>,
    pub(crate) challenge_ttl: Duration,
    pub(crate) fault: Option<Fault>,
    /// The next N submitted challenges are treated as expired on arrival.
    pub(crate) expire_next: usize,
    /// Challenge messages become typed data (a token permit) that no
    /// signing policy may sign.
    pub(crate) hostile_message: bool,
    /// Challenge messages become this server-chosen text (`{nonce}` is
    /// replaced), as an orchestrator other than ours writes them.
    pub(crate) foreign_message: Option<String>,
    /// Every API response is delayed this long.
    pub(crate) delay: Duration,
    /// Leave the machine id out of `MACHINE_IDENTITY_EXISTS` details.
    pub(crate) hide_existing_id: bool,
    pub(crate) counters: Counters,
    challenges: HashMap<String, Issued>,
    machines: HashMap<String, Stored>,
    next_id: u64,
}

pub(crate) struct Fake {
    state: Arc<Mutex<FakeState>>,
    /// Bumped after every request is counted, so that a test can wait for
    /// the agent's next request instead of sleeping through a window.
    counted: watch::Receiver<u64>,
    pub(crate) addr: SocketAddr,
    stop: CancellationToken,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

type Shared = Arc<Mutex<FakeState>>;

fn now() -> Timestamp {
    Timestamp::now()
}

fn error(status: u16, code: &str, message: &str, details: Option<serde_json::Value>) -> Response {
    let mut body = json!({"error": {"code": code, "message": message}});
    if let Some(d) = details {
        body["error"]["details"] = d;
    }
    (StatusCode::from_u16(status).unwrap(), Json(body)).into_response()
}

fn item<T: serde::Serialize>(status: StatusCode, value: T) -> Response {
    (status, Json(json!({ "item": value }))).into_response()
}

impl Fake {
    pub(crate) async fn start() -> Self {
        let state = Arc::new(Mutex::new(FakeState {
            controllers: HashMap::new(),
            proof_max_age: None,
            challenge_ttl: Duration::from_secs(300),
            fault: None,
            expire_next: 0,
            hostile_message: false,
            foreign_message: None,
            delay: Duration::ZERO,
            hide_existing_id: false,
            counters: Counters::default(),
            challenges: HashMap::new(),
            machines: HashMap::new(),
            next_id: 1,
        }));
        let (counted_tx, counted) = watch::channel(0);
        let app = axum::Router::new()
            .route("/health", get(|| async { Json(json!({"ok": true})) }))
            .route("/api/v1/machine-identity/challenges", post(challenge))
            .route("/api/v1/machines", post(create))
            .route("/api/v1/machines/{id}", get(read).patch(update))
            // No readiness route (the agent must not need one); while a
            // fault is on, unknown routes fail as the API does, as a server
            // that is down would.
            .fallback(unknown_route)
            .with_state(state.clone())
            .layer(middleware::from_fn(count_requests(
                state.clone(),
                counted_tx,
            )));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopped.cancelled().await })
                .await
                .unwrap();
        });
        Self {
            state,
            counted,
            addr,
            stop,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap()
    }

    pub(crate) fn set_controllers(&self, identity: &str, controllers: &[Address]) {
        self.lock()
            .controllers
            .insert(IdentityRef::parse(identity).unwrap(), controllers.to_vec());
    }

    pub(crate) fn machine(&self, id: &str) -> Option<Machine> {
        self.lock().machines.get(id).map(|s| s.machine.clone())
    }

    pub(crate) fn machines(&self) -> Vec<Machine> {
        self.lock()
            .machines
            .values()
            .map(|s| s.machine.clone())
            .collect()
    }

    /// Waits until the counters satisfy `pred` (checked after each request
    /// arrives and after each answer); panics after `timeout`.
    pub(crate) async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Counters) -> bool,
    ) {
        let mut counted = self.counted.clone();
        let waited = tokio::time::timeout(timeout, async {
            loop {
                if pred(&self.lock().counters) {
                    return;
                }
                counted.changed().await.unwrap();
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "timed out after {timeout:?} waiting for {what}; counters: {:?}",
            self.lock().counters
        );
    }

    /// An operator's write, bypassing the API.
    pub(crate) fn set_status(&self, id: &str, status: MachineStatus) {
        self.lock().machines.get_mut(id).unwrap().machine.status = status;
    }
}

/// Counts each request as it arrives and wakes [`Fake::wait_until`] then
/// and again once its answer is ready (the handler has counted it too).
fn count_requests(
    state: Shared,
    counted: watch::Sender<u64>,
) -> impl Fn(Request, Next) -> BoxFuture<Response> + Clone {
    let counted = Arc::new(counted);
    move |request, next| {
        let (state, counted) = (state.clone(), counted.clone());
        Box::pin(async move {
            {
                let counters = &mut state.lock().unwrap().counters;
                counters.requests += 1;
                counters.arrivals.push(std::time::Instant::now());
            }
            counted.send_modify(|n| *n += 1);
            let response = next.run(request).await;
            counted.send_modify(|n| *n += 1);
            response
        })
    }
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

async fn gate(state: &Shared) -> Option<Response> {
    let (delay, fault) = {
        let s = state.lock().unwrap();
        (s.delay, s.fault.clone())
    };
    tokio::time::sleep(delay).await;
    let f = fault?;
    let mut r = error(f.status, f.code, "injected fault", None);
    if let Some(secs) = f.retry_after {
        r.headers_mut().insert(
            "retry-after",
            HeaderValue::from_str(&secs.to_string()).unwrap(),
        );
    }
    Some(r)
}

async fn unknown_route(State(state): State<Shared>) -> Response {
    if let Some(r) = gate(&state).await {
        return r;
    }
    error(404, "NOT_FOUND", "no such route", None)
}

async fn challenge(
    State(state): State<Shared>,
    Json(req): Json<CreateChallengeRequest>,
) -> Response {
    if let Some(r) = gate(&state).await {
        return r;
    }
    let mut s = state.lock().unwrap();
    s.counters.challenges += 1;
    let Some(controllers) = s.controllers.get(&req.identity_ref).cloned() else {
        return error(409, "MACHINE_NOT_ACTIVATED", "identity not found", None);
    };
    let id = format!("chl_{}", s.next_id);
    s.next_id += 1;
    let issued = now();
    let expires_at = issued.saturating_add(s.challenge_ttl);
    let message = if s.hostile_message {
        r#"{"types":{"Permit":[]},"domain":{"name":"Token"},"primaryType":"Permit","message":{"spender":"0xdead","value":"115792089237316195423570985008687907853269984665640564039457584007913129639935"}}"#.to_owned()
    } else if let Some(text) = &s.foreign_message {
        text.replace("{nonce}", &format!("{}{}", "cd".repeat(8), s.next_id))
    } else {
        ChallengeMessage {
            orchestrator: "fake".into(),
            identity: req.identity_ref.clone(),
            challenge_id: id.clone(),
            nonce: "cd".repeat(32),
            issued_at: issued,
            expires_at,
        }
        .render()
    };
    s.challenges.insert(
        id.clone(),
        Issued {
            identity: req.identity_ref.clone(),
            message: message.clone(),
            expires_at,
            used: false,
        },
    );
    item(
        StatusCode::CREATED,
        Challenge {
            challenge_id: id,
            identity_ref: req.identity_ref,
            message,
            expires_at,
            verification_method: ProofMethod::Eip191,
            controller_addresses: controllers,
        },
    )
}

/// Verifies and consumes a proof for `identity`.
#[allow(clippy::result_large_err)] // a test double; the error is the response
fn verify(
    s: &mut FakeState,
    identity: &IdentityRef,
    proof: &MachineIdentityProofInput,
) -> Result<MachineIdentityProof, Response> {
    let invalid = |m: &str| error(403, "MACHINE_IDENTITY_PROOF_INVALID", m, None);
    let expire = if s.expire_next > 0 {
        s.expire_next -= 1;
        true
    } else {
        false
    };
    let hostile = s.hostile_message;
    let Some(ch) = s.challenges.get_mut(&proof.challenge_id) else {
        return Err(invalid("unknown challenge"));
    };
    if ch.used || &ch.identity != identity {
        return Err(invalid("challenge used or foreign"));
    }
    if expire || ch.expires_at < now() {
        return Err(error(
            410,
            "MACHINE_IDENTITY_PROOF_EXPIRED",
            "challenge expired",
            None,
        ));
    }
    let sig = Signature::parse(&proof.signature).map_err(|e| invalid(&e.to_string()))?;
    let signer = sig
        .recover_personal(ch.message.as_bytes())
        .map_err(|e| invalid(&e.to_string()))?;
    let expires = ch.expires_at;
    ch.used = true;
    if hostile {
        s.counters.signed_hostile += 1;
    }
    let controllers = s.controllers.get(identity).cloned().unwrap_or_default();
    if !controllers.contains(&signer) {
        return Err(invalid("signer is not a controller"));
    }
    let verified_at = now();
    Ok(MachineIdentityProof {
        method: ProofMethod::Eip191,
        identity_ref: identity.clone(),
        signer_address: signer,
        challenge_id: proof.challenge_id.clone(),
        verified_at,
        challenge_expires_at: expires,
        controller_addresses: controllers,
        resolution_source: ResolutionSource::PeaqosMcr,
        expires_at: s.proof_max_age.map(|a| verified_at.saturating_add(a)),
    })
}

/// What a read shows: `degraded` past the proof's expiry.
fn view(s: &FakeState, m: &Machine) -> Machine {
    let mut m = m.clone();
    let stale = m
        .identity_proof
        .as_ref()
        .and_then(|p| p.expires_at)
        .is_some_and(|e| e <= now());
    let _ = s;
    if m.status == MachineStatus::Active && stale {
        m.status = MachineStatus::Degraded;
    }
    m
}

async fn create(State(state): State<Shared>, Json(req): Json<CreateMachineRequest>) -> Response {
    if let Some(r) = gate(&state).await {
        return r;
    }
    let mut s = state.lock().unwrap();
    s.counters.creates += 1;
    let Some(input) = req.identity_proof.clone() else {
        return error(
            400,
            "MACHINE_IDENTITY_PROOF_REQUIRED",
            "proof required",
            None,
        );
    };
    if let Some(existing) = s
        .machines
        .values()
        .find(|m| m.machine.identity_ref == req.identity_ref)
    {
        let details = (!s.hide_existing_id).then(|| json!({"machineId": existing.machine.id}));
        return error(
            409,
            "MACHINE_IDENTITY_EXISTS",
            "identity has a machine",
            details,
        );
    }
    let proof = match verify(&mut s, &req.identity_ref, &input) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let id = format!("mach_{}", s.next_id);
    s.next_id += 1;
    let t = now();
    let machine = Machine {
        id: id.clone(),
        display_name: req.display_name,
        status: MachineStatus::Draft,
        owner_id: req.owner_id,
        identity_ref: req.identity_ref,
        identity_proof: Some(proof),
        machine_type: req.machine_type,
        runtime_profile: req.runtime_profile,
        capabilities: req.capabilities.unwrap_or_default(),
        labels: req.labels.unwrap_or_default(),
        policy_ids: req.policy_ids.unwrap_or_default(),
        skill_keys: req.skill_keys.unwrap_or_default(),
        created_at: t,
        updated_at: t,
    };
    s.machines.insert(
        id,
        Stored {
            machine: machine.clone(),
        },
    );
    item(StatusCode::CREATED, machine)
}

async fn read(State(state): State<Shared>, Path(id): Path<String>) -> Response {
    if let Some(r) = gate(&state).await {
        return r;
    }
    let mut s = state.lock().unwrap();
    s.counters.gets += 1;
    let Some(stored) = s.machines.get(&id) else {
        return error(404, "NOT_FOUND", "no such machine", None);
    };
    let m = stored.machine.clone();
    if let Some(p) = &m.identity_proof {
        let controllers = s
            .controllers
            .get(&m.identity_ref)
            .cloned()
            .unwrap_or_default();
        if !controllers.contains(&p.signer_address) {
            return error(
                409,
                "MACHINE_NOT_ACTIVATED",
                "signer no longer a controller",
                None,
            );
        }
    }
    item(StatusCode::OK, view(&s, &m))
}

async fn update(
    State(state): State<Shared>,
    Path(id): Path<String>,
    Json(req): Json<UpdateMachineRequest>,
) -> Response {
    if let Some(r) = gate(&state).await {
        return r;
    }
    let mut s = state.lock().unwrap();
    s.counters.patches += 1;
    let Some(stored) = s.machines.get(&id) else {
        return error(404, "NOT_FOUND", "no such machine", None);
    };
    let mut m = stored.machine.clone();
    if let Some(input) = &req.identity_proof {
        s.counters.patches_with_proof += 1;
        match verify(&mut s, &m.identity_ref.clone(), input) {
            Ok(p) => m.identity_proof = Some(p),
            Err(r) => return r,
        }
    }
    if req.status == Some(MachineStatus::Active) {
        let Some(p) = &m.identity_proof else {
            return error(409, "MACHINE_NOT_ACTIVATED", "no proof", None);
        };
        if p.expires_at.is_some_and(|e| e <= now()) {
            return error(
                410,
                "MACHINE_IDENTITY_PROOF_EXPIRED",
                "stored proof too old",
                None,
            );
        }
    }
    if let Some(status) = req.status {
        m.status = status;
    }
    if let Some(v) = req.display_name {
        m.display_name = v;
    }
    if let Some(v) = req.labels {
        m.labels = v;
    }
    if let Some(v) = req.capabilities {
        m.capabilities = v;
    }
    m.updated_at = now();
    s.machines.get_mut(&id).unwrap().machine = m.clone();
    let shown = view(&s, &m);
    item(StatusCode::OK, shown)
}
