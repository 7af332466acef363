//! Rows to records and records to column values, the same for every
//! database: both schemas store times as unix milliseconds (64-bit
//! integers) and list fields as JSON text.

use peaqos_protocol::{IdentityRef, MachineIdentityProof, Timestamp};
use sqlx::{ColumnIndex, Decode, Row, Type};

use super::{ChallengeRecord, MachineRecord, StoreError, StoredStatus};

/// The columns of `machines`, in the order every statement here uses.
macro_rules! machine_columns {
    () => {
        "id, identity_ref, status, display_name, owner_id, machine_type, runtime_profile, \
         capabilities, labels, policy_ids, skill_keys, proof, created_at, updated_at"
    };
}
pub(crate) use machine_columns;

/// JSON text of a list or map field.
pub(crate) fn to_json<T: serde::Serialize>(value: &T) -> String {
    // Serialising strings, lists and maps of strings cannot fail.
    serde_json::to_string(value).unwrap_or_default()
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

pub(crate) fn challenge_from_row<'r, R>(row: &'r R) -> Result<ChallengeRecord, StoreError>
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
    let identity_ref: String = row.try_get("identity_ref")?;
    let identity = IdentityRef::parse(&identity_ref).map_err(|_| corrupt("identity_ref"))?;
    let issued_at = Timestamp::from_unix_millis(row.try_get("issued_at")?)
        .ok_or_else(|| corrupt("issued_at"))?;
    let expires_at = Timestamp::from_unix_millis(row.try_get("expires_at")?)
        .ok_or_else(|| corrupt("expires_at"))?;
    Ok(ChallengeRecord {
        message: row.try_get("message")?,
        identity,
        issued_at,
        expires_at,
        id,
    })
}
