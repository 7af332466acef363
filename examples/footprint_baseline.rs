//! The floor under the agent's footprint, for `cargo xtask footprint`: the
//! agent's runtime and client stack doing the least an agent does. tokio
//! (current thread), reqwest over rustls/ring, rumqttc, built as an example
//! of `peaqos-agent` with the same profile, so with the same crate versions:
//! one GET of the orchestrator's `/health`, an MQTT client created (never
//! connected), then nothing until SIGTERM. What the agent takes beyond this
//! is its own.
//!
//! ```sh
//! cargo run --profile minsize --example footprint_baseline -- http://127.0.0.1:8080/health
//! ```

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

/// Printed on stderr once `/health` has answered; `cargo xtask footprint`
/// (crates/xtask/src/footprint.rs) waits for this text.
const READY: &str = "footprint_baseline: idle until SIGTERM";

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let url = std::env::args()
        .nth(1)
        .context("usage: footprint_baseline URL (the orchestrator's /health)")?;
    // As the agent does: reqwest is built without a crypto provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .build()
        .context("cannot build the HTTP client")?;
    let response = client
        .get(&url)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .with_context(|| format!("GET {url}"))?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .with_context(|| format!("GET {url}: reading the body"))?;
    let (_mqtt, _eventloop) = rumqttc::AsyncClient::new(
        rumqttc::MqttOptions::new("footprint-baseline", "127.0.0.1", 1883),
        10,
    );
    // When it had answered, for the time from exec to a first answer.
    let answered = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut terminate = signal(SignalKind::terminate()).context("cannot catch SIGTERM")?;
    eprintln!(
        "{READY} (GET {url}: {status}, {} bytes; answered_at={}.{:09})",
        body.len(),
        answered.as_secs(),
        answered.subsec_nanos()
    );
    terminate.recv().await;
    Ok(())
}
