//! Single-use challenges and one machine per identity under concurrent
//! requests, on a file database (WAL, separate read and write connections)
//! and on PostgreSQL when one is reachable.

use std::sync::Arc;

use peaqos_protocol::Machine;
use serde_json::json;

use crate::pg::PgSchema;
use crate::support::{TestServer, expect_item, key, machine_body};

/// A server on a SQLite file and, when one is reachable, a server on
/// PostgreSQL (with the schema that outlives it).
async fn servers(test: &str) -> Vec<(Arc<TestServer>, Option<PgSchema>)> {
    let file = TestServer::start(|c| c.database_url = crate::support::FILE_DB.into()).await;
    let mut out = vec![(Arc::new(file), None)];
    if let Some(schema) = PgSchema::create(test).await {
        let url = schema.url.clone();
        let pg = TestServer::start(move |c| c.database_url = url).await;
        out.push((Arc::new(pg), Some(schema)));
    }
    out
}

#[tokio::test]
async fn a_challenge_wins_once_however_many_submit_it() {
    for (s, _schema) in servers("a_challenge_wins_once_however_many_submit_it").await {
        a_challenge_wins_once(s).await;
    }
}

async fn a_challenge_wins_once(s: Arc<TestServer>) {
    let k = key(0);
    let m = s.create("did:peaq:1", &k).await;
    let proof = s.proof("did:peaq:1", &k).await;
    let path = format!("/api/v1/machines/{}", m.id);
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (s, path, proof) = (Arc::clone(&s), path.clone(), proof.clone());
            tokio::spawn(async move {
                s.patch(&path, &json!({"identityProof": proof, "status": "active"}))
                    .await
                    .status()
                    .as_u16()
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    statuses.sort_unstable();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        1,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 403),
        "{statuses:?}"
    );
}

#[tokio::test]
async fn concurrent_creates_of_one_identity_make_one_machine_and_burn_no_loser() {
    let test = "concurrent_creates_of_one_identity_make_one_machine_and_burn_no_loser";
    for (s, _schema) in servers(test).await {
        concurrent_creates_make_one_machine(s).await;
    }
}

async fn concurrent_creates_make_one_machine(s: Arc<TestServer>) {
    let k = key(0);
    let mut proofs = Vec::new();
    for _ in 0..8 {
        proofs.push(s.proof("did:peaq:1", &k).await);
    }
    let tasks: Vec<_> = proofs
        .iter()
        .map(|p| {
            let (s, body) = (Arc::clone(&s), machine_body("did:peaq:1", p.clone()));
            tokio::spawn(async move {
                let r = s.post("/api/v1/machines", &body).await;
                let status = r.status().as_u16();
                (status, r.json::<serde_json::Value>().await.unwrap())
            })
        })
        .collect();
    let mut winner = None;
    let mut losers = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let (status, body) = t.await.unwrap();
        match status {
            201 => {
                assert!(winner.is_none(), "two machines for one identity");
                winner = Some(body["item"]["id"].as_str().unwrap().to_owned());
            }
            409 => {
                assert_eq!(body["error"]["code"], "MACHINE_IDENTITY_EXISTS");
                losers.push(i);
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    let winner = winner.expect("one create wins");
    // Every loser's challenge is still unused: it can renew the winner.
    for i in losers {
        let r = s
            .patch(
                &format!("/api/v1/machines/{winner}"),
                &json!({"identityProof": proofs[i]}),
            )
            .await;
        expect_item::<Machine>(r, 200).await;
    }
}
