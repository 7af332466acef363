//! The broker address: `mqtt://host[:port]` or `mqtts://host[:port]`.
//!
//! Parsed by hand: the `url` crate (rumqttc's `url` feature) would add size
//! to the agent binary for two schemes and a port.

use std::fmt;

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
        let (tls, rest) = if let Some(rest) = text.strip_prefix("mqtt://") {
            (false, rest)
        } else if let Some(rest) = text.strip_prefix("mqtts://") {
            (true, rest)
        } else {
            return Err(format!(
                "{text:?} is not a broker URL (expected mqtt://host[:port] or mqtts://host[:port])"
            ));
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains('@') {
            return Err(
                "credentials do not belong in the URL; use username and password_file".to_owned(),
            );
        }
        if authority.contains(['/', '?', '#']) {
            return Err(format!(
                "{text:?} has a path or query; a broker URL is only mqtt[s]://host[:port]"
            ));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{text:?}: unclosed [ in an IPv6 address"))?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(format!("{text:?} has no host"));
        }
        let port =
            match port {
                None => {
                    if tls {
                        8883
                    } else {
                        1883
                    }
                }
                Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                    format!("{text:?}: port {p:?} is not a number from 1 to 65535")
                })?,
            };
        Ok(Self {
            host: host.to_owned(),
            port,
            tls,
        })
    }
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
