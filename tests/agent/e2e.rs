//! End to end: the real agent loop against the real orchestrator
//! (`peaqos-orchestrator`, in-process on 127.0.0.1 with SQLite and a
//! controller registry file, or the MCR API faked), through the events an
//! unattended machine meets: first start, restarts, a lost state file, proof
//! expiry, controller changes, orchestrator and MCR outages, a slow uplink,
//! a wrong key. Intervals are configured in milliseconds so that the whole
//! file runs in seconds.

use std::time::Duration;

use crate::support::orchestrator::{FakeMcr, Orchestrator, SlowLink, state_file};
use crate::support::{FAST_RENEWAL, Running, config_text, start, stored_machine_id, write_key};
use peaqos_agent::config::Config;
use peaqos_agent::status::AgentState;
use peaqos_protocol::{Address, SecretKey};

const ID: &str = "did:peaq:4242";
const WAIT: Duration = Duration::from_secs(10);
const STOP: Duration = Duration::from_secs(2);
const CHALLENGES: &str = "/api/v1/machine-identity/challenges";

/// A machine: its key and state directory, agents started from them.
struct Machine {
    dir: tempfile::TempDir,
    key: SecretKey,
    key_path: std::path::PathBuf,
}

impl Machine {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (key, key_path) = write_key(dir.path(), "controller");
        Self { dir, key, key_path }
    }

    fn address(&self) -> Address {
        self.key.address()
    }

    /// Starts an agent; `drop_in` is merged over the base configuration as
    /// an `agent.d` file would be.
    fn start(&self, url: &str, drop_in: &str) -> Running {
        let state = self.dir.path().join("state");
        let base = config_text(url, ID, &self.key_path, &state, FAST_RENEWAL);
        let config = Config::from_texts(vec![
            ("agent.toml".into(), base),
            ("agent.d/90-test.toml".into(), drop_in.to_owned()),
        ])
        .unwrap();
        start(config)
    }

    /// Starts an agent and waits until its record is active: the agent and
    /// its machine id.
    async fn start_active(&self, url: &str, drop_in: &str) -> (Running, String) {
        let mut agent = self.start(url, drop_in);
        let id = agent
            .wait_state(AgentState::Active, WAIT)
            .await
            .machine_id
            .unwrap();
        (agent, id)
    }

    fn machine_id(&self) -> Option<String> {
        stored_machine_id(&self.dir.path().join("state"))
    }

    /// A new key in place of the old one, as after a compromise.
    fn rotate_key(&mut self) {
        let (key, key_path) = write_key(self.dir.path(), "controller");
        self.key = key;
        self.key_path = key_path;
    }
}

#[tokio::test]
async fn first_start_registers_and_restarts_keep_the_same_record() {
    let orch = Orchestrator::start(|_| {}).await;
    let robot = Machine::new();
    orch.set_controllers(ID, &[robot.address()]);

    let mut agent = robot.start(&orch.url(), "");
    let active = agent.wait_state(AgentState::Active, WAIT).await;
    let id = active.machine_id.clone().unwrap();
    assert_eq!(
        robot.machine_id().as_deref(),
        Some(id.as_str()),
        "persisted"
    );
    let (status, body) = orch.machine(&id).await;
    assert_eq!(status, 200, "{body}");
    let m = &body["item"];
    assert_eq!(m["status"], "active");
    assert_eq!(m["identityRef"], ID);
    assert_eq!(
        m["identityProof"]["signerAddress"],
        robot.address().checksummed()
    );
    assert_eq!(m["labels"]["site"], "lab");
    assert_eq!(active.identity, ID);
    assert_eq!(active.controller_address, robot.address().checksummed());
    assert!(active.clock_skew_ms.is_some_and(|ms| ms.abs() < 2_000));
    agent.stop(STOP).await;

    // Restart: same record, no second one, and config changes are pushed.
    let mut agent = robot.start(&orch.url(), "");
    let again = agent.wait_state(AgentState::Active, WAIT).await;
    assert_eq!(again.machine_id.as_deref(), Some(id.as_str()));
    agent.stop(STOP).await;
    assert_eq!(orch.machine_ids().await, vec![id.clone()]);
}

