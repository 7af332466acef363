//! PostgreSQL's machine writes with their audit event, each one statement
//! (one round trip, one implicit transaction).
//!
//! Each statement draws the event's id by incrementing the one row of
//! `audit_sequence` *after* its machine write succeeded (the `EXISTS`
//! makes the counter's update wait for the write's result), and holds that
//! row's lock until it commits. So ids follow commit order: a reader that
//! sees id `n` sees every id below it, on any replica. The order of locks
//! is always machine row first, counter second, which cannot deadlock.
//!
//! Parameters: the machine's `$1..$14` (insert) or `$1..$12` (update) as
//! in `postgres.rs`, then the event's five (actor, type, resource id,
//! payload, time), then the challenge's three when one is consumed.

use super::rows::{audit_columns, machine_columns};

/// Draws an id once `$written` has a row; inserts the event with it.
macro_rules! event_ctes {
    ($written:literal, $a:literal, $t:literal, $r:literal, $p:literal, $c:literal) => {
        concat!(
            "seq AS (UPDATE audit_sequence SET last_id = last_id + 1 \
               WHERE only_row = 1 AND EXISTS (SELECT 1 FROM ",
            $written,
            ") RETURNING last_id), \
             event AS (INSERT INTO audit_events (",
            audit_columns!(),
            ") SELECT last_id, ",
            $a,
            ", ",
            $t,
            ", 'machine', ",
            $r,
            ", ",
            $p,
            ", ",
            $c,
            " FROM seq RETURNING id) "
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

/// An insert consuming a challenge: nothing is written unless it could be
/// deleted. A unique violation aborts the whole statement.
pub(super) const INSERT_CONSUMING_AUDITED_SQL: &str = concat!(
    "WITH consumed AS (\
        DELETE FROM challenges WHERE id = $20 AND identity_ref = $21 AND expires_at > $22 \
        RETURNING id), \
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
        DELETE FROM challenges \
        WHERE id = $18 AND identity_ref = $19 AND expires_at > $20 \
          AND EXISTS (SELECT 1 FROM target) \
        RETURNING id), \
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
     seq AS (UPDATE audit_sequence SET last_id = last_id + 1 \
        WHERE only_row = 1 AND EXISTS (SELECT 1 FROM archived) RETURNING last_id), \
     event AS (INSERT INTO audit_events (",
    audit_columns!(),
    ") SELECT seq.last_id, $3, $4, 'machine', $1, \
        json_build_object('old_status', target.status, 'new_status', 'archived')::text, $2 \
        FROM seq, target RETURNING id) \
     SELECT EXISTS (SELECT 1 FROM event) AS archived, \
            EXISTS (SELECT 1 FROM machines WHERE id = $1) AS found"
);

/// Up to `$2` of the oldest events before the first written at or after
/// `$1` (log order, as on SQLite).
pub(super) const PRUNE_SQL: &str = "DELETE FROM audit_events WHERE id IN (\
        SELECT id FROM audit_events WHERE id < COALESCE(\
            (SELECT id FROM audit_events WHERE created_at >= $1 ORDER BY id LIMIT 1), \
            9223372036854775807) \
        ORDER BY id LIMIT $2)";
