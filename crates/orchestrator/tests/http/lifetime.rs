//! The proof-lifetime extension: a stored proof older than
//! `PEAQOS_PROOF_MAX_AGE_SECS` leaves its machine `degraded` until a fresh
//! proof restores it.

use std::time::Duration;

use peaqos_protocol::{ListResponse, Machine, MachineStatus};
use serde_json::json;

use crate::support::{TestServer, expect_error, expect_item, key};

const DAY: Duration = Duration::from_hours(24);

#[tokio::test]
async fn stale_proofs_degrade_and_a_fresh_proof_restores() {
    let s = TestServer::start(|c| c.proof_max_age = Some(DAY)).await;
    let k = key(0);
    let m = s.create_active("did:peaq:1", &k).await;
    let path = format!("/api/v1/machines/{}", m.id);
    let proof = m.identity_proof.clone().unwrap();
    assert_eq!(
        proof.expires_at,
        Some(proof.verified_at.saturating_add(DAY))
    );
    assert_eq!(m.status, MachineStatus::Active);

    s.clock.advance(DAY.saturating_sub(Duration::from_secs(1)));
    let still: Machine = expect_item(s.get(&path).await, 200).await;
    assert_eq!(still.status, MachineStatus::Active);

    s.clock.advance(Duration::from_secs(1));
    let degraded: Machine = expect_item(s.get(&path).await, 200).await;
    assert_eq!(degraded.status, MachineStatus::Degraded);
    assert_eq!(
        degraded.identity_proof.as_ref().unwrap().expires_at,
        proof.expires_at
    );
    let page: ListResponse<Machine> = s.get("/api/v1/machines").await.json().await.unwrap();
    assert_eq!(
        page.items[0].status,
        MachineStatus::Degraded,
        "lists show it degraded"
    );

    // Other updates still work; the machine stays degraded.
    let renamed: Machine =
        expect_item(s.patch(&path, &json!({"displayName": "R2"})).await, 200).await;
    assert_eq!(renamed.status, MachineStatus::Degraded);

    // Activation with the stale stored proof is refused...
    let e = expect_error(
        s.patch(&path, &json!({"status": "active"})).await,
        410,
        "MACHINE_IDENTITY_PROOF_EXPIRED",
    )
    .await;
    assert!(e.error.message.contains("fresh"), "{}", e.error.message);

    // ...and a fresh challenge plus PATCH {identityProof, status} restores it.
    let fresh = s.proof("did:peaq:1", &k).await;
    let restored: Machine = expect_item(
        s.patch(&path, &json!({"identityProof": fresh, "status": "active"}))
            .await,
        200,
    )
    .await;
    assert_eq!(restored.status, MachineStatus::Active);
    let new = restored.identity_proof.unwrap();
    assert_eq!(new.expires_at, Some(new.verified_at.saturating_add(DAY)));
    assert!(new.verified_at >= proof.verified_at.saturating_add(DAY));
}

#[tokio::test]
async fn drafts_and_blocked_machines_do_not_read_as_degraded() {
    let s = TestServer::start(|c| c.proof_max_age = Some(DAY)).await;
    let m = s.create("did:peaq:1", &key(0)).await;
    s.clock.advance(DAY * 2);
    let got: Machine = expect_item(s.get(&format!("/api/v1/machines/{}", m.id)).await, 200).await;
    assert_eq!(got.status, MachineStatus::Draft);
    // Activating a draft whose proof went stale needs a fresh proof too.
    expect_error(
        s.patch(
            &format!("/api/v1/machines/{}", m.id),
            &json!({"status": "active"}),
        )
        .await,
        410,
        "MACHINE_IDENTITY_PROOF_EXPIRED",
    )
    .await;
}

#[tokio::test]
async fn without_a_limit_proofs_never_expire() {
    let s = TestServer::start(|_| {}).await;
    let m = s.create_active("did:peaq:1", &key(0)).await;
    s.clock.advance(DAY * 3650);
    let got: Machine = expect_item(s.get(&format!("/api/v1/machines/{}", m.id)).await, 200).await;
    assert_eq!(got.status, MachineStatus::Active);
    assert_eq!(got.identity_proof.unwrap().expires_at, None);
}
