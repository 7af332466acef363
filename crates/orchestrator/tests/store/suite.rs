//! What every store guarantees, run against each database.

use std::sync::Arc;

use peaqos_orchestrator::store::{MachineRecord, PageKey, StoreError, StoredStatus};
use peaqos_protocol::{Address, MachineIdentityProof, ProofMethod, ResolutionSource};

use crate::{consume, databases, identity, machine, ts};

#[tokio::test]
async fn challenges_are_redeemed_once_and_redemptions_collected() {
    for db in databases("challenges_are_redeemed_once_and_redemptions_collected").await {
        let (store, name) = (&db.store, db.name);
        let now = 1_000_000;
        // Expired at the time of the write: nothing is redeemed or written.
        let m = machine("mach_a", "did:peaq:1", 1);
        assert!(
            matches!(
                store
                    .insert_machine(&m, consume("chl_0", now, now), None)
                    .await,
                Err(StoreError::ChallengeGone)
            ),
            "{name}"
        );
        assert_eq!(store.get_machine("mach_a").await.unwrap(), None, "{name}");
        store
            .insert_machine(&m, consume("chl_0", 1_300_000, now), None)
            .await
            .unwrap();
        // Redeemed: a second write with it is refused, and writes nothing.
        let mut m2 = m.clone();
        m2.display_name = "renamed".into();
        assert!(
            matches!(
                store
                    .update_machine(&m2, consume("chl_0", 1_300_000, now), None)
                    .await,
                Err(StoreError::ChallengeGone)
            ),
            "{name}"
        );
        let stored = store.get_machine("mach_a").await.unwrap().unwrap();
        assert_eq!(stored.display_name, "Robot", "{name}");

        // A failed write leaves the challenge unredeemed.
        let clash = machine("mach_b", "did:peaq:1", 2);
        assert!(
            matches!(
                store.insert_machine(&clash, consume("chl_1", 1_300_000, now), None).await,
                Err(StoreError::IdentityTaken { machine_id }) if machine_id == "mach_a"
            ),
            "{name}"
        );
        // So does an update of a machine that is no longer live.
        store.archive_machine("mach_a", ts(3), None).await.unwrap();
        assert!(
            !store
                .update_machine(&m2, consume("chl_1", 1_300_000, now), None)
                .await
                .unwrap(),
            "{name}"
        );
        // Both times given back: it redeems now, once.
        let again = machine("mach_c", "did:peaq:1", 4);
        store
            .insert_machine(&again, consume("chl_1", 1_300_000, now), None)
            .await
            .unwrap();
        let other = machine("mach_d", "did:peaq:2", 5);
        assert!(
            matches!(
                store
                    .insert_machine(&other, consume("chl_1", 1_300_000, now), None)
                    .await,
                Err(StoreError::ChallengeGone)
            ),
            "{name}"
        );

        assert_eq!(
            store
                .delete_expired_redemptions(ts(1_299_999))
                .await
                .unwrap(),
            0,
            "{name}"
        );
        assert_eq!(
            store
                .delete_expired_redemptions(ts(1_300_000))
                .await
                .unwrap(),
            2,
            "{name}"
        );
    }
}

#[tokio::test]
async fn the_challenge_key_is_the_first_one_offered() {
    for db in databases("the_challenge_key_is_the_first_one_offered").await {
        let (store, name) = (&db.store, db.name);
        let first = store.challenge_key([1; 32]).await.unwrap();
        assert_eq!(first, [1; 32], "{name}");
        assert_eq!(
            store.challenge_key([2; 32]).await.unwrap(),
            [1; 32],
            "{name}"
        );
    }
}

