//! The loop's side of key rotation (`crate::rotation`): it picks up a
//! successor (made by `key rotate` or the MQTT `rotate_key` command) when
//! the record changes, signs a challenge with the successor as soon as the
//! challenge lists it among the controllers (never one challenge with both
//! keys), and once that proof is accepted promotes the successor and
//! retires the old key. Each step is durable before it is journalled.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use peaqos_logging::error_chain;

use super::Registrar;
use super::failure::{Failure, FailureKind};
use crate::config::IdentityConfig;
use crate::local_code::LocalCode;
use crate::rotation::{self, Record, Step};
use crate::signer::Signer;

/// What the loop knows about its machine's rotation.
#[derive(Debug)]
pub struct Rotation {
    identity: IdentityConfig,
    state_dir: PathBuf,
    /// `[state] dir` (a token's refused PINs are recorded there).
    state_root: Arc<Path>,
    /// Boxed: most machines never rotate, and a gateway keeps a thousand.
    record: Option<Box<Record>>,
    /// The record file's modification time and length when last read.
    seen: Option<(SystemTime, u64)>,
    /// The successor, opened.
    pub(super) next: Option<Signer>,
    /// The challenge in flight was signed by the successor.
    pub(super) signed_by_next: bool,
    /// The current key's last proof was refused (not a controller): the
    /// next challenge is signed with the successor, even where its list
    /// (which the contract lets name only some controllers) leaves it out.
    pub(super) try_next: bool,
}

impl Rotation {
    pub fn new(identity: IdentityConfig, state_dir: &Path, state_root: Arc<Path>) -> Self {
        Self {
            identity,
            state_dir: state_dir.to_owned(),
            state_root,
            record: None,
            seen: None,
            next: None,
            signed_by_next: false,
            try_next: false,
        }
    }

    fn keys(&self) -> PathBuf {
        rotation::keys_dir(&self.state_dir)
    }

    fn stamp(&self) -> Option<(SystemTime, u64)> {
        let meta = std::fs::metadata(self.keys().join("rotation.json")).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    }

    fn save(&mut self, record: Record) -> Result<(), rotation::RotateError> {
        record.save(&self.keys())?;
        self.record = Some(Box::new(record));
        self.seen = self.stamp();
        Ok(())
    }
}

/// The test-only hold ([`rotation::HOLD_ENV`]): never returns after `step`.
async fn hold(step: Step) {
    if step.held() {
        tracing::warn!(
            rotation_step = step.as_str(),
            "{} is set: holding after this step (tests only)",
            rotation::HOLD_ENV
        );
        std::future::pending::<()>().await;
    }
}

impl Registrar {
    /// Reads the rotation record when it changed, opens a new successor,
    /// and finishes a retirement that a stop interrupted.
    pub(super) async fn rotation_poll(&mut self) {
        let stamp = self.rotation.stamp();
        if stamp != self.rotation.seen {
            self.rotation.seen = stamp;
            self.rotation.record = Record::load(&self.rotation.keys()).map(Box::new);
            let want = self
                .rotation
                .record
                .as_ref()
                .and_then(|r| r.next.clone())
                .filter(|n| n.address != self.key.address());
            match want {
                Some(want)
                    if self.rotation.next.as_ref().map(Signer::address) != Some(want.address) =>
                {
                    let identity = self.rotation.identity.clone();
                    let root = self.rotation.state_root.clone();
                    let opened = tokio::task::spawn_blocking(move || {
                        rotation::open_ref(&want, &identity, &root)
                    })
                    .await;
                    match opened {
                        Ok(Ok(next)) => {
                            rotation::journal(Step::Prepared, self.key.address(), next.address());
                            let shown = next.address().checksummed();
                            self.update_status(|s| s.next_controller_address = Some(shown));
                            self.rotation.next = Some(next);
                            hold(Step::Prepared).await;
                        }
                        Ok(Err(e)) => tracing::warn!(
                            "key rotation: the successor cannot be opened: {}",
                            error_chain(&e)
                        ),
                        Err(e) => tracing::warn!("key rotation: opening the successor: {e}"),
                    }
                }
                Some(_) => {}
                None => {
                    if self.rotation.next.take().is_some() {
                        self.update_status(|s| s.next_controller_address = None);
                    }
                }
            }
        }
        if self
            .rotation
            .record
            .as_ref()
            .is_some_and(|r| r.retiring.is_some())
        {
            self.retire_old().await;
        }
    }

