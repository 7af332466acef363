//! The machines & identity contract, endpoint by endpoint.

use peaqos_protocol::{Challenge, ChallengeMessage, Machine, MachineStatus};
use serde_json::json;

use crate::support::{TestServer, expect_error, expect_item, key, machine_body, sign};

#[tokio::test]
async fn challenge_create_get_patch_round_trip() {
    let s = TestServer::start(|_| {}).await;
    let k = key(0);

    // The alias is accepted and answered in canonical form.
    let c: Challenge = s.challenge("peaqos:machine:1").await;
    assert_eq!(c.identity_ref.canonical(), "did:peaq:1");
    assert_eq!(c.controller_addresses.len(), 1);
    assert_eq!(c.controller_addresses[0].checksummed(), k.address);
    let parsed = ChallengeMessage::parse(&c.message).expect("message in the shared format");
    assert_eq!(parsed.challenge_id, c.challenge_id);
    assert_eq!(parsed.identity.canonical(), "did:peaq:1");
    assert_eq!(parsed.expires_at, c.expires_at);

    let proof = json!({"challengeId": c.challenge_id, "signature": sign(&k, &c.message)});
    let r = s
        .post("/api/v1/machines", &machine_body("peaqos:machine:1", proof))
        .await;
    let m: Machine = expect_item(r, 201).await;
    assert!(m.id.starts_with("mach_"), "{}", m.id);
    assert_eq!(m.status, MachineStatus::Draft);
    assert_eq!(m.identity_ref.canonical(), "did:peaq:1");
    let p = m.identity_proof.as_ref().expect("proof stored");
    assert_eq!(p.signer_address.checksummed(), k.address);
    assert_eq!(p.challenge_id, c.challenge_id);
    assert_eq!(p.identity_ref.canonical(), "did:peaq:1");
    assert_eq!(p.challenge_expires_at, c.expires_at);
    assert_eq!(p.expires_at, None, "no proof age limit configured");

    let got: Machine = expect_item(s.get(&format!("/api/v1/machines/{}", m.id)).await, 200).await;
    assert_eq!(got, m);

    let r = s
        .patch(
            &format!("/api/v1/machines/{}", m.id),
            &json!({"status": "active", "displayName": "Robot One"}),
        )
        .await;
    let active: Machine = expect_item(r, 200).await;
    assert_eq!(active.status, MachineStatus::Active);
    assert_eq!(active.display_name, "Robot One");
    assert_eq!(
        active.identity_proof, m.identity_proof,
        "stored proof reused"
    );

    // The challenge was single use.
    let again = json!({"challengeId": c.challenge_id, "signature": sign(&k, &c.message)});
    let r = s
        .patch(
            &format!("/api/v1/machines/{}", m.id),
            &json!({"identityProof": again}),
        )
        .await;
    expect_error(r, 403, "MACHINE_IDENTITY_PROOF_INVALID").await;
}

#[tokio::test]
async fn address_form_identities_are_canonical_and_self_controlled() {
    let s = TestServer::start(|_| {}).await;
    let k = key(1);
    let upper = format!("did:peaq:0x{}", k.address[2..].to_uppercase());
    let canonical = format!("did:peaq:{}", k.address.to_lowercase());

    let c = s.challenge(&upper).await;
    assert_eq!(c.identity_ref.canonical(), canonical);
    let shown: Vec<String> = c
        .controller_addresses
        .iter()
        .map(peaqos_protocol::Address::checksummed)
        .collect();
    assert_eq!(
        shown,
        std::slice::from_ref(&k.address),
        "the DID's own address controls it"
    );

    let proof = json!({"challengeId": c.challenge_id, "signature": sign(&k, &c.message)});
    let m: Machine = expect_item(
        s.post("/api/v1/machines", &machine_body(&upper, proof))
            .await,
        201,
    )
    .await;
    assert_eq!(m.identity_ref.canonical(), canonical);
    assert_eq!(
        m.identity_proof.unwrap().identity_ref.canonical(),
        canonical
    );

    // Another key cannot prove control of someone else's address DID.
    let other = key(0);
    let c = s.challenge(&canonical).await;
    let proof = json!({"challengeId": c.challenge_id, "signature": sign(&other, &c.message)});
    let r = s
        .patch(
            &format!("/api/v1/machines/{}", m.id),
            &json!({"identityProof": proof}),
        )
        .await;
    expect_error(r, 403, "MACHINE_IDENTITY_PROOF_INVALID").await;
}