/// A `log::Log` that keeps each entry's structured fields, as
/// `systemd-journal-logger` would send them as journal fields.
#[derive(Clone, Default)]
struct JournalFields(std::sync::Arc<std::sync::Mutex<Vec<Entry>>>);

/// One journal entry's fields.
type Entry = Vec<(String, String)>;

impl log::Log for JournalFields {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        struct Collect(Vec<(String, String)>);
        impl<'kvs> log::kv::VisitSource<'kvs> for Collect {
            fn visit_pair(
                &mut self,
                key: log::kv::Key<'kvs>,
                value: log::kv::Value<'kvs>,
            ) -> Result<(), log::kv::Error> {
                self.0.push((key.to_string(), value.to_string()));
                Ok(())
            }
        }
        if !record.target().starts_with("peaqos_agent") {
            return;
        }
        let mut fields = Collect(Vec::new());
        let _ = record.key_values().visit(&mut fields);
        self.0.lock().unwrap().push(fields.0);
    }

    fn flush(&self) {}
}

/// Issue #22 (11): `journalctl STATE=active MACHINE_ID=mach_…` found
/// nothing, because the state entries did not carry the record's id. Every
/// entry of the loop now carries `MACHINE_NAME=` and, once the record is
/// known, `MACHINE_ID=`, on the first start and after a restart.
#[tokio::test]
async fn the_loops_journal_entries_carry_machine_name_and_machine_id() {
    use tracing_subscriber::prelude::*;
    let journal = JournalFields::default();
    let subscriber =
        tracing_subscriber::registry().with(peaqos_logging::JournalLayer::new(journal.clone()));
    let _default = tracing::subscriber::set_default(subscriber);
    let orch = Orchestrator::start(|_| {}).await;
    let robot = Machine::new();
    orch.set_controllers(ID, &[robot.address()]);
    for _start in 0..2 {
        journal.0.lock().unwrap().clear();
        let (agent, id) = robot.start_active(&orch.url(), "").await;
        agent.stop(STOP).await;
        let entries = journal.0.lock().unwrap().clone();
        let field = |entry: &[(String, String)], name: &str| {
            entry
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let active: Vec<_> = entries
            .iter()
            .filter(|e| field(e, "state").as_deref() == Some("active"))
            .collect();
        assert!(!active.is_empty(), "{entries:#?}");
        for entry in active {
            assert_eq!(
                field(entry, "machine_id").as_deref(),
                Some(id.as_str()),
                "{entry:?}"
            );
            assert_eq!(
                field(entry, "machine_name").as_deref(),
                Some("test robot"),
                "{entry:?}"
            );
        }
    }
}

/// Issue #15: `seq` was seen on two different payloads. Facts learnt from
/// the orchestrator (record status, proof times) changed the snapshot
/// without a new `seq`, and MQTT republished the changed payload under the
/// old one. Every snapshot readers can see must have a `seq` of its own.
#[tokio::test]
async fn every_published_snapshot_has_its_own_seq() {
    let orch = Orchestrator::start(|_| {}).await;
    let robot = Machine::new();
    orch.set_controllers(ID, &[robot.address()]);
    let mut agent = robot.start(&orch.url(), "");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(vec![agent.status.borrow().clone()]));
    let mut rx = agent.status.clone();
    let out = seen.clone();
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let s = rx.borrow_and_update().clone();
            out.lock().unwrap().push(s);
        }
    });
    agent.wait_state(AgentState::Active, WAIT).await;
    // A renewal on request: more facts change (proof times).
    agent.reregister(WAIT).await.unwrap();
    agent.stop(STOP).await;
    let seen = seen.lock().unwrap();
    let mut by_seq = std::collections::BTreeMap::new();
    for s in seen.iter() {
        if let Some(other) = by_seq.insert(s.seq, s) {
            assert_eq!(
                other, s,
                "two different snapshots published as seq {}",
                s.seq
            );
        }
    }
    assert!(by_seq.len() >= 4, "{by_seq:#?}");
}

