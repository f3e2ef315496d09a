# Sourced by scripts/test.sh and scripts/run.sh: a virtualenv ($VENV, default ./.venv) with the
# project installed (editable) with the extras SETUP_EXTRAS names (default: test; run.sh: demo).
# With the test extra, also the system packages the tests start (redis-server, h2load), by apt.
# pip runs only when this venv has no install of these extras from this very pyproject.toml (a
# stamp in the venv, keyed on its hash): a second run with nothing changed reaches no index.
VENV="${VENV:-$PWD/.venv}"
SETUP_EXTRAS="${SETUP_EXTRAS:-test}"
if [ "$SETUP_EXTRAS" = test ]; then
  need_apt=()
  command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
  command -v h2load >/dev/null 2>&1 || need_apt+=(nghttp2-client)
  if [ ${#need_apt[@]} -gt 0 ]; then
    echo "== apt-get install ${need_apt[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
  fi
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "== python venv at $VENV"
  python3 -m venv "$VENV"
fi
stamp="$VENV/.authz-gateway-installed-${SETUP_EXTRAS//[^A-Za-z0-9_-]/_}"
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1) $PWD [$SETUP_EXTRAS]"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "== pip install -e .[$SETUP_EXTRAS]"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q -e ".[$SETUP_EXTRAS]"
  echo "$wanted" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
