//! The three response envelopes: `{item}`, `{items, nextCursor}`, `{error}`.

use serde::{Deserialize, Serialize};

use crate::error_code::ErrorCode;

/// `{"item": T}`: create, get, update and challenge responses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemResponse<T> {
    pub item: T,
}

/// `{"items": [...], "nextCursor": "..."}`; `nextCursor` is `null` on the
/// last page (and a missing field reads as `null`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListResponse<T> {
    pub items: Vec<T>,
    #[serde(default)]
    pub next_cursor: Option<String>,
}

/// `{"error": {"code", "message", "details"?}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: ErrorBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

/// Query parameters of list endpoints.
pub mod pagination {
    /// Page size when `limit` is absent.
    pub const DEFAULT_LIMIT: u32 = 100;
    /// Largest accepted `limit`.
    pub const MAX_LIMIT: u32 = 500;
}
