//! A fleet's life against the contract double, with the real binary.

use std::time::{Duration, Instant};

use peaqos_protocol::{Address, SecretKey};

use crate::agent::{AgentProcess, Device, poll};
use crate::double::{Double, Endpoint, Quirks, Record, StaleVerdict};

const ID: &str = "did:peaq:4242";
const WAIT: Duration = Duration::from_secs(15);
/// `slow_retry` in [`crate::agent::RENEWAL`].
const SLOW_RETRY: Duration = Duration::from_secs(1);

/// Our identity's records on the server.
fn ours(double: &Double) -> Vec<Record> {
    double
        .records()
        .into_iter()
        .filter(|r| r.identity == ID)
        .collect()
}

/// Waits until the server holds exactly one record for our identity,
/// active and proved by `device`'s key (other than `not`), the state file
/// names it, and the agent has said `active` since `mark`.
async fn until_active(
    double: &Double,
    device: &Device,
    agent: &mut AgentProcess,
    mark: usize,
    not: Option<&str>,
) -> Record {
    let line = agent.wait_line(mark, "state=active", WAIT).await;
    let record = poll(
        "one active record proved by our key, named in the state file",
        WAIT,
        || {
            let records = ours(double);
            let [r] = records.as_slice() else {
                return None;
            };
            let good = r.status == "active"
                && r.signer() == Some(device.address())
                && Some(r.id.as_str()) != not
                && device.stored_machine_id().as_deref() == Some(r.id.as_str());
            good.then(|| r.clone())
        },
        || format!("records: {:#?}\nlog:\n{}", ours(double), agent.log()),
    )
    .await;
    assert!(line >= mark);
    record
}

/// Waits until the agent has read the record `n` more times: time passing
/// for the agent, counted in its own steps rather than slept through.
pub(crate) async fn reads_later(double: &Double, agent: &AgentProcess, n: usize) {
    let from = double.count(Endpoint::GetMachine);
    poll(
        &format!("{n} more reads of the record"),
        WAIT,
        || (double.count(Endpoint::GetMachine) >= from + n).then_some(()),
        || agent.log(),
    )
    .await;
}

async fn start(quirks: Quirks) -> (Double, Device, AgentProcess) {
    let double = Double::start(quirks).await;
    let device = Device::new(ID);
    double.set_controllers(ID, &[device.address()]);
    let config = device.write_config(&double.url(), "", "");
    let agent = device.run(&config, &[]);
    (double, device, agent)
}

/// Watches three more attempts (each one request to `endpoint`): they come
/// at `slow_retry`, not at backoff speed.
async fn assert_slow_retries(double: &Double, agent: &AgentProcess, endpoint: Endpoint) {
    let mut seen = vec![(Instant::now(), double.count(endpoint))];
    while seen.len() < 4 {
        let (_, last) = *seen.last().unwrap();
        let next = poll(
            "another slow retry",
            WAIT,
            || {
                let n = double.count(endpoint);
                (n > last).then_some(n)
            },
            || agent.log(),
        )
        .await;
        assert_eq!(next, last + 1, "one {endpoint:?} per attempt");
        seen.push((Instant::now(), next));
    }
    // The first gap may have started mid-wait.
    for pair in seen[1..].windows(2) {
        let gap = pair[1].0 - pair[0].0;
        assert!(
            gap >= SLOW_RETRY.mul_f64(0.8),
            "retried after {gap:?}, expected about {SLOW_RETRY:?}\n{}",
            agent.log()
        );
    }
}

