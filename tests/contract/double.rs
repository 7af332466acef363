//! "FleetHub": an orchestrator written from the wire contract
//! (`shared/spec/orchestrator-api.md`, `seed-machines-and-identity.md`)
//! alone, not from `crates/orchestrator`.
//!
//! Wherever the contract leaves a choice, it takes the other one from our
//! orchestrator (each switchable in [`Quirks`]): its own challenge text,
//! proofs without `expiresAt`, `MACHINE_IDENTITY_EXISTS` without details,
//! identity references in the `peaqos:machine:` spelling, `200` for a
//! create, unknown extra fields, `VALIDATION_ERROR` as 422, timestamps
//! without milliseconds, no `Date` header and no health route. State is in
//! memory; tests steer it (controllers, operator edits, lost records, an
//! outage) and read it back, and every request is counted per endpoint.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use peaqos_protocol::{Address, Signature};
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// What the server does when a stored proof is older than
/// [`Quirks::proof_max_age`]: the three verdicts the contract allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StaleVerdict {
    /// Reads show the record `degraded`.
    Degraded,
    /// `GET` answers 410 `MACHINE_IDENTITY_PROOF_EXPIRED`.
    ProofExpired,
    /// `GET` answers 409 `MACHINE_NOT_ACTIVATED`.
    NotActivated,
}

/// The contract's free choices, set per scenario.
#[derive(Debug, Clone)]
pub(crate) struct Quirks {
    /// `MACHINE_IDENTITY_EXISTS` names the existing machine in `details`.
    pub(crate) exists_details: bool,
    /// Records, proofs and challenges spell `did:peaq:N` as `peaqos:machine:N`.
    pub(crate) alias_spelling: bool,
    /// Status of a successful `POST /machines`.
    pub(crate) create_status: StatusCode,
    /// Unknown fields on records, proofs and challenges.
    pub(crate) extra_fields: bool,
    /// Status of `VALIDATION_ERROR`.
    pub(crate) validation_status: StatusCode,
    /// A stored proof older than this no longer keeps the record active;
    /// the proof itself never says when (no `expiresAt`).
    pub(crate) proof_max_age: Option<Duration>,
    pub(crate) stale_verdict: StaleVerdict,
    pub(crate) challenge_ttl: Duration,
    /// Most items on one page of `GET /machines`, whatever `limit` asks.
    pub(crate) max_page: usize,
    /// A `machineType` this hub refuses with `VALIDATION_ERROR`.
    pub(crate) refused_machine_type: Option<&'static str>,
}

impl Default for Quirks {
    fn default() -> Self {
        Self {
            exists_details: false,
            alias_spelling: true,
            create_status: StatusCode::OK,
            extra_fields: true,
            validation_status: StatusCode::UNPROCESSABLE_ENTITY,
            proof_max_age: None,
            stale_verdict: StaleVerdict::ProofExpired,
            challenge_ttl: Duration::from_secs(300),
            max_page: 100,
            refused_machine_type: None,
        }
    }
}

/// Endpoints, for the request counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Endpoint {
    CreateChallenge,
    CreateMachine,
    GetMachine,
    UpdateMachine,
    ListMachines,
    /// Anything outside the contract's routes (a health probe, say).
    Other,
}

#[derive(Debug, Clone)]
struct Proof {
    signer: Address,
    challenge_id: String,
    verified_at: SystemTime,
    challenge_expires_at: SystemTime,
    controllers: Vec<Address>,
}

/// A machine as the server holds it (identity canonical).
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub(crate) id: String,
    pub(crate) identity: String,
    pub(crate) status: String,
    pub(crate) display_name: String,
    pub(crate) owner_id: String,
    pub(crate) machine_type: String,
    pub(crate) runtime_profile: String,
    pub(crate) labels: Map<String, Value>,
    pub(crate) capabilities: Vec<Value>,
    pub(crate) policy_ids: Vec<Value>,
    pub(crate) skill_keys: Vec<Value>,
    proof: Option<Proof>,
    created_at: SystemTime,
    updated_at: SystemTime,
}

impl Record {
    pub(crate) fn signer(&self) -> Option<Address> {
        self.proof.as_ref().map(|p| p.signer)
    }

