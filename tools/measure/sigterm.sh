#!/bin/bash
# SIGTERM-to-exit times of the real agent (docs/performance.md, "Shutdown").
# usage: ORCH=http://127.0.0.1:8080 sigterm.sh AGENT_BINARY [N]
# The agent runs with MQTT on (a broker at 127.0.0.1:1883) and is stopped at a
# random moment 0 to 2 s after start; prints one time in ms per stop.
set -eu
BIN=$1; N=${2:-20}
D=$(mktemp -d); mkdir "$D/state"
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$D/key"; chmod 600 "$D/key"
cat > "$D/agent.toml" <<T
[identity]
ref = "did:peaq:4242"
key_file = "$D/key"
[orchestrator]
url = "${ORCH:-http://127.0.0.1:9}"
[machine]
display_name = "term-$$"
owner_id = "o"
machine_type = "amr"
runtime_profile = "x"
[state]
dir = "$D/state"
[mqtt]
enabled = true
url = "mqtt://127.0.0.1:1883"
T
for _ in $(seq "$N"); do
  "$BIN" run --config "$D/agent.toml" >/dev/null 2>&1 &
  P=$!
  sleep "$((RANDOM % 2)).$((RANDOM % 10))"
  t0=$(date +%s%N); kill -TERM $P; wait $P || true; t1=$(date +%s%N)
  echo $(( (t1 - t0) / 1000000 ))
done
rm -rf "$D"
