"""The pipeline: one check, step by step (`check.Authorizer`), and what the response path asks
of the same steps (`response_path.ResponsePath`). docs/architecture.md lists the modules."""

from gateway.pipeline.allows import UPSTREAM_HEADERS, UPSTREAM_ISSUER, UPSTREAM_SUBJECT
from gateway.pipeline.check import Authorizer
from gateway.pipeline.response_path import ResponsePath
from gateway.policy.model import PolicyHolder

__all__ = [
    "UPSTREAM_HEADERS", "UPSTREAM_ISSUER", "UPSTREAM_SUBJECT", "Authorizer", "PolicyHolder", "ResponsePath",
]
