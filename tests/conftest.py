from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.issuer import TestIssuer  # noqa: E402


@pytest.fixture
def issuer() -> TestIssuer:
    idp = TestIssuer()
    yield idp
    idp.stop()
