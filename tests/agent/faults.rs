//! The registration loop against an orchestrator that misbehaves on
//! purpose (see `support::fake`): rate limits with Retry-After,
//! challenges that expire in transit, challenge texts that are not
//! challenges, operators blocking the record, a server that stalls.

use std::time::Duration;

use crate::support::fake::{Fake, Fault};
use crate::support::{FAST_RENEWAL, config, config_text, start, stored_machine_id, write_key};
use peaqos_agent::status::AgentState;
use peaqos_protocol::{MachineStatus, Timestamp};

const ID: &str = "did:peaq:4242";
const WAIT: Duration = Duration::from_secs(10);

struct Setup {
    fake: Fake,
    dir: tempfile::TempDir,
    key_path: std::path::PathBuf,
}

async fn setup() -> Setup {
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (key, key_path) = write_key(dir.path(), "controller");
    fake.set_controllers(ID, &[key.address()]);
    Setup {
        fake,
        dir,
        key_path,
    }
}

impl Setup {
    fn config(&self) -> peaqos_agent::config::Config {
        config(
            &self.fake.url(),
            ID,
            &self.key_path,
            &self.dir.path().join("state"),
            FAST_RENEWAL,
        )
    }

    /// The configuration with a drop-in `extra` and `renewal` settings.
    fn config_with(&self, extra: &str, renewal: &str) -> peaqos_agent::config::Config {
        let main = config_text(
            &self.fake.url(),
            ID,
            &self.key_path,
            &self.dir.path().join("state"),
            renewal,
        );
        peaqos_agent::config::Config::from_texts(vec![
            ("agent.toml".into(), main),
            ("agent.d/50-test.toml".into(), extra.to_owned()),
        ])
        .unwrap()
    }
}

#[tokio::test]
async fn registers_activates_and_remembers_its_record() {
    let s = setup().await;
    let mut agent = start(s.config());
    let active = agent.wait_state(AgentState::Active, WAIT).await;
    let id = active.machine_id.clone().unwrap();
    let m = s.fake.machine(&id).unwrap();
    assert_eq!(m.status, MachineStatus::Active);
    assert_eq!(m.display_name, "test robot");
    assert_eq!(m.labels.get("site").map(String::as_str), Some("lab"));
    assert_eq!(active.record_status, Some(MachineStatus::Active));
    assert!(active.proof_verified_at.is_some());
    assert!(active.clock_skew_ms.is_some());
    assert_eq!(stored_machine_id(&s.dir.path().join("state")), Some(id));
    let c = &s.fake.lock().counters;
    assert_eq!((c.creates, c.challenges), (1, 1), "{c:?}");
    drop(agent);
}

/// Issue #15 item 10: after an outage the agent used to wait out its
/// backoff (up to `backoff_max`, 5 minutes by default). Cheap probes now
/// notice the orchestrator is back; this fake has no readiness or health
/// route, and a 404 there is enough to show it answers again.
#[tokio::test]
async fn a_probe_ends_the_backoff_once_an_orchestrator_without_health_routes_answers() {
    let s = setup().await;
    s.fake.lock().fault = Some(Fault {
        status: 503,
        code: "SERVICE_UNAVAILABLE",
        retry_after: None,
    });
    // Without probes the next attempt would come after a minute at least
    // (the jitter's floor is a tenth of backoff_initial).
    let config = s.config_with(
        "[renewal]\nbackoff_initial = \"10m\"\nbackoff_max = \"1h\"\nprobe_interval = \"100ms\"\n",
        FAST_RENEWAL,
    );
    let mut agent = start(config);
    let waiting = agent.wait_state(AgentState::Backoff, WAIT).await;
    let failed = waiting.last_error.unwrap();
    let next = waiting.next_attempt_at.unwrap();
    assert!(next.millis_since(&failed.at) >= 59_000);
    // Probes come and find it still down (503 on every route); they are
    // not cycles (no new failure is recorded).
    let before = s.fake.lock().counters.requests;
    s.fake
        .wait_until("two probes", WAIT, |c| c.requests >= before + 2)
        .await;
    let now = agent.status.borrow().clone();
    assert_eq!(now.state, AgentState::Backoff);
    assert_eq!(now.last_error.unwrap().at, failed.at, "a probe ran a cycle");
    s.fake.lock().fault = None;
    agent.wait_state(AgentState::Active, WAIT).await;
    agent.stop(Duration::from_secs(2)).await;
}

