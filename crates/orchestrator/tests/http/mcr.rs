//! The MCR HTTP source against a fake MCR API that can be right, slow,
//! down, failing or wrong.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use peaqos_protocol::{ListResponse, Machine, MachineStatus};
use serde_json::json;

use crate::support::{Key, TestServer, expect_error, expect_item, key, machine_body};

/// What the fake answers.
#[derive(Debug, Clone)]
pub(crate) enum Mode {
    /// A profile with these controller/owner/operator values.
    Profile {
        controller: Option<String>,
        owner: Option<String>,
        operator: Option<String>,
    },
    NotFound,
    Status(u16),
    Garbage,
    /// A valid profile, of machine 999 whatever was asked.
    WrongMachine,
    /// This `peaqos` block, whatever was asked: profiles that do not say
    /// (or garble) which machine they describe.
    Block(serde_json::Value),
    Slow(Duration, Box<Mode>),
}

impl Mode {
    pub(crate) fn owned_by(key: &Key) -> Self {
        Self::Profile {
            controller: None,
            owner: Some(key.address.clone()),
            operator: None,
        }
    }
}

#[derive(Clone)]
struct FakeState {
    mode: Arc<Mutex<Mode>>,
    hits: Arc<AtomicUsize>,
    in_flight: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

/// A fake MCR API on 127.0.0.1:0, stopped on drop.
pub(crate) struct FakeMcr {
    pub(crate) url: String,
    mode: Arc<Mutex<Mode>>,
    hits: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeMcr {
    pub(crate) async fn start(mode: Mode) -> Self {
        let state = FakeState {
            mode: Arc::new(Mutex::new(mode)),
            hits: Arc::new(AtomicUsize::new(0)),
            in_flight: Arc::new(AtomicUsize::new(0)),
            peak: Arc::new(AtomicUsize::new(0)),
        };
        let app = axum::Router::new()
            .route("/v1/machine/{did}", axum::routing::get(machine))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            url,
            mode: state.mode,
            hits: state.hits,
            peak: state.peak,
            task,
        }
    }

    pub(crate) fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    pub(crate) fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// The most requests it was answering at once, since the last call.
    pub(crate) fn take_peak(&self) -> usize {
        self.peak.swap(0, Ordering::SeqCst)
    }
}

impl Drop for FakeMcr {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn profile(
    did: &str,
    controller: Option<&String>,
    owner: Option<&String>,
    operator: Option<&String>,
) -> serde_json::Value {
    let machine_id = did.strip_prefix("did:peaq:").unwrap_or(did);
    json!({
        "schema_version": "1.0",
        "name": "Fake robot",
        "peaqos": {
            "machine_id": machine_id,
            "did": did,
            "operator": operator,
            "owner": owner,
            "controller": controller,
            "mcr": "A",
            "mcr_score": 80,
            "bond_status": "bonded",
            "negative_flag": false,
            "event_count": 3,
            "data_visibility": "public"
        }
    })
}

/// Counts a request in flight for as long as it lives.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(state: &FakeState) -> Self {
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.peak.fetch_max(now, Ordering::SeqCst);
        Self(Arc::clone(&state.in_flight))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn machine(State(state): State<FakeState>, Path(did): Path<String>) -> Response {
    state.hits.fetch_add(1, Ordering::SeqCst);
    let _in_flight = InFlight::enter(&state);
    let mut mode = state.mode.lock().unwrap().clone();
    if let Mode::Slow(delay, inner) = mode {
        tokio::time::sleep(delay).await;
        mode = *inner;
    }
    match mode {
        Mode::Profile {
            controller,
            owner,
            operator,
        } => axum::Json(profile(
            &did,
            controller.as_ref(),
            owner.as_ref(),
            operator.as_ref(),
        ))
        .into_response(),
        Mode::NotFound => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"error": "not found"})),
        )
            .into_response(),
        Mode::Status(code) => StatusCode::from_u16(code).unwrap().into_response(),
        Mode::Garbage => (StatusCode::OK, "<html>maintenance</html>").into_response(),
        Mode::WrongMachine => axum::Json(profile(
            "did:peaq:999",
            Some(&"0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed".to_owned()),
            None,
            None,
        ))
        .into_response(),
        Mode::Block(block) => {
            axum::Json(json!({"schema_version": "1.0", "name": "x", "peaqos": block}))
                .into_response()
        }
        Mode::Slow(..) => unreachable!(),
    }
}

async fn server_for(mcr: &FakeMcr) -> TestServer {
    let url = mcr.url.clone();
    TestServer::start(move |c| {
        c.registry_file = None;
        c.mcr_api_url = Some(url);
        c.mcr_timeout = Duration::from_millis(300);
    })
    .await
}

