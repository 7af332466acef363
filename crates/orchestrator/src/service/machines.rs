//! Machine records: create, read, update, archive and list, each bound to
//! one verified machine identity. Requests arrive parsed and their fields
//! checked (the HTTP edge); the lifecycle rules are `lifecycle`'s.

use peaqos_protocol::{CreateMachineRequest, Machine, UpdateMachineRequest};

use super::ServiceError;
use crate::app::App;
use crate::audit::{self, Caller};
use crate::ids;
use crate::lifecycle;
use crate::roles::Role;
use crate::store::{Consume, MachineRecord, PageKey, StoreError, StoredStatus};

/// A list request examines at most this many batches of `limit` records
/// looking for visible ones; past that it returns a short page with a cursor.
const MAX_SCAN_BATCHES: usize = 8;

/// One page of a list: the machines shown, and where the next page starts
/// (`None` at the end).
#[derive(Debug)]
pub struct Page {
    pub items: Vec<Machine>,
    pub next: Option<PageKey>,
}

/// A store write's refusals in the domain's terms.
fn write_refused(e: StoreError) -> ServiceError {
    match e {
        StoreError::IdentityTaken { machine_id } => ServiceError::IdentityExists { machine_id },
        // Consumed meanwhile (or collected): as unknown as if never issued.
        StoreError::ChallengeGone => crate::verify::ProofError::UnknownChallenge.into(),
        e => e.into(),
    }
}

