#!/usr/bin/env bash
# Set up (Python packages only, no root) and run the demo: a 3-host site on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/meshorch demo "$@"