#[tokio::test]
async fn registry_may_add_controllers_to_an_address_did() {
    let k = crate::support::keys();
    let did = format!("did:peaq:{}", k[1].address.to_lowercase());
    let registry = crate::support::registry_toml(&[(did.as_str(), &[&k[2]])]);
    let s = TestServer::start_with_registry(&registry, |_| {}).await;
    let c = s.challenge(&did).await;
    let shown: Vec<String> = c
        .controller_addresses
        .iter()
        .map(peaqos_protocol::Address::checksummed)
        .collect();
    assert_eq!(shown, [k[1].address.clone(), k[2].address.clone()]);
    s.create(&did, &k[2]).await;
}

#[tokio::test]
async fn bad_identity_refs_are_validation_errors_naming_the_field() {
    let s = TestServer::start(|_| {}).await;
    let huge = format!("did:peaq:{}", "9".repeat(10_000));
    let bad = [
        json!("did:peaq:01"),
        json!("did:peaq:-1"),
        json!("did:key:z6Mk"),
        json!(""),
        json!(huge),
        json!("peaqos:machine:0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaed"),
        json!("did:peaq:0x1234"),
        json!("did:peaq:\u{0661}"),
        json!("did:peaq:1\u{0000}"),
        json!(7),
        json!(null),
        json!({"did": "did:peaq:1"}),
    ];
    for identity in &bad {
        let r = s
            .post(
                "/api/v1/machine-identity/challenges",
                &json!({"identityRef": identity}),
            )
            .await;
        let e = expect_error(r, 400, "VALIDATION_ERROR").await;
        assert_eq!(
            e.error.details.as_ref().unwrap()["field"],
            "identityRef",
            "{identity}"
        );
        assert!(
            e.error.message.len() < 400,
            "message stays short: {}",
            e.error.message
        );
        assert!(!e.error.message.contains("99999999999"), "input not echoed");

        let mut body = machine_body(
            "did:peaq:1",
            json!({"challengeId": "chl_x", "signature": "0x"}),
        );
        body["identityRef"] = identity.clone();
        let e = expect_error(
            s.post("/api/v1/machines", &body).await,
            400,
            "VALIDATION_ERROR",
        )
        .await;
        assert_eq!(
            e.error.details.as_ref().unwrap()["field"],
            "identityRef",
            "{identity}"
        );
    }
    let r = s
        .post("/api/v1/machine-identity/challenges", &json!({}))
        .await;
    let e = expect_error(r, 400, "VALIDATION_ERROR").await;
    assert_eq!(e.error.details.unwrap()["field"], "identityRef");
}

#[tokio::test]
async fn identities_without_controllers_are_not_activated() {
    let k = crate::support::keys();
    let registry = crate::support::registry_toml(&[("did:peaq:1", &[&k[0]]), ("did:peaq:5", &[])]);
    let s = TestServer::start_with_registry(&registry, |_| {}).await;
    for identity in ["did:peaq:999", "did:peaq:5"] {
        let r = s
            .post(
                "/api/v1/machine-identity/challenges",
                &json!({"identityRef": identity}),
            )
            .await;
        expect_error(r, 409, "MACHINE_NOT_ACTIVATED").await;
    }
}

#[tokio::test]
async fn one_machine_per_identity_until_archived() {
    let s = TestServer::start(|_| {}).await;
    let k = key(0);
    let first = s.create("did:peaq:1", &k).await;

    // Any spelling of the same identity is the same identity.
    let proof = s.proof("peaqos:machine:1", &k).await;
    let r = s
        .post(
            "/api/v1/machines",
            &machine_body("peaqos:machine:1", proof.clone()),
        )
        .await;
    let e = expect_error(r, 409, "MACHINE_IDENTITY_EXISTS").await;
    assert_eq!(e.error.details.unwrap()["machineId"], first.id.as_str());

    // The refused create did not burn its challenge.
    let r = s.delete(&format!("/api/v1/machines/{}", first.id)).await;
    assert_eq!(r.status(), 204);
    let second: Machine = expect_item(
        s.post("/api/v1/machines", &machine_body("did:peaq:1", proof))
            .await,
        201,
    )
    .await;
    assert_ne!(second.id, first.id);
}