#[tokio::test]
async fn profile_controllers_drive_challenges_and_proofs() {
    let (k0, k1) = (key(0), key(1));
    let mcr = FakeMcr::start(Mode::Profile {
        controller: Some(format!("did:peaq:{}", k1.address)),
        owner: Some(k0.address.to_lowercase()),
        operator: Some("9xQeWvG816bUx9EPjHmaT23yvVM2ZWbrrpZb9PusVFin".to_owned()),
    })
    .await;
    let s = server_for(&mcr).await;
    let c = s.challenge("peaqos:machine:42").await;
    let shown: Vec<String> = c
        .controller_addresses
        .iter()
        .map(peaqos_protocol::Address::checksummed)
        .collect();
    assert_eq!(shown, [k1.address.clone(), k0.address.clone()]);
    let m = s.create("did:peaq:42", &k1).await;
    assert_eq!(m.identity_proof.unwrap().controller_addresses.len(), 2);
    assert_eq!(mcr.hits(), 1, "one look-up, then the cache");
    let ready: serde_json::Value = s.get("/ready").await.json().await.unwrap();
    assert_eq!(ready["controllerSource"], "mcr");

    // Address-form DIDs are not sent to the MCR: the address controls them.
    let before = mcr.hits();
    s.create(&format!("did:peaq:{}", k0.address), &k0).await;
    assert_eq!(mcr.hits(), before);
}

#[tokio::test]
async fn an_unknown_machine_is_not_activated() {
    let mcr = FakeMcr::start(Mode::NotFound).await;
    let s = server_for(&mcr).await;
    let r = s
        .post(
            "/api/v1/machine-identity/challenges",
            &json!({"identityRef": "did:peaq:7"}),
        )
        .await;
    expect_error(r, 409, "MACHINE_NOT_ACTIVATED").await;
}

#[tokio::test]
async fn failures_answer_503_with_retry_after_and_write_nothing() {
    let k = key(0);
    let mcr = FakeMcr::start(Mode::owned_by(&k)).await;
    let s = server_for(&mcr).await;
    let failures = [
        Mode::Status(500),
        Mode::Status(502),
        Mode::Status(503),
        Mode::Status(429),
        Mode::Status(401),
        Mode::Garbage,
        Mode::WrongMachine,
        // A profile must name the machine it answers for (issue #15.5):
        // without that, its controller would authorise any identity, and
        // an empty block would silently drop machines from lists.
        Mode::Block(json!({"owner": k.address})),
        Mode::Block(json!({})),
        Mode::Block(json!({"did": "did:peaq:01", "owner": k.address})),
        Mode::Block(json!({"machine_id": "1", "owner": k.address})),
        Mode::Slow(Duration::from_secs(3), Box::new(Mode::owned_by(&k))),
    ];
    for failure in failures {
        mcr.set(Mode::owned_by(&k));
        s.clock.advance(Duration::from_secs(11));
        let proof = s.proof("did:peaq:1", &k).await;
        mcr.set(failure.clone());
        s.clock.advance(Duration::from_secs(11));

        let r = s
            .post(
                "/api/v1/machine-identity/challenges",
                &json!({"identityRef": "did:peaq:1"}),
            )
            .await;
        assert!(r.headers().contains_key("retry-after"), "{failure:?}");
        expect_error(r, 503, "PEAQOS_IDENTITY_UNAVAILABLE").await;
        let r = s
            .post(
                "/api/v1/machines",
                &machine_body("did:peaq:1", proof.clone()),
            )
            .await;
        assert!(r.headers().contains_key("retry-after"), "{failure:?}");
        expect_error(r, 503, "PEAQOS_IDENTITY_UNAVAILABLE").await;

        // Nothing was written and the challenge survived: once the MCR is
        // back, the same proof creates the machine.
        mcr.set(Mode::owned_by(&k));
        let m: Machine = expect_item(
            s.post("/api/v1/machines", &machine_body("did:peaq:1", proof))
                .await,
            201,
        )
        .await;

        // Reads of an existing machine fail the same way, and change nothing.
        let path = format!("/api/v1/machines/{}", m.id);
        mcr.set(failure.clone());
        s.clock.advance(Duration::from_secs(11));
        expect_error(s.get(&path).await, 503, "PEAQOS_IDENTITY_UNAVAILABLE").await;
        expect_error(
            s.get("/api/v1/machines").await,
            503,
            "PEAQOS_IDENTITY_UNAVAILABLE",
        )
        .await;
        expect_error(
            s.patch(&path, &json!({"status": "active"})).await,
            503,
            "PEAQOS_IDENTITY_UNAVAILABLE",
        )
        .await;
        mcr.set(Mode::owned_by(&k));
        let still: Machine = expect_item(s.get(&path).await, 200).await;
        assert_eq!(
            still.status,
            MachineStatus::Draft,
            "{failure:?}: the refused PATCH wrote nothing"
        );
        assert_eq!(s.delete(&path).await.status(), 204);
    }
}

