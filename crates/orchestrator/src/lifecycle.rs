//! The machine lifecycle rules the wire contract leaves open
//! (docs/orchestrator.md, "Rules the contract leaves open"), in one place
//! and without I/O: which status a PATCH may set, identity immutability,
//! which PATCH relies on the stored proof (block and unblock do not),
//! activation with a stored proof,
//! what a list shows, and when a record reads `degraded`.
//!
//! The service layer fetches what these rules need (the record, fresh
//! controllers, the time) and asks them; the HTTP edge maps a [`Refusal`] to
//! the contract's code. Messages are for the client: they name the problem
//! and never echo client input beyond canonical identifiers.

use std::time::Duration;

use peaqos_protocol::{
    Address, IdentityRef, Machine, MachineIdentityProof, MachineStatus, Timestamp,
};

use crate::controllers::Resolution;
use crate::store::{MachineRecord, StoredStatus};
use crate::verify;

/// The deployment's settings the rules depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Machine writes need a verified identity proof (production).
    pub verification_required: bool,
    /// Proofs older than this no longer keep a machine active.
    pub proof_max_age: Option<Duration>,
}

/// Why a lifecycle rule refuses a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("status: `degraded` follows from the proof's age and cannot be set")]
    DegradedNotSettable,
    #[error("status: archive a machine with DELETE /api/v1/machines/{{machineId}}")]
    ArchiveWithDelete,
    #[error("identityRef is {current} and cannot be changed")]
    IdentityImmutable { current: IdentityRef },
    #[error(
        "identityProof is required: request a challenge for the identity, sign its message \
         with a controller key, and send {{challengeId, signature}}"
    )]
    ProofRequired,
    #[error("a blocked machine is activated only with a fresh identity proof")]
    BlockedNeedsFreshProof,
    #[error("the machine has no verified identity proof")]
    NoStoredProof,
    #[error(
        "the stored identity proof expired at {expired_at}; request a challenge and send a \
         fresh identityProof with status `active`"
    )]
    StoredProofExpired { expired_at: Timestamp },
    #[error("the proof's signer {signer} is no longer a controller of {identity}")]
    NoLongerController {
        machine_id: String,
        signer: Address,
        identity: IdentityRef,
    },
    #[error("{identity} no longer resolves to any controller (not activated on peaqOS)")]
    NoLongerResolves {
        machine_id: String,
        identity: IdentityRef,
    },
    #[error("{identity} does not resolve to any controller (not activated on peaqOS)")]
    NotActivated { identity: IdentityRef },
}

/// A new machine: proofs are required unless verification is off. (A new
/// record is always `draft`.)
pub fn check_create(has_proof: bool, policy: Policy) -> Result<(), Refusal> {
    if policy.verification_required && !has_proof {
        return Err(Refusal::ProofRequired);
    }
    Ok(())
}

/// The stored status a PATCH asks for. `degraded` follows from proof age
/// and `archived` is set with DELETE, so neither can be asked for.
pub fn settable_status(requested: Option<MachineStatus>) -> Result<Option<StoredStatus>, Refusal> {
    match requested {
        None => Ok(None),
        Some(MachineStatus::Degraded) => Err(Refusal::DegradedNotSettable),
        Some(MachineStatus::Archived) => Err(Refusal::ArchiveWithDelete),
        Some(s) => Ok(StoredStatus::from_wire(s)),
    }
}

/// Archived is final: a PATCH finds nothing to change (404).
pub fn is_patchable(status: StoredStatus) -> bool {
    status != StoredStatus::Archived
}

/// `identityRef` never changes; sending the same canonical value is not a
/// change.
pub fn check_identity_unchanged(
    current: &IdentityRef,
    requested: Option<&IdentityRef>,
) -> Result<(), Refusal> {
    match requested {
        Some(new) if new != current => Err(Refusal::IdentityImmutable {
            current: current.clone(),
        }),
        _ => Ok(()),
    }
}

