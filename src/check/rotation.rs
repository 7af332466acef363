//! `check`'s lines about key rotation: a promoted key in use instead of the
//! configured one, a successor waiting to become a controller
//! (`nextControllerAddress`), a successor that stands in for a sealed key
//! as plaintext, and retired keys still on disk.

use std::path::Path;

use peaqos_logging::error_chain;
use peaqos_protocol::Address;

use super::{Outcome, Report};
use crate::config::IdentityConfig;
use crate::rotation::{self, Location, Record};

/// The rotation record of the machine whose state is in `state_dir`.
pub(super) fn record(state_dir: &Path) -> Option<Record> {
    Record::load(&rotation::keys_dir(state_dir))
}

/// The lines for a promoted key, in place of the configured key's: its
/// address when it opens.
pub(super) fn check_promoted(
    r: &mut Report,
    identity: &IdentityConfig,
    state_root: &Path,
    record: &Record,
) -> Option<Address> {
    let current = record.current.as_ref()?;
    match rotation::open_ref(current, identity, state_root) {
        Ok(key) => {
            r.push(
                Outcome::Ok,
                "key",
                format!(
                    "rotated: {} ({}), replacing the configured key {}",
                    key.address().checksummed(),
                    current.location,
                    record.configured.checksummed()
                ),
            );
            if record.next_unsealed && matches!(current.location, Location::File { .. }) {
                r.push(
                    Outcome::Warn,
                    "key plaintext",
                    format!(
                        "{} replaced a sealed key, and the agent cannot seal: seal it \
                         (docs/rotation.md#a-sealed-key)",
                        current.location
                    ),
                );
            }
            Some(key.address())
        }
        Err(e) => {
            r.push(Outcome::Fail, "key", error_chain(&e));
            None
        }
    }
}

/// The successor and the retired keys.
pub(super) fn check_steps(r: &mut Report, identity: &IdentityConfig, record: &Record) {
    if let Some(next) = &record.next {
        r.push(
            Outcome::Ok,
            "key successor",
            format!(
                "nextControllerAddress {} ({}) waits to become a controller of {}",
                next.address.checksummed(),
                next.location,
                identity.identity_ref
            ),
        );
        if record.next_unsealed {
            r.push(
                Outcome::Warn,
                "key plaintext",
                format!(
                    "the successor {} is a plaintext file: the current key is sealed, which \
                     the agent cannot do; seal it once promoted (docs/rotation.md#a-sealed-key)",
                    next.location
                ),
            );
        }
    }
    for old in &record.retired {
        let keep = identity.retire_old_key == crate::config::RetireOldKey::Keep;
        let detail = match rotation::retired_file(old, identity).filter(|_| !keep) {
            Some(file) => format!(
                "{} was retired and is never signed with again, but {file} still holds it; \
                 delete it: shred -u {file}",
                old.address.checksummed()
            ),
            None => format!(
                "{} was retired and is never signed with again ({}; kept)",
                old.address.checksummed(),
                old.location
            ),
        };
        let outcome = if keep { Outcome::Ok } else { Outcome::Warn };
        r.push(outcome, "key retired", detail);
    }
}