#[tokio::test]
async fn changed_machine_fields_are_pushed_at_start() {
    let orch = Orchestrator::start(|_| {}).await;
    let robot = Machine::new();
    orch.set_controllers(ID, &[robot.address()]);
    let (agent, id) = robot.start_active(&orch.url(), "").await;
    agent.stop(STOP).await;

    let state = robot.dir.path().join("state");
    let text = config_text(&orch.url(), ID, &robot.key_path, &state, FAST_RENEWAL)
        .replace(
            "display_name = \"test robot\"",
            "display_name = \"renamed robot\"",
        )
        .replace(
            "labels = { site = \"lab\" }",
            "labels = { site = \"hall 2\", zone = \"b\" }",
        );
    let config = Config::from_texts(vec![("agent.toml".into(), text)]).unwrap();
    let mut agent = start(config);
    agent.wait_state(AgentState::Active, WAIT).await;
    let (_, body) = orch.machine(&id).await;
    assert_eq!(body["item"]["displayName"], "renamed robot");
    assert_eq!(body["item"]["labels"]["zone"], "b");
    assert_eq!(body["item"]["labels"]["site"], "hall 2");
    agent.stop(STOP).await;
}

#[tokio::test]
async fn a_lost_or_corrupt_state_file_finds_the_record_again() {
    let orch = Orchestrator::start(|_| {}).await;
    let robot = Machine::new();
    orch.set_controllers(ID, &[robot.address()]);
    let (agent, id) = robot.start_active(&orch.url(), "").await;
    let first_proof = orch.machine(&id).await.1["item"]["identityProof"]["challengeId"].clone();
    agent.stop(STOP).await;

    // Deleted: MACHINE_IDENTITY_EXISTS leads back to the same record, which
    // is re-proved with a fresh challenge.
    std::fs::remove_file(state_file(robot.dir.path())).unwrap();
    let mut agent = robot.start(&orch.url(), "");
    let back = agent.wait_state(AgentState::Active, WAIT).await;
    assert_eq!(back.machine_id.as_deref(), Some(id.as_str()));
    assert_eq!(robot.machine_id().as_deref(), Some(id.as_str()));
    let proof = orch.machine(&id).await.1["item"]["identityProof"]["challengeId"].clone();
    assert_ne!(proof, first_proof, "taken back with a fresh proof");
    agent.stop(STOP).await;

    // Corrupt (power cut during someone's edit): set aside, same outcome.
    std::fs::write(state_file(robot.dir.path()), b"{\"version\":1,\"machi").unwrap();
    let mut agent = robot.start(&orch.url(), "");
    let back = agent.wait_state(AgentState::Active, WAIT).await;
    assert_eq!(back.machine_id.as_deref(), Some(id.as_str()));
    agent.stop(STOP).await;
    let aside = std::fs::read_dir(robot.dir.path().join("state"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("state.json.corrupt-")
        })
        .count();
    assert_eq!(aside, 1);
    assert_eq!(orch.machine_ids().await, vec![id]);
}

