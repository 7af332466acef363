//! The audit trail: one event per change to a machine, written by the store
//! in the same transaction as the change (a rolled-back change leaves no
//! event). This module says what an event is and what it records: the
//! kind of change, who made it, and what changed. It is pure; `service`
//! builds events and `store` writes and reads them.
//!
//! Events are numbered by one counter that every writer takes in its
//! transaction (a row on PostgreSQL, the single writer on SQLite), so ids
//! follow commit order without gaps, the same on both stores: a reader that
//! has seen id `n` has seen every event up to `n`, whichever replica wrote
//! it. An id is therefore also a cursor any replica understands.

use peaqos_protocol::{Address, Timestamp};
use serde_json::{Map, Value, json};

use crate::store::{MachineRecord, StoredStatus};

/// The only resource type recorded so far.
pub const RESOURCE_MACHINE: &str = "machine";

/// What happened to the resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Created,
    /// Plain fields changed; status and proof as they were.
    Updated,
    /// A fresh proof was stored; status as it was.
    ProofRenewed,
    Activated,
    Blocked,
    /// Set back to `draft`.
    Drafted,
    Archived,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "machine.created",
            Self::Updated => "machine.updated",
            Self::ProofRenewed => "machine.proof_renewed",
            Self::Activated => "machine.activated",
            Self::Blocked => "machine.blocked",
            Self::Drafted => "machine.drafted",
            Self::Archived => "machine.archived",
        }
    }

    /// One change is one event: a status change names it, else a fresh
    /// proof, else the fields.
    pub fn of_update(old: StoredStatus, new: StoredStatus, renewed: bool) -> Self {
        match new {
            _ if new == old && renewed => Self::ProofRenewed,
            _ if new == old => Self::Updated,
            StoredStatus::Active => Self::Activated,
            StoredStatus::Blocked => Self::Blocked,
            StoredStatus::Draft => Self::Drafted,
            StoredStatus::Archived => Self::Archived,
        }
    }
}

/// Who asks: the name of the API key the request came with (auth on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub key_name: std::sync::Arc<str>,
    /// What the key may do.
    pub role: crate::roles::Role,
}

/// The actor of a change: the caller's key name; without auth, the signer
/// of the fresh proof the change carries; else `anonymous`. Never a secret.
pub fn actor(caller: Option<&Caller>, fresh_signer: Option<&Address>) -> String {
    match (caller, fresh_signer) {
        (Some(c), _) => c.key_name.to_string(),
        (None, Some(signer)) => signer.to_string(),
        (None, None) => "anonymous".to_owned(),
    }
}

/// An event about to be written (its id is drawn in the write).
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub actor: String,
    pub kind: EventType,
    pub resource_id: String,
    pub payload: Value,
    pub created_at: Timestamp,
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    pub id: i64,
    pub actor: String,
    /// `machine.created`, ...; kept as stored, so that kinds added later
    /// still read.
    pub kind: String,
    pub resource_type: String,
    pub resource_id: String,
    pub payload: Value,
    pub created_at: Timestamp,
}

/// Which events to list: after `after` (an event id), oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    pub machine_id: Option<String>,
    pub resource_type: Option<String>,
    pub after: i64,
    pub limit: u32,
}

/// The fields a client sets, by wire name, as they differ between two
/// records (status, identity and proof are reported apart).
fn changed_fields(old: &MachineRecord, new: &MachineRecord) -> Vec<&'static str> {
    let mut fields = Vec::new();
    let mut differs = |name, changed: bool| {
        if changed {
            fields.push(name);
        }
    };
    differs("displayName", old.display_name != new.display_name);
    differs("ownerId", old.owner_id != new.owner_id);
    differs("machineType", old.machine_type != new.machine_type);
    differs("runtimeProfile", old.runtime_profile != new.runtime_profile);
    differs("capabilities", old.capabilities != new.capabilities);
    differs("labels", old.labels != new.labels);
    differs("policyIds", old.policy_ids != new.policy_ids);
    differs("skillKeys", old.skill_keys != new.skill_keys);
    fields
}

fn proof_part(payload: &mut Map<String, Value>, m: &MachineRecord) {
    if let Some(proof) = &m.proof {
        payload.insert("signer".into(), json!(proof.signer_address.to_string()));
        payload.insert("challenge_id".into(), json!(proof.challenge_id));
    }
}

/// A machine was created: its identity, status, the fields it was given
/// and the proof it came with.
pub fn created(m: &MachineRecord, actor: String) -> NewEvent {
    let empty = MachineRecord {
        display_name: String::new(),
        owner_id: String::new(),
        machine_type: String::new(),
        runtime_profile: String::new(),
        capabilities: Vec::new(),
        labels: std::collections::BTreeMap::new(),
        policy_ids: Vec::new(),
        skill_keys: Vec::new(),
        ..m.clone()
    };
    let mut payload = Map::new();
    payload.insert("identity_ref".into(), json!(m.identity.canonical()));
    payload.insert("fields".into(), json!(changed_fields(&empty, m)));
    payload.insert("new_status".into(), json!(m.status.as_str()));
    proof_part(&mut payload, m);
    NewEvent {
        actor,
        kind: EventType::Created,
        resource_id: m.id.clone(),
        payload: Value::Object(payload),
        created_at: m.updated_at,
    }
}

/// A machine was changed from `old` to `new`; `renewed`: with a fresh
/// proof.
pub fn updated(old: &MachineRecord, new: &MachineRecord, renewed: bool, actor: String) -> NewEvent {
    let mut payload = Map::new();
    payload.insert("fields".into(), json!(changed_fields(old, new)));
    if old.status != new.status {
        payload.insert("old_status".into(), json!(old.status.as_str()));
        payload.insert("new_status".into(), json!(new.status.as_str()));
    }
    if renewed {
        proof_part(&mut payload, new);
    }
    NewEvent {
        actor,
        kind: EventType::of_update(old.status, new.status, renewed),
        resource_id: new.id.clone(),
        payload: Value::Object(payload),
        created_at: new.updated_at,
    }
}

/// The payload of an archive, once the store knows the status it replaced.
pub fn archived_payload(old: StoredStatus) -> Value {
    json!({"old_status": old.as_str(), "new_status": StoredStatus::Archived.as_str()})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_change_is_one_kind() {
        use StoredStatus::{Active, Blocked, Draft};
        assert_eq!(
            EventType::of_update(Draft, Active, true),
            EventType::Activated
        );
        assert_eq!(
            EventType::of_update(Draft, Active, false),
            EventType::Activated
        );
        assert_eq!(
            EventType::of_update(Blocked, Active, false),
            EventType::Activated
        );
        assert_eq!(
            EventType::of_update(Active, Active, true),
            EventType::ProofRenewed
        );
        assert_eq!(
            EventType::of_update(Active, Active, false),
            EventType::Updated
        );
        assert_eq!(
            EventType::of_update(Active, Blocked, true),
            EventType::Blocked
        );
        assert_eq!(
            EventType::of_update(Active, Draft, false),
            EventType::Drafted
        );
    }
}
