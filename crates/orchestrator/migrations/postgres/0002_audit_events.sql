-- The audit trail: one event per change to a machine, inserted by the
-- statement that makes the change.
--
-- Ids are not drawn from a sequence: a sequence hands out numbers in the
-- order transactions ask, not the order they commit, so a reader could see
-- event 7 before event 6 commits and page past 6 for good. Every writer
-- instead increments the one row of audit_sequence in its statement: the
-- row lock is held until commit, so the next writer's number is drawn only
-- after this one committed (or rolled back, giving the number back). Ids
-- thus follow commit order without gaps, on every replica, and an id is a
-- cursor any replica can resume from. The price is that machine writes
-- take turns for the moment between drawing the number and committing
-- (measured in docs/performance.md).
CREATE TABLE audit_sequence (
    only_row INTEGER PRIMARY KEY CHECK (only_row = 1),
    last_id  BIGINT NOT NULL
);
INSERT INTO audit_sequence (only_row, last_id) VALUES (1, 0);

CREATE TABLE audit_events (
    id            BIGINT PRIMARY KEY,
    actor         TEXT NOT NULL,   -- an API key's name or a signer address, never a secret
    type          TEXT NOT NULL,   -- machine.created, machine.updated, ...
    resource_type TEXT COLLATE "C" NOT NULL, -- machine
    resource_id   TEXT COLLATE "C" NOT NULL,
    payload       TEXT NOT NULL,   -- JSON object: what changed
    created_at    BIGINT NOT NULL  -- unix milliseconds
);
-- One machine's history, in order.
CREATE INDEX audit_events_resource ON audit_events (resource_id, id);