    pub(crate) fn proof_challenge(&self) -> Option<&str> {
        self.proof.as_ref().map(|p| p.challenge_id.as_str())
    }
}

#[derive(Debug)]
struct Issued {
    identity: String,
    message: String,
    expires_at: SystemTime,
    used: bool,
}

#[derive(Debug, Default)]
struct Store {
    controllers: BTreeMap<String, Vec<Address>>,
    challenges: BTreeMap<String, Issued>,
    machines: BTreeMap<String, Record>,
    next: u64,
    proofs_accepted: usize,
    /// What challenges list as controllers instead of the controllers
    /// (a listing that lags: the contract only promises at least one).
    listed: Option<Vec<Address>>,
}

#[derive(Debug)]
struct Shared {
    store: Mutex<Store>,
    quirks: Mutex<Quirks>,
    counts: Mutex<BTreeMap<Endpoint, usize>>,
    down: AtomicBool,
    /// Cancelled when the server goes down: open (kept-alive) connections
    /// close too, as in a real outage.
    connections: Mutex<CancellationToken>,
    /// Connections dropped unanswered while down.
    refused: AtomicUsize,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap()
    }

    fn quirks(&self) -> Quirks {
        self.quirks.lock().unwrap().clone()
    }

    fn count(&self, endpoint: Endpoint) {
        *self.counts.lock().unwrap().entry(endpoint).or_default() += 1;
    }
}

/// A running double on 127.0.0.1.
#[derive(Debug)]
pub(crate) struct Double {
    pub(crate) addr: SocketAddr,
    shared: Arc<Shared>,
    tls: bool,
    stop: CancellationToken,
}

impl Double {
    /// Plain HTTP.
    pub(crate) async fn start(quirks: Quirks) -> Self {
        Self::serve(quirks, None).await
    }

    #[cfg(feature = "tls")]
    /// HTTPS with the given server configuration (which decides whether a
    /// client certificate is required).
    pub(crate) async fn start_tls(
        quirks: Quirks,
        tls: Arc<tokio_rustls::rustls::ServerConfig>,
    ) -> Self {
        Self::serve(quirks, Some(TlsAcceptor::from(tls))).await
    }

    async fn serve(quirks: Quirks, tls: Option<TlsAcceptor>) -> Self {
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            quirks: Mutex::new(quirks),
            counts: Mutex::new(BTreeMap::new()),
            down: AtomicBool::new(false),
            connections: Mutex::new(CancellationToken::new()),
            refused: AtomicUsize::new(0),
        });
        let app = router(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let is_tls = tls.is_some();
        tokio::spawn(accept_loop(
            listener,
            app,
            tls,
            shared.clone(),
            stop.clone(),
        ));
        Self {
            addr,
            shared,
            tls: is_tls,
            stop,
        }
    }

    pub(crate) fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The identity's controllers as its resolution source would name them
    /// (`identity` in any accepted spelling). Empty: it does not resolve.
    pub(crate) fn set_controllers(&self, identity: &str, controllers: &[Address]) {
        let canonical = canonical_identity(identity).expect("test identity is valid");
        let mut store = self.shared.store();
        if controllers.is_empty() {
            store.controllers.remove(&canonical);
        } else {
            store.controllers.insert(canonical, controllers.to_vec());
        }
    }

    /// Going down closes every open connection; while down, new ones are
    /// accepted and closed unanswered.
    /// Challenges list `listed` as the controllers (`None`: the real ones).
    pub(crate) fn set_listed(&self, listed: Option<&[Address]>) {
        self.shared.store().listed = listed.map(<[Address]>::to_vec);
    }

    pub(crate) fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
        if down {
            let mut current = self.shared.connections.lock().unwrap();
            current.cancel();
            *current = CancellationToken::new();
        }
    }

    /// Connections closed unanswered so far.
    pub(crate) fn refused(&self) -> usize {
        self.shared.refused.load(Ordering::SeqCst)
    }

    pub(crate) fn count(&self, endpoint: Endpoint) -> usize {
        self.shared
            .counts
            .lock()
            .unwrap()
            .get(&endpoint)
            .copied()
            .unwrap_or(0)
    }

    /// Proofs verified and accepted (by a create or an update).
    pub(crate) fn proofs_accepted(&self) -> usize {
        self.shared.store().proofs_accepted
    }

    pub(crate) fn records(&self) -> Vec<Record> {
        self.shared.store().machines.values().cloned().collect()
    }

    pub(crate) fn record(&self, id: &str) -> Option<Record> {
        self.shared.store().machines.get(id).cloned()
    }

    /// An operator's edit, straight in the store.
    pub(crate) fn set_status(&self, id: &str, status: &str) {
        let mut store = self.shared.store();
        let record = store.machines.get_mut(id).expect("record exists");
        status.clone_into(&mut record.status);
        record.updated_at = SystemTime::now();
    }

    /// The server loses the record (a restore from an old backup, say).
    pub(crate) fn lose(&self, id: &str) {
        assert!(self.shared.store().machines.remove(id).is_some());
    }

    /// A listed, active record of another identity, signed by `signer`
    /// (which becomes that identity's controller): list pages to wade
    /// through.
    pub(crate) fn add_other_machine(&self, identity: &str, signer: Address) -> String {
        let canonical = canonical_identity(identity).expect("test identity is valid");
        let mut store = self.shared.store();
        store.controllers.insert(canonical.clone(), vec![signer]);
        let id = store.new_id("mch");
        let now = SystemTime::now();
        let record = Record {
            id: id.clone(),
            identity: canonical,
            status: "active".into(),
            display_name: format!("neighbour {id}"),
            owner_id: "fleet-2".into(),
            machine_type: "drone".into(),
            runtime_profile: "px4".into(),
            labels: Map::new(),
            capabilities: Vec::new(),
            policy_ids: Vec::new(),
            skill_keys: Vec::new(),
            proof: Some(Proof {
                signer,
                challenge_id: store.new_id("seed"),
                verified_at: now,
                challenge_expires_at: now,
                controllers: vec![signer],
            }),
            created_at: now,
            updated_at: now,
        };
        store.machines.insert(id.clone(), record);
        id
    }
}

