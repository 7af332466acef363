//! The broker address: `mqtt://host[:port]` or `mqtts://host[:port]`.
//!
//! Parsed with the `url` crate, which the agent links anyway (reqwest's
//! `Url` is its type), so that the corner cases of authorities (IPv6
//! literals, user info, ports) are handled as everywhere else.

use std::fmt;

use url::{Host, Url};

/// A parsed broker URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BrokerUrl {
    /// Host name or IP address (IPv6 without brackets).
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) tls: bool,
}

impl BrokerUrl {
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let url = match Url::parse(text) {
            Ok(url) => url,
            // Whatever else is wrong, the text may hold a password: say
            // only that credentials do not belong there.
            Err(_) if has_user_info(text) => return Err(CREDENTIALS.to_owned()),
            Err(url::ParseError::InvalidPort) => {
                return Err(format!(
                    "{text:?}: the port is not a number from 1 to 65535"
                ));
            }
            Err(url::ParseError::EmptyHost) => return Err(format!("{text:?} has no host")),
            Err(url::ParseError::InvalidIpv6Address) => {
                return Err(format!("{text:?}: not a valid IPv6 address in [ ]"));
            }
            Err(_) => return Err(not_a_broker_url(text)),
        };
        let tls = match url.scheme() {
            "mqtt" => false,
            "mqtts" => true,
            _ => return Err(not_a_broker_url(text)),
        };
        // `mqtt:host`, without the `//`.
        if url.cannot_be_a_base() {
            return Err(not_a_broker_url(text));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(CREDENTIALS.to_owned());
        }
        if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
            return Err(format!(
                "{text:?} has a path or query; a broker URL is only mqtt[s]://host[:port]"
            ));
        }
        let host = match url.host() {
            None | Some(Host::Domain("")) => return Err(format!("{text:?} has no host")),
            Some(Host::Domain(name)) => name.to_owned(),
            Some(Host::Ipv4(ip)) => ip.to_string(),
            Some(Host::Ipv6(ip)) => ip.to_string(),
        };
        let port = match url.port() {
            None if tls => 8883,
            None => 1883,
            Some(0) => {
                return Err(format!(
                    "{text:?}: the port is not a number from 1 to 65535"
                ));
            }
            Some(port) => port,
        };
        Ok(Self { host, port, tls })
    }
}

const CREDENTIALS: &str = "credentials do not belong in the URL; use username and password_file";

fn not_a_broker_url(text: &str) -> String {
    format!("{text:?} is not a broker URL (expected mqtt://host[:port] or mqtts://host[:port])")
}

/// Whether the authority of `text` (between `://` and the next `/`, `?`
/// or `#`) has an `@`, i.e. user info, perhaps with a password.
fn has_user_info(text: &str) -> bool {
    text.split_once("://").is_some_and(|(_, rest)| {
        rest.split(['/', '?', '#'])
            .next()
            .is_some_and(|authority| authority.contains('@'))
    })
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> (String, u16, bool) {
        let url = BrokerUrl::parse(text).unwrap();
        (url.host, url.port, url.tls)
    }

    #[test]
    fn parses_hosts_ports_and_schemes() {
        assert_eq!(ok("mqtt://127.0.0.1"), ("127.0.0.1".into(), 1883, false));
        assert_eq!(ok("mqtt://broker:1884/"), ("broker".into(), 1884, false));
        assert_eq!(
            ok("mqtts://broker.local"),
            ("broker.local".into(), 8883, true)
        );
        assert_eq!(ok("mqtt://[::1]:1883"), ("::1".into(), 1883, false));
        assert_eq!(ok("mqtts://[fe80::1]"), ("fe80::1".into(), 8883, true));
    }

    #[test]
    fn refuses_what_is_not_a_broker_url() {
        for bad in [
            "",
            "127.0.0.1:1883",
            "tcp://host",
            "http://host",
            "mqtt://",
            "mqtt://:1883",
            "mqtt://host:0",
            "mqtt://host:99999",
            "mqtt://host:port",
            "mqtt://user:pw@host",
            "mqtt://host/topic",
            "mqtt://[::1",
        ] {
            assert!(BrokerUrl::parse(bad).is_err(), "{bad:?} was accepted");
        }
        let err = BrokerUrl::parse("mqtt://user:pw@host").unwrap_err();
        assert!(!err.contains("pw"), "the error repeats a password: {err}");
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let err = |text: &str| BrokerUrl::parse(text).unwrap_err();
        for (text, says) in [
            ("tcp://host", "not a broker URL"),
            ("mqtt:host", "not a broker URL"),
            ("127.0.0.1:1883", "not a broker URL"),
            ("mqtt://", "no host"),
            ("mqtt://:1883", "no host"),
            ("mqtt://host:0", "port"),
            ("mqtt://host:port", "port"),
            ("mqtt://host:99999", "port"),
            ("mqtt://host/topic", "path"),
            ("mqtt://host?x=1", "path or query"),
            ("mqtt://[::1", "IPv6"),
            ("mqtt://user:pw@host", "credentials"),
        ] {
            let error = err(text);
            assert!(error.contains(says), "{text:?}: {error}");
        }
        // Credentials are named before anything else that is wrong, and
        // never repeated.
        let error = err("mqtt://user:s3cret@host:99999");
        assert!(error.contains("credentials"), "{error}");
        assert!(!error.contains("s3cret"), "{error}");
    }

    #[test]
    fn displays_a_normalised_url() {
        assert_eq!(
            BrokerUrl::parse("mqtt://[::1]").unwrap().to_string(),
            "mqtt://[::1]:1883"
        );
        assert_eq!(
            BrokerUrl::parse("mqtts://b/").unwrap().to_string(),
            "mqtts://b:8883"
        );
    }
}
