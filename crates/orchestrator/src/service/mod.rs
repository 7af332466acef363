//! The service layer: what each endpoint does, in the domain's terms. It
//! fetches what the `lifecycle` rules and `verify` need (records,
//! controllers, the time), applies them, writes, and counts outcomes. It
//! returns [`ServiceError`], never an HTTP type; `http` parses requests,
//! calls in here, and maps the answer.

mod audit;
mod challenges;
mod error;
mod identity;
mod machines;

pub use audit::AuditPage;
pub use error::ServiceError;
pub use machines::Page;