impl Drop for Double {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        if shared.down.load(Ordering::SeqCst) {
            shared.refused.fetch_add(1, Ordering::SeqCst);
            drop(stream);
            continue;
        }
        let (app, tls) = (app.clone(), tls.clone());
        let close = shared.connections.lock().unwrap().clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = TowerToHyperService::new(app);
            // hyper adds `Date` unless told not to; the contract does not
            // promise it, so this server leaves it out.
            let mut http = hyper::server::conn::http1::Builder::new();
            http.auto_date_header(false);
            let served = async {
                match tls {
                    None => {
                        let _ = http.serve_connection(TokioIo::new(stream), service).await;
                    }
                    Some(acceptor) => {
                        // A failed handshake (unknown CA, no client
                        // certificate) ends here, before any handler runs.
                        if let Ok(stream) = acceptor.accept(stream).await {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                    }
                }
            };
            tokio::select! {
                () = stop.cancelled() => {}
                () = close.cancelled() => {}
                () = served => {}
            }
        });
    }
}

fn router(shared: Arc<Shared>) -> axum::Router {
    axum::Router::new()
        .route(
            "/api/v1/machine-identity/challenges",
            post(create_challenge),
        )
        .route("/api/v1/machines", post(create_machine).get(list_machines))
        .route(
            "/api/v1/machines/{id}",
            get(get_machine).patch(update_machine),
        )
        .fallback(not_found)
        .with_state(shared)
}

/// An error envelope to send.
#[derive(Debug)]
pub(crate) struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
    details: Option<Value>,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut body = json!({"code": self.code, "message": self.message});
        if let Some(d) = self.details {
            body["details"] = d;
        }
        (self.status, Json(json!({"error": body}))).into_response()
    }
}

type Answer = Result<Response, Refusal>;

fn error(status: StatusCode, code: &'static str, message: &str, details: Option<Value>) -> Refusal {
    Refusal {
        status,
        code,
        message: message.to_owned(),
        details,
    }
}

fn validation(q: &Quirks, field: &str, message: &str) -> Refusal {
    error(
        q.validation_status,
        "VALIDATION_ERROR",
        message,
        Some(json!({"field": field})),
    )
}

fn item(status: StatusCode, value: &Value) -> Response {
    (status, Json(json!({"item": value}))).into_response()
}

