//! Pure decisions of the loop: when to renew a proof, which configured
//! fields differ from the record, which record a `MACHINE_IDENTITY_EXISTS`
//! names.

use std::time::Duration;

use peaqos_protocol::{Machine, Timestamp, UpdateMachineRequest};

use crate::client;
use crate::config::MachineConfig;

/// The renewal point of a proof, in server time: about two thirds into its
/// lifetime (or `renew_before` ahead of expiry), moved earlier by up to a
/// twelfth of the lifetime according to `jitter` in [0, 1], and never
/// earlier than a quarter of the lifetime, so that even a `renew_before`
/// longer than the lifetime cannot make the agent renew in a loop.
pub fn renewal_point(
    verified_at: Timestamp,
    expires_at: Timestamp,
    renew_before: Option<Duration>,
    jitter: f64,
) -> Timestamp {
    let v = verified_at.unix_millis();
    let lifetime = expires_at.unix_millis().saturating_sub(v).max(0);
    let base = match renew_before {
        None => v + lifetime * 2 / 3,
        Some(b) => expires_at
            .unix_millis()
            .saturating_sub(i64::try_from(b.as_millis()).unwrap_or(i64::MAX)),
    };
    #[allow(clippy::cast_possible_truncation)] // bounded by lifetime / 12
    let spread = ((lifetime / 12) as f64 * jitter.clamp(0.0, 1.0)) as i64;
    let point = (base - spread).max(v + lifetime / 4);
    Timestamp::from_unix_millis(point).unwrap_or(expires_at)
}

/// The fields of `[machine]` that differ from the record; empty when equal.
/// Lists and maps left out of the config are not managed.
pub fn field_changes(cfg: &MachineConfig, m: &Machine) -> UpdateMachineRequest {
    let differs = |want: &String, have: &String| (want != have).then(|| want.clone());
    UpdateMachineRequest {
        display_name: differs(&cfg.display_name, &m.display_name),
        owner_id: differs(&cfg.owner_id, &m.owner_id),
        machine_type: differs(&cfg.machine_type, &m.machine_type),
        runtime_profile: differs(&cfg.runtime_profile, &m.runtime_profile),
        capabilities: cfg
            .capabilities
            .as_ref()
            .filter(|c| **c != m.capabilities)
            .cloned(),
        labels: cfg.labels.as_ref().filter(|l| **l != m.labels).cloned(),
        skill_keys: cfg
            .skill_keys
            .as_ref()
            .filter(|s| **s != m.skill_keys)
            .cloned(),
        policy_ids: cfg
            .policy_ids
            .as_ref()
            .filter(|p| **p != m.policy_ids)
            .cloned(),
        ..UpdateMachineRequest::default()
    }
}

pub(super) fn update_is_empty(u: &UpdateMachineRequest) -> bool {
    *u == UpdateMachineRequest::default()
}

/// The machine id named by a `MACHINE_IDENTITY_EXISTS` error, if any.
pub(super) fn existing_machine_id(details: Option<&serde_json::Value>) -> Option<String> {
    let details = details?;
    ["machineId", "existingMachineId", "machine_id", "id"]
        .iter()
        .find_map(|k| details.get(*k).and_then(|v| v.as_str()))
        .filter(|id| client::is_valid_machine_id(id))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use peaqos_protocol::{
        Address, IdentityRef, MachineIdentityProof, MachineStatus, ProofMethod, ResolutionSource,
    };

    use super::*;

    fn ts(ms: i64) -> Timestamp {
        Timestamp::from_unix_millis(ms).unwrap()
    }

    #[test]
    fn renewal_is_at_two_thirds_with_bounded_jitter() {
        let v = ts(1_000_000);
        let e = ts(1_000_000 + 90_000);
        assert_eq!(renewal_point(v, e, None, 0.0), ts(1_060_000));
        assert_eq!(renewal_point(v, e, None, 1.0), ts(1_060_000 - 7_500));
        assert_eq!(
            renewal_point(v, e, Some(Duration::from_secs(10)), 0.0),
            ts(1_080_000)
        );
        // A renew_before longer than the lifetime still leaves a quarter.
        assert_eq!(
            renewal_point(v, e, Some(Duration::from_secs(3600)), 1.0),
            ts(1_022_500)
        );
    }

    fn record(cfg: &MachineConfig) -> Machine {
        Machine {
            id: "mach_1".into(),
            display_name: cfg.display_name.clone(),
            status: MachineStatus::Active,
            owner_id: cfg.owner_id.clone(),
            identity_ref: IdentityRef::parse("did:peaq:1").unwrap(),
            identity_proof: Some(MachineIdentityProof {
                method: ProofMethod::Eip191,
                identity_ref: IdentityRef::parse("did:peaq:1").unwrap(),
                signer_address: Address::parse("0x0000000000000000000000000000000000000001")
                    .unwrap(),
                challenge_id: "chl_1".into(),
                verified_at: ts(0),
                challenge_expires_at: ts(0),
                controller_addresses: vec![],
                resolution_source: ResolutionSource::PeaqosMcr,
                expires_at: None,
            }),
            machine_type: cfg.machine_type.clone(),
            runtime_profile: cfg.runtime_profile.clone(),
            capabilities: vec!["lidar".into()],
            labels: BTreeMap::new(),
            policy_ids: vec![],
            skill_keys: vec![],
            created_at: ts(0),
            updated_at: ts(0),
        }
    }

    #[test]
    fn only_changed_and_managed_fields_are_pushed() {
        let mut cfg = MachineConfig {
            display_name: "robot".into(),
            owner_id: "o".into(),
            machine_type: "t".into(),
            runtime_profile: "r".into(),
            capabilities: None,
            labels: None,
            skill_keys: None,
            policy_ids: None,
        };
        let m = record(&cfg);
        assert!(
            update_is_empty(&field_changes(&cfg, &m)),
            "unmanaged lists left alone"
        );
        cfg.display_name = "robot 2".into();
        cfg.labels = Some(BTreeMap::from([("site".into(), "b".into())]));
        cfg.capabilities = Some(vec!["lidar".into()]);
        let u = field_changes(&cfg, &m);
        assert_eq!(u.display_name.as_deref(), Some("robot 2"));
        assert_eq!(u.labels, cfg.labels);
        assert_eq!(u.capabilities, None, "equal list not sent");
        assert_eq!(u.status, None);
    }

    #[test]
    fn existing_record_id_is_read_from_details_and_validated() {
        let d = serde_json::json!({"machineId": "mach_9"});
        assert_eq!(existing_machine_id(Some(&d)).as_deref(), Some("mach_9"));
        let d = serde_json::json!({"machineId": "../x"});
        assert_eq!(existing_machine_id(Some(&d)), None);
        assert_eq!(existing_machine_id(None), None);
    }
}