impl App {
    /// A slot for a write, or `Busy` with the time to come back.
    async fn admit(&self) -> Result<crate::admission::Admitted<'_>, ServiceError> {
        self.admission
            .enter()
            .await
            .map_err(|busy| self.refused(busy))
    }

    /// A refusal by the admission, counted.
    pub(super) fn refused(&self, busy: crate::admission::Busy) -> ServiceError {
        self.metrics.rate_limited.inc();
        busy.into()
    }

    /// The machine as responses carry it now.
    pub fn to_wire(&self, m: MachineRecord) -> Machine {
        lifecycle::read_as(m, self.config.proof_max_age, self.now())
    }

    /// A new `draft` bound to the request's identity (and its proof, which
    /// is consumed in the same write).
    pub async fn create_machine(
        &self,
        request: CreateMachineRequest,
        caller: Option<&Caller>,
    ) -> Result<Machine, ServiceError> {
        lifecycle::check_create(request.identity_proof.is_some(), self.policy())?;
        let _admitted = self.admit().await?;
        let identity = request.identity_ref;
        // Answer early, before any proof work; the unique index decides races.
        if let Some(machine_id) = self.store.live_machine_for(&identity).await? {
            return Err(ServiceError::IdentityExists { machine_id });
        }
        let proof = match &request.identity_proof {
            Some(input) => Some(self.verify_submitted(&identity, input).await?),
            None => None,
        };
        let now = self.now();
        let record = MachineRecord {
            id: ids::machine_id()
                .map_err(|e| ServiceError::internal("cannot draw a machine id", e))?,
            identity,
            status: StoredStatus::Draft,
            display_name: request.display_name,
            owner_id: request.owner_id,
            machine_type: request.machine_type,
            runtime_profile: request.runtime_profile,
            capabilities: request.capabilities.unwrap_or_default(),
            labels: request.labels.unwrap_or_default(),
            policy_ids: request.policy_ids.unwrap_or_default(),
            skill_keys: request.skill_keys.unwrap_or_default(),
            proof,
            created_at: now,
            updated_at: now,
        };
        let consume = request
            .identity_proof
            .as_ref()
            .zip(record.proof.as_ref())
            .map(|(p, proof)| Consume {
                challenge_id: &p.challenge_id,
                expires_at: proof.challenge_expires_at,
                now,
            });
        let event = self.config.audit_trail.then(|| {
            let signer = record.proof.as_ref().map(|p| &p.signer_address);
            audit::created(&record, audit::actor(caller, signer))
        });
        self.store
            .insert_machine(&record, consume, event.as_ref())
            .await
            .map_err(write_refused)?;
        self.events.written();
        tracing::info!(machine = %record.id, identity = %record.identity, "machine created");
        Ok(self.to_wire(record))
    }

    /// One machine, its stored proof re-verified (archived ones are shown
    /// as they are).
    pub async fn read_machine(&self, id: &str) -> Result<Machine, ServiceError> {
        let machine = self
            .store
            .get_machine(id)
            .await?
            .ok_or(ServiceError::not_found("machine"))?;
        if lifecycle::read_reverifies(machine.status, self.policy()) {
            self.reverify(&machine).await?;
        }
        Ok(self.to_wire(machine))
    }

    /// A partial update; see the lifecycle rules for status, identity and
    /// proof.
    pub async fn update_machine(
        &self,
        id: &str,
        mut request: UpdateMachineRequest,
        caller: Option<&Caller>,
    ) -> Result<Machine, ServiceError> {
        let policy = self.policy();
        let proof_input = request.identity_proof.take();
        let target = lifecycle::settable_status(request.status)?;
        let _admitted = self.admit().await?;
        let mut machine = self
            .store
            .get_machine(id)
            .await?
            .filter(|m| lifecycle::is_patchable(m.status))
            .ok_or(ServiceError::not_found("machine"))?;
        lifecycle::check_identity_unchanged(&machine.identity, request.identity_ref.as_ref())?;
        // Lifting a block is an operator's decision, even with a fresh
        // proof: an agent's key re-proving its own machine may not undo it.
        if let Some(caller) = caller
            && machine.status == StoredStatus::Blocked
            && target.is_some_and(|t| t != StoredStatus::Blocked)
            && !caller.role.allows(Role::Operator)
        {
            return Err(ServiceError::Forbidden {
                role: caller.role.as_str(),
                action: "lift a block",
            });
        }
        let fresh = match &proof_input {
            Some(input) => Some(self.verify_submitted(&machine.identity, input).await?),
            None => None,
        };
        if lifecycle::patch_reverifies(fresh.is_some(), machine.status, target, policy) {
            self.reverify(&machine).await?;
        }
        let now = self.now();
        if fresh.is_none() && target == Some(StoredStatus::Active) {
            lifecycle::check_activation_with_stored_proof(&machine, policy, now)?;
        }
        // The event describes the change from the record this decision
        // was made on.
        let before = self.config.audit_trail.then(|| machine.clone());
        let renewed = fresh.is_some();
        apply(&mut machine, request);
        if let Some(proof) = fresh {
            machine.proof = Some(proof);
        }
        if let Some(status) = target {
            machine.status = status;
        }
        machine.updated_at = now;
        let consume = proof_input
            .as_ref()
            .zip(machine.proof.as_ref().filter(|_| renewed))
            .map(|(p, proof)| Consume {
                challenge_id: &p.challenge_id,
                expires_at: proof.challenge_expires_at,
                now,
            });
        let event = before.map(|before| {
            let signer = machine.proof.as_ref().filter(|_| renewed);
            let actor = audit::actor(caller, signer.map(|p| &p.signer_address));
            audit::updated(&before, &machine, renewed, actor)
        });
        if !self
            .store
            .update_machine(&machine, consume, event.as_ref())
            .await
            .map_err(write_refused)?
        {
            return Err(ServiceError::not_found("machine"));
        }
        self.events.written();
        Ok(self.to_wire(machine))
    }

    /// Archives (soft-deletes) a machine; archiving an archived one again
    /// succeeds.
    pub async fn archive_machine(
        &self,
        id: &str,
        caller: Option<&Caller>,
    ) -> Result<(), ServiceError> {
        let actor = self.config.audit_trail.then(|| audit::actor(caller, None));
        let _admitted = self.admit().await?;
        match self
            .store
            .archive_machine(id, self.now(), actor.as_deref())
            .await?
        {
            None => Err(ServiceError::not_found("machine")),
            Some(archived_now) => {
                if archived_now {
                    self.events.written();
                    tracing::info!(machine = %id, "machine archived");
                }
                Ok(())
            }
        }
    }

    /// Up to `limit` listed machines after `after`, in creation order.
    pub async fn list_machines(
        &self,
        mut after: Option<PageKey>,
        limit: u32,
    ) -> Result<Page, ServiceError> {
        let policy = self.policy();
        let want = limit as usize;
        let mut items = Vec::with_capacity(want.min(64));
        let mut next = None;
        'scan: for _ in 0..MAX_SCAN_BATCHES {
            let rows = self.store.list_machines(after.as_ref(), limit).await?;
            let exhausted = rows.len() < want;
            let resolutions = if policy.verification_required {
                self.resolve_all(
                    rows.iter()
                        .filter(|m| m.proof.is_some())
                        .map(|m| &m.identity),
                )
                .await?
            } else {
                std::collections::HashMap::new()
            };
            let mut rows = rows.into_iter().peekable();
            while let Some(m) = rows.next() {
                let key = page_key(&m);
                if lifecycle::is_listed(&m, resolutions.get(&m.identity), policy) {
                    items.push(self.to_wire(m));
                }
                after = Some(key);
                if items.len() == want {
                    next = (rows.peek().is_some() || !exhausted)
                        .then(|| after.clone())
                        .flatten();
                    break 'scan;
                }
            }
            if exhausted {
                next = None;
                break;
            }
            // Out of batches: the client continues from the last record examined.
            next.clone_from(&after);
        }
        Ok(Page { items, next })
    }
}

fn page_key(m: &MachineRecord) -> PageKey {
    PageKey {
        created_at_ms: m.created_at.unix_millis(),
        id: m.id.clone(),
    }
}

/// Copies the plain fields of an update (status, identity and proof are
/// handled before).
fn apply(m: &mut MachineRecord, f: UpdateMachineRequest) {
    if let Some(v) = f.display_name {
        m.display_name = v;
    }
    if let Some(v) = f.owner_id {
        m.owner_id = v;
    }
    if let Some(v) = f.machine_type {
        m.machine_type = v;
    }
    if let Some(v) = f.runtime_profile {
        m.runtime_profile = v;
    }
    if let Some(v) = f.capabilities {
        m.capabilities = v;
    }
    if let Some(v) = f.labels {
        m.labels = v;
    }
    if let Some(v) = f.policy_ids {
        m.policy_ids = v;
    }
    if let Some(v) = f.skill_keys {
        m.skill_keys = v;
    }
}
