#!/usr/bin/env bash
# Builds the Debian packages of peaqos-agent and peaqos-orchestrator into
# target/debian/, installing the pinned cargo-deb first if it is missing.
#
#   packaging/build-debs.sh                          # this machine's architecture
#   packaging/build-debs.sh --target aarch64-unknown-linux-gnu
#   packaging/build-debs.sh --target armv7-unknown-linux-gnueabihf
#   packaging/build-debs.sh --only peaqos-agent      # one of the two
#
# Other arguments go to every `cargo deb` call: `--no-build` packages the
# executables already built (`cargo xtask arm --debs` does that, so that
# each is compiled once), `--output DIR` puts the packages elsewhere. The
# agent is built with the `minsize` profile (opt-level z, fat LTO,
# panic=abort, stripped), the orchestrator with `release`, both through
# the pinned `cargo auditable` (installed first if missing), so that each
# executable carries its dependency list and `cargo audit bin
# /usr/bin/peaqos-agent` can check an installed one (docs/security.md,
# "Supply chain"). Cross-building
# needs the target's toolchain: .ci/install-tools installs it (docs/agent.md,
# "Cross-building for boards").
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION=3.8.0
CARGO_AUDITABLE_VERSION=0.7.7

packages=(peaqos-agent peaqos-orchestrator)
args=()
while (($#)); do
    case "$1" in
        --only)
            case "${2:-}" in
                peaqos-agent | peaqos-orchestrator) packages=("$2") ;;
                *)
                    echo "build-debs.sh: --only takes peaqos-agent or peaqos-orchestrator, not '${2:-}'" >&2
                    exit 2
                    ;;
            esac
            shift 2
            ;;
        *)
            args+=("$1")
            shift
            ;;
    esac
done

if ! cargo deb --version 2>/dev/null | grep -q "$CARGO_DEB_VERSION"; then
    echo "--- installing cargo-deb $CARGO_DEB_VERSION"
    cargo install --locked "cargo-deb@$CARGO_DEB_VERSION"
fi

# With --no-build, whoever built the executables chose how (`cargo xtask
# arm` builds them with cargo auditable too).
build=(--cargo-build "auditable build")
for arg in ${args[@]+"${args[@]}"}; do
    if [[ $arg == --no-build ]]; then
        build=()
    fi
done
if ((${#build[@]})) && ! cargo install --list | grep -qx "cargo-auditable v$CARGO_AUDITABLE_VERSION:"; then
    echo "--- installing cargo-auditable $CARGO_AUDITABLE_VERSION"
    cargo install --locked "cargo-auditable@$CARGO_AUDITABLE_VERSION"
fi

for package in "${packages[@]}"; do
    echo "--- $package"
    cargo deb -p "$package" --locked ${build[@]+"${build[@]}"} ${args[@]+"${args[@]}"}
done