/// An overloaded orchestrator asks for time: `Retry-After` (or a 429) is
/// obeyed in full, with no probes in between.
#[tokio::test]
async fn no_probes_while_the_orchestrator_asked_to_wait() {
    let s = setup().await;
    s.fake.lock().fault = Some(Fault {
        status: 503,
        code: "SERVICE_UNAVAILABLE",
        retry_after: Some(2),
    });
    let config = s.config_with("[renewal]\nprobe_interval = \"50ms\"\n", FAST_RENEWAL);
    let agent = start(config);
    s.fake
        .wait_until("two attempts", WAIT, |c| c.requests >= 2)
        .await;
    // Every request is a cycle's first (the challenge), two seconds apart:
    // a probe would have come 50 ms after the first.
    let gap = {
        let c = &s.fake.lock().counters;
        c.arrivals[1] - c.arrivals[0]
    };
    assert!(gap >= Duration::from_millis(1950), "{gap:?}");
    agent.stop(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn rate_limit_retry_after_is_honoured_without_spinning() {
    let s = setup().await;
    s.fake.lock().fault = Some(Fault {
        status: 429,
        code: "RATE_LIMITED",
        retry_after: Some(1),
    });
    let mut agent = start(s.config());
    let waiting = agent.wait_state(AgentState::Backoff, WAIT).await;
    let error = waiting.last_error.as_ref().unwrap();
    assert_eq!(error.code, "RATE_LIMITED");
    let next = waiting.next_attempt_at.unwrap();
    assert!(
        next.millis_since(&error.at) >= 950,
        "next attempt {next} should honour Retry-After: 1 (failed at {})",
        error.at
    );
    // backoff_max is 400 ms, but the server asked for a second: no retry
    // comes sooner. (Lower bounds: a slow machine only lengthens the gaps.)
    s.fake
        .wait_until("two retries", WAIT, |c| c.requests >= 3)
        .await;
    let arrivals = s.fake.lock().counters.arrivals.clone();
    for pair in arrivals.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(950),
            "retried after {gap:?} despite Retry-After: 1"
        );
    }
    s.fake.lock().fault = None;
    agent.wait_state(AgentState::Active, WAIT).await;
    agent.stop(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn a_challenge_that_expires_in_transit_is_retried_at_once() {
    let s = setup().await;
    s.fake.lock().expire_next = 1;
    let mut agent = start(s.config());
    let states = agent.record_states();
    agent.wait_state(AgentState::Active, WAIT).await;
    let c = &s.fake.lock().counters;
    assert_eq!((c.challenges, c.creates), (2, 2), "{c:?}");
    let states = states.lock().unwrap().clone();
    assert!(
        !states.contains(&AgentState::Backoff),
        "retried at once: {states:?}"
    );
}

#[tokio::test]
async fn two_expired_challenges_in_a_row_back_off_then_recover() {
    let s = setup().await;
    s.fake.lock().expire_next = 2;
    let mut agent = start(s.config());
    let waiting = agent
        .wait_for("backoff after expiry", WAIT, |st| {
            st.last_error
                .as_ref()
                .is_some_and(|e| e.code == "MACHINE_IDENTITY_PROOF_EXPIRED")
        })
        .await;
    assert_eq!(waiting.state, AgentState::Backoff);
    agent.wait_state(AgentState::Active, WAIT).await;
    assert_eq!(s.fake.lock().counters.challenges, 3);
}

#[tokio::test]
async fn text_that_is_not_a_challenge_is_never_signed() {
    let s = setup().await;
    s.fake.lock().hostile_message = true;
    let mut agent = start(s.config());
    let refused = agent
        .wait_for("refusal", WAIT, |st| st.last_error.is_some())
        .await;
    let error = refused.last_error.unwrap();
    assert_eq!(error.code, "BAD_CHALLENGE");
    assert!(error.message.contains("typed-data"), "{}", error.message);
    assert_eq!(refused.state, AgentState::ChallengeRefused);
    // Slow retries keep refusing: by the third challenge two whole cycles
    // have ended, and nothing was ever submitted.
    s.fake
        .wait_until("two more challenges", WAIT, |c| c.challenges >= 3)
        .await;
    let c = &s.fake.lock().counters;
    assert_eq!((c.creates, c.patches, c.signed_hostile), (0, 0, 0), "{c:?}");
}

/// An orchestrator other than ours chooses its own challenge text: the
/// default policy signs it, `strict` refuses it, and a refusal waits
/// `slow_retry` rather than asking for a challenge at backoff speed.
#[tokio::test]
async fn server_chosen_challenge_text_is_signed_by_default_only() {
    let s = setup().await;
    s.fake.lock().foreign_message = Some("Sign this nonce: {nonce}".into());
    let mut strict = start(s.config_with(
        "[orchestrator]\nchallenge_policy = \"strict\"",
        "[renewal]\ncheck_interval = \"300ms\"\nbackoff_initial = \"50ms\"\nbackoff_max = \"50ms\"\nslow_retry = \"5s\"",
    ));
    let refused = strict.wait_state(AgentState::ChallengeRefused, WAIT).await;
    let error = refused.last_error.as_ref().unwrap();
    assert!(error.message.contains("rule format"), "{}", error.message);
    // The next attempt is planned slow_retry (5 s) ahead, not at backoff
    // speed (50 ms): read from the plan the agent publishes with the state,
    // rather than by watching a quiet window go by.
    let planned = refused.next_attempt_at.expect("a planned next attempt");
    let now = peaqos_protocol::Timestamp::now();
    let ahead = planned.unix_millis().saturating_sub(now.unix_millis());
    assert!(ahead >= 4_000, "next attempt in {ahead} ms, not slow_retry");
    {
        let c = &s.fake.lock().counters;
        assert_eq!((c.creates, c.patches), (0, 0), "{c:?}");
    }
    strict.stop(Duration::from_secs(2)).await;

    let mut standard = start(s.config());
    standard.wait_state(AgentState::Active, WAIT).await;
    standard.stop(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn blocked_and_archived_records_are_reported_not_fought() {
    let s = setup().await;
    let mut agent = start(s.config());
    let id = agent
        .wait_state(AgentState::Active, WAIT)
        .await
        .machine_id
        .unwrap();
    s.fake.set_status(&id, MachineStatus::Blocked);
    let blocked = agent.wait_state(AgentState::Blocked, WAIT).await;
    assert_eq!(blocked.record_status, Some(MachineStatus::Blocked));
    let (patches, gets) = {
        let c = &s.fake.lock().counters;
        (c.patches, c.gets)
    };
    let answer = agent.reregister(WAIT).await;
    assert!(answer.unwrap_err().contains("blocked"));
    // Two more checks of the record (every 300 ms) have come and gone.
    s.fake
        .wait_until("two more reads", WAIT, |c| c.gets >= gets + 2)
        .await;
    assert_eq!(
        s.fake.lock().counters.patches,
        patches,
        "no PATCH against an operator"
    );
    assert_eq!(s.fake.machine(&id).unwrap().status, MachineStatus::Blocked);

    s.fake.set_status(&id, MachineStatus::Archived);
    agent.wait_state(AgentState::Archived, WAIT).await;
    // The operator restores the record: the agent carries on.
    s.fake.set_status(&id, MachineStatus::Active);
    agent.wait_state(AgentState::Active, WAIT).await;
    agent.stop(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn a_taken_back_record_that_is_blocked_is_left_alone() {
    let s = setup().await;
    let mut agent = start(s.config());
    let id = agent
        .wait_state(AgentState::Active, WAIT)
        .await
        .machine_id
        .unwrap();
    agent.stop(Duration::from_secs(2)).await;
    s.fake.set_status(&id, MachineStatus::Blocked);
    std::fs::remove_file(s.dir.path().join("state/state.json")).unwrap();
    let mut agent = start(s.config());
    let blocked = agent.wait_state(AgentState::Blocked, WAIT).await;
    assert_eq!(blocked.machine_id.as_deref(), Some(id.as_str()));
    assert_eq!(s.fake.lock().counters.patches_with_proof, 0);
    assert_eq!(s.fake.machine(&id).unwrap().status, MachineStatus::Blocked);
}

#[tokio::test]
async fn reregister_renews_the_proof_now() {
    let s = setup().await;
    let mut agent = start(s.config());
    let first = agent.wait_state(AgentState::Active, WAIT).await;
    let before = first.proof_verified_at.unwrap();
    // A renewal within the same millisecond would carry the same time.
    while Timestamp::now() <= before {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    agent.reregister(WAIT).await.unwrap();
    let after = agent
        .wait_for("a newer proof", WAIT, |st| {
            st.proof_verified_at.is_some_and(|t| t > before)
        })
        .await;
    assert_eq!(after.machine_id, first.machine_id);
    assert_eq!(s.fake.lock().counters.patches_with_proof, 1);
}

#[tokio::test]
async fn shutdown_abandons_a_stalled_request_promptly() {
    let s = setup().await;
    let mut agent = start(s.config());
    agent.wait_state(AgentState::Active, WAIT).await;
    let state_file = s.dir.path().join("state/state.json");
    let saved = std::fs::read(&state_file).unwrap();
    // The server now takes 30 s per answer; the agent is mid-request.
    s.fake.lock().delay = Duration::from_secs(30);
    let requests = s.fake.lock().counters.requests;
    agent.reregister_nowait();
    s.fake
        .wait_until("the stalled request", WAIT, |c| c.requests > requests)
        .await;
    let last = agent.stop(Duration::from_secs(1)).await;
    assert_eq!(last.state, AgentState::Stopping);
    assert_eq!(std::fs::read(&state_file).unwrap(), saved, "state intact");
}