async fn not_found(State(s): State<Arc<Shared>>) -> Refusal {
    s.count(Endpoint::Other);
    error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such route", None)
}

/// The JSON body as an object; anything else is a validation error.
fn object(q: &Quirks, body: &[u8]) -> Result<Map<String, Value>, Refusal> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(validation(q, "body", "the body must be a JSON object")),
    }
}

async fn create_challenge(State(s): State<Arc<Shared>>, body: axum::body::Bytes) -> Answer {
    s.count(Endpoint::CreateChallenge);
    let q = s.quirks();
    let body = object(&q, &body)?;
    let identity = body
        .get("identityRef")
        .and_then(Value::as_str)
        .and_then(canonical_identity)
        .ok_or_else(|| validation(&q, "identityRef", "identityRef is not a peaqOS identity"))?;
    let mut store = s.store();
    let Some(controllers) = store.controllers.get(&identity).cloned() else {
        return Err(error(
            StatusCode::CONFLICT,
            "MACHINE_NOT_ACTIVATED",
            "this identity does not resolve on peaqOS",
            None,
        ));
    };
    let id = store.new_id("chl");
    let nonce = hex::encode(random_bytes());
    let now = SystemTime::now();
    let expires_at = now + q.challenge_ttl;
    // Our own text, unlike anything `crates/orchestrator` writes.
    let message = format!(
        "Welcome to FleetHub.\nPlease sign to prove control of {identity}.\n\nnonce: {nonce}\nissued: {}",
        wire_time(now)
    );
    store.challenges.insert(
        id.clone(),
        Issued {
            identity: identity.clone(),
            message: message.clone(),
            expires_at,
            used: false,
        },
    );
    let mut value = json!({
        "challengeId": id,
        "identityRef": spelling(&q, &identity),
        "message": message,
        "expiresAt": wire_time(expires_at),
        "verificationMethod": "eip191",
        "controllerAddresses": store.listed.as_ref().unwrap_or(&controllers).iter().map(Address::checksummed).collect::<Vec<_>>(),
    });
    if q.extra_fields {
        value["issuedAt"] = wire_time(now).into();
        value["fleetHub"] = json!({"region": "eu-central", "policyVersion": 3});
    }
    Ok(item(StatusCode::OK, &value))
}

/// Checks `{challengeId, signature}` for `identity` without consuming it.
fn verify_proof(store: &Store, identity: &str, input: &Value) -> Result<(String, Proof), Refusal> {
    let invalid = |message: &str| {
        error(
            StatusCode::FORBIDDEN,
            "MACHINE_IDENTITY_PROOF_INVALID",
            message,
            None,
        )
    };
    let challenge_id = input
        .get("challengeId")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("identityProof.challengeId is missing"))?;
    let signature = input
        .get("signature")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("identityProof.signature is missing"))?;
    let issued = store
        .challenges
        .get(challenge_id)
        .filter(|c| !c.used && c.identity == identity)
        .ok_or_else(|| invalid("unknown, used or foreign challenge"))?;
    let now = SystemTime::now();
    if now > issued.expires_at {
        return Err(error(
            StatusCode::GONE,
            "MACHINE_IDENTITY_PROOF_EXPIRED",
            "the challenge has expired; ask for a new one",
            None,
        ));
    }
    let signer = Signature::parse(signature)
        .and_then(|sig| sig.recover_personal(issued.message.as_bytes()))
        .map_err(|_| invalid("the signature does not verify"))?;
    let controllers = store.controllers.get(identity).cloned().unwrap_or_default();
    if !controllers.contains(&signer) {
        return Err(invalid("the signer is not a controller of this identity"));
    }
    Ok((
        challenge_id.to_owned(),
        Proof {
            signer,
            challenge_id: challenge_id.to_owned(),
            verified_at: now,
            challenge_expires_at: issued.expires_at,
            controllers,
        },
    ))
}

fn consume(store: &mut Store, challenge_id: &str) {
    if let Some(c) = store.challenges.get_mut(challenge_id) {
        c.used = true;
    }
    store.proofs_accepted += 1;
}

fn string_field(q: &Quirks, body: &Map<String, Value>, field: &str) -> Result<String, Refusal> {
    body.get(field)
        .and_then(Value::as_str)
        .filter(|v| !v.trim().is_empty())
        .map(str::to_owned)
        .ok_or_else(|| validation(q, field, &format!("{field} is required")))
}

