//! The orchestrator behind a private CA, with and without client
//! certificates (`[orchestrator] ca_file`, `client_cert_file`,
//! `client_key_file`), and the failures an operator must be able to read:
//! the wrong CA, a missing client certificate, a file that is not there.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, CertifiedIssuer, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, KeyPair, KeyUsagePurpose, NameConstraints,
};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::agent::{AgentProcess, Device, poll};
use crate::double::{Double, Endpoint, Quirks};

const ID: &str = "did:peaq:4343";
const WAIT: Duration = Duration::from_secs(15);

/// A CA made for one test.
pub(crate) struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub(crate) fn new(name: &str) -> Self {
        Self::with_name_constraints(name, None)
    }

    /// A CA that may only issue for the DNS names under `permitted` (RFC
    /// 5280 name constraints).
    pub(crate) fn constrained(name: &str, permitted: &[&str]) -> Self {
        let permitted_subtrees = permitted
            .iter()
            .map(|n| GeneralSubtree::DnsName((*n).to_owned()))
            .collect();
        Self::with_name_constraints(
            name,
            Some(NameConstraints {
                permitted_subtrees,
                excluded_subtrees: Vec::new(),
            }),
        )
    }

    fn with_name_constraints(name: &str, constraints: Option<NameConstraints>) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.name_constraints = constraints;
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    pub(crate) fn pem(&self) -> String {
        self.issuer.pem()
    }

    pub(crate) fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// A leaf for `names` (IP addresses become IP SANs) with its key.
    pub(crate) fn leaf(
        &self,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> (Certificate, KeyPair) {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "contract test");
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert, key)
    }
}

