"""The published peaqOS Python SDK against our orchestrator: health and
readiness, challenge ->
eth-account signature -> create -> activate -> get -> list all -> archive,
each response passing the SDK's own validation. Prints one JSON summary.

Usage: python sdk_flow.py BASE_URL PRIVATE_KEY API_KEY IDENTITY
"""
import json
import sys

from eth_account import Account
from eth_account.messages import encode_defunct
from peaq_os_sdk import PeaqosClient
from peaq_os_sdk.orchestration.errors import OrchestrationApiError
from peaq_os_sdk.orchestration.types.machine import (
    CreateMachineIdentityChallengeRequest,
    CreateMachineRequest,
    MachineIdentityProofInput,
    UpdateMachineRequest,
)

base, key, api_key, identity = sys.argv[1:5]
client = PeaqosClient(
    # Never contacted: only the orchestration namespace is used.
    rpc_url="http://127.0.0.1:9",
    private_key=key,
    orchestration_url=base,
    api_key=api_key,
)
orch = client.orchestration


def prove(identity_ref):
    ch = orch.create_machine_identity_challenge(
        CreateMachineIdentityChallengeRequest(identity_ref=identity_ref)
    ).item
    signed = Account.sign_message(encode_defunct(text=ch.message), key)
    sig = "0x" + bytes(signed.signature).hex().removeprefix("0x")
    return ch, MachineIdentityProofInput(challenge_id=ch.challenge_id, signature=sig)


health = orch.check_health()
readiness = orch.get_readiness()
challenge, proof = prove(identity)
created = orch.create_machine(
    CreateMachineRequest(
        display_name="SDK robot",
        owner_id="owner-sdk",
        machine_type="amr",
        runtime_profile="ros2",
        identity_ref=identity,
        identity_proof=proof,
        capabilities=("lidar", "camera"),
        labels={"site": "berlin"},
    )
).item
activated = orch.update_machine(created.id, UpdateMachineRequest(status="active")).item
got = orch.get_machine(created.id).item
_, renewal = prove(identity)
renewed = orch.update_machine(
    created.id, UpdateMachineRequest(status="active", identity_proof=renewal)
).item
listed = list(orch.list_machines_all(limit=1))
errors = {}
try:
    orch.create_machine(
        CreateMachineRequest(
            display_name="dup",
            owner_id="o",
            machine_type="t",
            runtime_profile="p",
            identity_ref=identity,
            identity_proof=prove(identity)[1],
        )
    )
except OrchestrationApiError as e:
    errors["duplicate"] = [e.code, e.status_code]
try:
    orch.update_machine(created.id, UpdateMachineRequest(identity_ref="did:peaq:424242"))
except OrchestrationApiError as e:
    errors["immutable"] = [e.code, e.status_code]
orch.archive_machine(created.id)
try:
    orch.get_machine("mach_aaaaaaaaaaaaaaaaaaaaaaaaaa")
except OrchestrationApiError as e:
    errors["missing"] = [e.code, e.status_code]
archived = orch.get_machine(created.id).item
trail = orch.list_audit_events(machine_id=created.id, resource_type="machine", limit=100)
first_two = orch.list_audit_events(limit=2)
print(
    json.dumps(
        {
            "health": health.ok,
            "readiness": [
                readiness.status,
                [[c.name, c.status] for c in readiness.checks],
            ],
            "challenge_identity": challenge.identity_ref,
            "controllers": list(challenge.controller_addresses),
            "created": [created.id, created.status, created.identity_ref],
            "proof_signer": created.identity_proof.signer_address,
            "activated": activated.status,
            "got": [got.id, got.status, got.identity_proof.challenge_id == challenge.challenge_id],
            "renewed_challenge_changed": renewed.identity_proof.challenge_id != challenge.challenge_id,
            "listed": [m.id for m in listed],
            "archived": archived.status,
            "errors": errors,
            "audit": [[e.type, e.actor, e.resource_type, e.resource_id] for e in trail.items],
            "audit_next": trail.next_cursor,
            "audit_payloads": [dict(e.payload) for e in trail.items],
            "audit_ids": [e.id for e in first_two.items],
            "audit_first_next": first_two.next_cursor,
        }
    )
)