fn list_field(body: &Map<String, Value>, field: &str) -> Option<Vec<Value>> {
    body.get(field).and_then(Value::as_array).cloned()
}

async fn create_machine(State(s): State<Arc<Shared>>, body: axum::body::Bytes) -> Answer {
    s.count(Endpoint::CreateMachine);
    let q = s.quirks();
    let body = object(&q, &body)?;
    let display_name = string_field(&q, &body, "displayName")?;
    let owner_id = string_field(&q, &body, "ownerId")?;
    let machine_type = string_field(&q, &body, "machineType")?;
    if q.refused_machine_type == Some(machine_type.as_str()) {
        return Err(validation(
            &q,
            "machineType",
            "this hub does not take machines of this type",
        ));
    }
    let runtime_profile = string_field(&q, &body, "runtimeProfile")?;
    let identity = body
        .get("identityRef")
        .and_then(Value::as_str)
        .and_then(canonical_identity)
        .ok_or_else(|| validation(&q, "identityRef", "identityRef is not a peaqOS identity"))?;
    let Some(proof_input) = body.get("identityProof").filter(|v| !v.is_null()) else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "MACHINE_IDENTITY_PROOF_REQUIRED",
            "identity verification is required",
            None,
        ));
    };
    let mut store = s.store();
    let (challenge_id, proof) = verify_proof(&store, &identity, proof_input)?;
    if let Some(existing) = store.machines.values().find(|m| m.identity == identity) {
        let details = q.exists_details.then(|| json!({"machineId": existing.id}));
        return Err(error(
            StatusCode::CONFLICT,
            "MACHINE_IDENTITY_EXISTS",
            "a machine with this identity already exists",
            details,
        ));
    }
    consume(&mut store, &challenge_id);
    let id = store.new_id("mch");
    let now = SystemTime::now();
    let record = Record {
        id: id.clone(),
        identity,
        status: "draft".into(),
        display_name,
        owner_id,
        machine_type,
        runtime_profile,
        labels: body
            .get("labels")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default(),
        capabilities: list_field(&body, "capabilities").unwrap_or_default(),
        policy_ids: list_field(&body, "policyIds").unwrap_or_default(),
        skill_keys: list_field(&body, "skillKeys").unwrap_or_default(),
        proof: Some(proof),
        created_at: now,
        updated_at: now,
    };
    let value = render(&q, &record, &store);
    store.machines.insert(id, record);
    Ok(item(q.create_status, &value))
}

/// What a read finds wrong with a record's stored proof, if anything.
enum ProofStanding {
    Good,
    /// The signer no longer controls the identity, or it does not resolve.
    NotController,
    /// Older than the deployment's maximum proof age.
    Stale,
}

fn standing(q: &Quirks, store: &Store, m: &Record) -> ProofStanding {
    let Some(proof) = &m.proof else {
        return ProofStanding::NotController;
    };
    let controls = store
        .controllers
        .get(&m.identity)
        .is_some_and(|c| c.contains(&proof.signer));
    if !controls {
        return ProofStanding::NotController;
    }
    let stale = q.proof_max_age.is_some_and(|max| {
        SystemTime::now()
            .duration_since(proof.verified_at)
            .is_ok_and(|age| age > max)
    });
    if stale {
        ProofStanding::Stale
    } else {
        ProofStanding::Good
    }
}

fn not_activated() -> Refusal {
    error(
        StatusCode::CONFLICT,
        "MACHINE_NOT_ACTIVATED",
        "the machine's identity proof no longer verifies",
        None,
    )
}

fn proof_expired() -> Refusal {
    error(
        StatusCode::GONE,
        "MACHINE_IDENTITY_PROOF_EXPIRED",
        "the machine's identity proof is too old; prove control again",
        None,
    )
}

fn missing(id: &str) -> Refusal {
    error(
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
        &format!("no machine {id}"),
        None,
    )
}

