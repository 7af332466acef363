//! Which rustls-webpki verifies the agent's TLS peers. rumqttc 0.25.1 links
//! rustls-webpki 0.102.8 (RUSTSEC-2026-0049, -0098, -0099, -0104) next to
//! the 0.103 that rustls 0.23 uses; deny.toml's exception for 0.102 rests
//! on these tests.
//!
//! The witness is RUSTSEC-2026-0099: a CA constrained to
//! `accept.example.com` that issues a certificate also naming
//! `*.example.com`. rustls-webpki 0.102.8 accepts that chain (the first
//! test calls it directly); 0.103.17 refuses it with
//! `NameConstraintViolation`. The orchestrator connection (reqwest) and the
//! broker connection (rumqttc) both refuse it, so neither verifies with
//! 0.102. The same CA issuing for `accept.example.com` alone is accepted on
//! both, so it is the wildcard, not the set-up, that is refused.

use std::sync::Arc;
use std::time::Duration;

use peaqos_agent::mqtt::{self, MqttConfig};
use rcgen::ExtendedKeyUsagePurpose;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::ServerCertVerifier;
use tokio_rustls::rustls::pki_types::{ServerName, UnixTime};

use crate::agent::Device;
use crate::double::{Double, Endpoint, Quirks};
use crate::tls::{Ca, served, server_config_for, toml_path, write};

const ID: &str = "did:peaq:4545";
const WAIT: Duration = Duration::from_secs(15);
const PERMITTED: &str = "accept.example.com";
/// Beyond the CA's constraint: it also matches `reject.example.com`.
const WILDCARD: &str = "*.example.com";

/// A server's TLS side with a certificate from `ca` for `names`.
fn server(ca: &Ca, names: &[&str]) -> Arc<rustls::ServerConfig> {
    let (cert, key) = ca.leaf(names, ExtendedKeyUsagePurpose::ServerAuth);
    server_config_for(&cert, &key, None)
}

fn constrained_ca() -> Ca {
    Ca::constrained("fleet CA for accept.example.com only", &[PERMITTED])
}

/// rustls 0.23's certificate verifier (rustls-webpki 0.103) trusting `ca`
/// alone: the one src/tls.rs configures for both connections.
fn rustls_verifier(ca: &Ca) -> Arc<rustls::client::WebPkiServerVerifier> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der()).unwrap();
    rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap()
}

#[test]
fn webpki_0102_accepts_the_wildcard_beyond_the_name_constraint_and_rustls_refuses_it() {
    let ca = constrained_ca();
    let (leaf, _key) = ca.leaf(
        &["127.0.0.1", WILDCARD],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let ca_der = ca.der();
    let leaf_der = leaf.der().clone();
    let server_name = ServerName::try_from("127.0.0.1").unwrap();

    // rustls-webpki 0.102.8, as rumqttc links it: the chain passes.
    let anchor = webpki_0102::anchor_from_trusted_cert(&ca_der).unwrap();
    let end_entity = webpki_0102::EndEntityCert::try_from(&leaf_der).unwrap();
    end_entity
        .verify_for_usage(
            webpki_0102::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[],
            UnixTime::now(),
            webpki_0102::KeyUsage::server_auth(),
            None,
            None,
        )
        .expect("rustls-webpki 0.102.8 accepts the wildcard (RUSTSEC-2026-0099)");
    end_entity
        .verify_is_valid_for_subject_name(&server_name)
        .unwrap();

    // rustls 0.23's verifier (rustls-webpki 0.103), which src/tls.rs
    // configures for both connections: refused.
    let err = rustls_verifier(&ca)
        .verify_server_cert(&leaf_der, &[], &server_name, &[], UnixTime::now())
        .unwrap_err();
    assert!(
        format!("{err:?}").contains("NameConstraintViolation"),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orchestrator_connection_refuses_the_certificate_0102_accepts() {
    let ca = constrained_ca();
    let device = Device::new(ID);
    let ca_file = write(device.dir.path(), "orchestrator-ca.pem", &ca.pem());
    let extra = format!("ca_file = \"{}\"", toml_path(&ca_file));

    // Within the constraint: served.
    let good = Double::start_tls(Quirks::default(), server(&ca, &["127.0.0.1", PERMITTED])).await;
    good.set_controllers(ID, &[device.address()]);
    let agent = device.run(&device.write_config(&good.url(), &extra, ""), &[]);
    served(&good, &agent).await;
    agent.stop().await;

    // Beyond it: refused before any request.
    let bad = Double::start_tls(Quirks::default(), server(&ca, &["127.0.0.1", WILDCARD])).await;
    bad.set_controllers(ID, &[device.address()]);
    let mut agent = device.run(&device.write_config(&bad.url(), &extra, ""), &[]);
    agent.wait_line(0, "state=backoff", WAIT).await;
    let log = agent.log();
    assert!(
        log.contains("invalid peer certificate") && log.contains("NameConstraintViolation"),
        "the log says the certificate breaks its CA's name constraints:\n{log}"
    );
    for endpoint in [Endpoint::CreateChallenge, Endpoint::Other] {
        assert_eq!(bad.count(endpoint), 0, "{endpoint:?}");
    }
    agent.stop().await;
}

/// A TLS listener for one connection: reports whether the client completed
/// the handshake (it accepted the certificate). No MQTT behind it; the
/// handshake is all that is in question.
async fn tls_listener(
    config: Arc<rustls::ServerConfig>,
) -> (u16, tokio::sync::oneshot::Receiver<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let accepted = TlsAcceptor::from(config).accept(tcp).await.is_ok();
        let _ = tx.send(accepted);
    });
    (port, rx)
}

fn mqtt_config(port: u16, ca_file: &std::path::Path) -> MqttConfig {
    toml::from_str(&format!(
        "enabled = true\nurl = \"mqtts://127.0.0.1:{port}\"\nca_file = \"{}\"\nconnect_timeout = \"2s\"\n",
        toml_path(ca_file)
    ))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mqtt_connection_refuses_the_certificate_0102_accepts() {
    let ca = constrained_ca();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write(dir.path(), "broker-ca.pem", &ca.pem());
    let handshake = |names: &'static [&'static str]| {
        let config = server(&ca, names);
        let ca_file = ca_file.clone();
        async move {
            let (port, accepted) = tls_listener(config).await;
            let result =
                mqtt::check_broker(&mqtt_config(port, &ca_file), Duration::from_secs(5)).await;
            let accepted = tokio::time::timeout(WAIT, accepted).await.unwrap().unwrap();
            (accepted, result)
        }
    };

    let (accepted, _no_broker_behind_it) = handshake(&["127.0.0.1", PERMITTED]).await;
    assert!(
        accepted,
        "the certificate within the constraint is accepted"
    );

    let (accepted, result) = handshake(&["127.0.0.1", WILDCARD]).await;
    assert!(!accepted, "the handshake fails");
    let err = result.unwrap_err();
    let chain = peaqos_logging::error_chain(&err);
    assert!(chain.contains("NameConstraintViolation"), "{chain}");
}

#[test]
fn the_constrained_ca_is_valid_within_its_constraint() {
    // Guard against a CA that refuses everything: the constraint must leave
    // `accept.example.com` valid under 0.103 too, or the refusals above
    // would prove nothing about wildcards.
    let ca = constrained_ca();
    let (leaf, _key) = ca.leaf(
        &["127.0.0.1", PERMITTED],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    rustls_verifier(&ca)
        .verify_server_cert(
            leaf.der(),
            &[],
            &ServerName::try_from("127.0.0.1").unwrap(),
            &[],
            UnixTime::now(),
        )
        .unwrap();
}