#[tokio::test]
async fn a_short_proof_lifetime_is_renewed_unattended_and_never_lapses() {
    // Long enough that a loaded machine's scheduling delays (hundreds of
    // ms) are not mistaken for a lapse.
    let lifetime = Duration::from_secs(3);
    let orch = Orchestrator::start(|c| c.proof_max_age = Some(lifetime)).await;
    let robot = Machine::new();
    orch.set_controllers(ID, &[robot.address()]);
    // Checks far apart: only the proactive renewal can keep it active.
    let mut agent = robot.start(&orch.url(), "[renewal]\ncheck_interval = \"1h\"\n");
    let first = agent.wait_state(AgentState::Active, WAIT).await;
    let id = first.machine_id.clone().unwrap();
    assert!(first.proof_expires_at.is_some(), "expiry known: {first:?}");

    // For three lifetimes, an independent client always sees it active, and
    // the proof keeps being replaced before it expires.
    let mut proofs = std::collections::BTreeSet::new();
    let until = tokio::time::Instant::now() + lifetime * 3;
    while tokio::time::Instant::now() < until {
        let (status, body) = orch.machine(&id).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["item"]["status"], "active", "lapsed: {body}");
        proofs.insert(body["item"]["identityProof"]["challengeId"].to_string());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The samples above can miss a short lapse between them; the server's
    // own history cannot. Every change that carried a proof (the create,
    // the activation, each renewal) is in the audit trail with its time:
    // each must follow the one before within a lifetime, and the last must
    // still be within one now.
    let proved: Vec<i64> = orch
        .audit_events(&id)
        .await
        .iter()
        .filter(|e| e["payload"]["signer"].is_string())
        .map(|e| {
            peaqos_protocol::Timestamp::parse(e["created_at"].as_str().unwrap())
                .unwrap()
                .unix_millis()
        })
        .collect();
    let lifetime_ms = i64::try_from(lifetime.as_millis()).unwrap();
    for pair in proved.windows(2) {
        assert!(
            pair[1] - pair[0] < lifetime_ms,
            "a proof lapsed: renewed {} ms after the one before ({proved:?})",
            pair[1] - pair[0]
        );
    }
    let now = peaqos_protocol::Timestamp::now().unix_millis();
    assert!(now - proved.last().unwrap() < lifetime_ms, "{proved:?}");
    // Renewal at 7/12..2/3 of the lifetime: about 4.5 renewals in three lifetimes, and
    // no renewing in a loop either.
    assert!(
        proofs.len() >= 4,
        "renewed {} times in three lifetimes",
        proofs.len() - 1
    );
    assert!(
        proved.len() <= 10,
        "{} proofs in three lifetimes: renewing in a loop ({proved:?})",
        proved.len()
    );
    agent.stop(STOP).await;
}

#[tokio::test]
async fn expiry_during_downtime_is_repaired_at_start() {
    let lifetime = Duration::from_secs(1);
    let orch = Orchestrator::start(|c| c.proof_max_age = Some(lifetime)).await;
    let robot = Machine::new();
    orch.set_controllers(ID, &[robot.address()]);
    let (agent, id) = robot.start_active(&orch.url(), "").await;
    agent.stop(STOP).await;
    // The proof lapses while the agent is down.
    let deadline = tokio::time::Instant::now() + WAIT;
    while orch.machine(&id).await.1["item"]["status"] != "degraded" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the record never read degraded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut agent = robot.start(&orch.url(), "");
    agent.wait_state(AgentState::Active, WAIT).await;
    assert_eq!(orch.machine(&id).await.1["item"]["status"], "active");
    agent.stop(STOP).await;
}

#[tokio::test]
async fn a_removed_controller_is_reported_and_recovers_when_restored() {
    let orch = Orchestrator::start(|_| {}).await;
    let robot = Machine::new();
    let other = SecretKey::generate().unwrap().address();
    orch.set_controllers(ID, &[robot.address()]);
    let (mut agent, id) = robot.start_active(&orch.url(), "").await;

    orch.set_controllers(ID, &[other]);
    let lost = agent.wait_state(AgentState::NotController, WAIT).await;
    let error = lost.last_error.unwrap();
    assert_eq!(error.code, "MACHINE_IDENTITY_PROOF_INVALID");
    assert!(
        error.message.contains(&robot.address().checksummed()),
        "{}",
        error.message
    );
    assert!(
        error.message.contains(&other.checksummed()),
        "{}",
        error.message
    );

    orch.set_controllers(ID, &[other, robot.address()]);
    let back = agent.wait_state(AgentState::Active, WAIT).await;
    assert_eq!(back.machine_id.as_deref(), Some(id.as_str()));
    assert!(back.last_error.is_none());
    assert_eq!(orch.machine(&id).await.1["item"]["status"], "active");
    agent.stop(STOP).await;
}

