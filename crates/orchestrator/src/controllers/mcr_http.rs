//! The peaqOS MCR API: `GET {base}/machine/{did}` returns the machine's
//! profile, whose `peaqos` block names its operator, owner and controller.
//!
//! Controllers are the EVM addresses among `controller`, `owner` and
//! `operator` (a value may be `0x...` or `did:peaq:0x...`; values in other
//! chains' formats, such as Solana base58 keys, are skipped). 404 means not
//! activated. A timeout, a connection failure, a 5xx, a 429, or a body that
//! is not a profile of the machine asked about means "unavailable": nothing
//! is decided on it.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use peaqos_protocol::{Address, IdentityRef};
use serde::Deserialize;

use super::{ControllerSource, Resolution, SourceFuture, Unavailable};

/// Profiles are a few kilobytes; anything far larger is not one.
const MAX_PROFILE_BYTES: usize = 1024 * 1024;
/// Readiness probes are answered from memory for this long, so that a
/// probing orchestrator does not spend the MCR API's rate limit.
const READY_CACHE: Duration = Duration::from_secs(10);

/// Why the MCR source could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the HTTP client for the MCR API")]
pub struct McrClientError(#[source] reqwest::Error);

#[derive(Debug, Deserialize)]
struct Profile {
    peaqos: PeaqosBlock,
}

#[derive(Debug, Deserialize)]
struct PeaqosBlock {
    #[serde(default)]
    machine_id: Option<serde_json::Value>,
    #[serde(default)]
    did: Option<String>,
    #[serde(default)]
    operator: Option<String>,
    #[serde(default)]
    owner: Option<String>,
    #[serde(default)]
    controller: Option<String>,
}

/// The EVM address in `value`, if it is one (`0x` + 40 hex, any case, or
/// the same behind `did:peaq:`).
fn evm_address(value: &str) -> Option<Address> {
    let hex = value.strip_prefix("did:peaq:").unwrap_or(value);
    let digits = hex.strip_prefix("0x").or_else(|| hex.strip_prefix("0X"))?;
    if digits.len() != 40 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    // The MCR's casing is presentation; only the bytes matter here.
    Address::parse(&format!("0x{}", digits.to_ascii_lowercase())).ok()
}

/// Controllers from a profile body, after checking that it describes
/// `identity`.
///
/// The profile must say which machine it answers for: `peaqos.did`, a
/// canonical machine DID equal to the one asked about (and `machine_id`, when
/// present, must agree). A body without it, or with an unparseable or
/// non-canonical one (`did:peaq:061`), is not an answer to the question: a
/// cache or proxy keyed on the wrong identifier could serve it, and its
/// controllers would then authorise any identity asked about. It reads as
/// "unavailable" (503, retry), the same as a 5xx, never as controller data.
/// peaq-os-sdk's own MCR queries (`assert_correlated_machine_did`) apply the
/// same rule, so a real MCR always sends the field.
pub fn controllers_from_profile(
    identity: &IdentityRef,
    body: &[u8],
) -> Result<Vec<Address>, String> {
    let profile: Profile = serde_json::from_slice(body)
        .map_err(|e| format!("MCR answered with a non-profile body: {e}"))?;
    let block = profile.peaqos;
    let Some(did) = &block.did else {
        return Err("MCR profile does not name its machine (no peaqos.did)".to_owned());
    };
    let returned = IdentityRef::parse(did)
        .ok()
        .filter(|r| matches!(r, IdentityRef::MachineId(_)) && r.did() == *did)
        .ok_or_else(|| "MCR profile names its machine with a malformed peaqos.did".to_owned())?;
    if returned != *identity {
        return Err("MCR answered with the profile of another machine".to_owned());
    }
    if let (Some(id), IdentityRef::MachineId(asked)) = (&block.machine_id, identity) {
        let returned = match id {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            _ => return Err("MCR profile has a malformed machine_id".to_owned()),
        };
        if returned != asked.as_str() {
            return Err("MCR answered with the profile of another machine".to_owned());
        }
    }
    let mut out: Vec<Address> = Vec::new();
    for value in [&block.controller, &block.owner, &block.operator]
        .into_iter()
        .flatten()
    {
        if let Some(address) = evm_address(value)
            && !out.contains(&address)
        {
            out.push(address);
        }
    }
    Ok(out)
}

/// The MCR API as a [`ControllerSource`].
#[derive(Debug)]
pub struct McrHttpSource {
    client: reqwest::Client,
    base: String,
    ready: Mutex<Option<(Instant, Result<(), Unavailable>)>>,
}

impl McrHttpSource {
    /// `base` is the API's base URL (`https://mcr.example/v1`); `timeout`
    /// bounds each request from connect to the last byte.
    pub fn new(base: &str, timeout: Duration) -> Result<Self, McrClientError> {
        crate::tls::install_crypto_provider();
        let client = reqwest::Client::builder()
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .timeout(timeout)
            .user_agent(concat!("peaqos-orchestrator/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(McrClientError)?;
        Ok(Self {
            client,
            base: base.trim_end_matches('/').to_owned(),
            ready: Mutex::new(None),
        })
    }

    async fn fetch(&self, identity: &IdentityRef) -> Result<Resolution, Unavailable> {
        let unavailable = |reason: String| Unavailable { reason };
        let url = format!("{}/machine/{}", self.base, identity.did());
        let response = self.client.get(&url).send().await.map_err(|e| {
            unavailable(if e.is_timeout() {
                "MCR API timed out".to_owned()
            } else {
                "MCR API unreachable".to_owned()
            })
        })?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(Resolution::NotFound);
        }
        if !status.is_success() {
            return Err(unavailable(format!("MCR API answered {status}")));
        }
        if response
            .content_length()
            .is_some_and(|n| n > MAX_PROFILE_BYTES as u64)
        {
            return Err(unavailable(
                "MCR API answered with an oversized body".to_owned(),
            ));
        }
        let body = response.bytes().await.map_err(|e| {
            unavailable(if e.is_timeout() {
                "MCR API timed out".to_owned()
            } else {
                "MCR API response was cut off".to_owned()
            })
        })?;
        if body.len() > MAX_PROFILE_BYTES {
            return Err(unavailable(
                "MCR API answered with an oversized body".to_owned(),
            ));
        }
        controllers_from_profile(identity, &body)
            .map(|c| Resolution::Found(c.into()))
            .map_err(unavailable)
    }
}

impl ControllerSource for McrHttpSource {
    fn name(&self) -> &'static str {
        "mcr"
    }

    fn resolve<'a>(&'a self, identity: &'a IdentityRef) -> SourceFuture<'a, Resolution> {
        Box::pin(self.fetch(identity))
    }

    fn covers_address_form(&self) -> bool {
        false
    }

    /// Ready when a look-up of machine 0 gets any answer that is not a
    /// failure (404 included), remembered for a few seconds.
    fn ready(&self) -> SourceFuture<'_, ()> {
        Box::pin(async move {
            if let Some((at, result)) = &*self.ready.lock().unwrap_or_else(PoisonError::into_inner)
                && at.elapsed() < READY_CACHE
            {
                return result.clone();
            }
            let probe = IdentityRef::parse("did:peaq:0").map_err(|e| Unavailable {
                reason: e.to_string(),
            })?;
            let result = self.fetch(&probe).await.map(|_| ());
            *self.ready.lock().unwrap_or_else(PoisonError::into_inner) =
                Some((Instant::now(), result.clone()));
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> IdentityRef {
        IdentityRef::parse(s).unwrap()
    }

    #[test]
    fn controllers_are_the_evm_addresses_deduplicated() {
        let body = br#"{"schema_version":"1.0","name":"Robot","peaqos":{
            "machine_id":"42","did":"did:peaq:42",
            "operator":"0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaed",
            "owner":"did:peaq:0x5AAEB6053F3E94C9B9A09F33669435E7EF1BEAED",
            "controller":"0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
            "mcr":"A","extra":{"x":1}}}"#;
        let c = controllers_from_profile(&id("did:peaq:42"), body).unwrap();
        let shown: Vec<String> = c.iter().map(Address::checksummed).collect();
        assert_eq!(
            shown,
            [
                "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
                "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"
            ]
        );
    }

    #[test]
    fn non_evm_values_are_skipped() {
        let body = br#"{"schema_version":"1.0","name":"x","peaqos":{"machine_id":"7","did":"did:peaq:7",
            "owner":"9xQeWvG816bUx9EPjHmaT23yvVM2ZWbrrpZb9PusVFin","controller":null,"operator":null}}"#;
        assert!(
            controllers_from_profile(&id("did:peaq:7"), body)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn garbage_and_other_machines_are_refused() {
        let other = br#"{"schema_version":"1.0","name":"x","peaqos":{"machine_id":"8","did":"did:peaq:8"}}"#;
        assert!(controllers_from_profile(&id("did:peaq:7"), other).is_err());
        let other_id = br#"{"schema_version":"1.0","name":"x","peaqos":{"machine_id":"8","did":"did:peaq:7"}}"#;
        assert!(controllers_from_profile(&id("did:peaq:7"), other_id).is_err());
        for body in [&b"<html>oops</html>"[..], b"{}", b"[]", b"null", b""] {
            assert!(controllers_from_profile(&id("did:peaq:7"), body).is_err());
        }
    }

    /// A profile that does not say which machine it describes authorises
    /// nothing: its controller would otherwise pass for any identity.
    #[test]
    fn a_profile_must_name_the_machine_canonically() {
        let c = r#""controller":"0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359""#;
        for peaqos in [
            format!("{{{c}}}"),
            "{}".to_owned(),
            format!(r#"{{"machine_id":"7",{c}}}"#),
            format!(r#"{{"did":"did:peaq:07",{c}}}"#),
            format!(r#"{{"did":"did:peaq:061",{c}}}"#),
            format!(r#"{{"did":"peaqos:machine:7",{c}}}"#),
            format!(r#"{{"did":7,{c}}}"#),
            format!(r#"{{"did":"",{c}}}"#),
        ] {
            let body = format!(r#"{{"schema_version":"1.0","name":"x","peaqos":{peaqos}}}"#);
            let got = controllers_from_profile(&id("did:peaq:7"), body.as_bytes());
            assert!(got.is_err(), "{body} was accepted: {got:?}");
        }
        let named =
            format!(r#"{{"schema_version":"1.0","name":"x","peaqos":{{"did":"did:peaq:7",{c}}}}}"#);
        assert_eq!(
            controllers_from_profile(&id("did:peaq:7"), named.as_bytes())
                .unwrap()
                .len(),
            1
        );
    }
}
