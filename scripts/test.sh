#!/usr/bin/env bash
# Set up and run the whole test suite: lint, types, then pytest.
# As root it installs the lab's Debian packages and runs the lab tests too;
# with MESHORCH_REQUIRE_LAB=1 a lab test whose prerequisites are missing fails.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $(id -u) -eq 0 ]]; then
  scripts/setup.sh --lab
else
  scripts/setup.sh
fi
echo "==> ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "==> mypy --strict"
.venv/bin/mypy
echo "==> import-linter (the layering of docs/architecture.md)"
.venv/bin/lint-imports
echo "==> pytest"
exec .venv/bin/pytest -ra --durations=15 "$@"