/// Whether a GET re-verifies the stored proof. An archived record is a
/// tombstone shown as it is; a blocked one too, because it claims nothing:
/// re-verifying it would answer `409` once its controller is gone (the
/// usual reason to block), and an agent told `409` re-proves, which would
/// be its way out of an operator's block. Shown as `blocked`, it is
/// reported and left alone.
pub fn read_reverifies(status: StoredStatus, policy: Policy) -> bool {
    !matches!(status, StoredStatus::Archived | StoredStatus::Blocked)
        && policy.verification_required
}

/// Whether a PATCH re-verifies the stored proof: every one does, unless it
/// carries a fresh proof (verified instead), or withdraws trust rather than
/// relying on it: one that leaves the record `blocked` (so that a machine
/// can be blocked after its key is compromised and its controller removed),
/// or takes it from `blocked` back to `draft` (an operator's unblock, after
/// which the agent proves itself again before it is `active`).
pub fn patch_reverifies(
    fresh_proof: bool,
    from: StoredStatus,
    to: Option<StoredStatus>,
    policy: Policy,
) -> bool {
    let ends = to.unwrap_or(from);
    let withdraws_trust = ends == StoredStatus::Blocked
        || (from == StoredStatus::Blocked && ends == StoredStatus::Draft);
    !fresh_proof && !withdraws_trust && policy.verification_required
}

/// A stored proof holds while its signer is among the fresh controllers.
pub fn check_stored_proof(
    machine: &MachineRecord,
    controllers: &Resolution,
) -> Result<(), Refusal> {
    let Some(proof) = &machine.proof else {
        return Err(Refusal::NoStoredProof);
    };
    if verify::still_valid(proof, controllers) {
        return Ok(());
    }
    if controllers.is_active() {
        Err(Refusal::NoLongerController {
            machine_id: machine.id.clone(),
            signer: proof.signer_address,
            identity: machine.identity.clone(),
        })
    } else {
        Err(Refusal::NoLongerResolves {
            machine_id: machine.id.clone(),
            identity: machine.identity.clone(),
        })
    }
}

/// `status: active` without a fresh proof reuses the stored one, which must
/// exist and be young enough, and is never a way out of `blocked`. (That it
/// still matches the controllers is checked by re-verification before.)
pub fn check_activation_with_stored_proof(
    machine: &MachineRecord,
    policy: Policy,
    now: Timestamp,
) -> Result<(), Refusal> {
    if machine.status == StoredStatus::Blocked {
        return Err(Refusal::BlockedNeedsFreshProof);
    }
    if !policy.verification_required {
        return Ok(());
    }
    let Some(proof) = &machine.proof else {
        return Err(Refusal::NoStoredProof);
    };
    match verify::proof_expiry(proof, policy.proof_max_age) {
        Some(expired_at) if now >= expired_at => Err(Refusal::StoredProofExpired { expired_at }),
        _ => Ok(()),
    }
}

/// Whether a live machine is listed: its identity resolves and its stored
/// proof's signer is still a controller. Drafts without a proof are never
/// listed; with verification off, proofs are not checked.
pub fn is_listed(
    machine: &MachineRecord,
    controllers: Option<&Resolution>,
    policy: Policy,
) -> bool {
    match &machine.proof {
        None => !policy.verification_required && machine.status != StoredStatus::Draft,
        Some(_) if !policy.verification_required => true,
        Some(proof) => controllers.is_some_and(|r| r.is_controller(&proof.signer_address)),
    }
}

/// The status a record reads as: `active` reads `degraded` once its proof is
/// past the maximum age; drafts and blocked machines keep their status.
pub fn displayed_status(
    status: StoredStatus,
    proof: Option<&MachineIdentityProof>,
    max_age: Option<Duration>,
    now: Timestamp,
) -> MachineStatus {
    match status {
        StoredStatus::Draft => MachineStatus::Draft,
        StoredStatus::Active if proof.is_some_and(|p| verify::is_stale(p, max_age, now)) => {
            MachineStatus::Degraded
        }
        StoredStatus::Active => MachineStatus::Active,
        StoredStatus::Blocked => MachineStatus::Blocked,
        StoredStatus::Archived => MachineStatus::Archived,
    }
}

