//! Which TLS check a failed connection to the orchestrator tripped, read
//! from the error's chain (rustls' own error, under reqwest's and hyper's),
//! and what an operator fixes for each: `ca_file`, the certificates, or the
//! clock. Time failures are the clock's (`CLOCK`, retried within seconds,
//! so that an agent is active soon after NTP syncs); the others are `TLS`,
//! retried at `slow_retry` since nothing changes until someone acts.

use std::error::Error;

/// A failed TLS check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFailure {
    /// The certificate chains to no CA the agent trusts.
    UnknownCa,
    /// The certificate does not name the host of the URL.
    BadName,
    /// The certificate's validity starts after the local clock.
    NotYetValid,
    /// The certificate's validity ended before the local clock.
    Expired,
    /// The server refused our client certificate (or wanted one).
    ClientCertificateRefused,
    /// Another certificate check (bad signature, revoked, bad encoding).
    Certificate,
    /// The handshake failed otherwise (protocol versions, ciphers).
    Handshake,
}

impl TlsFailure {
    /// The TLS failure under `error`, if the request failed in TLS.
    pub fn of(error: &(dyn Error + 'static)) -> Option<Self> {
        #[cfg(feature = "tls")]
        {
            rustls_error(error).map(Self::from_rustls)
        }
        #[cfg(not(feature = "tls"))]
        {
            let _ = error;
            None
        }
    }

    /// A failure of time: the local clock, or the certificate's dates.
    pub fn is_clock(self) -> bool {
        matches!(self, Self::NotYetValid | Self::Expired)
    }

    /// Which check failed and what to fix, for the status and the journal.
    pub fn advice(self) -> &'static str {
        match self {
            Self::UnknownCa => {
                "its certificate is not issued by a CA the agent trusts (unknown issuer); set \
                 [orchestrator] ca_file to the CA that issued it"
            }
            Self::BadName => {
                "its certificate does not name the host in [orchestrator] url; fix the url or \
                 the orchestrator's certificate"
            }
            Self::NotYetValid => {
                "its certificate is not valid yet by this machine's clock: the clock is \
                 probably behind (a board without a real-time clock before NTP has synced; see \
                 `timedatectl timesync-status`). Fix the clock or let NTP sync; retried every \
                 few seconds"
            }
            Self::Expired => {
                "its certificate has expired by this machine's clock: if the clock is ahead, \
                 fix it (NTP; see `timedatectl timesync-status`), else renew the \
                 orchestrator's certificate; retried every few seconds"
            }
            Self::ClientCertificateRefused => {
                "the orchestrator refused our client certificate, or wants one; check \
                 [orchestrator] client_cert_file and client_key_file, and that the orchestrator \
                 trusts their CA"
            }
            Self::Certificate => {
                "its certificate failed a check; check the orchestrator's certificate and \
                 [orchestrator] ca_file"
            }
            Self::Handshake => {
                "the TLS handshake failed; check that [orchestrator] url names a TLS server and \
                 its certificate and [orchestrator] ca_file"
            }
        }
    }

    #[cfg(feature = "tls")]
    fn from_rustls(e: &rustls::Error) -> Self {
        use rustls::AlertDescription as Alert;
        use rustls::CertificateError as Cert;
        match e {
            rustls::Error::InvalidCertificate(cert) => match cert {
                Cert::UnknownIssuer => Self::UnknownCa,
                Cert::NotValidForName | Cert::NotValidForNameContext { .. } => Self::BadName,
                Cert::NotValidYet | Cert::NotValidYetContext { .. } => Self::NotYetValid,
                Cert::Expired | Cert::ExpiredContext { .. } => Self::Expired,
                _ => Self::Certificate,
            },
            rustls::Error::AlertReceived(
                Alert::BadCertificate
                | Alert::CertificateRequired
                | Alert::UnknownCA
                | Alert::CertificateUnknown
                | Alert::CertificateExpired
                | Alert::CertificateRevoked
                | Alert::UnsupportedCertificate
                | Alert::AccessDenied,
            ) => Self::ClientCertificateRefused,
            _ => Self::Handshake,
        }
    }
}

/// rustls' error in `error`'s chain. An `io::Error` hides its inner error
/// from `source()` (it returns the inner error's source, and hyper's
/// connector nests one `io::Error` in another), so an `io::Error` is
/// followed through `get_ref` instead.
#[cfg(feature = "tls")]
fn rustls_error<'a>(error: &'a (dyn Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        next = match e.downcast_ref::<std::io::Error>() {
            Some(io) => io.get_ref().map(|inner| inner as &(dyn Error + 'static)),
            None => e.source(),
        };
    }
    None
}

#[cfg(all(test, feature = "tls"))]
mod tests {
    use super::*;

    /// An error chain as hyper and reqwest build it: rustls' error inside
    /// an `io::Error` inside another, inside hyper's error.
    #[derive(Debug, thiserror::Error)]
    #[error("client error (Connect)")]
    struct Outer(#[source] std::io::Error);

    fn wrapped(e: rustls::Error) -> Outer {
        Outer(std::io::Error::other(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            e,
        )))
    }

    #[test]
    fn each_check_is_told_apart_and_time_is_the_clocks() {
        use rustls::CertificateError as Cert;
        let cases = [
            (
                rustls::Error::InvalidCertificate(Cert::UnknownIssuer),
                TlsFailure::UnknownCa,
            ),
            (
                rustls::Error::InvalidCertificate(Cert::NotValidForName),
                TlsFailure::BadName,
            ),
            (
                rustls::Error::InvalidCertificate(Cert::Expired),
                TlsFailure::Expired,
            ),
            (
                rustls::Error::InvalidCertificate(Cert::NotValidYet),
                TlsFailure::NotYetValid,
            ),
            (
                rustls::Error::InvalidCertificate(Cert::BadSignature),
                TlsFailure::Certificate,
            ),
            (
                rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired),
                TlsFailure::ClientCertificateRefused,
            ),
            (
                rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure),
                TlsFailure::Handshake,
            ),
        ];
        for (error, want) in cases {
            assert_eq!(TlsFailure::of(&wrapped(error)), Some(want));
            assert_eq!(
                want.is_clock(),
                matches!(want, TlsFailure::Expired | TlsFailure::NotYetValid)
            );
        }
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(TlsFailure::of(&Outer(refused)), None);
        assert!(TlsFailure::UnknownCa.advice().contains("ca_file"));
        assert!(
            TlsFailure::ClientCertificateRefused
                .advice()
                .contains("client_cert_file")
        );
        assert!(TlsFailure::Expired.advice().contains("NTP"));
    }
}