#[tokio::test]
async fn create_requires_a_proof_and_valid_fields() {
    let s = TestServer::start(|_| {}).await;
    let mut body = machine_body("did:peaq:1", json!(null));
    body.as_object_mut().unwrap().remove("identityProof");
    let e = expect_error(
        s.post("/api/v1/machines", &body).await,
        400,
        "MACHINE_IDENTITY_PROOF_REQUIRED",
    )
    .await;
    assert_eq!(e.error.details.unwrap()["field"], "identityProof");

    let proof = s.proof("did:peaq:1", &key(0)).await;
    let cases = [
        ("displayName", json!(null), "displayName"),
        ("displayName", json!("   "), "displayName"),
        ("ownerId", json!(""), "ownerId"),
        ("machineType", json!(5), "machineType"),
        ("capabilities", json!(["ok", ""]), "capabilities[1]"),
        ("capabilities", json!("lidar"), "capabilities"),
        ("labels", json!({"k": 1}), "labels.k"),
        ("displayName", json!("x".repeat(201)), "displayName"),
    ];
    for (field, value, named) in cases {
        let mut body = machine_body("did:peaq:1", proof.clone());
        if value.is_null() {
            body.as_object_mut().unwrap().remove(field);
        } else {
            body[field] = value.clone();
        }
        let e = expect_error(
            s.post("/api/v1/machines", &body).await,
            400,
            "VALIDATION_ERROR",
        )
        .await;
        assert_eq!(
            e.error.details.unwrap()["field"],
            named,
            "{field} = {value}"
        );
    }

    // Nothing above was written, and the proof's challenge is still usable;
    // unknown fields are ignored (clients may be newer than servers).
    let mut body = machine_body("did:peaq:1", proof);
    body["fromTheFuture"] = json!({"x": 1});
    body["identityProof"]["alsoNew"] = json!(true);
    let m: Machine = expect_item(s.post("/api/v1/machines", &body).await, 201).await;
    assert_eq!(m.capabilities, ["lidar"]);
    assert_eq!(m.labels["site"], "berlin");
    assert!(m.policy_ids.is_empty() && m.skill_keys.is_empty());
}

#[tokio::test]
async fn proofs_are_checked_and_a_refused_proof_does_not_burn_its_challenge() {
    let s = TestServer::start(|c| c.challenge_ttl = std::time::Duration::from_mins(5)).await;
    let (k0, k1) = (key(0), key(1));
    let c = s.challenge("did:peaq:1").await;
    let good = sign(&k0, &c.message);
    let create = |proof| {
        let body = machine_body("did:peaq:1", proof);
        let s = &s;
        async move { s.post("/api/v1/machines", &body).await }
    };

    // Signed by a key that is not a controller of did:peaq:1.
    let wrong_signer = json!({"challengeId": c.challenge_id, "signature": sign(&k1, &c.message)});
    let e = expect_error(
        create(wrong_signer).await,
        403,
        "MACHINE_IDENTITY_PROOF_INVALID",
    )
    .await;
    assert!(e.error.message.contains(&k1.address), "{}", e.error.message);

    // A signature over another text.
    let other_text = json!({"challengeId": c.challenge_id, "signature": sign(&k0, "hello")});
    expect_error(
        create(other_text).await,
        403,
        "MACHINE_IDENTITY_PROOF_INVALID",
    )
    .await;

    // A challenge issued for another identity.
    let foreign = s.challenge("did:peaq:3").await;
    let p = json!({"challengeId": foreign.challenge_id, "signature": sign(&k0, &foreign.message)});
    expect_error(create(p).await, 403, "MACHINE_IDENTITY_PROOF_INVALID").await;

    // Unknown challenge ids of every shape.
    for id in [
        "chl_aaaaaaaaaaaaaaaaaaaaaaaaaa",
        "",
        "nope",
        &"x".repeat(5000),
    ] {
        let p = json!({"challengeId": id, "signature": good});
        expect_error(create(p).await, 403, "MACHINE_IDENTITY_PROOF_INVALID").await;
    }

    // v as 0/1 is accepted like 27/28: this is the same signature.
    let v = u8::from_str_radix(&good[130..], 16).unwrap() - 27;
    let zero_one = format!("{}{v:02x}", &good[..130]);
    let p = json!({"challengeId": c.challenge_id, "signature": zero_one});
    let m: Machine = expect_item(create(p).await, 201).await;
    assert_eq!(
        m.identity_proof.unwrap().signer_address.checksummed(),
        k0.address
    );
}

