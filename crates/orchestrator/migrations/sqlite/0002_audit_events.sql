-- The audit trail: one event per change to a machine, inserted in the
-- transaction of the change. Ids come from audit_sequence, taken in that
-- transaction, so they follow commit order without gaps (a rollback gives
-- its number back), the same as on PostgreSQL.
CREATE TABLE audit_sequence (
    only_row INTEGER PRIMARY KEY CHECK (only_row = 1),
    last_id  INTEGER NOT NULL
) STRICT;
INSERT INTO audit_sequence (only_row, last_id) VALUES (1, 0);

CREATE TABLE audit_events (
    id            INTEGER PRIMARY KEY NOT NULL,
    actor         TEXT NOT NULL,   -- an API key's name or a signer address, never a secret
    type          TEXT NOT NULL,   -- machine.created, machine.updated, ...
    resource_type TEXT NOT NULL,   -- machine
    resource_id   TEXT NOT NULL,
    payload       TEXT NOT NULL,   -- JSON object: what changed
    created_at    INTEGER NOT NULL -- unix milliseconds
) STRICT;
-- One machine's history, in order.
CREATE INDEX audit_events_resource ON audit_events (resource_id, id);