#[tokio::test]
async fn machines_page_in_keyset_order_and_archive_releases_identity() {
    for db in databases("machines_page_in_keyset_order_and_archive_releases_identity").await {
        let (store, name) = (&db.store, db.name);
        for (i, created) in [(0, 5), (1, 3), (2, 5), (3, 1)] {
            let m = machine(&format!("mach_{i}"), &format!("did:peaq:{i}"), created);
            store.insert_machine(&m, None, None).await.unwrap();
        }
        let page = async |after: Option<&PageKey>| {
            store
                .list_machines(after, 2)
                .await
                .unwrap()
                .into_iter()
                .map(|m| m.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(page(None).await, ["mach_3", "mach_1"], "{name}");
        let key = PageKey {
            created_at_ms: 3,
            id: "mach_1".into(),
        };
        assert_eq!(page(Some(&key)).await, ["mach_0", "mach_2"], "{name}");

        assert_eq!(
            store.archive_machine("mach_0", ts(9), None).await.unwrap(),
            Some(true),
            "{name}"
        );
        assert_eq!(
            store.archive_machine("mach_0", ts(9), None).await.unwrap(),
            Some(false),
            "{name}"
        );
        assert_eq!(
            store.archive_machine("mach_x", ts(9), None).await.unwrap(),
            None,
            "{name}"
        );
        assert_eq!(page(Some(&key)).await, ["mach_2"], "{name}");
        let archived = store.get_machine("mach_0").await.unwrap().unwrap();
        assert_eq!(archived.status, StoredStatus::Archived, "{name}");
        assert_eq!(archived.updated_at, ts(9), "{name}");
        assert!(
            !store.update_machine(&archived, None, None).await.unwrap(),
            "{name}: archived is final"
        );
        let zero = identity("did:peaq:0");
        assert_eq!(store.live_machine_for(&zero).await.unwrap(), None, "{name}");
        store
            .insert_machine(&machine("mach_5", "did:peaq:0", 10), None, None)
            .await
            .unwrap();
        assert_eq!(
            store.live_machine_for(&zero).await.unwrap().as_deref(),
            Some("mach_5"),
            "{name}"
        );
    }
}

fn full_record() -> MachineRecord {
    let mut m = machine(
        "mach_full",
        "did:peaq:0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaed",
        7,
    );
    m.status = StoredStatus::Active;
    m.labels
        .insert("zone".into(), "ünïcödé 🚀 \"quoted\"".into());
    m.policy_ids = vec!["p1".into(), "p2".into()];
    m.proof = Some(MachineIdentityProof {
        method: ProofMethod::Eip191,
        identity_ref: m.identity.clone(),
        signer_address: Address::from_bytes([7; 20]),
        challenge_id: "chl_x".into(),
        verified_at: ts(1_764_089_659_123),
        challenge_expires_at: ts(1_764_089_959_123),
        controller_addresses: vec![Address::from_bytes([7; 20]), Address::from_bytes([8; 20])],
        resolution_source: ResolutionSource::PeaqosMcr,
        expires_at: None,
    });
    m.updated_at = ts(1_764_089_659_999);
    m
}

#[tokio::test]
async fn records_round_trip_every_field() {
    for db in databases("records_round_trip_every_field").await {
        let (store, name) = (&db.store, db.name);
        let m = full_record();
        store.insert_machine(&m, None, None).await.unwrap();
        assert_eq!(
            store.get_machine(&m.id).await.unwrap().as_ref(),
            Some(&m),
            "{name}"
        );
        let mut changed = m.clone();
        changed.status = StoredStatus::Blocked;
        changed.proof = None;
        changed.capabilities.clear();
        changed.updated_at = ts(1_764_089_700_000);
        assert!(
            store.update_machine(&changed, None, None).await.unwrap(),
            "{name}"
        );
        assert_eq!(
            store.get_machine(&m.id).await.unwrap().as_ref(),
            Some(&changed),
            "{name}"
        );
        assert_eq!(
            store.list_machines(None, 10).await.unwrap(),
            [changed],
            "{name}"
        );
    }
}

#[tokio::test]
async fn one_challenge_one_winner_however_many_submit_it() {
    for db in databases("one_challenge_one_winner_however_many_submit_it").await {
        let name = db.name;
        let store = Arc::clone(&db.store);
        let m = machine("mach_a", "did:peaq:1", 1);
        store.insert_machine(&m, None, None).await.unwrap();
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let store = Arc::clone(&store);
                let mut m = m.clone();
                tokio::spawn(async move {
                    m.display_name = format!("writer {i}");
                    let result = store
                        .update_machine(&m, consume("chl_race", 9_000_000, 1_000), None)
                        .await;
                    (i, result)
                })
            })
            .collect();
        let mut winners = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                (i, Ok(true)) => winners.push(i),
                (_, Err(StoreError::ChallengeGone)) => {}
                (_, other) => panic!("{name}: {other:?}"),
            }
        }
        assert_eq!(winners.len(), 1, "{name}: {winners:?}");
        let stored = store.get_machine("mach_a").await.unwrap().unwrap();
        assert_eq!(
            stored.display_name,
            format!("writer {}", winners[0]),
            "{name}: the winner's write, nobody else's"
        );
    }
}

