-- Challenges are no longer stored when issued (see the PostgreSQL
-- migration of the same name): a redemption inserts the id into
-- redeemed_challenges in the machine write's transaction, and the primary
-- key refuses a second one.
DROP TABLE challenges;

CREATE TABLE redeemed_challenges (
    id         TEXT PRIMARY KEY NOT NULL,
    expires_at INTEGER NOT NULL -- unix milliseconds
) STRICT;
CREATE INDEX redeemed_challenges_expiry ON redeemed_challenges (expires_at);

CREATE TABLE challenge_key (
    only_row INTEGER PRIMARY KEY CHECK (only_row = 1),
    key      BLOB NOT NULL CHECK (length(key) = 32)
) STRICT;