#[tokio::test]
async fn expired_challenges_are_refused_with_410() {
    let s = TestServer::start(|_| {}).await;
    let k = key(0);
    let c = s.challenge("did:peaq:1").await;
    let proof = json!({"challengeId": c.challenge_id, "signature": sign(&k, &c.message)});
    s.clock.advance(std::time::Duration::from_secs(301));
    let r = s
        .post("/api/v1/machines", &machine_body("did:peaq:1", proof))
        .await;
    let e = expect_error(r, 410, "MACHINE_IDENTITY_PROOF_EXPIRED").await;
    assert_eq!(
        e.error.details.unwrap()["field"],
        "identityProof.challengeId"
    );
}

#[tokio::test]
async fn reads_lists_and_updates_reverify_against_fresh_controllers() {
    let s = TestServer::start(|_| {}).await;
    let k = crate::support::keys();
    let m = s.create_active("did:peaq:1", &k[0]).await;
    let other = s.create_active("did:peaq:2", &k[1]).await;
    let path = format!("/api/v1/machines/{}", m.id);

    // The controller is removed from the registry: once the cache entry is
    // stale, reads and updates say the machine is not activated, and lists
    // leave it out.
    crate::support::write_registry(
        &s.registry,
        &crate::support::registry_toml(&[("did:peaq:1", &[&k[2]]), ("did:peaq:2", &[&k[1]])]),
    );
    let r = s.get(&path).await;
    assert_eq!(r.status(), 200, "cached controllers are fresh for the TTL");
    s.clock.advance(std::time::Duration::from_secs(11));
    let e = expect_error(s.get(&path).await, 409, "MACHINE_NOT_ACTIVATED").await;
    assert!(
        e.error.message.contains(&k[0].address),
        "{}",
        e.error.message
    );
    expect_error(
        s.patch(&path, &json!({"displayName": "x"})).await,
        409,
        "MACHINE_NOT_ACTIVATED",
    )
    .await;
    let page: peaqos_protocol::ListResponse<Machine> =
        s.get("/api/v1/machines").await.json().await.unwrap();
    let ids: Vec<&str> = page.items.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, [other.id.as_str()]);

    // The identity disappears from the registry entirely: same answer.
    crate::support::write_registry(
        &s.registry,
        &crate::support::registry_toml(&[("did:peaq:2", &[&k[1]])]),
    );
    s.clock.advance(std::time::Duration::from_secs(11));
    expect_error(s.get(&path).await, 409, "MACHINE_NOT_ACTIVATED").await;

    // Restored: the stored proof holds again, no new signature needed.
    crate::support::write_registry(
        &s.registry,
        &crate::support::registry_toml(&[("did:peaq:1", &[&k[0]]), ("did:peaq:2", &[&k[1]])]),
    );
    s.clock.advance(std::time::Duration::from_secs(11));
    let back: Machine = expect_item(s.get(&path).await, 200).await;
    assert_eq!(back.status, MachineStatus::Active);
}

#[tokio::test]
async fn a_registry_that_breaks_keeps_its_last_good_content() {
    let s = TestServer::start(|c| c.mcr_cache_ttl = std::time::Duration::ZERO).await;
    let m = s.create_active("did:peaq:1", &key(0)).await;
    crate::support::write_registry(
        &s.registry,
        "[identities]\n\"did:peaq:1\" = [\"0xnot an address\"]\n",
    );
    let got: Machine = expect_item(s.get(&format!("/api/v1/machines/{}", m.id)).await, 200).await;
    assert_eq!(got.status, MachineStatus::Active);
    crate::support::write_registry(&s.registry, "this is not toml");
    expect_item::<Machine>(s.get(&format!("/api/v1/machines/{}", m.id)).await, 200).await;
    std::fs::remove_file(&s.registry).unwrap();
    expect_item::<Machine>(s.get(&format!("/api/v1/machines/{}", m.id)).await, 200).await;
}

