-- Challenges are no longer stored when issued: a challenge id carries its
-- times and a MAC with the key below (src/challenge_key.rs), so issuing one
-- costs no write. What the database still decides is single use: the
-- statement that writes the machine inserts the id into
-- redeemed_challenges, and the primary key refuses a second redemption on
-- any replica (a concurrent one waits for the first to commit or roll
-- back). Rows are kept until their challenge expired (plus a grace): an
-- expired id is refused before it reaches the database.
--
-- Challenges pending when this migration runs become unknown; agents ask
-- for a new one, as they do after any refusal.
DROP TABLE challenges;

CREATE TABLE redeemed_challenges (
    id         TEXT COLLATE "C" PRIMARY KEY,
    expires_at BIGINT NOT NULL -- unix milliseconds
);
CREATE INDEX redeemed_challenges_expiry ON redeemed_challenges (expires_at);

-- The MAC key every replica shares: the first replica to start stores the
-- one it drew; the others read it.
CREATE TABLE challenge_key (
    only_row INTEGER PRIMARY KEY CHECK (only_row = 1),
    key      BYTEA NOT NULL CHECK (octet_length(key) = 32)
);
