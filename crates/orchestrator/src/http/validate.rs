//! Bounds on the fields of machine requests: what a request must look like
//! before the service sees it. Every error names the field.

use std::collections::BTreeMap;

use peaqos_protocol::{CreateMachineRequest, UpdateMachineRequest};

use super::ApiError;

/// Text fields: display name, owner, type, runtime profile, list entries.
const MAX_TEXT: usize = 200;
/// Entries of each list field, and labels.
const MAX_ITEMS: usize = 100;
const MAX_LABEL_KEY: usize = 100;
const MAX_LABEL_VALUE: usize = 500;

fn check_text(field: &str, value: &str, non_empty: bool) -> Result<(), ApiError> {
    if non_empty && value.trim().is_empty() {
        return Err(ApiError::validation(
            field,
            format!("{field} must not be empty"),
        ));
    }
    // Characters, as JSON Schema's maxLength counts them (the OpenAPI
    // document gives the same bounds).
    if value.chars().count() > MAX_TEXT {
        return Err(ApiError::validation(
            field,
            format!("{field} is longer than {MAX_TEXT} characters"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::validation(
            field,
            format!("{field} must not contain control characters"),
        ));
    }
    Ok(())
}

fn check_list(field: &str, values: &[String]) -> Result<(), ApiError> {
    if values.len() > MAX_ITEMS {
        return Err(ApiError::validation(
            field,
            format!("{field} has more than {MAX_ITEMS} entries"),
        ));
    }
    for (i, v) in values.iter().enumerate() {
        check_text(&format!("{field}[{i}]"), v, true)?;
    }
    Ok(())
}

fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if labels.len() > MAX_ITEMS {
        return Err(ApiError::validation(
            "labels",
            format!("labels has more than {MAX_ITEMS} entries"),
        ));
    }
    for (k, v) in labels {
        let bad = |message: &str| ApiError::validation("labels", message.to_owned());
        if k.is_empty() || k.chars().count() > MAX_LABEL_KEY || k.chars().any(char::is_control) {
            return Err(bad(&format!(
                "label keys must be 1 to {MAX_LABEL_KEY} characters without control characters"
            )));
        }
        if v.chars().count() > MAX_LABEL_VALUE || v.chars().any(char::is_control) {
            return Err(bad(&format!(
                "label values must be at most {MAX_LABEL_VALUE} characters without control characters"
            )));
        }
    }
    Ok(())
}

pub(super) fn validate_create(r: &CreateMachineRequest) -> Result<(), ApiError> {
    check_text("displayName", &r.display_name, true)?;
    check_text("ownerId", &r.owner_id, true)?;
    check_text("machineType", &r.machine_type, false)?;
    check_text("runtimeProfile", &r.runtime_profile, false)?;
    check_list(
        "capabilities",
        r.capabilities.as_deref().unwrap_or_default(),
    )?;
    check_list("policyIds", r.policy_ids.as_deref().unwrap_or_default())?;
    check_list("skillKeys", r.skill_keys.as_deref().unwrap_or_default())?;
    check_labels(r.labels.as_ref().unwrap_or(&BTreeMap::new()))
}

pub(super) fn validate_update(r: &UpdateMachineRequest) -> Result<(), ApiError> {
    // No body, `{}` or only `null`s: nothing to change. Accepting it would
    // move `updatedAt` and record a `machine.updated` event with no fields.
    if *r == UpdateMachineRequest::default() {
        return Err(ApiError::validation(
            "body",
            "the request body must give at least one field to change",
        ));
    }
    let text = [
        ("displayName", &r.display_name, true),
        ("ownerId", &r.owner_id, true),
        ("machineType", &r.machine_type, false),
        ("runtimeProfile", &r.runtime_profile, false),
    ];
    for (field, value, non_empty) in text {
        if let Some(v) = value {
            check_text(field, v, non_empty)?;
        }
    }
    let lists = [
        ("capabilities", &r.capabilities),
        ("policyIds", &r.policy_ids),
        ("skillKeys", &r.skill_keys),
    ];
    for (field, value) in lists {
        if let Some(v) = value {
            check_list(field, v)?;
        }
    }
    if let Some(labels) = &r.labels {
        check_labels(labels)?;
    }
    Ok(())
}
