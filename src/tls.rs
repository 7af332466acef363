//! TLS client settings from PEM files, for the broker (`mqtts://`) and the
//! orchestrator (`https://` with `ca_file`): rustls with the ring provider,
//! trusting only the configured CA file, with an optional client
//! certificate.
//!
//! The client config is built with an explicit provider instead of rustls'
//! process-wide default, so it works whether or not anything else in the
//! process installed one.
//!
//! Certificates are checked by webpki at the clock's floor when the local
//! clock reads earlier ([`crate::clock::trusted_now`], see
//! [`FlooredVerifier`]); `tls_check.rs` names what failed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::secrets::{self, SecretError};

/// Why a TLS client configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} is not valid PEM")]
    Pem {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("no usable CA certificate in {path}")]
    NoUsableCa { path: PathBuf },
    #[error("cannot read the client key")]
    Key(#[source] SecretError),
    #[error("the client key {path} holds no PEM private key")]
    NoKey { path: PathBuf },
    #[error("rustls refused the TLS settings")]
    Rustls(#[source] rustls::Error),
}

/// Builds the client config: roots from `ca_file` (and nothing else), and a
/// client certificate when one is configured (`key_location` may be
/// `credential:NAME`).
pub(crate) fn client_config(
    ca_file: &Path,
    client_auth: Option<(&Path, &str)>,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(read_certs(ca_file)?);
    if added == 0 {
        return Err(TlsError::NoUsableCa {
            path: ca_file.to_owned(),
        });
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|_| TlsError::NoUsableCa {
        path: ca_file.to_owned(),
    })?;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rustls)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(FlooredVerifier(webpki)));
    let config = match client_auth {
        None => builder.with_no_client_auth(),
        Some((cert_file, key_location)) => {
            let chain = read_certs(cert_file)?;
            let key_path = secrets::resolve(key_location).map_err(TlsError::Key)?;
            let pem = secrets::read(&key_path).map_err(TlsError::Key)?;
            let key = PrivateKeyDer::from_pem_slice(pem.as_bytes())
                .map_err(|_| TlsError::NoKey { path: key_path })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(TlsError::Rustls)?
        }
    };
    Ok(config)
}

/// webpki's server certificate check, at the clock's floor when the local
/// clock reads earlier: a board without a real-time clock that boots in
/// 1970 would otherwise find every certificate "not valid yet" until NTP
/// answers, and NTP may itself be behind the orchestrator it cannot reach.
/// Everything else (chain, name, signatures) is webpki's, unchanged.
#[derive(Debug)]
struct FlooredVerifier(Arc<dyn rustls::client::danger::ServerCertVerifier>);

impl rustls::client::danger::ServerCertVerifier for FlooredVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let floor = rustls::pki_types::UnixTime::since_unix_epoch(
            crate::clock::floor()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        let now = if now.as_secs() < floor.as_secs() {
            floor
        } else {
            now
        };
        self.0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The client config for an `https://` orchestrator without `ca_file`: the
/// system's roots through the verifier reqwest itself uses
/// (rustls-platform-verifier), checked at the clock's floor as well.
pub(crate) fn system_roots_config() -> Result<rustls::ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let system =
        rustls_platform_verifier::Verifier::new(provider.clone()).map_err(TlsError::Rustls)?;
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rustls)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(FlooredVerifier(Arc::new(system))))
        .with_no_client_auth())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}
