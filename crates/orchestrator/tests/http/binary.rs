//! The `peaqos-orchestrator` binary: start-up errors are one line naming
//! the setting, and SIGTERM lets in-flight requests finish.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use serde_json::json;
use tokio::sync::Notify;

use crate::support::{TIMEOUT, key};

const BIN: &str = env!("CARGO_BIN_EXE_peaqos-orchestrator");

fn run_with(env: &[(&str, &str)], args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .env_clear()
        .envs(env.iter().copied())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_settings_stop_start_up_with_one_line_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/o.db", dir.path().display());
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("PEAQOS_CHALLENGE_TTL_SECS", "five")],
            "PEAQOS_CHALLENGE_TTL_SECS",
        ),
        (
            &[("PEAQOS_LISTEN_ADDR", "everywhere")],
            "PEAQOS_LISTEN_ADDR",
        ),
        (
            &[("PEAQOS_MACHINE_IDENTITY_VERIFICATION", "off")],
            "PEAQOS_MACHINE_IDENTITY_VERIFICATION",
        ),
        (
            &[("PEAQOS_REQUIRE_API_AUTH", "true")],
            "PEAQOS_API_KEYS_FILE",
        ),
        (&[("DATABASE_URL", "mysql://x/db")], "DATABASE_URL"),
        (
            &[("PEAQOS_DB_STATEMENT_TIMEOUT_MS", "soon")],
            "PEAQOS_DB_STATEMENT_TIMEOUT_MS",
        ),
    ];
    for (env, setting) in cases {
        let (code, stderr) = run_with(env, &[]);
        assert_eq!(code, 2, "{env:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(setting), "{stderr}");
    }

    // Errors found while starting (files) name the setting and the file.
    let missing = dir.path().join("missing.toml");
    let port = peaqos_testkit::free_port().to_string();
    let addr = format!("127.0.0.1:{port}");
    let (code, stderr) = run_with(
        &[
            ("DATABASE_URL", &db),
            ("PEAQOS_LISTEN_ADDR", &addr),
            ("PEAQOS_MCR_REGISTRY_FILE", missing.to_str().unwrap()),
            ("RUST_LOG", "off"),
        ],
        &[],
    );
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("PEAQOS_MCR_REGISTRY_FILE") && stderr.contains("missing.toml"),
        "{stderr}"
    );

    // A database that cannot be reached: one line naming the setting, and
    // neither the password nor a wait longer than the acquire timeout.
    let closed = peaqos_testkit::free_port();
    let url = format!("postgres://fleet:s3cret@127.0.0.1:{closed}/fleet");
    let started = std::time::Instant::now();
    let (code, stderr) = run_with(
        &[
            ("DATABASE_URL", &url),
            ("PEAQOS_DB_ACQUIRE_TIMEOUT_MS", "300"),
            ("PEAQOS_LISTEN_ADDR", &addr),
            ("RUST_LOG", "off"),
        ],
        &[],
    );
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("DATABASE_URL"), "{stderr}");
    assert!(!stderr.contains("s3cret"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(10));

    let file = dir.path().join("orchestrator.toml");
    std::fs::write(&file, "challenge_ttl_secs = 60\nproof_max_age = 5\n").unwrap();
    let (code, stderr) = run_with(&[], &["--config", file.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("line 2") && stderr.contains("proof_max_age"),
        "{stderr}"
    );
}

#[derive(Clone)]
struct Slow {
    arrived: Arc<Notify>,
    owner: String,
}

async fn slow_profile(State(s): State<Slow>) -> axum::Json<serde_json::Value> {
    s.arrived.notify_one();
    tokio::time::sleep(Duration::from_millis(500)).await;
    axum::Json(json!({"schema_version": "1.0", "name": "x",
        "peaqos": {"machine_id": "1", "did": "did:peaq:1", "owner": s.owner}}))
}

#[tokio::test]
async fn sigterm_lets_in_flight_requests_finish() {
    let arrived = Arc::new(Notify::new());
    let app = axum::Router::new()
        .route("/machine/{did}", axum::routing::get(slow_profile))
        .with_state(Slow {
            arrived: arrived.clone(),
            owner: key(0).address,
        });
    let mcr = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mcr_url = format!("http://{}", mcr.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(mcr, app).await.unwrap() });

    let dir = tempfile::tempdir().unwrap();
    let port = peaqos_testkit::free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut child = tokio::process::Command::new(BIN)
        .env_clear()
        .env("PEAQOS_LISTEN_ADDR", addr.to_string())
        .env(
            "DATABASE_URL",
            format!("sqlite://{}/o.db", dir.path().display()),
        )
        .env("PEAQOS_MCR_API_URL", &mcr_url)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    assert!(
        tokio::task::spawn_blocking(move || peaqos_testkit::wait_for_port(addr, TIMEOUT))
            .await
            .unwrap(),
        "the binary listens"
    );
    peaqos_orchestrator::install_crypto_provider();
    let client = reqwest::Client::builder().timeout(TIMEOUT).build().unwrap();
    let in_flight = tokio::spawn(async move {
        client
            .post(format!("http://{addr}/api/v1/machine-identity/challenges"))
            .json(&json!({"identityRef": "did:peaq:1"}))
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    tokio::time::timeout(TIMEOUT, arrived.notified())
        .await
        .expect("request reached the MCR");
    let pid = rustix::process::Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    assert_eq!(
        in_flight.await.unwrap().unwrap(),
        201,
        "the in-flight request finished"
    );
    let status = tokio::time::timeout(TIMEOUT, child.wait())
        .await
        .expect("exits")
        .unwrap();
    assert!(status.success(), "{status:?}");
}