#[tokio::test]
async fn an_orchestrator_outage_is_waited_out() {
    let mut orch = Orchestrator::start(|_| {}).await;
    let robot = Machine::new();
    orch.set_controllers(ID, &[robot.address()]);
    let (mut agent, id) = robot.start_active(&orch.url(), "").await;

    orch.stop().await;
    let down = agent.wait_state(AgentState::Backoff, WAIT).await;
    let mut failed_at = down.last_error.as_ref().unwrap().at;
    assert_eq!(down.last_error.unwrap().code, "NETWORK");
    assert!(down.next_attempt_at.is_some());
    // Still retrying (bounded backoff), never given up: two more attempts
    // fail, and the agent backs off again after each.
    for _ in 0..2 {
        let again = agent
            .wait_for("another failed attempt", WAIT, |s| {
                s.last_error.as_ref().is_some_and(|e| e.at > failed_at)
            })
            .await;
        let error = again.last_error.unwrap();
        assert_eq!(
            (again.state, error.code.as_str()),
            (AgentState::Backoff, "NETWORK")
        );
        failed_at = error.at;
    }

    orch.restart().await;
    let back = agent.wait_state(AgentState::Active, WAIT).await;
    assert_eq!(back.machine_id.as_deref(), Some(id.as_str()));
    agent.stop(STOP).await;
    assert_eq!(orch.machine_ids().await, vec![id]);
}

/// Issue #15 item 10: the real orchestrator's `GET /api/v1/readiness` ends
/// the wait as soon as it is back, where the backoff alone (here at least a
/// minute) kept the machine away.
#[tokio::test]
async fn a_returning_orchestrator_is_noticed_by_a_probe_not_after_the_backoff() {
    let mut orch = Orchestrator::start(|_| {}).await;
    let robot = Machine::new();
    orch.set_controllers(ID, &[robot.address()]);
    let (mut agent, id) = robot.start_active(
        &orch.url(),
        "[renewal]\nbackoff_initial = \"10m\"\nbackoff_max = \"1h\"\nprobe_interval = \"200ms\"\n",
    ).await;
    orch.stop().await;
    let down = agent.wait_state(AgentState::Backoff, WAIT).await;
    let failed = down.last_error.unwrap();
    assert_eq!(failed.code, "NETWORK");
    assert!(down.next_attempt_at.unwrap().millis_since(&failed.at) >= 59_000);
    orch.restart().await;
    let back = agent.wait_state(AgentState::Active, WAIT).await;
    assert_eq!(back.machine_id.as_deref(), Some(id.as_str()));
    agent.stop(STOP).await;
}

#[tokio::test]
async fn an_agent_started_while_the_orchestrator_is_down_registers_when_it_appears() {
    let mut orch = Orchestrator::start(|_| {}).await;
    let robot = Machine::new();
    orch.set_controllers(ID, &[robot.address()]);
    orch.stop().await;
    let mut agent = robot.start(&orch.url(), "");
    agent.wait_state(AgentState::Backoff, WAIT).await;
    orch.restart().await;
    agent.wait_state(AgentState::Active, WAIT).await;
    agent.stop(STOP).await;
}

#[tokio::test]
async fn an_mcr_outage_backs_off_and_nothing_is_written() {
    let robot = Machine::new();
    let mcr = FakeMcr::start("4242", robot.address()).await;
    let orch = Orchestrator::start(|c| {
        c.registry_file = None;
        c.mcr_api_url = Some(mcr.url());
        c.mcr_timeout = Duration::from_secs(1);
    })
    .await;
    mcr.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut agent = robot.start(&orch.url(), "");
    let waiting = agent
        .wait_for("identity unavailable", WAIT, |s| {
            s.last_error
                .as_ref()
                .is_some_and(|e| e.code == "PEAQOS_IDENTITY_UNAVAILABLE")
        })
        .await;
    assert_eq!(waiting.state, AgentState::Backoff);
    assert!(orch.machine_ids().await.is_empty());
    assert!(robot.machine_id().is_none());

    mcr.down.store(false, std::sync::atomic::Ordering::SeqCst);
    let active = agent.wait_state(AgentState::Active, WAIT).await;
    assert!(active.machine_id.is_some());
    agent.stop(STOP).await;
}

