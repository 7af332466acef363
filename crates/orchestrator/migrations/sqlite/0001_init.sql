-- Challenges live until they expire or are consumed; consumption deletes
-- the row inside the transaction that writes the machine, so a failed write
-- leaves the challenge usable and a second submission finds nothing.
CREATE TABLE challenges (
    id           TEXT PRIMARY KEY NOT NULL,
    identity_ref TEXT NOT NULL,
    message      TEXT NOT NULL,
    issued_at    INTEGER NOT NULL, -- unix milliseconds
    expires_at   INTEGER NOT NULL  -- unix milliseconds
) STRICT;
CREATE INDEX challenges_expiry ON challenges (expires_at);

CREATE TABLE machines (
    id              TEXT PRIMARY KEY NOT NULL,
    identity_ref    TEXT NOT NULL,   -- canonical form
    status          TEXT NOT NULL CHECK (status IN ('draft', 'active', 'blocked', 'archived')),
    display_name    TEXT NOT NULL,
    owner_id        TEXT NOT NULL,
    machine_type    TEXT NOT NULL,
    runtime_profile TEXT NOT NULL,
    capabilities    TEXT NOT NULL,   -- JSON array of strings
    labels          TEXT NOT NULL,   -- JSON object of strings
    policy_ids      TEXT NOT NULL,   -- JSON array of strings
    skill_keys      TEXT NOT NULL,   -- JSON array of strings
    proof           TEXT,            -- JSON MachineIdentityProof, NULL if none
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
) STRICT;
-- One live machine per identity; an archived record releases its identity.
CREATE UNIQUE INDEX machines_live_identity ON machines (identity_ref) WHERE status <> 'archived';
-- Keyset pagination over live machines.
CREATE INDEX machines_live_page ON machines (created_at, id) WHERE status <> 'archived';
