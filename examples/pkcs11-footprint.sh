#!/usr/bin/env bash
# The `pkcs11` feature's cost, in one run (docs/performance.md): the
# minsize agent's size with and without the feature, and the resident
# memory after IDLE seconds (default 60) of three agents registered with a
# local orchestrator at the same time: without the feature (key file), with
# it (key file: the module is never loaded), and with it and the key in a
# SoftHSM2 token (module loaded, session open). Each agent's own identity
# and state; everything in a temp dir, on 127.0.0.1, stopped at the end.
#
#   examples/pkcs11-footprint.sh            # IDLE=60
#
# Needs softhsm2 (.ci/install-tools installs it). The orchestrator is
# target/debug/peaqos-orchestrator (built if missing): only the agents
# are measured.
set -euo pipefail
cd "$(dirname "$0")/.."
IDLE=${IDLE:-60}
MODULE=${MODULE:-/usr/lib/softhsm/libsofthsm2.so}
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

cargo build -q --profile minsize -p peaqos-agent --bin peaqos-agent --no-default-features --features tls
cp target/minsize/peaqos-agent "$work/agent-without"
cargo build -q --profile minsize -p peaqos-agent --bin peaqos-agent
cp target/minsize/peaqos-agent "$work/agent-with"
[ -x target/debug/peaqos-orchestrator ] || cargo build -q -p peaqos-orchestrator
orchestrator=target/debug/peaqos-orchestrator

# The token: a private SoftHSM2 store, a key made by the agent's keygen.
mkdir "$work/tokens"
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' \
    "$work/tokens" >"$work/softhsm2.conf"
export SOFTHSM2_CONF="$work/softhsm2.conf"
softhsm2-util --init-token --free --label robot --pin 1234 --so-pin 5678 >/dev/null
printf '1234\n' >"$work/pin"
chmod 600 "$work/pin"
uri="pkcs11:token=robot;object=controller?module-path=$MODULE&pin-source=$work/pin"
token_address=$("$work/agent-with" keygen --pkcs11 "$uri")
file_a=$("$work/agent-with" keygen --out "$work/a.key")
file_b=$("$work/agent-with" keygen --out "$work/b.key")

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$work/registry.toml" <<TOML
[identities]
"did:peaq:1001" = ["$file_a"]
"did:peaq:1002" = ["$file_b"]
"did:peaq:1003" = ["$token_address"]
TOML
DATABASE_URL="sqlite://$work/orchestrator.db" PEAQOS_MCR_REGISTRY_FILE="$work/registry.toml" \
    PEAQOS_LISTEN_ADDR="127.0.0.1:$port" RUST_LOG=warn "$orchestrator" >"$work/orchestrator.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$port/ready" >/dev/null 2>&1 && break
    sleep 0.1
done

start_agent() { # name binary identity key-lines
    local name=$1 binary=$2 identity=$3 key=$4
    cat >"$work/$name.toml" <<TOML
[identity]
ref = "$identity"
$key
[orchestrator]
url = "http://127.0.0.1:$port"
[machine]
display_name = "$name"
owner_id = "owner-1"
machine_type = "amr"
runtime_profile = "ros2"
[state]
dir = "$work/$name-state"
TOML
    RUST_LOG=info "$binary" run --config "$work/$name.toml" >"$work/$name.log" 2>&1 &
    pids+=($!)
    echo $! >"$work/$name.pid"
}
start_agent without "$work/agent-without" did:peaq:1001 "key_file = \"$work/a.key\""
start_agent with-file "$work/agent-with" did:peaq:1002 "key_file = \"$work/b.key\""
start_agent with-token "$work/agent-with" did:peaq:1003 "key = \"$uri\""
for name in without with-file with-token; do
    for _ in $(seq 300); do
        grep -q "machine record activated" "$work/$name.log" && break
        sleep 0.1
    done
    grep -q "machine record activated" "$work/$name.log" || {
        echo "$name did not become active:"
        cat "$work/$name.log"
        exit 1
    }
done
echo "all three active; idle for ${IDLE} s (load average $(cut -d' ' -f1 /proc/loadavg))"
sleep "$IDLE"

kib() { awk -v k="$2" '$1 == k":" {print $2}' "/proc/$1/status"; }
without_rss=$(kib "$(cat "$work/without.pid")" VmRSS)
printf '| agent | stripped size (minsize) | VmRSS after %s s idle | VmHWM | RSS / without |\n|---|---:|---:|---:|---:|\n' "$IDLE"
for name in without with-file with-token; do
    pid=$(cat "$work/$name.pid")
    binary=$work/agent-${name%%-*}
    rss=$(kib "$pid" VmRSS)
    printf '| %s | %s B | %s KiB | %s KiB | %s |\n' "$name" "$(stat -c %s "$binary")" "$rss" \
        "$(kib "$pid" VmHWM)" "$(awk -v a="$rss" -v b="$without_rss" 'BEGIN {printf "%.2f", a / b}')"
done