async fn get_machine(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Answer {
    s.count(Endpoint::GetMachine);
    let q = s.quirks();
    let store = s.store();
    let m = store.machines.get(&id).ok_or_else(|| missing(&id))?;
    let active = m.status == "active";
    match standing(&q, &store, m) {
        // Drafts carry a proof that may be stale or foreign: only active
        // records are re-verified on read.
        ProofStanding::NotController if active => return Err(not_activated()),
        ProofStanding::Stale if active => match q.stale_verdict {
            StaleVerdict::ProofExpired => return Err(proof_expired()),
            StaleVerdict::NotActivated => return Err(not_activated()),
            StaleVerdict::Degraded => {}
        },
        _ => {}
    }
    Ok(item(StatusCode::OK, &render(&q, m, &store)))
}

async fn update_machine(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Answer {
    s.count(Endpoint::UpdateMachine);
    let q = s.quirks();
    let body = object(&q, &body)?;
    let mut store = s.store();
    let m = store.machines.get(&id).ok_or_else(|| missing(&id))?.clone();
    if let Some(v) = body.get("identityRef").filter(|v| !v.is_null()) {
        let canonical = v
            .as_str()
            .and_then(canonical_identity)
            .ok_or_else(|| validation(&q, "identityRef", "identityRef is not a peaqOS identity"))?;
        if canonical != m.identity {
            return Err(error(
                StatusCode::CONFLICT,
                "MACHINE_IDENTITY_IMMUTABLE",
                "identityRef cannot change",
                None,
            ));
        }
    }
    let new_status = match body.get("status").filter(|v| !v.is_null()) {
        None => None,
        Some(v) => Some(
            v.as_str()
                .filter(|s| ["draft", "active", "degraded", "blocked", "archived"].contains(s))
                .ok_or_else(|| validation(&q, "status", "unknown status"))?
                .to_owned(),
        ),
    };
    let mut updated = m.clone();
    let mut accepted = None;
    if let Some(input) = body.get("identityProof").filter(|v| !v.is_null()) {
        let (challenge_id, proof) = verify_proof(&store, &m.identity, input)?;
        updated.proof = Some(proof);
        accepted = Some(challenge_id);
    } else if new_status.as_deref() == Some("active") {
        // Activation reuses the stored proof, re-verified.
        match standing(&q, &store, &m) {
            ProofStanding::Good => {}
            ProofStanding::NotController => return Err(not_activated()),
            ProofStanding::Stale => return Err(proof_expired()),
        }
    }
    for (field, slot) in [
        ("displayName", &mut updated.display_name),
        ("ownerId", &mut updated.owner_id),
        ("machineType", &mut updated.machine_type),
        ("runtimeProfile", &mut updated.runtime_profile),
    ] {
        if body.get(field).is_some_and(|v| !v.is_null()) {
            *slot = string_field(&q, &body, field)?;
        }
    }
    if let Some(labels) = body.get("labels").and_then(Value::as_object) {
        updated.labels.clone_from(labels);
    }
    for (field, slot) in [
        ("capabilities", &mut updated.capabilities),
        ("policyIds", &mut updated.policy_ids),
        ("skillKeys", &mut updated.skill_keys),
    ] {
        if let Some(list) = list_field(&body, field) {
            *slot = list;
        }
    }
    if let Some(status) = new_status {
        updated.status = status;
    }
    updated.updated_at = SystemTime::now();
    if let Some(challenge_id) = accepted {
        consume(&mut store, &challenge_id);
    }
    let value = render(&q, &updated, &store);
    store.machines.insert(id, updated);
    Ok(item(StatusCode::OK, &value))
}

#[derive(serde::Deserialize)]
struct Page {
    limit: Option<String>,
    cursor: Option<String>,
}

async fn list_machines(State(s): State<Arc<Shared>>, Query(page): Query<Page>) -> Answer {
    s.count(Endpoint::ListMachines);
    let q = s.quirks();
    let limit = match page.limit.as_deref() {
        None => 100,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=500).contains(n))
            .ok_or_else(|| validation(&q, "limit", "limit must be 1..500"))?,
    };
    // The cursor is the hex of the last id on the previous page.
    let after = match page.cursor.as_deref() {
        None => None,
        Some(c) => Some(
            hex::decode(c)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| validation(&q, "cursor", "bad cursor"))?,
        ),
    };
    let store = s.store();
    let take = limit.min(q.max_page);
    let listed: Vec<&Record> = store
        .machines
        .values()
        .filter(|m| after.as_ref().is_none_or(|a| m.id > *a))
        .filter(|m| !matches!(standing(&q, &store, m), ProofStanding::NotController))
        .take(take + 1)
        .collect();
    let more = listed.len() > take;
    let items: Vec<Value> = listed
        .iter()
        .take(take)
        .map(|m| render(&q, m, &store))
        .collect();
    let mut body = json!({"items": items});
    if more {
        let last = &listed[take - 1].id;
        body["nextCursor"] = hex::encode(last.as_bytes()).into();
    }
    // On the last page the cursor is absent: the contract allows that as
    // well as `null`.
    Ok(Json(body).into_response())
}

