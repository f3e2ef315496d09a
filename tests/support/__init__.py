"""Shared helpers for the tests: real processes, a real JWKS issuer, CheckRequest builders."""