#[tokio::test]
async fn an_unreachable_mcr_is_unavailable_and_not_ready() {
    let port = peaqos_testkit::free_port();
    let s = TestServer::start(move |c| {
        c.registry_file = None;
        c.mcr_api_url = Some(format!("http://127.0.0.1:{port}/v1"));
        c.mcr_timeout = Duration::from_millis(500);
    })
    .await;
    let r = s
        .post(
            "/api/v1/machine-identity/challenges",
            &json!({"identityRef": "did:peaq:1"}),
        )
        .await;
    let retry = r.headers()["retry-after"].to_str().unwrap().to_owned();
    assert!(retry.parse::<u64>().unwrap() >= 1);
    expect_error(r, 503, "PEAQOS_IDENTITY_UNAVAILABLE").await;
    let r = s.get("/ready").await;
    expect_error(r, 503, "SERVICE_UNAVAILABLE").await;
    assert_eq!(s.get("/health").await.status(), 200, "alive all the same");
    // The SDK's readiness says the same in its own shape, with a 200.
    let r = s.get("/api/v1/readiness").await;
    assert_eq!(r.status(), 200);
    let readiness: serde_json::Value = r.json().await.unwrap();
    assert_eq!(readiness["status"], "not_ready");
    assert_eq!(readiness["checks"][0]["name"], "store");
    assert_eq!(readiness["checks"][0]["status"], "pass");
    assert_eq!(readiness["checks"][1]["name"], "controller_source");
    assert_eq!(readiness["checks"][1]["status"], "fail");
    assert!(
        readiness["checks"][1]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{readiness}"
    );
}

#[tokio::test]
async fn concurrent_reads_share_one_lookup_and_the_cache_expires() {
    let k = key(0);
    let mcr = FakeMcr::start(Mode::owned_by(&k)).await;
    let s = Arc::new(server_for(&mcr).await);
    let m = s.create_active("did:peaq:5", &k).await;
    let path = format!("/api/v1/machines/{}", m.id);

    s.clock.advance(Duration::from_secs(11));
    mcr.set(Mode::Slow(
        Duration::from_millis(200),
        Box::new(Mode::owned_by(&k)),
    ));
    let before = mcr.hits();
    let reads: Vec<_> = (0..20)
        .map(|_| {
            let s = Arc::clone(&s);
            let path = path.clone();
            tokio::spawn(async move { s.get(&path).await.status() })
        })
        .collect();
    for r in reads {
        assert_eq!(r.await.unwrap(), 200);
    }
    assert_eq!(
        mcr.hits() - before,
        1,
        "twenty concurrent reads, one MCR request"
    );
    for _ in 0..10 {
        assert_eq!(s.get(&path).await.status(), 200);
    }
    assert_eq!(mcr.hits() - before, 1, "fresh for the TTL");
    s.clock.advance(Duration::from_secs(11));
    assert_eq!(s.get(&path).await.status(), 200);
    assert_eq!(mcr.hits() - before, 2, "asked again once stale");

    // A controller change at the MCR takes effect after the TTL.
    mcr.set(Mode::owned_by(&key(1)));
    assert_eq!(s.get(&path).await.status(), 200);
    s.clock.advance(Duration::from_secs(11));
    expect_error(s.get(&path).await, 409, "MACHINE_NOT_ACTIVATED").await;
}

#[tokio::test]
async fn a_list_page_looks_each_identity_up_once_concurrently_and_only_when_cold() {
    const MACHINES: usize = 40;
    let k = key(0);
    let mcr = FakeMcr::start(Mode::owned_by(&k)).await;
    let s = Arc::new(server_for(&mcr).await);
    for i in 0..MACHINES {
        s.create(&format!("did:peaq:{}", 100 + i), &k).await;
    }
    let list = async |s: &TestServer| -> usize {
        let r = s.get("/api/v1/machines?limit=100").await;
        let page: ListResponse<Machine> = expect_list(r).await;
        page.items.len()
    };

    // Fresh cache: a page costs the controller source nothing.
    let before = mcr.hits();
    assert_eq!(list(&s).await, MACHINES);
    assert_eq!(mcr.hits(), before, "warm page, no look-ups");

    // Cold: one look-up per identity, several at a time but never more
    // than the bound, however slow the source.
    s.clock.advance(Duration::from_secs(11));
    mcr.set(Mode::Slow(
        Duration::from_millis(50),
        Box::new(Mode::owned_by(&k)),
    ));
    mcr.take_peak();
    let before = mcr.hits();
    assert_eq!(list(&s).await, MACHINES);
    assert_eq!(mcr.hits() - before, MACHINES, "one look-up per identity");
    let peak = mcr.take_peak();
    // 16 in flight at most; well above one (they are concurrent).
    assert!((9..=16).contains(&peak), "{peak} look-ups at once");

    // Cold again, three lists at once: still one look-up per identity.
    s.clock.advance(Duration::from_secs(11));
    let before = mcr.hits();
    let lists: Vec<_> = (0..3)
        .map(|_| {
            let s = Arc::clone(&s);
            tokio::spawn(async move { list(&s).await })
        })
        .collect();
    for l in lists {
        assert_eq!(l.await.unwrap(), MACHINES);
    }
    assert_eq!(
        mcr.hits() - before,
        MACHINES,
        "concurrent pages share look-ups"
    );
}

async fn expect_list<T: serde::de::DeserializeOwned>(r: reqwest::Response) -> ListResponse<T> {
    let status = r.status();
    let text = r.text().await.unwrap();
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}
