#!/usr/bin/env bash
# Install everything the test suite needs on a fresh machine, then run it.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup-env.sh
# The differential and bypass tests run a server built with the official TypeScript MCP SDK
# (tests/node): Node >= 18 with npm, and the packages pinned by its package-lock.json.
if ! command -v npm >/dev/null 2>&1 \
  || ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 18 ? 0 : 1)'; then
  echo "ERROR: the tests need Node.js >= 18 with npm (tests/node: the TypeScript MCP SDK server)." >&2
  exit 1
fi
# Reinstalled only when node_modules is missing or the lock file changed since the last install.
if ! cmp -s tests/node/package-lock.json tests/node/node_modules/.installed-package-lock.json; then
  echo "== npm ci --prefix tests/node"
  npm ci --prefix tests/node --no-audit --no-fund --loglevel=error >/dev/null
  cp tests/node/package-lock.json tests/node/node_modules/.installed-package-lock.json
fi
echo "== ruff"; "$VENV/bin/ruff" check gateway tests bench
echo "== mypy (strict on gateway/)"; "$VENV/bin/mypy" gateway
echo "== import-linter (layers)"; "$VENV/bin/lint-imports"
echo "== pytest"; "$VENV/bin/python" -m pytest "$@"