#[tokio::test]
async fn patch_rules() {
    let s = TestServer::start(|_| {}).await;
    let k = key(0);
    let m = s.create("did:peaq:1", &k).await;
    let path = format!("/api/v1/machines/{}", m.id);

    let e = expect_error(
        s.patch(&path, &json!({"identityRef": "did:peaq:2"})).await,
        409,
        "MACHINE_IDENTITY_IMMUTABLE",
    )
    .await;
    assert_eq!(e.error.details.unwrap()["field"], "identityRef");
    // The same identity in another spelling is not a change.
    let same: Machine = expect_item(
        s.patch(
            &path,
            &json!({"identityRef": "peaqos:machine:1", "labels": {"a": "b"}, "skillKeys": ["nav"]}),
        )
        .await,
        200,
    )
    .await;
    assert_eq!(same.labels.len(), 1, "labels are replaced, not merged");
    assert_eq!(same.skill_keys, ["nav"]);
    assert_eq!(same.display_name, m.display_name, "absent fields stay");
    assert!(same.updated_at >= m.updated_at);
    assert_eq!(same.created_at, m.created_at);

    for status in ["degraded", "archived", "retired"] {
        let e = expect_error(
            s.patch(&path, &json!({"status": status})).await,
            400,
            "VALIDATION_ERROR",
        )
        .await;
        assert_eq!(e.error.details.unwrap()["field"], "status", "{status}");
    }

    // blocked: `active` needs a fresh proof; `draft` (the operator's
    // unblock) needs none, and leaves the agent to prove itself again.
    let blocked: Machine =
        expect_item(s.patch(&path, &json!({"status": "blocked"})).await, 200).await;
    assert_eq!(blocked.status, MachineStatus::Blocked);
    expect_error(
        s.patch(&path, &json!({"status": "active"})).await,
        409,
        "MACHINE_NOT_ACTIVATED",
    )
    .await;
    let unblocked: Machine =
        expect_item(s.patch(&path, &json!({"status": "draft"})).await, 200).await;
    assert_eq!(unblocked.status, MachineStatus::Draft);
    expect_item::<Machine>(s.patch(&path, &json!({"status": "blocked"})).await, 200).await;
    let proof = s.proof("did:peaq:1", &k).await;
    let active: Machine = expect_item(
        s.patch(&path, &json!({"status": "active", "identityProof": proof}))
            .await,
        200,
    )
    .await;
    assert_eq!(active.status, MachineStatus::Active);
    assert_ne!(
        active.identity_proof.unwrap().challenge_id,
        m.identity_proof.unwrap().challenge_id,
        "a fresh proof replaces the stored one"
    );

    let back: Machine = expect_item(s.patch(&path, &json!({"status": "draft"})).await, 200).await;
    assert_eq!(back.status, MachineStatus::Draft);

    expect_error(
        s.patch(
            "/api/v1/machines/mach_aaaaaaaaaaaaaaaaaaaaaaaaaa",
            &json!({"displayName": "x"}),
        )
        .await,
        404,
        "NOT_FOUND",
    )
    .await;
    assert_eq!(s.delete(&path).await.status(), 204);
    expect_error(
        s.patch(&path, &json!({"displayName": "x"})).await,
        404,
        "NOT_FOUND",
    )
    .await;
}

#[tokio::test]
async fn a_fresh_proof_in_a_patch_replaces_the_stored_one() {
    let s = TestServer::start(|_| {}).await;
    let k = crate::support::keys();
    // did:peaq:3 has two controllers: keys 2 and 0.
    let m = s.create("did:peaq:3", &k[2]).await;
    s.clock.advance(std::time::Duration::from_secs(5));
    let proof = s.proof("did:peaq:3", &k[0]).await;
    let r = s
        .patch(
            &format!("/api/v1/machines/{}", m.id),
            &json!({"identityProof": proof}),
        )
        .await;
    let renewed: Machine = expect_item(r, 200).await;
    let (old, new) = (m.identity_proof.unwrap(), renewed.identity_proof.unwrap());
    assert_eq!(new.signer_address.checksummed(), k[0].address);
    assert!(new.verified_at > old.verified_at);
    assert_ne!(new.challenge_id, old.challenge_id);
    assert_eq!(
        renewed.status,
        MachineStatus::Draft,
        "a proof alone does not change status"
    );
}

