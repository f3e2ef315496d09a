#!/usr/bin/env bash
# Install what is needed, start the gateway with examples/gateway.yaml, and show one real
# allow and one real deny. The gateway then keeps serving on 127.0.0.1:9191 until Ctrl-C.
#   bash scripts/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup-env.sh
PY="$VENV/bin/python"
GW="$VENV/bin/authz-gateway"

echo "== authz-gateway serve --config examples/gateway.yaml"
"$GW" serve --config examples/gateway.yaml &
GATEWAY_PID=$!
trap 'kill -TERM "$GATEWAY_PID" 2>/dev/null; wait "$GATEWAY_PID" 2>/dev/null || true' EXIT
trap 'exit 0' INT TERM
"$PY" scripts/try_check.py --wait

TOKEN="$("$GW" token --sub alice)"
echo
echo "== a Check with a valid token (authz-gateway token --sub alice)"
"$PY" scripts/try_check.py --token "$TOKEN"
echo "== a Check without a token"
"$PY" scripts/try_check.py
echo "== a Check with an expired token (authz-gateway token --ttl -120)"
"$PY" scripts/try_check.py --token "$("$GW" token --ttl -120)"

cat <<EOF

The gateway is serving Envoy's ext_authz gRPC API on 127.0.0.1:9191 (Ctrl-C stops it).
Try it yourself, from this directory, in another terminal:
  TOKEN=\$($GW token --sub alice)      # signed with examples/keys/issuer-rs256.pem
  $PY scripts/try_check.py --token "\$TOKEN" --session s-1
  $PY scripts/try_check.py --token "\$($GW token --sub bob)" --session s-1    # 404: s-1 is alice's
Put Envoy in front (README, section "Beside Envoy"): $VENV/bin/envoy -c examples/envoy/envoy.yaml
EOF
wait "$GATEWAY_PID"