/// The double's TLS side: a certificate for 127.0.0.1 from `ca`, and, with
/// `client_ca`, a required client certificate issued by it.
fn server_config(ca: &Ca, client_ca: Option<&Ca>) -> Arc<rustls::ServerConfig> {
    let (cert, key) = ca.leaf(&["127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
    server_config_for(&cert, &key, client_ca)
}

/// As [`server_config`], with a server certificate valid only from
/// `not_before` to `not_after` (the CA is valid for rcgen's default span).
pub(crate) fn server_config_valid(
    ca: &Ca,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> Arc<rustls::ServerConfig> {
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "contract test");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = not_before;
    params.not_after = not_after;
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    server_config_for(&cert, &key, None)
}

pub(crate) fn server_config_for(
    cert: &Certificate,
    key: &KeyPair,
    client_ca: Option<&Ca>,
) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = vec![cert.der().clone()];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(client_ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(client_ca.der()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    };
    Arc::new(builder.with_single_cert(chain, key).unwrap())
}

pub(crate) fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

pub(crate) fn toml_path(p: &Path) -> String {
    p.display().to_string()
}

/// Waits until the agent's first request (a challenge) has been served
/// over TLS: the handshake, and the client certificate when required,
/// passed.
pub(crate) async fn served(double: &Double, agent: &AgentProcess) {
    poll(
        "a challenge served over TLS",
        WAIT,
        || (double.count(Endpoint::CreateChallenge) >= 1).then_some(()),
        || agent.log(),
    )
    .await;
    let log = agent.log();
    assert!(!log.contains("cannot reach the orchestrator"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_is_trusted_through_ca_file() {
    let ca = Ca::new("fleet private CA");
    let double = Double::start_tls(Quirks::default(), server_config(&ca, None)).await;
    let device = Device::new(ID);
    double.set_controllers(ID, &[device.address()]);
    let ca_file = write(device.dir.path(), "orchestrator-ca.pem", &ca.pem());
    let config = device.write_config(
        &double.url(),
        &format!("ca_file = \"{}\"", toml_path(&ca_file)),
        "",
    );
    let mut agent = device.run(&config, &[]);
    served(&double, &agent).await;
    agent.wait_line(0, "state=active", WAIT).await;
    poll(
        "an active record over HTTPS",
        WAIT,
        || {
            double
                .records()
                .iter()
                .any(|r| r.status == "active" && r.signer() == Some(device.address()))
                .then_some(())
        },
        || agent.log(),
    )
    .await;
    assert_eq!(double.count(Endpoint::CreateChallenge), 1);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_with_its_key_from_a_credential_passes_mtls() {
    let ca = Ca::new("fleet private CA");
    let clients = Ca::new("fleet device CA");
    let double = Double::start_tls(Quirks::default(), server_config(&ca, Some(&clients))).await;
    let device = Device::new(ID);
    double.set_controllers(ID, &[device.address()]);
    let dir = device.dir.path();
    let ca_file = write(dir, "orchestrator-ca.pem", &ca.pem());
    let (cert, key) = clients.leaf(&["robot-7"], ExtendedKeyUsagePurpose::ClientAuth);
    let cert_file = write(dir, "client.pem", &cert.pem());
    // The key arrives as a systemd credential, as the controller key can.
    let credentials = dir.join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    write(
        &credentials,
        "orchestrator-client-key",
        &key.serialize_pem(),
    );
    let config = device.write_config(
        &double.url(),
        &format!(
            "ca_file = \"{}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"credential:orchestrator-client-key\"",
            toml_path(&ca_file),
            toml_path(&cert_file),
        ),
        "",
    );
    let mut agent = device.run(&config, &[("CREDENTIALS_DIRECTORY", &credentials)]);
    served(&double, &agent).await;
    agent.wait_line(0, "state=active", WAIT).await;
    assert_eq!(double.count(Endpoint::CreateChallenge), 1);
    assert_eq!(double.count(Endpoint::CreateMachine), 1);
    let log = agent.stop().await;
    assert!(
        !log.contains(key.serialize_pem().lines().nth(1).unwrap()),
        "the client key never reaches the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wrong_ca_is_reported_and_nothing_reaches_the_server() {
    let ca = Ca::new("fleet private CA");
    let other = Ca::new("some other CA");
    let double = Double::start_tls(Quirks::default(), server_config(&ca, None)).await;
    let device = Device::new(ID);
    double.set_controllers(ID, &[device.address()]);
    let ca_file = write(device.dir.path(), "wrong-ca.pem", &other.pem());
    let config = device.write_config(
        &double.url(),
        &format!("ca_file = \"{}\"", toml_path(&ca_file)),
        "",
    );
    let mut agent = device.run(&config, &[]);
    let line = agent.wait_line(0, "state=backoff", WAIT).await;
    let log = agent.log();
    assert!(
        log.contains("invalid peer certificate") && log.contains("UnknownIssuer"),
        "the log says the certificate is not trusted:\n{log}"
    );
    // #22.19: its own code, the check that failed and what to fix.
    let (_, failure) = agent.find(0, "error_code=TLS").expect("a TLS failure");
    assert!(
        failure.contains("unknown issuer") && failure.contains("ca_file"),
        "{failure}"
    );
    assert!(!log.contains("error_code=NETWORK"), "{log}");
    assert!(line > 0);
    for endpoint in [Endpoint::CreateChallenge, Endpoint::Other] {
        assert_eq!(double.count(endpoint), 0, "{endpoint:?}");
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_client_certificate_is_reported() {
    let ca = Ca::new("fleet private CA");
    let clients = Ca::new("fleet device CA");
    let double = Double::start_tls(Quirks::default(), server_config(&ca, Some(&clients))).await;
    let device = Device::new(ID);
    double.set_controllers(ID, &[device.address()]);
    let ca_file = write(device.dir.path(), "orchestrator-ca.pem", &ca.pem());
    let config = device.write_config(
        &double.url(),
        &format!("ca_file = \"{}\"", toml_path(&ca_file)),
        "",
    );
    let mut agent = device.run(&config, &[]);
    agent.wait_line(0, "state=backoff", WAIT).await;
    let log = agent.log();
    assert!(
        log.contains("CertificateRequired"),
        "the log says the server wants a client certificate:\n{log}"
    );
    let (_, failure) = agent.find(0, "error_code=TLS").expect("a TLS failure");
    assert!(failure.contains("client_cert_file"), "{failure}");
    assert_eq!(double.count(Endpoint::CreateChallenge), 0);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_tls_files_stop_the_start_naming_the_file() {
    let device = Device::new(ID);
    let dir = device.dir.path();
    let missing = dir.join("no-such-ca.pem");
    let not_pem = write(dir, "not-a-cert.pem", "hello\n");
    let ca = Ca::new("fleet private CA");
    let ca_file = write(dir, "ca.pem", &ca.pem());
    let cert_only = write(
        dir,
        "client.pem",
        &ca.leaf(&["x"], ExtendedKeyUsagePurpose::ClientAuth).0.pem(),
    );
    let cases = [
        (
            format!("ca_file = \"{}\"", toml_path(&missing)),
            toml_path(&missing),
        ),
        (
            format!("ca_file = \"{}\"", toml_path(&not_pem)),
            toml_path(&not_pem),
        ),
        (
            // The certificate file given as the key: no private key in it.
            format!(
                "ca_file = \"{}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"",
                toml_path(&ca_file),
                toml_path(&cert_only),
                toml_path(&cert_only)
            ),
            toml_path(&cert_only),
        ),
    ];
    for (keys, names) in cases {
        let config = device.write_config("https://127.0.0.1:9", &keys, "");
        let mut agent = device.run(&config, &[]);
        let status = agent.wait_exit(Duration::from_secs(10)).await;
        let log = agent.log();
        assert_eq!(status.code(), Some(78), "EX_CONFIG for {keys}:\n{log}");
        assert!(log.contains(&names), "names {names}:\n{log}");
    }
}
