-- The orchestrator's schema on PostgreSQL: the same tables as on SQLite
-- (times in unix milliseconds, list fields as JSON text that only the
-- orchestrator reads). Tables go to the first schema of the connection's
-- search_path.
--
-- Identifiers compare byte-wise (COLLATE "C"): they are ASCII, keyset
-- pagination then orders them as SQLite does, and comparisons skip the
-- locale's collation rules.

-- Challenges live until they expire or are consumed; consumption deletes
-- the row in the statement that writes the machine, so a failed write
-- leaves the challenge usable and a second submission finds nothing.
CREATE TABLE challenges (
    id           TEXT COLLATE "C" PRIMARY KEY,
    identity_ref TEXT COLLATE "C" NOT NULL,
    message      TEXT NOT NULL,
    issued_at    BIGINT NOT NULL, -- unix milliseconds
    expires_at   BIGINT NOT NULL  -- unix milliseconds
);
CREATE INDEX challenges_expiry ON challenges (expires_at);

CREATE TABLE machines (
    id              TEXT COLLATE "C" PRIMARY KEY,
    identity_ref    TEXT COLLATE "C" NOT NULL, -- canonical form
    status          TEXT NOT NULL CHECK (status IN ('draft', 'active', 'blocked', 'archived')),
    display_name    TEXT NOT NULL,
    owner_id        TEXT NOT NULL,
    machine_type    TEXT NOT NULL,
    runtime_profile TEXT NOT NULL,
    capabilities    TEXT NOT NULL, -- JSON array of strings
    labels          TEXT NOT NULL, -- JSON object of strings
    policy_ids      TEXT NOT NULL, -- JSON array of strings
    skill_keys      TEXT NOT NULL, -- JSON array of strings
    proof           TEXT,          -- JSON MachineIdentityProof, NULL if none
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL
);
-- One live machine per identity, across every replica; an archived record
-- releases its identity. The store maps a violation of this index to
-- MACHINE_IDENTITY_EXISTS.
CREATE UNIQUE INDEX machines_live_identity ON machines (identity_ref) WHERE status <> 'archived';
-- Keyset pagination over live machines: a page is one index range scan.
CREATE INDEX machines_live_page ON machines (created_at, id) WHERE status <> 'archived';
