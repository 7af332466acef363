//! TLS client settings from PEM files, for the broker (`mqtts://`) and the
//! orchestrator (`https://` with `ca_file`): rustls with the ring provider,
//! trusting only the configured CA file, with an optional client
//! certificate.
//!
//! The client config is built with an explicit provider instead of rustls'
//! process-wide default, so it works whether or not anything else in the
//! process installed one.

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
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(TlsError::Rustls)?
    .with_root_certificates(roots);
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
