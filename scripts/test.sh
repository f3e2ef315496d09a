#!/usr/bin/env bash
# Install everything the test suite needs on a fresh machine, then run it.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup-env.sh
echo "== ruff"; "$VENV/bin/ruff" check gateway tests bench
echo "== mypy (strict on gateway/)"; "$VENV/bin/mypy" gateway
echo "== pytest"; "$VENV/bin/python" -m pytest "$@"