    /// Makes a successor (the MQTT `rotate_key` command): its address, or
    /// why not.
    pub(super) async fn prepare_rotation(&mut self) -> Result<String, String> {
        let identity = self.rotation.identity.clone();
        let state_dir = self.rotation.state_dir.clone();
        let current = self.key.address();
        let prepared =
            tokio::task::spawn_blocking(move || rotation::prepare(&identity, &state_dir, current))
                .await
                .map_err(|e| e.to_string())?;
        match prepared {
            Ok((address, unsealed)) => {
                if unsealed {
                    tracing::warn!(
                        next_controller = %address.checksummed(),
                        "key rotation: the current key is a sealed credential, which the agent \
                         cannot seal; the successor is a plaintext file (0600) in {} until an \
                         operator seals it (docs/rotation.md)",
                        self.rotation.keys().display()
                    );
                }
                self.rotation_poll().await;
                Ok(address.checksummed())
            }
            Err(e) => {
                rotation::log_failure("cannot prepare a successor", &e);
                Err(error_chain(&e))
            }
        }
    }

    /// The successor's proof was accepted (and saved in the state file):
    /// it becomes the key, durably, then the old key is retired.
    pub(super) async fn promote(&mut self) -> Result<(), Failure> {
        self.rotation.signed_by_next = false;
        let Some(next) = self.rotation.next.take() else {
            return Ok(());
        };
        let old = self.key.address();
        rotation::journal(Step::Proven, old, next.address());
        hold(Step::Proven).await;
        let mut record = *self
            .rotation
            .record
            .clone()
            .expect("a successor comes from the record");
        let old_ref = Record::current_ref(Some(&record), old);
        record.current = record.next.take();
        record.retiring = Some(old_ref);
        if let Err(e) = self.rotation.save(record) {
            // The successor stays the successor: the next cycle proves
            // with it again and promotes it then.
            self.rotation.next = Some(next);
            return Err(Failure::new(
                FailureKind::NeedsOperator,
                LocalCode::StateWrite,
                error_chain(&e),
            ));
        }
        rotation::journal(Step::Promoted, old, next.address());
        let shown = next.address().checksummed();
        self.key = next;
        self.update_status(|s| {
            s.controller_address = shown;
            s.next_controller_address = None;
        });
        hold(Step::Promoted).await;
        self.retire_old().await;
        Ok(())
    }

    /// Retires the promoted-away key the record names.
    async fn retire_old(&mut self) {
        let Some(mut record) = self.rotation.record.as_deref().cloned() else {
            return;
        };
        let Some(old) = record.retiring.take() else {
            return;
        };
        let identity = self.rotation.identity.clone();
        let (address, at) = (old.address, old.clone());
        let retired = tokio::task::spawn_blocking(move || rotation::retire(&at, &identity)).await;
        match retired {
            Ok(Ok(kept)) => {
                record.retired.extend(kept);
                if let Err(e) = self.rotation.save(record) {
                    rotation::log_failure("cannot record the retirement", &e);
                    return;
                }
                rotation::journal(Step::Retired, address, self.key.address());
                hold(Step::Retired).await;
            }
            Ok(Err(e)) => rotation::log_failure("cannot retire the old key", &e),
            Err(e) => tracing::warn!("key rotation: retiring the old key: {e}"),
        }
    }
}
