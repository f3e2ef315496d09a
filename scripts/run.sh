#!/usr/bin/env bash
# Install what is needed, start the gateway with examples/gateway.yaml, and show one real
# allow and one real deny. The gateway then keeps serving on 127.0.0.1:9191 until Ctrl-C.
#   bash scripts/run.sh
# Installs only what running needs: the project and its demo extra (Envoy, the MCP SDK) in
# ./.venv, no test tools, no apt, no sudo; with nothing changed, a second run reaches no index.
set -euo pipefail
cd "$(dirname "$0")/.."
SETUP_EXTRAS=demo
. scripts/setup-env.sh
PY="$VENV/bin/python"
GW="$VENV/bin/authz-gateway"

# Another process on the port would answer the Checks below in this gateway's place.
if "$PY" -c 'import socket, sys; sys.exit(socket.socket().connect_ex(("127.0.0.1", 9191)) != 0)'; then
  echo "run.sh: 127.0.0.1:9191 is already in use by another process; stop it first" >&2
  exit 1
fi
echo "== authz-gateway serve --config examples/gateway.yaml"
"$GW" serve --config examples/gateway.yaml &
GATEWAY_PID=$!
trap 'kill -TERM "$GATEWAY_PID" 2>/dev/null; wait "$GATEWAY_PID" 2>/dev/null || true' EXIT
trap 'exit 0' INT TERM
if ! "$PY" scripts/try_check.py --wait || ! kill -0 "$GATEWAY_PID" 2>/dev/null; then
  echo "run.sh: the gateway did not start (its error is above)" >&2
  exit 1
fi

TOKEN="$("$GW" token --sub alice)"
echo
echo "== a Check with a valid token (authz-gateway token --sub alice)"
"$PY" scripts/try_check.py --token "$TOKEN"
echo "== a Check without a token"
"$PY" scripts/try_check.py
echo "== a Check with an expired token (authz-gateway token --ttl -120)"
"$PY" scripts/try_check.py --token "$("$GW" token --ttl -120)"

cat <<EOF

The gateway is serving Envoy's ext_authz and ext_proc gRPC APIs on 127.0.0.1:9191 (Ctrl-C stops it).
Try it yourself, from this directory, in another terminal:
  TOKEN=\$($GW token --sub alice)      # signed with examples/keys/issuer-rs256.pem
  $PY scripts/try_check.py --token "\$TOKEN" --issue s-1     # the server's answer issues s-1: bound to alice
  $PY scripts/try_check.py --token "\$TOKEN" --session s-1
  $PY scripts/try_check.py --token "\$($GW token --sub bob)" --session s-1    # 404: s-1 is alice's
Put Envoy in front (README, section "Beside Envoy"): $VENV/bin/envoy -c examples/envoy/envoy.yaml
EOF
wait "$GATEWAY_PID"
