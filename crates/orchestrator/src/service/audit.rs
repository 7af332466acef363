//! Reading the audit trail.

use super::ServiceError;
use crate::app::App;
use crate::audit::{AuditEvent, AuditQuery};

/// One page of events, and the cursor of the next (`None`: the log ends
/// here for now).
#[derive(Debug)]
pub struct AuditPage {
    pub items: Vec<AuditEvent>,
    pub next: Option<i64>,
}

impl App {
    /// Events after `query.after`, oldest first. A full page has a next
    /// cursor; a short one is the end of the log as committed now, and its
    /// last id is where to look again later.
    pub async fn list_audit_events(&self, query: &AuditQuery) -> Result<AuditPage, ServiceError> {
        let items = self.store.list_audit_events(query).await?;
        let full = items.len() >= query.limit as usize;
        let next = items.last().filter(|_| full).map(|e| e.id);
        Ok(AuditPage { items, next })
    }

    /// The id of the last committed event: where a stream without a cursor
    /// starts.
    pub async fn audit_head(&self) -> Result<i64, ServiceError> {
        Ok(self.store.audit_head().await?)
    }
}