#[tokio::test]
async fn a_challenge_expiring_on_a_slow_link_is_retried_once_at_once() {
    let orch = Orchestrator::start(|c| c.challenge_ttl = Duration::from_secs(1)).await;
    let link = SlowLink::start(&orch.url(), Duration::from_millis(1500)).await;
    let robot = Machine::new();
    orch.set_controllers(ID, &[robot.address()]);
    // The first signed submission sits on the link past the challenge's TTL.
    link.hold_next_proofs
        .store(1, std::sync::atomic::Ordering::SeqCst);
    // A backoff would last at least 500 ms here, a slow retry 300 ms: the
    // recorder would see either. (This orchestrator purges expired
    // challenges within a second, so it may call the late one unknown
    // rather than expired; the agent tells the two apart by the clock.)
    let mut agent = robot.start(
        &link.url(),
        "[renewal]\nbackoff_initial = \"5s\"\nbackoff_max = \"5s\"\n",
    );
    let states = agent.record_states();
    agent.wait_state(AgentState::Active, WAIT).await;
    assert_eq!(link.count("POST", CHALLENGES), 2);
    assert_eq!(link.count("POST", "/api/v1/machines"), 2);
    let states = states.lock().unwrap().clone();
    assert!(
        !states.contains(&AgentState::Backoff) && !states.contains(&AgentState::NotController),
        "retried at once: {states:?}"
    );
    agent.stop(STOP).await;
}

#[tokio::test]
async fn a_wrong_key_is_never_activated_and_says_why() {
    let orch = Orchestrator::start(|_| {}).await;
    let owner = SecretKey::generate().unwrap().address();
    orch.set_controllers(ID, &[owner]);
    // The link counts the agent's requests.
    let link = SlowLink::start(&orch.url(), Duration::ZERO).await;
    let impostor = Machine::new();
    let mut agent = impostor.start(&link.url(), "");
    let refused = agent.wait_state(AgentState::NotController, WAIT).await;
    assert_eq!(
        refused.last_error.as_ref().unwrap().code,
        "MACHINE_IDENTITY_PROOF_INVALID"
    );
    // Retried slowly, still refused, nothing created: two more challenges
    // have been answered (the agent sees the controller list in each and
    // submits nothing).
    let tried = link.count("POST", CHALLENGES);
    link.wait_count("POST", CHALLENGES, tried + 2, WAIT).await;
    assert_eq!(link.count("POST", "/api/v1/machines"), 0);
    let still = agent.wait_state(AgentState::NotController, WAIT).await;
    assert_eq!(
        still.last_error.unwrap().code,
        "MACHINE_IDENTITY_PROOF_INVALID"
    );
    assert!(orch.machine_ids().await.is_empty());
    agent.stop(STOP).await;
}

#[tokio::test]
async fn an_unknown_identity_waits_for_an_operator() {
    let orch = Orchestrator::start(|_| {}).await;
    let robot = Machine::new();
    let mut agent = robot.start(&orch.url(), "");
    let waiting = agent.wait_state(AgentState::NotController, WAIT).await;
    assert_eq!(waiting.last_error.unwrap().code, "MACHINE_NOT_ACTIVATED");
    orch.set_controllers(ID, &[robot.address()]);
    agent.wait_state(AgentState::Active, WAIT).await;
    agent.stop(STOP).await;
}

#[tokio::test]
async fn an_operator_block_is_respected() {
    let orch = Orchestrator::start(|_| {}).await;
    let robot = Machine::new();
    orch.set_controllers(ID, &[robot.address()]);
    // The link counts the agent's requests.
    let link = SlowLink::start(&orch.url(), Duration::ZERO).await;
    let (mut agent, id) = robot.start_active(&link.url(), "").await;
    assert_eq!(
        orch.patch(&id, serde_json::json!({"status": "blocked"}))
            .await,
        200
    );
    agent.wait_state(AgentState::Blocked, WAIT).await;
    // A blocked record could be re-activated with a fresh proof; the agent
    // must not do it: two more checks of the record (every 300 ms) come
    // and go without a write.
    let record = format!("/api/v1/machines/{id}");
    let (reads, writes) = (link.count("GET", &record), link.count("PATCH", &record));
    link.wait_count("GET", &record, reads + 2, WAIT).await;
    assert_eq!(link.count("PATCH", &record), writes, "{:?}", link.seen);
    assert_eq!(orch.machine(&id).await.1["item"]["status"], "blocked");
    assert_eq!(agent.status.borrow().state, AgentState::Blocked);

    // The operator unblocks (back to `draft`, no proof needed); the agent
    // proves itself again and is active on the same record by itself.
    assert_eq!(
        orch.patch(&id, serde_json::json!({"status": "draft"}))
            .await,
        200
    );
    let back = agent.wait_state(AgentState::Active, WAIT).await;
    assert_eq!(back.machine_id.as_deref(), Some(id.as_str()));
    assert_eq!(orch.machine(&id).await.1["item"]["status"], "active");
    agent.stop(STOP).await;
}

