//! Machine records and the requests that create and update them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::address::Address;
use crate::identity::IdentityRef;
use crate::timestamp::Timestamp;

/// Lifecycle status of a machine record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineStatus {
    Draft,
    Active,
    /// Active once, but its stored proof is older than the deployment's
    /// maximum proof age: it needs a fresh proof.
    Degraded,
    Blocked,
    Archived,
}

impl MachineStatus {
    pub const ALL: [Self; 5] = [
        Self::Draft,
        Self::Active,
        Self::Degraded,
        Self::Blocked,
        Self::Archived,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Draft => "draft",
            Self::Active => "active",
            Self::Degraded => "degraded",
            Self::Blocked => "blocked",
            Self::Archived => "archived",
        }
    }

    pub fn from_wire(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

impl std::fmt::Display for MachineStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A proof's verification method. The contract has one, `eip191`; another
/// server may announce one this version does not know, which is kept
/// verbatim so that a client can refuse it by name rather than fail to
/// read the response.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ProofMethod {
    #[default]
    Eip191,
    Other(String),
}

impl ProofMethod {
    pub fn as_str(&self) -> &str {
        match self {
            Self::Eip191 => "eip191",
            Self::Other(s) => s,
        }
    }

    pub fn from_wire(text: &str) -> Self {
        match text {
            "eip191" => Self::Eip191,
            other => Self::Other(other.to_owned()),
        }
    }
}

/// Where controller data came from. The contract has one value whatever the
/// source behind it (MCR API, local registry, address DID); another value is
/// kept verbatim (clients do not branch on it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ResolutionSource {
    #[default]
    PeaqosMcr,
    Other(String),
}

impl ResolutionSource {
    pub fn as_str(&self) -> &str {
        match self {
            Self::PeaqosMcr => "peaqos-mcr",
            Self::Other(s) => s,
        }
    }

    pub fn from_wire(text: &str) -> Self {
        match text {
            "peaqos-mcr" => Self::PeaqosMcr,
            other => Self::Other(other.to_owned()),
        }
    }
}

macro_rules! wire_text {
    ($($ty:ty),*) => {$(
        impl Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                Ok(Self::from_wire(&s))
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}

wire_text!(ProofMethod, ResolutionSource);

/// The verified proof persisted with a machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MachineIdentityProof {
    pub method: ProofMethod,
    pub identity_ref: IdentityRef,
    pub signer_address: Address,
    pub challenge_id: String,
    pub verified_at: Timestamp,
    pub challenge_expires_at: Timestamp,
    #[serde(default)]
    pub controller_addresses: Vec<Address>,
    pub resolution_source: ResolutionSource,
    /// Extension: when the deployment limits proof age, the time after which
    /// this proof no longer keeps the machine active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
}

/// A machine record as every response carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Machine {
    pub id: String,
    pub display_name: String,
    pub status: MachineStatus,
    pub owner_id: String,
    pub identity_ref: IdentityRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_proof: Option<MachineIdentityProof>,
    pub machine_type: String,
    pub runtime_profile: String,
    #[serde(default)]
    pub capabilities: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub policy_ids: Vec<String>,
    #[serde(default)]
    pub skill_keys: Vec<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// `{challengeId, signature}` submitted with a create or update. The
/// signature stays text here so that a malformed one is reported as an
/// invalid proof (403), not as a malformed request (400).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MachineIdentityProofInput {
    pub challenge_id: String,
    pub signature: String,
}

/// `POST /machines` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateMachineRequest {
    pub display_name: String,
    pub owner_id: String,
    pub machine_type: String,
    pub runtime_profile: String,
    pub identity_ref: IdentityRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_proof: Option<MachineIdentityProofInput>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_ids: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skill_keys: Option<Vec<String>>,
}

/// `PATCH /machines/:id` body: every field optional; absent and `null` both
/// mean "leave as is".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateMachineRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<MachineStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_ref: Option<IdentityRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_profile: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_ids: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skill_keys: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_proof: Option<MachineIdentityProofInput>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_omits_absent_fields() {
        let req = UpdateMachineRequest {
            status: Some(MachineStatus::Active),
            ..UpdateMachineRequest::default()
        };
        assert_eq!(
            serde_json::to_string(&req).unwrap(),
            r#"{"status":"active"}"#
        );
    }

    #[test]
    fn unknown_methods_and_sources_are_kept_not_refused() {
        let m: ProofMethod = serde_json::from_str("\"eip712\"").unwrap();
        assert_eq!(m, ProofMethod::Other("eip712".into()));
        assert_eq!(serde_json::to_string(&m).unwrap(), "\"eip712\"");
        let m: ProofMethod = serde_json::from_str("\"eip191\"").unwrap();
        assert_eq!(m, ProofMethod::Eip191);
        let r: ResolutionSource = serde_json::from_str("\"did-registry\"").unwrap();
        assert_eq!(r.to_string(), "did-registry");
        assert_eq!(
            serde_json::to_string(&ResolutionSource::PeaqosMcr).unwrap(),
            "\"peaqos-mcr\""
        );
    }

    #[test]
    fn records_from_other_servers_are_read() {
        // Extra fields, no proof expiry, offsets and precisions of RFC 3339
        // other than ours, lowercase addresses, the alias spelling.
        let m: Machine = serde_json::from_value(serde_json::json!({
            "id": "m-1", "displayName": "r", "status": "active", "ownerId": "o",
            "identityRef": "peaqos:machine:42", "machineType": "t", "runtimeProfile": "p",
            "createdAt": "2026-01-02T03:04:05Z", "updatedAt": "2026-01-02T03:04:05.123456+00:00",
            "tenant": {"id": 7}, "fromTheFuture": true,
            "identityProof": {
                "method": "eip191", "identityRef": "did:peaq:42",
                "signerAddress": "0x00000000000000000000000000000000000000ab",
                "challengeId": "c", "verifiedAt": "2026-01-02T04:04:05.1+01:00",
                "challengeExpiresAt": "2026-01-02T03:09:05.000000001Z",
                "controllerAddresses": ["0x00000000000000000000000000000000000000AB"],
                "resolutionSource": "peaqos-mcr", "extra": 1
            }
        }))
        .unwrap();
        assert_eq!(m.identity_ref.to_string(), "did:peaq:42");
        let p = m.identity_proof.unwrap();
        assert_eq!(p.expires_at, None);
        assert_eq!(p.verified_at.to_string(), "2026-01-02T03:04:05.100Z");
        assert_eq!(p.controller_addresses, vec![p.signer_address]);
    }

    #[test]
    fn requests_ignore_unknown_fields_and_accept_null() {
        let req: UpdateMachineRequest =
            serde_json::from_str(r#"{"displayName":null,"fromTheFuture":1}"#).unwrap();
        assert_eq!(req, UpdateMachineRequest::default());
    }
}