#[tokio::test]
async fn archive_is_a_soft_delete_answering_204() {
    let s = TestServer::start(|_| {}).await;
    let m = s.create_active("did:peaq:1", &key(0)).await;
    let path = format!("/api/v1/machines/{}", m.id);
    // A bodyless DELETE that declares JSON, as some clients send it.
    let r = s
        .client
        .delete(s.url(&path))
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(r.bytes().await.unwrap().is_empty());
    let gone: Machine = expect_item(s.get(&path).await, 200).await;
    assert_eq!(gone.status, MachineStatus::Archived);
    let page: peaqos_protocol::ListResponse<Machine> =
        s.get("/api/v1/machines").await.json().await.unwrap();
    assert!(page.items.is_empty());
    assert_eq!(
        s.delete(&path).await.status(),
        204,
        "archiving twice is fine"
    );
    expect_error(
        s.delete("/api/v1/machines/mach_aaaaaaaaaaaaaaaaaaaaaaaaaa")
            .await,
        404,
        "NOT_FOUND",
    )
    .await;
    expect_error(
        s.get("/api/v1/machines/mach_aaaaaaaaaaaaaaaaaaaaaaaaaa")
            .await,
        404,
        "NOT_FOUND",
    )
    .await;
}

#[tokio::test]
async fn lists_page_with_opaque_cursors() {
    let k = crate::support::keys();
    let ids: Vec<String> = (10..17).map(|i| format!("did:peaq:{i}")).collect();
    let k0 = [&k[0]];
    let entries: Vec<(&str, &[&crate::support::Key])> =
        ids.iter().map(|i| (i.as_str(), &k0[..])).collect();
    let s = TestServer::start_with_registry(&crate::support::registry_toml(&entries), |_| {}).await;
    let mut created = Vec::new();
    for (n, identity) in ids.iter().enumerate() {
        let m = s.create(identity, &k[0]).await;
        if n % 2 == 0 {
            s.clock.advance(std::time::Duration::from_millis(1));
        }
        created.push((m.created_at, m.id));
    }
    // Keyset order: creation time, then id among machines of the same
    // millisecond.
    created.sort();
    let created: Vec<String> = created.into_iter().map(|(_, id)| id).collect();

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = Vec::new();
    loop {
        let q = match &cursor {
            None => "/api/v1/machines?limit=3".to_owned(),
            Some(c) => format!("/api/v1/machines?limit=3&cursor={c}"),
        };
        let r = s.get(&q).await;
        assert_eq!(r.status(), 200);
        let page: peaqos_protocol::ListResponse<Machine> = r.json().await.unwrap();
        pages.push(page.items.len());
        seen.extend(page.items.into_iter().map(|m| m.id));
        match page.next_cursor {
            Some(c) => {
                assert!(!c.contains("mach_"), "cursor is opaque");
                cursor = Some(c);
            }
            None => break,
        }
        assert!(pages.len() < 10, "pagination terminates");
    }
    assert_eq!(pages, [3, 3, 1]);
    assert_eq!(seen, created, "keyset order, each exactly once");

    let all: peaqos_protocol::ListResponse<Machine> =
        s.get("/api/v1/machines").await.json().await.unwrap();
    assert_eq!(all.items.len(), 7);
    assert_eq!(all.next_cursor, None);

    for q in ["limit=0", "limit=501", "limit=ten", "limit=-1", "limit="] {
        let e = expect_error(
            s.get(&format!("/api/v1/machines?{q}")).await,
            400,
            "VALIDATION_ERROR",
        )
        .await;
        assert_eq!(e.error.details.unwrap()["field"], "limit", "{q}");
    }
    for q in [
        "cursor=abc",
        "cursor=",
        "cursor=6d6163685f",
        &format!("cursor={}", "ab".repeat(500)),
    ] {
        let e = expect_error(
            s.get(&format!("/api/v1/machines?{q}")).await,
            400,
            "VALIDATION_ERROR",
        )
        .await;
        assert_eq!(e.error.details.unwrap()["field"], "cursor", "{q}");
    }
    let page: peaqos_protocol::ListResponse<Machine> = s
        .get("/api/v1/machines?limit=500&unknown=1")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page.items.len(), 7);
}

