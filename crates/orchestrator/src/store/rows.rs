//! Rows to records and records to column values, the same for every
//! database: both schemas store times as unix milliseconds (64-bit
//! integers) and list fields as JSON text.

use peaqos_protocol::{IdentityRef, MachineIdentityProof, Timestamp};
use sqlx::{ColumnIndex, Decode, Row, Type};

use super::{MachineRecord, StoreError, StoredStatus};
use crate::audit::AuditEvent;

/// The columns of `machines`, in the order every statement here uses.
macro_rules! machine_columns {
    () => {
        "id, identity_ref, status, display_name, owner_id, machine_type, runtime_profile, \
         capabilities, labels, policy_ids, skill_keys, proof, created_at, updated_at"
    };
}
pub(crate) use machine_columns;

/// The columns of `audit_events`, in the order every statement here uses.
macro_rules! audit_columns {
    () => {
        "id, actor, type, resource_type, resource_id, payload, created_at"
    };
}
pub(crate) use audit_columns;

/// JSON text of a list or map field.
pub(crate) fn to_json<T: serde::Serialize>(value: &T) -> String {
    // Serialising strings, lists and maps of strings cannot fail.
    serde_json::to_string(value).unwrap_or_default()
}

/// JSON text of a stored proof, with its addresses in lower case. Reading a
/// mixed-case (EIP-55) address back means verifying its checksum, a keccak
/// hash per address per read, which was a tenth of a list page's time;
/// lower case reads back without one. (Older rows, in mixed case, still
/// read.)
pub(crate) fn proof_json(proof: &MachineIdentityProof) -> String {
    let mut value = serde_json::to_value(proof).unwrap_or_default();
    let lower = |v: &mut serde_json::Value| {
        if let serde_json::Value::String(s) = v {
            s.make_ascii_lowercase();
        }
    };
    if let Some(signer) = value.get_mut("signerAddress") {
        lower(signer);
    }
    if let Some(serde_json::Value::Array(all)) = value.get_mut("controllerAddresses") {
        all.iter_mut().for_each(lower);
    }
    value.to_string()
}

pub(crate) fn machine_from_row<'r, R>(row: &'r R) -> Result<MachineRecord, StoreError>
where
    R: Row,
    &'r str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
{
    let id: String = row.try_get("id")?;
    let corrupt = |what: &str| StoreError::Corrupt {
        id: id.clone(),
        what: what.to_owned(),
    };
    let text = |column: &'r str| -> Result<String, StoreError> { Ok(row.try_get(column)?) };
    let identity_ref = text("identity_ref")?;
    let identity = IdentityRef::parse(&identity_ref).map_err(|_| corrupt("identity_ref"))?;
    let status = StoredStatus::parse(&text("status")?).ok_or_else(|| corrupt("status"))?;
    let proof: Option<String> = row.try_get("proof")?;
    let proof = proof
        .map(|p| serde_json::from_str::<MachineIdentityProof>(&p))
        .transpose()
        .map_err(|_| corrupt("proof"))?;
    let millis = |column: &'r str| -> Result<Timestamp, StoreError> {
        Timestamp::from_unix_millis(row.try_get(column)?).ok_or_else(|| corrupt(column))
    };
    Ok(MachineRecord {
        identity,
        status,
        display_name: text("display_name")?,
        owner_id: text("owner_id")?,
        machine_type: text("machine_type")?,
        runtime_profile: text("runtime_profile")?,
        capabilities: serde_json::from_str(&text("capabilities")?)
            .map_err(|_| corrupt("capabilities"))?,
        labels: serde_json::from_str(&text("labels")?).map_err(|_| corrupt("labels"))?,
        policy_ids: serde_json::from_str(&text("policy_ids")?)
            .map_err(|_| corrupt("policy_ids"))?,
        skill_keys: serde_json::from_str(&text("skill_keys")?)
            .map_err(|_| corrupt("skill_keys"))?,
        proof,
        created_at: millis("created_at")?,
        updated_at: millis("updated_at")?,
        id,
    })
}

pub(crate) fn audit_event_from_row<'r, R>(row: &'r R) -> Result<AuditEvent, StoreError>
where
    R: Row,
    &'r str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
{
    let id: i64 = row.try_get("id")?;
    let corrupt = |what: &str| StoreError::Corrupt {
        id: format!("audit event {id}"),
        what: what.to_owned(),
    };
    let payload: String = row.try_get("payload")?;
    Ok(AuditEvent {
        actor: row.try_get("actor")?,
        kind: row.try_get("type")?,
        resource_type: row.try_get("resource_type")?,
        resource_id: row.try_get("resource_id")?,
        payload: serde_json::from_str(&payload).map_err(|_| corrupt("payload"))?,
        created_at: Timestamp::from_unix_millis(row.try_get("created_at")?)
            .ok_or_else(|| corrupt("created_at"))?,
        id,
    })
}

#[cfg(test)]
mod tests {
    use peaqos_protocol::{Address, ProofMethod, ResolutionSource};

    use super::*;

    #[test]
    fn proofs_are_stored_with_lower_case_addresses_and_old_rows_still_read() {
        let at = Timestamp::from_unix_millis(1_764_089_659_123).unwrap();
        let a = Address::parse("0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed").unwrap();
        let b = Address::parse("0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359").unwrap();
        let proof = MachineIdentityProof {
            method: ProofMethod::Eip191,
            identity_ref: IdentityRef::parse("did:peaq:7").unwrap(),
            signer_address: a,
            challenge_id: "chl_x".into(),
            verified_at: at,
            challenge_expires_at: at,
            controller_addresses: vec![a, b],
            resolution_source: ResolutionSource::PeaqosMcr,
            expires_at: None,
        };
        let stored = proof_json(&proof);
        assert!(
            stored.contains("\"0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaed\""),
            "{stored}"
        );
        assert!(!stored.contains("5aAeb"), "{stored}");
        assert_eq!(
            serde_json::from_str::<MachineIdentityProof>(&stored).unwrap(),
            proof
        );
        let old = to_json(&proof);
        assert!(old.contains("5aAeb"));
        assert_eq!(
            serde_json::from_str::<MachineIdentityProof>(&old).unwrap(),
            proof
        );
    }
}
