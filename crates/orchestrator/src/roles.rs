//! What an API key may do: its role, from the keys file.
//!
//! The roles are a ladder, each allowed what the one below is:
//! - `read`: every `GET` (machines, the audit trail, the event stream,
//!   metrics) and the console's views;
//! - `agent`: also registers and re-proves machines (challenges, `POST`
//!   machines, `PATCH` with a proof, `status: "active"` or plain fields);
//! - `operator`: also blocks, sets back to `draft` (unblocks), archives
//!   (`DELETE` or `status: "archived"`), and activates a blocked machine.
//!
//! An operator may also do what an agent does: a key without a role is an
//! operator (every key could do everything before roles), and registering
//! needs a controller's signature whoever asks.
//!
//! A refused request answers `403 FORBIDDEN` before anything is read or
//! written (no audit event).

use axum::http::Method;
use peaqos_protocol::MachineStatus;

use crate::audit::Caller;
use crate::service::ServiceError;

/// A key's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Read,
    Agent,
    Operator,
}

impl Role {
    /// The spellings in the keys file, lowest first.
    pub const NAMES: &'static [&'static str] = &["read", "agent", "operator"];

    pub fn parse(word: &str) -> Option<Self> {
        match word {
            "read" => Some(Self::Read),
            "agent" => Some(Self::Agent),
            "operator" => Some(Self::Operator),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Agent => "agent",
            Self::Operator => "operator",
        }
    }

    /// The least role a method needs. Unknown routes are judged by method
    /// too, so that a `read` key learns nothing more by probing.
    pub fn needed_for(method: &Method) -> Self {
        match *method {
            Method::GET | Method::HEAD | Method::OPTIONS => Self::Read,
            Method::DELETE => Self::Operator,
            _ => Self::Agent,
        }
    }

    /// The least role that may set `status` on a machine (a `PATCH`).
    pub fn needed_to_set(status: Option<MachineStatus>) -> Self {
        match status {
            None | Some(MachineStatus::Active | MachineStatus::Degraded) => Self::Agent,
            Some(MachineStatus::Draft | MachineStatus::Blocked | MachineStatus::Archived) => {
                Self::Operator
            }
        }
    }

    pub fn allows(self, needed: Self) -> bool {
        self >= needed
    }
}

/// Refuses `action` unless the caller's role reaches `needed`; without a
/// caller (auth off) everything is allowed, as the API is public then.
pub fn require(
    caller: Option<&Caller>,
    needed: Role,
    action: &'static str,
) -> Result<(), ServiceError> {
    match caller {
        Some(c) if !c.role.allows(needed) => Err(ServiceError::Forbidden {
            role: c.role.as_str(),
            action,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_role_may_do_what_the_one_below_may() {
        for (method, read, agent) in [
            (Method::GET, true, true),
            (Method::POST, false, true),
            (Method::PATCH, false, true),
            (Method::DELETE, false, false),
        ] {
            let needed = Role::needed_for(&method);
            assert_eq!(Role::Read.allows(needed), read, "{method}");
            assert_eq!(Role::Agent.allows(needed), agent, "{method}");
            assert!(Role::Operator.allows(needed), "{method}");
        }
        let block = Role::needed_to_set(Some(MachineStatus::Blocked));
        assert!(!Role::Agent.allows(block) && Role::Operator.allows(block));
        assert!(!Role::Agent.allows(Role::needed_to_set(Some(MachineStatus::Draft))));
        assert!(Role::Agent.allows(Role::needed_to_set(Some(MachineStatus::Active))));
        for name in Role::NAMES {
            assert_eq!(Role::parse(name).unwrap().as_str(), *name);
        }
    }
}
