"""Telemetry: one span per check, OTel metrics, and the optional decision log."""