#[tokio::test]
async fn one_live_machine_per_identity_under_concurrent_creates() {
    for db in databases("one_live_machine_per_identity_under_concurrent_creates").await {
        let name = db.name;
        let store = Arc::clone(&db.store);
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    let m = machine(&format!("mach_{i}"), "did:peaq:1", 1);
                    let id = format!("chl_{i}");
                    (
                        i,
                        store
                            .insert_machine(&m, consume(&id, 9_000_000, 1_000), None)
                            .await,
                    )
                })
            })
            .collect();
        let mut winner = None;
        let mut losers = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                (i, Ok(())) => {
                    assert!(winner.is_none(), "{name}: two machines for one identity");
                    winner = Some(i);
                }
                (i, Err(StoreError::IdentityTaken { machine_id })) => losers.push((i, machine_id)),
                (_, other) => panic!("{name}: {other:?}"),
            }
        }
        let winner = winner.unwrap_or_else(|| panic!("{name}: nobody won"));
        assert_eq!(losers.len(), 7, "{name}");
        let held = store
            .get_machine(&format!("mach_{winner}"))
            .await
            .unwrap()
            .unwrap();
        for (i, named) in losers {
            assert_eq!(named, format!("mach_{winner}"), "{name}: names the holder");
            // A loser's challenge is not burnt: it still redeems.
            let id = format!("chl_{i}");
            assert!(
                store
                    .update_machine(&held, consume(&id, 9_000_000, 1_000), None)
                    .await
                    .unwrap(),
                "{name}: {id}"
            );
        }
        let id = format!("chl_{winner}");
        assert!(
            matches!(
                store
                    .update_machine(&held, consume(&id, 9_000_000, 1_000), None)
                    .await,
                Err(StoreError::ChallengeGone)
            ),
            "{name}"
        );
    }
}

#[tokio::test]
async fn paging_visits_every_live_machine_once_in_order() {
    for db in databases("paging_visits_every_live_machine_once_in_order").await {
        let (store, name) = (&db.store, db.name);
        let mut expected = Vec::new();
        // Ties on created_at are broken by id.
        for i in 0..250_i64 {
            let m = machine(
                &format!("mach_{i:03}"),
                &format!("did:peaq:{i}"),
                1_000 + i / 7,
            );
            store.insert_machine(&m, None, None).await.unwrap();
            if i % 5 == 0 {
                store.archive_machine(&m.id, ts(5_000), None).await.unwrap();
            } else {
                expected.push(m.id);
            }
        }
        let mut seen = Vec::new();
        let mut after: Option<PageKey> = None;
        loop {
            let page = store.list_machines(after.as_ref(), 37).await.unwrap();
            seen.extend(page.iter().map(|m| m.id.clone()));
            let Some(last) = page.last() else { break };
            after = Some(PageKey {
                created_at_ms: last.created_at.unix_millis(),
                id: last.id.clone(),
            });
            if page.len() < 37 {
                break;
            }
        }
        assert_eq!(seen, expected, "{name}");
    }
}

/// The store is usable through `Arc<dyn Store>` and says what it is.
#[tokio::test]
async fn stores_name_their_backend_and_answer_pings() {
    for db in databases("stores_name_their_backend_and_answer_pings").await {
        db.store.ping().await.unwrap();
        let expected = if db.name == "postgres" {
            "postgres"
        } else {
            "sqlite"
        };
        assert_eq!(db.store.backend().name(), expected);
        db.store.close().await;
    }
}
