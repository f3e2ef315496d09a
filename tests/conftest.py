from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.issuer import TestIssuer  # noqa: E402
from tests.support.processes import RedisServer  # noqa: E402
from tests.support.redis_topologies import ClusterTopology, SentinelTopology  # noqa: E402


@pytest.fixture
def issuer() -> TestIssuer:
    idp = TestIssuer()
    yield idp
    idp.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the whole run; tests keep apart by key prefix."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sentinel_topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelTopology]:
    """1 master, 1 replica, 3 sentinels, for the whole run; tests keep apart by key prefix, and a
    test that fails the master over leaves the topology healthy again."""
    topology = SentinelTopology(tmp_path_factory.mktemp("sentinel"))
    yield topology
    topology.stop()


@pytest.fixture(scope="session")
def cluster_topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterTopology]:
    """A Redis Cluster of 3 masters with 1 replica each, for the whole run."""
    topology = ClusterTopology(tmp_path_factory.mktemp("cluster"))
    yield topology
    topology.stop()
