#!/usr/bin/env bash
# Builds the Debian packages of peaqos-agent and peaqos-orchestrator into
# target/debian/, installing the pinned cargo-deb first if it is missing.
#
#   packaging/build-debs.sh                          # this machine's architecture
#   packaging/build-debs.sh --target aarch64-unknown-linux-gnu
#   packaging/build-debs.sh --target armv7-unknown-linux-gnueabihf
#
# Extra arguments go to both `cargo deb` calls. The agent is built with the
# `minsize` profile (opt-level z, fat LTO, panic=abort, stripped), the
# orchestrator with `release`. Cross-building needs the target's linker; see
# docs/agent.md ("Cross-building for boards").
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION=3.8.0

if ! cargo deb --version 2>/dev/null | grep -q "$CARGO_DEB_VERSION"; then
    echo "--- installing cargo-deb $CARGO_DEB_VERSION"
    cargo install --locked "cargo-deb@$CARGO_DEB_VERSION"
fi

echo "--- peaqos-agent"
cargo deb -p peaqos-agent --locked "$@"
echo "--- peaqos-orchestrator"
cargo deb -p peaqos-orchestrator --locked "$@"
