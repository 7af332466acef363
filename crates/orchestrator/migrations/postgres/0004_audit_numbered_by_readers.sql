-- Audit events are numbered after they commit, not while their write holds
-- a lock. Writers insert an event with no id (`arrival`, from a sequence,
-- only orders what waits); readers, before they read, number every event
-- that has committed and has no id yet, in one statement under an advisory
-- lock (src/store/pg_audit.rs). A reader can only number what it sees, and
-- it sees only committed events, so an event that commits later gets a
-- larger id than any a reader was shown: ids still follow commit order
-- without gaps, and a cursor is good on every replica. Writers no longer
-- take turns on audit_sequence, which now counts what readers numbered.
CREATE SEQUENCE audit_arrival;
ALTER TABLE audit_events ADD COLUMN arrival BIGINT;
ALTER TABLE audit_events ALTER COLUMN arrival SET DEFAULT nextval('audit_arrival');
ALTER TABLE audit_events DROP CONSTRAINT audit_events_pkey;
ALTER TABLE audit_events ALTER COLUMN id DROP NOT NULL;
CREATE UNIQUE INDEX audit_events_id ON audit_events (id);
CREATE INDEX audit_events_unnumbered ON audit_events (arrival) WHERE id IS NULL;
