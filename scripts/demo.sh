#!/usr/bin/env bash
# Set up and run the demo: a hub and three sites on loopback (Python packages only, no root).
# With --lab (root): the Debian lab packages too, and the sites on namespaces, WireGuard, podman.
set -euo pipefail
cd "$(dirname "$0")/.."
setup_args=()
for arg in "$@"; do
    if [[ "$arg" == "--lab" ]]; then setup_args=(--lab); fi
done
scripts/setup.sh "${setup_args[@]}"
exec .venv/bin/meshorch demo "$@"