/// The record on the wire: the status a reader sees (a stale proof reads
/// `degraded`), this server's spelling and extras.
fn render(q: &Quirks, m: &Record, store: &Store) -> Value {
    let status = match (m.status.as_str(), standing(q, store, m)) {
        ("active", ProofStanding::Stale) => "degraded",
        (s, _) => s,
    };
    let proof = m.proof.as_ref().map(|p| {
        let mut v = json!({
            "method": "eip191",
            "identityRef": spelling(q, &m.identity),
            "signerAddress": p.signer.checksummed(),
            "challengeId": p.challenge_id,
            "verifiedAt": wire_time(p.verified_at),
            "challengeExpiresAt": wire_time(p.challenge_expires_at),
            "controllerAddresses": p.controllers.iter().map(Address::checksummed).collect::<Vec<_>>(),
            "resolutionSource": "peaqos-mcr",
        });
        if q.extra_fields {
            v["attestationLevel"] = "basic".into();
        }
        v
    });
    let mut v = json!({
        "id": m.id,
        "displayName": m.display_name,
        "status": status,
        "ownerId": m.owner_id,
        "identityRef": spelling(q, &m.identity),
        "identityProof": proof,
        "machineType": m.machine_type,
        "runtimeProfile": m.runtime_profile,
        "capabilities": m.capabilities,
        "labels": m.labels,
        "policyIds": m.policy_ids,
        "skillKeys": m.skill_keys,
        "createdAt": wire_time(m.created_at),
        "updatedAt": wire_time(m.updated_at),
    });
    if q.extra_fields {
        v["fleetHubRevision"] = 7.into();
        v["lastSeenAt"] = Value::Null;
        v["site"] = json!({"name": "hall 3", "geo": [52.5, 13.4]});
    }
    v
}

/// `did:peaq:N` as `peaqos:machine:N` when the quirk is on; the address
/// form has no alias.
fn spelling(q: &Quirks, canonical: &str) -> String {
    match canonical.strip_prefix("did:peaq:") {
        Some(n) if q.alias_spelling && !n.starts_with("0x") => format!("peaqos:machine:{n}"),
        _ => canonical.to_owned(),
    }
}

/// The contract's identity forms, canonicalised: `did:peaq:<decimal>`,
/// `peaqos:machine:<decimal>` (same identity), `did:peaq:0x<40 hex>`
/// (lowercased). The decimal is canonical (no leading zero) and at most
/// 2^256-1.
pub(crate) fn canonical_identity(input: &str) -> Option<String> {
    const MAX: &str =
        "115792089237316195423570985008687907853269984665640564039457584007913129639935";
    let decimal = |n: &str| {
        let ok = !n.is_empty()
            && n.bytes().all(|b| b.is_ascii_digit())
            && (n == "0" || !n.starts_with('0'))
            && (n.len() < MAX.len() || (n.len() == MAX.len() && n <= MAX));
        ok.then(|| format!("did:peaq:{n}"))
    };
    if let Some(rest) = input.strip_prefix("did:peaq:") {
        if let Some(hex) = rest.strip_prefix("0x") {
            let ok = hex.len() == 40 && hex.bytes().all(|b| b.is_ascii_hexdigit());
            return ok.then(|| format!("did:peaq:0x{}", hex.to_ascii_lowercase()));
        }
        return decimal(rest);
    }
    input.strip_prefix("peaqos:machine:").and_then(decimal)
}

/// RFC 3339 in UTC to the second (no fraction), as many servers write it.
pub(crate) fn wire_time(t: SystemTime) -> String {
    let t = OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn random_bytes() -> [u8; 16] {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).unwrap();
    b
}