/// Key compromise: the controller is removed, and the operator can still
/// block the machine (it answered 409 before: a block re-verified the
/// proof it withdraws). The agent reports the block instead of fighting it
/// with re-proofs; after the key is rotated on the machine and in the
/// controller data, the operator unblocks and the agent activates with its
/// new key.
#[tokio::test]
async fn a_compromised_key_is_blocked_rotated_and_unblocked() {
    let orch = Orchestrator::start(|_| {}).await;
    let mut robot = Machine::new();
    orch.set_controllers(ID, &[robot.address()]);
    let (mut agent, id) = robot.start_active(&orch.url(), "").await;

    orch.set_controllers(ID, &[]);
    assert_eq!(
        orch.patch(&id, serde_json::json!({"status": "blocked"}))
            .await,
        200,
        "an operator can block a machine whose controller is gone"
    );
    let blocked = agent.wait_state(AgentState::Blocked, WAIT).await;
    assert_eq!(
        blocked.record_status,
        Some(peaqos_protocol::MachineStatus::Blocked)
    );
    agent.stop(STOP).await;

    robot.rotate_key();
    orch.set_controllers(ID, &[robot.address()]);
    let mut agent = robot.start(&orch.url(), "");
    agent.wait_state(AgentState::Blocked, WAIT).await;
    assert_eq!(orch.machine(&id).await.1["item"]["status"], "blocked");

    assert_eq!(
        orch.patch(&id, serde_json::json!({"status": "draft"}))
            .await,
        200
    );
    let active = agent.wait_state(AgentState::Active, WAIT).await;
    assert_eq!(active.machine_id.as_deref(), Some(id.as_str()));
    let record = orch.machine(&id).await.1;
    assert_eq!(record["item"]["status"], "active");
    assert_eq!(
        record["item"]["identityProof"]["signerAddress"],
        robot.address().checksummed()
    );
    agent.stop(STOP).await;
}

#[tokio::test]
async fn the_api_key_comes_from_its_file() {
    let keys = tempfile::tempdir().unwrap();
    let keys_file = keys.path().join("api-keys");
    std::fs::write(&keys_file, "# fleet keys\nk-fleet-7-0123456789abcdef\n").unwrap();
    let orch = Orchestrator::start(|c| {
        c.require_api_auth = true;
        c.api_keys_file = Some(keys_file.clone());
    })
    .await;
    let robot = Machine::new();
    orch.set_controllers(ID, &[robot.address()]);

    let mut agent = robot.start(&orch.url(), "");
    let refused = agent
        .wait_for("auth refusal", WAIT, |s| s.last_error.is_some())
        .await;
    assert_eq!(refused.last_error.unwrap().code, "AUTH_REQUIRED");
    assert_eq!(refused.state, AgentState::Backoff);
    agent.stop(STOP).await;

    let secret = robot.dir.path().join("api-key");
    std::fs::write(&secret, "k-fleet-7-0123456789abcdef\n").unwrap();
    let drop_in = format!("[orchestrator]\napi_key_file = \"{}\"\n", secret.display());
    let mut agent = robot.start(&orch.url(), &drop_in);
    agent.wait_state(AgentState::Active, WAIT).await;
    agent.stop(STOP).await;
}
