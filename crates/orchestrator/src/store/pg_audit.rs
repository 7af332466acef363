//! PostgreSQL's machine writes with their audit event, each one statement
//! (one round trip, one implicit transaction), and the numbering of events
//! by their readers.
//!
//! A write inserts its event without an id: writers share no lock, so
//! their commits share WAL flushes. Before reading, a reader numbers the
//! committed events that have none ([`NUMBER_SQL`]), under an advisory
//! lock that makes numberers on every replica take turns, so each sees
//! what the previous one numbered. It sees only committed events, so an
//! event that commits later is numbered later, with a larger id: a reader
//! that was shown id `n` has seen every id below it, on any replica.
//!
//! Parameters: the machine's `$1..$14` (insert) or `$1..$12` (update) as
//! in `postgres.rs`, then the event's five (actor, type, resource id,
//! payload, time), then the challenge's three (id, expiry, now) when one is
//! redeemed.

use super::rows::machine_columns;

/// An event's columns as a writer inserts them: no id yet.
macro_rules! unnumbered_columns {
    () => {
        "actor, type, resource_type, resource_id, payload, created_at"
    };
}

/// Numbers the committed events that have no id yet, in their order of
/// arrival, continuing `audit_sequence`: 10,000 at most (a longer backlog
/// is numbered by the next reads). One round trip of three statements
/// (simple query protocol, one implicit transaction): the advisory lock
/// first, so that the numbering statement's snapshot is taken after the
/// previous numberer committed, and it numbers nothing twice. The lock is
/// the transaction's, released at its end. The key is arbitrary and ours
/// ("peaqaudi" in ASCII).
///
/// Bitmap scans are off for this transaction: numbering leaves every event's
/// entry in `audit_events_unnumbered` pointing at a dead row version, and
/// only a plain or index-only scan marks such entries dead in the index
/// (a bitmap scan never does), so with the planner's usual bitmap plan every
/// numbering visited every event written since the last vacuum, twice
/// (docs/performance.md: about 2,000 index entries read per registration
/// at 64 writers, against 14 with this plan).
pub const NUMBER_SQL: &str = "SELECT pg_advisory_xact_lock(8098986644489987177); \
     SET LOCAL enable_bitmapscan = off; \
     WITH todo AS (\
        SELECT arrival, row_number() OVER (ORDER BY arrival) AS n FROM (\
            SELECT arrival FROM audit_events WHERE id IS NULL ORDER BY arrival LIMIT 10000\
        ) AS waiting), \
     base AS (\
        UPDATE audit_sequence SET last_id = last_id + (SELECT count(*) FROM todo) \
        WHERE only_row = 1 AND EXISTS (SELECT 1 FROM todo) \
        RETURNING last_id - (SELECT count(*) FROM todo) AS first) \
     UPDATE audit_events AS e SET id = base.first + todo.n \
     FROM todo, base WHERE e.id IS NULL AND e.arrival = todo.arrival";

/// Inserts the event (unnumbered) once `$written` has a row.
macro_rules! event_ctes {
    ($written:literal, $a:literal, $t:literal, $r:literal, $p:literal, $c:literal) => {
        concat!(
            "event AS (INSERT INTO audit_events (",
            unnumbered_columns!(),
            ") SELECT ",
            $a,
            ", ",
            $t,
            ", 'machine', ",
            $r,
            ", ",
            $p,
            ", ",
            $c,
            " WHERE EXISTS (SELECT 1 FROM ",
            $written,
            ") RETURNING 1) "
        )
    };
}

/// An insert; `audited` has a row if the machine (and its event) was written.
pub(super) const INSERT_AUDITED_SQL: &str = concat!(
    "WITH inserted AS (INSERT INTO machines (",
    machine_columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) RETURNING id), ",
    event_ctes!("inserted", "$15", "$16", "$17", "$18", "$19"),
    "SELECT count(*) AS written FROM event"
);