fn other_address() -> Address {
    SecretKey::generate().unwrap().address()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_with_a_foreign_challenge_text_and_stays_active() {
    let (double, device, mut agent) = start(Quirks::default()).await;
    let record = until_active(&double, &device, &mut agent, 0, None).await;
    assert_eq!(record.display_name, "contract robot");
    assert_eq!(record.owner_id, "fleet-1");
    assert_eq!(record.labels["site"], "hall-3");
    assert_eq!(double.count(Endpoint::CreateChallenge), 1);
    assert_eq!(double.count(Endpoint::CreateMachine), 1);
    assert_eq!(double.proofs_accepted(), 1);

    // Several checks later: still active, nothing re-proved, no probe of
    // routes the contract does not have, nothing worth a warning.
    reads_later(&double, &agent, 4).await;
    assert_eq!(ours(&double)[0].status, "active");
    assert_eq!(
        double.count(Endpoint::CreateChallenge),
        1,
        "{}",
        agent.log()
    );
    assert_eq!(double.count(Endpoint::Other), 0, "{}", agent.log());
    let log = agent.stop().await;
    assert!(!log.contains(" WARN "), "{log}");
    assert!(!log.contains(" ERROR "), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_degraded_record_is_proved_again_with_one_challenge() {
    let (double, device, mut agent) = start(Quirks::default()).await;
    let first = until_active(&double, &device, &mut agent, 0, None).await;
    let mark = agent.mark();
    double.set_status(&first.id, "degraded");
    let renewed = poll(
        "the record active again with a new proof",
        WAIT,
        || {
            let r = double.record(&first.id)?;
            (r.status == "active" && r.proof_challenge() != first.proof_challenge()).then_some(r)
        },
        || agent.log(),
    )
    .await;
    assert_eq!(renewed.id, first.id, "same record, not a new one");
    agent.wait_line(mark, "state=active", WAIT).await;
    reads_later(&double, &agent, 3).await;
    assert_eq!(
        double.count(Endpoint::CreateChallenge),
        2,
        "{}",
        agent.log()
    );
    assert_eq!(double.count(Endpoint::CreateMachine), 1);
    assert_eq!(ours(&double).len(), 1);
    agent.stop().await;
}

/// Proofs that expire without the server ever saying when: the agent can
/// only learn it from the server's verdict on a read, and must renew then.
async fn expiry_without_expires_at(verdict: StaleVerdict) {
    let quirks = Quirks {
        proof_max_age: Some(Duration::from_millis(1200)),
        stale_verdict: verdict,
        ..Quirks::default()
    };
    let (double, device, mut agent) = start(quirks).await;
    let first = until_active(&double, &device, &mut agent, 0, None).await;
    // Two renewals, each forced by the server's verdict.
    poll(
        "two renewals",
        WAIT,
        || (double.proofs_accepted() >= 3).then_some(()),
        || agent.log(),
    )
    .await;
    let records = ours(&double);
    assert_eq!(records.len(), 1, "renewed in place: {records:#?}");
    assert_eq!(records[0].id, first.id);
    assert_eq!(
        device.stored_machine_id().as_deref(),
        Some(first.id.as_str())
    );
    assert_eq!(double.count(Endpoint::CreateMachine), 1);
    // Every challenge but one still in flight became an accepted proof.
    let (challenges, proofs) = (
        double.count(Endpoint::CreateChallenge),
        double.proofs_accepted(),
    );
    assert!(
        challenges <= proofs + 1,
        "{challenges} challenges for {proofs} proofs\n{}",
        agent.log()
    );
    // And the renewals kept the record active: it reads active again.
    poll(
        "the record active after renewals",
        WAIT,
        || (double.record(&first.id)?.status == "active").then_some(()),
        || agent.log(),
    )
    .await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proof_expiry_answered_410_is_renewed() {
    expiry_without_expires_at(StaleVerdict::ProofExpired).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proof_expiry_answered_not_activated_is_renewed() {
    expiry_without_expires_at(StaleVerdict::NotActivated).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proof_expiry_read_as_degraded_is_renewed() {
    expiry_without_expires_at(StaleVerdict::Degraded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_server_lost_is_registered_again() {
    let (double, device, mut agent) = start(Quirks::default()).await;
    let first = until_active(&double, &device, &mut agent, 0, None).await;
    let mark = agent.mark();
    double.lose(&first.id);
    let second = until_active(&double, &device, &mut agent, mark, Some(&first.id)).await;
    assert_ne!(second.id, first.id);
    assert_eq!(double.count(Endpoint::CreateMachine), 2);
    assert_eq!(
        double.count(Endpoint::CreateChallenge),
        2,
        "{}",
        agent.log()
    );
    assert_eq!(double.count(Endpoint::ListMachines), 0);
    agent.stop().await;
}

/// The state file is lost; the server answers `MACHINE_IDENTITY_EXISTS`
/// (with or without naming the record) and the agent takes its record back,
/// paging through `GET /machines` when it is not named.
async fn lost_state(exists_details: bool) {
    let quirks = Quirks {
        exists_details,
        max_page: 2,
        ..Quirks::default()
    };
    let double = Double::start(quirks).await;
    // Neighbours listed before our record: it is on the second page.
    for n in 1..=3 {
        double.add_other_machine(&format!("did:peaq:{n}"), other_address());
    }
    let device = Device::new(ID);
    double.set_controllers(ID, &[device.address()]);
    let config = device.write_config(&double.url(), "", "");
    let mut agent = device.run(&config, &[]);
    let first = until_active(&double, &device, &mut agent, 0, None).await;
    agent.stop().await;

    std::fs::remove_file(device.state_file()).unwrap();
    let challenges = double.count(Endpoint::CreateChallenge);
    let mut agent = device.run(&config, &[]);
    let back = until_active(&double, &device, &mut agent, 0, None).await;
    assert_eq!(back.id, first.id, "took its record back");
    assert_ne!(
        back.proof_challenge(),
        first.proof_challenge(),
        "with a fresh proof"
    );
    assert_eq!(double.records().len(), 4, "no second record");
    // One challenge for the create that met the existing record, one for
    // the proof that took it back.
    assert_eq!(
        double.count(Endpoint::CreateChallenge) - challenges,
        2,
        "{}",
        agent.log()
    );
    let listed = double.count(Endpoint::ListMachines);
    if exists_details {
        assert_eq!(listed, 0, "the error named the record");
    } else {
        assert!(listed >= 2, "paged to the second page: {listed} pages");
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_state_file_finds_the_record_through_the_list() {
    lost_state(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_state_file_uses_the_record_an_exists_error_names() {
    lost_state(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_waited_out_without_new_proofs() {
    let (double, device, mut agent) = start(Quirks::default()).await;
    let first = until_active(&double, &device, &mut agent, 0, None).await;
    let mark = agent.mark();
    double.set_down(true);
    let down_line = agent.wait_line(mark, "state=backoff", WAIT).await;
    poll(
        "a few retries into the outage",
        WAIT,
        || (double.refused() >= 3).then_some(()),
        || agent.log(),
    )
    .await;
    double.set_down(false);
    agent.wait_line(down_line, "state=active", WAIT).await;
    let after = until_active(&double, &device, &mut agent, down_line, None).await;
    assert_eq!(after.id, first.id);
    assert_eq!(
        double.count(Endpoint::CreateChallenge),
        1,
        "{}",
        agent.log()
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_controller_is_reported_retried_slowly_and_recovers() {
    let (double, device, mut agent) = start(Quirks::default()).await;
    let first = until_active(&double, &device, &mut agent, 0, None).await;
    let mark = agent.mark();
    double.set_controllers(ID, &[other_address()]);
    agent.wait_line(mark, "state=not_controller", WAIT).await;

    // Each attempt costs one challenge, refused by the agent itself.
    assert_slow_retries(&double, &agent, Endpoint::CreateChallenge).await;
    assert_eq!(
        double.record(&first.id).unwrap().signer(),
        Some(device.address())
    );

    let challenges = double.count(Endpoint::CreateChallenge);
    let mark = agent.mark();
    double.set_controllers(ID, &[device.address(), other_address()]);
    let back = until_active(&double, &device, &mut agent, mark, None).await;
    assert_eq!(back.id, first.id);
    // Its stored proof is good again; at most the attempt in flight asked
    // for a challenge.
    assert!(
        double.count(Endpoint::CreateChallenge) <= challenges + 1,
        "{}",
        agent.log()
    );
    agent.stop().await;
}

/// A refusal of the record's fields, under a status our orchestrator does
/// not use for it (422): the operator's problem, retried slowly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_validation_error_as_422_is_retried_slowly_and_reported() {
    let quirks = Quirks {
        refused_machine_type: Some("amr"),
        ..Quirks::default()
    };
    let (double, _device, mut agent) = start(quirks).await;
    agent
        .wait_line(0, "error_code=VALIDATION_ERROR", WAIT)
        .await;
    assert_slow_retries(&double, &agent, Endpoint::CreateMachine).await;
    assert!(double.records().is_empty());
    assert_eq!(double.proofs_accepted(), 0);
    agent.stop().await;
}