impl Store {
    fn new_id(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!(
            "{prefix}-{:06}-{}",
            self.next,
            &hex::encode(random_bytes())[..8]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_canonicalise_like_the_contract_says() {
        assert_eq!(
            canonical_identity("peaqos:machine:42").as_deref(),
            Some("did:peaq:42")
        );
        assert_eq!(
            canonical_identity("did:peaq:0").as_deref(),
            Some("did:peaq:0")
        );
        assert_eq!(
            canonical_identity("did:peaq:0xABCDEF0123456789abcdef0123456789ABCDEF01").as_deref(),
            Some("did:peaq:0xabcdef0123456789abcdef0123456789abcdef01")
        );
        for bad in [
            "did:peaq:007",
            "did:peaq:",
            "peaqos:machine:0x01",
            "did:peaq:-1",
            "x:1",
        ] {
            assert_eq!(canonical_identity(bad), None, "{bad}");
        }
        let max = "115792089237316195423570985008687907853269984665640564039457584007913129639935";
        assert!(canonical_identity(&format!("did:peaq:{max}")).is_some());
        let over = "115792089237316195423570985008687907853269984665640564039457584007913129639936";
        assert!(canonical_identity(&format!("did:peaq:{over}")).is_none());
    }

    #[test]
    fn wire_times_have_no_fraction() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_000_000_123);
        assert_eq!(wire_time(t), "2025-11-24T16:00:00Z");
    }
}

/// The double differs from our orchestrator where this file says it does:
/// checked on the wire, so that a scenario passing against it means what it
/// claims.
#[cfg(test)]
mod wire {
    use super::*;

    async fn send(
        method: reqwest::Method,
        url: String,
        body: Option<Value>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        peaqos_agent::client::install_tls_provider();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let mut request = client.request(method, url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
        let headers = response.headers().clone();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, headers, body)
    }

    #[tokio::test]
    async fn the_double_takes_the_other_choice_everywhere() {
        let double = Double::start(Quirks::default()).await;
        let key = peaqos_protocol::SecretKey::generate().unwrap();
        double.set_controllers("did:peaq:9", &[key.address()]);
        let base = format!("{}/api/v1", double.url());

        let (status, headers, _) = send(
            reqwest::Method::GET,
            format!("{}/health", double.url()),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "no health route");
        assert!(headers.get("date").is_none(), "no Date header");

        let (status, _, body) = send(
            reqwest::Method::POST,
            format!("{base}/machine-identity/challenges"),
            Some(json!({"identityRef": "did:peaq:9"})),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let challenge = &body["item"];
        let message = challenge["message"].as_str().unwrap();
        assert!(message.starts_with("Welcome to FleetHub.\n"), "{message}");
        assert_eq!(challenge["identityRef"], "peaqos:machine:9");
        assert!(challenge["fleetHub"].is_object(), "extra field");
        let expires = challenge["expiresAt"].as_str().unwrap();
        assert!(
            expires.ends_with('Z') && !expires.contains('.'),
            "{expires}"
        );

        let signature = key.sign_personal(message.as_bytes()).to_hex();
        let create = json!({
            "displayName": "d", "ownerId": "o", "machineType": "t", "runtimeProfile": "r",
            "identityRef": "did:peaq:9",
            "identityProof": {"challengeId": challenge["challengeId"], "signature": signature},
        });
        let (status, _, body) = send(
            reqwest::Method::POST,
            format!("{base}/machines"),
            Some(create.clone()),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "200, not 201: {body}");
        let record = &body["item"];
        assert_eq!(record["identityRef"], "peaqos:machine:9");
        assert!(record["identityProof"].get("expiresAt").is_none());
        assert!(record["fleetHubRevision"].is_number(), "extra field");

        // The same challenge again: refused, it was used.
        let (status, _, body) = send(
            reqwest::Method::POST,
            format!("{base}/machines"),
            Some(create),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");

        let (status, _, body) = send(
            reqwest::Method::POST,
            format!("{base}/machines"),
            Some(json!({"displayName": "d"})),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(body["error"]["code"], "VALIDATION_ERROR");

        let (status, _, body) = send(
            reqwest::Method::GET,
            format!("{base}/machines?limit=0"),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    }
}
