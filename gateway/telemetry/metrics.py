"""The gateway's OTel instruments, created once at import.

They come from the global meter provider: before telemetry is set up (or when it is
disabled) they are the API's no-ops, so recording costs next to nothing.
"""

from __future__ import annotations

from opentelemetry import metrics

_meter = metrics.get_meter("authz-gateway")

checks = _meter.create_counter(
    "authz_checks", unit="1", description="Checks answered, by decision, reason and policy"
)
check_duration = _meter.create_histogram(
    "authz_check_duration", unit="s", description="Time to answer one Check"
)
policy_reloads = _meter.create_counter(
    "authz_policy_reloads", unit="1", description="Policy set (re)loads, by result"
)
store_operation_duration = _meter.create_histogram(
    "authz_store_operation_duration", unit="s", description="Session store operations, by operation"
)
store_errors = _meter.create_counter(
    "authz_store_errors", unit="1", description="Session store operations that failed, by operation"
)
jwks_refreshes = _meter.create_counter(
    "authz_jwks_refreshes", unit="1", description="JWKS fetches, by issuer and result"
)