#[tokio::test]
async fn development_mode_accepts_writes_without_proofs_and_says_so() {
    let s = TestServer::start(|c| c.verification = peaqos_orchestrator::VerificationMode::Disabled)
        .await;
    let mut body = machine_body("did:peaq:77", json!(null));
    body.as_object_mut().unwrap().remove("identityProof");
    let r = s.post("/api/v1/machines", &body).await;
    assert_eq!(r.headers()["x-peaqos-identity-verification"], "disabled");
    let m: Machine = expect_item(r, 201).await;
    assert!(m.identity_proof.is_none());
    let page: peaqos_protocol::ListResponse<Machine> =
        s.get("/api/v1/machines").await.json().await.unwrap();
    assert!(
        page.items.is_empty(),
        "drafts without a proof are not listed"
    );
    let active: Machine = expect_item(
        s.patch(
            &format!("/api/v1/machines/{}", m.id),
            &json!({"status": "active"}),
        )
        .await,
        200,
    )
    .await;
    assert_eq!(active.status, MachineStatus::Active);
    let page: peaqos_protocol::ListResponse<Machine> =
        s.get("/api/v1/machines").await.json().await.unwrap();
    assert_eq!(page.items.len(), 1);
    // A supplied proof is still verified.
    let c = s.challenge("did:peaq:1").await;
    let p = json!({"challengeId": c.challenge_id, "signature": sign(&key(1), &c.message)});
    expect_error(
        s.post("/api/v1/machines", &machine_body("did:peaq:1", p))
            .await,
        403,
        "MACHINE_IDENTITY_PROOF_INVALID",
    )
    .await;
}

#[tokio::test]
async fn health_readiness_errors_and_dates() {
    let s = TestServer::start(|_| {}).await;
    let r = s.get("/health").await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers().contains_key("date"),
        "clients measure clock skew from Date"
    );
    assert!(r.headers().contains_key("x-request-id"));
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap(),
        json!({"ok": true})
    );
    let ready: serde_json::Value = s.get("/ready").await.json().await.unwrap();
    assert_eq!(ready["ok"], true);
    assert_eq!(ready["controllerSource"], "registry");

    expect_error(s.get("/api/v1/nothing-here").await, 404, "NOT_FOUND").await;
    expect_error(s.get("/nothing-here").await, 404, "NOT_FOUND").await;
    // The root leads to the fleet console.
    let r = s.get("/").await;
    assert_eq!(r.url().path(), "/console");
    let r = s
        .client
        .put(s.url("/api/v1/machines"))
        .send()
        .await
        .unwrap();
    expect_error(r, 405, "METHOD_NOT_ALLOWED").await;
    let r = s.client.post(s.url("/health")).send().await.unwrap();
    expect_error(r, 405, "METHOD_NOT_ALLOWED").await;
    let r = s
        .client
        .get(s.url("/api/v1/machine-identity/challenges"))
        .send()
        .await
        .unwrap();
    expect_error(r, 405, "METHOD_NOT_ALLOWED").await;

    // Errors carry a Date header too.
    let r = s
        .get("/api/v1/machines/mach_aaaaaaaaaaaaaaaaaaaaaaaaaa")
        .await;
    assert!(r.headers().contains_key("date"));
}

#[tokio::test]
async fn graceful_stop_returns_ok() {
    let s = TestServer::start(|_| {}).await;
    s.create("did:peaq:1", &key(0)).await;
    s.stop().await.unwrap();
}

/// A PATCH that changes nothing (no body, `{}`, only `null`s) is refused
/// and writes nothing: `updatedAt` stays and no audit event is recorded.
#[tokio::test]
async fn a_patch_without_fields_is_refused_and_writes_nothing() {
    let s = TestServer::start(|_| {}).await;
    let m = s.create("did:peaq:1", &key(0)).await;
    let path = format!("/api/v1/machines/{}", m.id);
    let log = format!("/api/v1/audit-events?machineId={}", m.id);
    let before: serde_json::Value = s.get(&log).await.json().await.unwrap();
    s.clock.advance(std::time::Duration::from_secs(5));
    let bodyless = s.client.patch(s.url(&path)).send().await.unwrap();
    let as_json = s
        .client
        .patch(s.url(&path))
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    for r in [
        bodyless,
        as_json,
        s.patch(&path, &json!({})).await,
        s.patch(&path, &json!({"displayName": null, "labels": null}))
            .await,
    ] {
        let e = expect_error(r, 400, "VALIDATION_ERROR").await;
        assert_eq!(e.error.details.unwrap()["field"], "body");
        assert!(
            e.error.message.contains("at least one field"),
            "{}",
            e.error.message
        );
    }
    let after: Machine = expect_item(s.get(&path).await, 200).await;
    assert_eq!(after.updated_at, m.updated_at, "updatedAt did not move");
    let log_after: serde_json::Value = s.get(&log).await.json().await.unwrap();
    assert_eq!(log_after["items"], before["items"], "no event was written");
}