/// An insert redeeming a challenge (`$20` id, `$21` expiry, `$22` now):
/// nothing is written unless it could be redeemed. A unique violation
/// aborts the whole statement.
pub(super) const INSERT_CONSUMING_AUDITED_SQL: &str = concat!(
    "WITH consumed AS (\
        INSERT INTO redeemed_challenges (id, expires_at) SELECT $20, $21 WHERE $21 > $22 \
        ON CONFLICT DO NOTHING RETURNING id), \
     inserted AS (INSERT INTO machines (",
    machine_columns!(),
    ") SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14 FROM consumed \
     RETURNING id), ",
    event_ctes!("inserted", "$15", "$16", "$17", "$18", "$19"),
    "SELECT count(*) AS written FROM event"
);

/// An update of a live machine (`$1..$11` mutable columns, `$12` id).
pub(super) const UPDATE_AUDITED_SQL: &str = concat!(
    "WITH updated AS (\
        UPDATE machines SET status = $1, display_name = $2, owner_id = $3, machine_type = $4, \
          runtime_profile = $5, capabilities = $6, labels = $7, policy_ids = $8, \
          skill_keys = $9, proof = $10, updated_at = $11 \
        WHERE id = $12 AND status <> 'archived' RETURNING id), ",
    event_ctes!("updated", "$13", "$14", "$15", "$16", "$17"),
    "SELECT count(*) AS written FROM event"
);

/// The update with a challenge consumed (see `UPDATE_MACHINE_CONSUMING_SQL`
/// in `postgres.rs` for `live` and `updated`).
pub(super) const UPDATE_CONSUMING_AUDITED_SQL: &str = concat!(
    "WITH target AS (\
        SELECT id FROM machines WHERE id = $12 AND status <> 'archived' FOR UPDATE), \
     consumed AS (\
        INSERT INTO redeemed_challenges (id, expires_at) SELECT $18, $19 \
        WHERE $19 > $20 AND EXISTS (SELECT 1 FROM target) \
        ON CONFLICT DO NOTHING RETURNING id), \
     updated AS (\
        UPDATE machines SET status = $1, display_name = $2, owner_id = $3, machine_type = $4, \
          runtime_profile = $5, capabilities = $6, labels = $7, policy_ids = $8, \
          skill_keys = $9, proof = $10, updated_at = $11 \
        WHERE id = (SELECT id FROM target) AND EXISTS (SELECT 1 FROM consumed) \
        RETURNING id), ",
    event_ctes!("updated", "$13", "$14", "$15", "$16", "$17"),
    "SELECT EXISTS (SELECT 1 FROM target) AS live, EXISTS (SELECT 1 FROM event) AS updated"
);

/// An archive (`$1` id, `$2` time, `$3` actor, `$4` type) recording the
/// status it replaced; `found` and `archived` as without the trail.
pub(super) const ARCHIVE_AUDITED_SQL: &str = concat!(
    "WITH target AS (\
        SELECT id, status FROM machines WHERE id = $1 AND status <> 'archived' FOR UPDATE), \
     archived AS (\
        UPDATE machines SET status = 'archived', updated_at = $2 \
        WHERE id = (SELECT id FROM target) RETURNING id), \
     event AS (INSERT INTO audit_events (",
    unnumbered_columns!(),
    ") SELECT $3, $4, 'machine', $1, \
        json_build_object('old_status', target.status, 'new_status', 'archived')::text, $2 \
        FROM target WHERE EXISTS (SELECT 1 FROM archived) RETURNING 1) \
     SELECT EXISTS (SELECT 1 FROM event) AS archived, \
            EXISTS (SELECT 1 FROM machines WHERE id = $1) AS found"
);

/// Up to `$2` of the oldest events before the first written at or after
/// `$1` (log order, as on SQLite).
pub const PRUNE_SQL: &str = "DELETE FROM audit_events WHERE id IN (\
        SELECT id FROM audit_events WHERE id < COALESCE(\
            (SELECT id FROM audit_events WHERE created_at >= $1 ORDER BY id LIMIT 1), \
            9223372036854775807) \
        ORDER BY id LIMIT $2)";