/// The machine as responses carry it: the status it reads as, and the
/// proof with its expiry (`expiresAt`) when proofs age.
pub fn read_as(m: MachineRecord, max_age: Option<Duration>, now: Timestamp) -> Machine {
    let status = displayed_status(m.status, m.proof.as_ref(), max_age, now);
    let identity_proof = m.proof.map(|mut p| {
        p.expires_at = verify::proof_expiry(&p, max_age);
        p
    });
    Machine {
        id: m.id,
        display_name: m.display_name,
        status,
        owner_id: m.owner_id,
        identity_ref: m.identity,
        identity_proof,
        machine_type: m.machine_type,
        runtime_profile: m.runtime_profile,
        capabilities: m.capabilities,
        labels: m.labels,
        policy_ids: m.policy_ids,
        skill_keys: m.skill_keys,
        created_at: m.created_at,
        updated_at: m.updated_at,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use peaqos_protocol::{ProofMethod, ResolutionSource};

    use super::*;

    const DAY: Duration = Duration::from_hours(24);
    const REQUIRED: Policy = Policy {
        verification_required: true,
        proof_max_age: Some(DAY),
    };
    const DISABLED: Policy = Policy {
        verification_required: false,
        proof_max_age: Some(DAY),
    };

    fn at(ms: i64) -> Timestamp {
        Timestamp::from_unix_millis(ms).unwrap()
    }

    fn signer() -> Address {
        Address::from_bytes([7; 20])
    }

    fn proof(verified_ms: i64) -> MachineIdentityProof {
        MachineIdentityProof {
            method: ProofMethod::Eip191,
            identity_ref: IdentityRef::parse("did:peaq:42").unwrap(),
            signer_address: signer(),
            challenge_id: "chl_x".into(),
            verified_at: at(verified_ms),
            challenge_expires_at: at(verified_ms + 1000),
            controller_addresses: vec![signer()],
            resolution_source: ResolutionSource::PeaqosMcr,
            expires_at: None,
        }
    }

    fn machine(status: StoredStatus, proof: Option<MachineIdentityProof>) -> MachineRecord {
        MachineRecord {
            id: "mach_1".into(),
            identity: IdentityRef::parse("did:peaq:42").unwrap(),
            status,
            display_name: "m".into(),
            owner_id: "o".into(),
            machine_type: String::new(),
            runtime_profile: String::new(),
            capabilities: vec![],
            labels: std::collections::BTreeMap::new(),
            policy_ids: vec![],
            skill_keys: vec![],
            proof,
            created_at: at(0),
            updated_at: at(0),
        }
    }

    fn controllers(addresses: &[Address]) -> Resolution {
        Resolution::Found(Arc::from(addresses))
    }

    #[test]
    fn create_needs_a_proof_only_when_verification_is_required() {
        assert_eq!(check_create(false, REQUIRED), Err(Refusal::ProofRequired));
        assert_eq!(check_create(true, REQUIRED), Ok(()));
        assert_eq!(check_create(false, DISABLED), Ok(()));
    }

    #[test]
    fn patch_may_set_draft_active_and_blocked_only() {
        assert_eq!(settable_status(None), Ok(None));
        assert_eq!(
            settable_status(Some(MachineStatus::Draft)),
            Ok(Some(StoredStatus::Draft))
        );
        assert_eq!(
            settable_status(Some(MachineStatus::Active)),
            Ok(Some(StoredStatus::Active))
        );
        assert_eq!(
            settable_status(Some(MachineStatus::Blocked)),
            Ok(Some(StoredStatus::Blocked))
        );
        assert_eq!(
            settable_status(Some(MachineStatus::Degraded)),
            Err(Refusal::DegradedNotSettable)
        );
        assert_eq!(
            settable_status(Some(MachineStatus::Archived)),
            Err(Refusal::ArchiveWithDelete)
        );
    }

    #[test]
    fn archived_is_final_and_neither_it_nor_blocked_is_reverified_on_read() {
        assert!(!is_patchable(StoredStatus::Archived));
        for s in [
            StoredStatus::Draft,
            StoredStatus::Active,
            StoredStatus::Blocked,
        ] {
            assert!(is_patchable(s), "{s:?}");
            assert!(!read_reverifies(s, DISABLED), "{s:?}");
        }
        assert!(read_reverifies(StoredStatus::Draft, REQUIRED));
        assert!(read_reverifies(StoredStatus::Active, REQUIRED));
        assert!(!read_reverifies(StoredStatus::Blocked, REQUIRED));
        assert!(!read_reverifies(StoredStatus::Archived, REQUIRED));
    }

    #[test]
    fn identity_is_immutable_but_resending_it_is_no_change() {
        let current = IdentityRef::parse("did:peaq:42").unwrap();
        let alias = IdentityRef::parse("peaqos:machine:42").unwrap();
        let other = IdentityRef::parse("did:peaq:43").unwrap();
        assert_eq!(check_identity_unchanged(&current, None), Ok(()));
        assert_eq!(check_identity_unchanged(&current, Some(&alias)), Ok(()));
        let refused = check_identity_unchanged(&current, Some(&other)).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "identityRef is did:peaq:42 and cannot be changed"
        );
    }

    #[test]
    fn every_patch_reverifies_unless_it_carries_a_fresh_proof_or_withdraws_trust() {
        use StoredStatus::{Active, Blocked, Draft};
        // Relying on the stored proof: re-verified.
        for (from, to) in [
            (Draft, None),
            (Active, None),
            (Draft, Some(Active)),
            (Active, Some(Draft)),
            (Blocked, Some(Active)),
        ] {
            assert!(
                patch_reverifies(false, from, to, REQUIRED),
                "{from:?} -> {to:?}"
            );
            assert!(
                !patch_reverifies(true, from, to, REQUIRED),
                "{from:?} -> {to:?}"
            );
            assert!(
                !patch_reverifies(false, from, to, DISABLED),
                "{from:?} -> {to:?}"
            );
        }
        // Blocking (also a blocked record edited) and unblocking to draft:
        // possible after the controller is gone.
        for (from, to) in [
            (Draft, Some(Blocked)),
            (Active, Some(Blocked)),
            (Blocked, Some(Blocked)),
            (Blocked, None),
            (Blocked, Some(Draft)),
        ] {
            assert!(
                !patch_reverifies(false, from, to, REQUIRED),
                "{from:?} -> {to:?}"
            );
        }
    }

    #[test]
    fn a_stored_proof_holds_while_its_signer_is_a_controller() {
        let m = machine(StoredStatus::Active, Some(proof(0)));
        assert_eq!(check_stored_proof(&m, &controllers(&[signer()])), Ok(()));
        let other = Address::from_bytes([1; 20]);
        assert!(matches!(
            check_stored_proof(&m, &controllers(&[other])),
            Err(Refusal::NoLongerController { .. })
        ));
        assert!(matches!(
            check_stored_proof(&m, &Resolution::NotFound),
            Err(Refusal::NoLongerResolves { .. })
        ));
        let bare = machine(StoredStatus::Draft, None);
        assert_eq!(
            check_stored_proof(&bare, &controllers(&[signer()])),
            Err(Refusal::NoStoredProof)
        );
    }

    #[test]
    fn activation_with_a_stored_proof_needs_one_young_enough_and_not_blocked() {
        let young = machine(StoredStatus::Draft, Some(proof(0)));
        assert_eq!(
            check_activation_with_stored_proof(&young, REQUIRED, at(1000)),
            Ok(())
        );
        let day_ms = 86_400_000;
        assert_eq!(
            check_activation_with_stored_proof(&young, REQUIRED, at(day_ms)),
            Err(Refusal::StoredProofExpired {
                expired_at: at(day_ms)
            })
        );
        let no_limit = Policy {
            proof_max_age: None,
            ..REQUIRED
        };
        assert_eq!(
            check_activation_with_stored_proof(&young, no_limit, at(day_ms * 365)),
            Ok(())
        );
        let bare = machine(StoredStatus::Draft, None);
        assert_eq!(
            check_activation_with_stored_proof(&bare, REQUIRED, at(0)),
            Err(Refusal::NoStoredProof)
        );
        assert_eq!(
            check_activation_with_stored_proof(&bare, DISABLED, at(0)),
            Ok(())
        );
        let blocked = machine(StoredStatus::Blocked, Some(proof(0)));
        for policy in [REQUIRED, DISABLED] {
            assert_eq!(
                check_activation_with_stored_proof(&blocked, policy, at(0)),
                Err(Refusal::BlockedNeedsFreshProof)
            );
        }
    }

    #[test]
    fn lists_show_machines_whose_proof_holds() {
        let mine = controllers(&[signer()]);
        let others = controllers(&[Address::from_bytes([1; 20])]);
        for status in [
            StoredStatus::Draft,
            StoredStatus::Active,
            StoredStatus::Blocked,
        ] {
            let m = machine(status, Some(proof(0)));
            assert!(is_listed(&m, Some(&mine), REQUIRED), "{status:?}");
            assert!(!is_listed(&m, Some(&others), REQUIRED), "{status:?}");
            assert!(!is_listed(&m, None, REQUIRED), "{status:?}");
            assert!(is_listed(&m, None, DISABLED), "{status:?}");
        }
        let bare_draft = machine(StoredStatus::Draft, None);
        assert!(!is_listed(&bare_draft, Some(&mine), REQUIRED));
        assert!(!is_listed(&bare_draft, None, DISABLED));
        let bare_active = machine(StoredStatus::Active, None);
        assert!(!is_listed(&bare_active, None, REQUIRED));
        assert!(is_listed(&bare_active, None, DISABLED));
    }

    #[test]
    fn only_an_active_machine_past_the_proof_age_reads_degraded() {
        let p = proof(0);
        let day_ms = 86_400_000;
        let max = Some(DAY);
        let show = |s, now| displayed_status(s, Some(&p), max, at(now));
        assert_eq!(
            show(StoredStatus::Active, day_ms - 1),
            MachineStatus::Active
        );
        assert_eq!(show(StoredStatus::Active, day_ms), MachineStatus::Degraded);
        assert_eq!(show(StoredStatus::Draft, day_ms), MachineStatus::Draft);
        assert_eq!(show(StoredStatus::Blocked, day_ms), MachineStatus::Blocked);
        assert_eq!(
            show(StoredStatus::Archived, day_ms),
            MachineStatus::Archived
        );
        assert_eq!(
            displayed_status(StoredStatus::Active, Some(&p), None, at(day_ms * 365)),
            MachineStatus::Active
        );
        assert_eq!(
            displayed_status(StoredStatus::Active, None, max, at(day_ms)),
            MachineStatus::Active
        );

        let wire = read_as(
            machine(StoredStatus::Active, Some(p.clone())),
            max,
            at(day_ms),
        );
        assert_eq!(wire.status, MachineStatus::Degraded);
        assert_eq!(wire.identity_proof.unwrap().expires_at, Some(at(day_ms)));
        let wire = read_as(machine(StoredStatus::Active, Some(p)), None, at(0));
        assert_eq!(wire.identity_proof.unwrap().expires_at, None);
    }
}
