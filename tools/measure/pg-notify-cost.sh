#!/bin/sh
# What a NOTIFY in every write transaction costs PostgreSQL's commits, with
# pgbench: 64 clients updating random rows of a 100,000-row table, each
# shape twice, alternating, in one run. Shapes: a plain write transaction;
# the same with pg_notify (every notifying transaction holds one
# database-wide lock until it has committed); one counter row updated in
# each (the audit trail's numbering before issue 23); both; and the write
# followed by pg_notify in a transaction of its own with synchronous_commit
# off (a notification after the commit).
#
#   tools/measure/pg-notify-cost.sh [postgres://postgres@127.0.0.1:5432/test] [seconds]
#
# Works in a schema of its own (notify_cost), dropped at the end.
set -eu
export PGOPTIONS="-c client_min_messages=warning"
url=${1:-postgres://postgres@127.0.0.1:5432/test}
secs=${2:-6}
dir=$(mktemp -d)
trap 'rm -rf "$dir"; psql -q "$url" -c "DROP SCHEMA IF EXISTS notify_cost CASCADE" >/dev/null 2>&1' EXIT
psql -q -v ON_ERROR_STOP=1 "$url" <<'EOF'
DROP SCHEMA IF EXISTS notify_cost CASCADE;
CREATE SCHEMA notify_cost;
CREATE TABLE notify_cost.t (id int PRIMARY KEY, v int);
INSERT INTO notify_cost.t SELECT g, 0 FROM generate_series(1, 100000) g;
CREATE TABLE notify_cost.c (only_row int PRIMARY KEY, n bigint);
INSERT INTO notify_cost.c VALUES (1, 0);
EOF
head='\set id random(1, 100000)'
write='UPDATE notify_cost.t SET v = v + 1 WHERE id = :id;'
count='UPDATE notify_cost.c SET n = n + 1 WHERE only_row = 1;'
notify="SELECT pg_notify('pg_notify_cost', :id::text);"
printf '%s\nBEGIN;\n%s\nSELECT 1;\nEND;\n' "$head" "$write" >"$dir/plain.sql"
printf '%s\nBEGIN;\n%s\n%s\nEND;\n' "$head" "$write" "$notify" >"$dir/notify.sql"
printf '%s\nBEGIN;\n%s\n%s\nEND;\n' "$head" "$write" "$count" >"$dir/counter.sql"
printf '%s\nBEGIN;\n%s\n%s\n%s\nEND;\n' "$head" "$write" "$count" "$notify" >"$dir/counter-notify.sql"
printf '%s\n%s\nSET synchronous_commit = off;\n%s\nSET synchronous_commit = on;\n' \
    "$head" "$write" "$notify" >"$dir/notify-after.sql"
uptime
for round in 1 2; do
    for shape in plain notify counter counter-notify notify-after; do
        tps=$(pgbench -n -c 64 -j 2 -T "$secs" -f "$dir/$shape.sql" "$url" 2>&1 |
            sed -n 's/^tps = \([0-9.]*\).*/\1/p')
        echo "round $round  $shape  $tps tps"
    done
done
