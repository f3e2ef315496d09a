# Sourced by scripts/test.sh and scripts/run.sh: a virtualenv with the project and its
# test extra, plus the system packages the tests start (redis-server, h2load).
VENV="${VENV:-$PWD/.venv}"
need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v h2load >/dev/null 2>&1 || need_apt+=(nghttp2-client)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== apt-get install ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "== python venv at $VENV"
  python3 -m venv "$VENV"
fi
echo "== pip install -e .[test]"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q -e ".[test]"
# xds-protos ships its own, older copy of opentelemetry/proto/*_pb2.py; installed after
# opentelemetry-proto it overwrites it and the OTLP exporter fails to import. Put it back.
"$VENV/bin/python" -m pip install -q --force-reinstall --no-deps \
  "opentelemetry-proto==$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("opentelemetry-proto"))')"
export PATH="$VENV/bin:$PATH"
