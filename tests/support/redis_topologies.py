"""Real Redis topologies on free loopback ports, from Debian's redis-server and redis-cli:
Sentinel (1 master, 1 replica, 3 sentinels) and Cluster (3 masters, each with 1 replica).

Each start() polls until the topology is usable (replicas in sync, sentinels agreeing on a
quorum, every slot covered), so tests start from a known state; nothing here sleeps blindly.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

import redis
from redis.cluster import RedisCluster

from tests.support.processes import ManagedProcess, free_port, wait_for_port, wait_until

MASTER_NAME = "gatewaymaster"
# Both topologies require passwords, so every test on them exercises authentication too.
REDIS_PASSWORD = "topology-redis-pw"
SENTINEL_PASSWORD = "topology-sentinel-pw"


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed (apt-get install redis-server)")
    return found


def _client(port: int, password: str = REDIS_PASSWORD) -> redis.Redis:
    return redis.Redis(
        host="127.0.0.1", port=port, password=password, socket_timeout=2, socket_connect_timeout=2
    )


def _sentinel(port: int) -> redis.Redis:
    return _client(port, SENTINEL_PASSWORD)


def _info(port: int, section: str) -> dict[str, Any]:
    try:
        with contextlib.closing(_client(port)) as client:
            return dict(client.info(section))
    except redis.exceptions.RedisError:
        return {}


class RedisNode(ManagedProcess):
    """One redis-server, no persistence; `extra` for replication or cluster options."""

    def __init__(self, work_dir: Path, port: int, extra: list[str], name: str = "redis") -> None:
        self.port = port
        self.work_dir = work_dir
        self.extra = extra
        argv = [
            _binary("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(work_dir), "--requirepass", REDIS_PASSWORD,
            "--masterauth", REDIS_PASSWORD, *extra,
        ]  # fmt: skip
        super().__init__(f"{name}-{port}", argv, work_dir)
        wait_for_port(port, 10)

    def client(self) -> redis.Redis:
        return _client(self.port)


class SentinelTopology:
    """A master, its replica and three sentinels watching them (quorum 2)."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.nodes: dict[int, RedisNode] = {}
        master_port, replica_port = free_port(), free_port()
        self.nodes[master_port] = RedisNode(work_dir, master_port, [], "sentinel-master")
        self.nodes[replica_port] = RedisNode(
            work_dir, replica_port, ["--replicaof", "127.0.0.1", str(master_port)], "sentinel-replica"
        )
        self.sentinels: list[ManagedProcess] = []
        self.sentinel_ports: list[int] = []
        for index in range(3):
            port = free_port()
            conf = work_dir / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {work_dir}\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
                f"sentinel failover-timeout {MASTER_NAME} 4000\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
                f"sentinel auth-pass {MASTER_NAME} {REDIS_PASSWORD}\n"
                f"requirepass {SENTINEL_PASSWORD}\nsentinel sentinel-pass {SENTINEL_PASSWORD}\n"
            )
            process = ManagedProcess(
                f"sentinel-{index}-{port}", [_binary("redis-server"), str(conf), "--sentinel"], work_dir
            )
            self.sentinels.append(process)
            self.sentinel_ports.append(port)
        for port in self.sentinel_ports:
            wait_for_port(port, 10)
        self.wait_healthy()

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return (
            f"redis+sentinel://:{REDIS_PASSWORD}@{hosts}/{MASTER_NAME}?sentinel_password={SENTINEL_PASSWORD}"
        )

    def master_port(self) -> int:
        """The master, as the sentinels see it."""
        with contextlib.closing(_sentinel(self.sentinel_ports[0])) as sentinel:
            host, port = sentinel.sentinel_get_master_addr_by_name(MASTER_NAME)
        return int(port)

    def admin(self) -> redis.Redis:
        """A client on the current master."""
        return _client(self.master_port())

    def wait_healthy(self, timeout: float = 40.0) -> int:
        """Until every sentinel names the same master, which has a replica in sync and the
        sentinels' quorum; the master's port."""

        def healthy() -> int | None:
            try:
                seen = set()
                for port in self.sentinel_ports:
                    with contextlib.closing(_sentinel(port)) as sentinel:
                        seen.add(int(sentinel.sentinel_get_master_addr_by_name(MASTER_NAME)[1]))
                        state = sentinel.sentinel_master(MASTER_NAME)
                        if (
                            "s_down" in str(state.get("flags"))
                            or int(state.get("num-other-sentinels", 0)) < 2
                        ):
                            return None
                        if int(state.get("num-slaves", 0)) < 1:
                            return None
                if len(seen) != 1:
                    return None
                master = seen.pop()
                replication = _info(master, "replication")
                if replication.get("role") != "master" or int(replication.get("connected_slaves", 0)) < 1:
                    return None
                replica = replication.get("slave0", {})
                if not isinstance(replica, dict) or replica.get("state") != "online":
                    return None
                return master
            except (redis.exceptions.RedisError, TypeError, ValueError):
                return None

        return int(wait_until(healthy, timeout, 0.2, "a healthy Sentinel topology"))

    def failover(self) -> int:
        """SENTINEL FAILOVER (a planned switch); the new master's port, once healthy again."""
        before = self.master_port()
        with contextlib.closing(_sentinel(self.sentinel_ports[0])) as sentinel:
            sentinel.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
        wait_until(lambda: self.master_port() != before, 20, 0.1, "a new master")
        return self.wait_healthy()

    def kill_master(self) -> int:
        """SIGKILL of the master; its port."""
        port = self.master_port()
        self.nodes[port].kill()
        return port

    def restart_as_replica(self, port: int) -> None:
        """The killed node back (empty: no persistence), as a replica of the current master."""
        master = wait_until(
            lambda: self.master_port() != port and self.master_port(), 30, 0.2, "a new master"
        )
        old = self.nodes[port]
        old.stop()
        self.nodes[port] = RedisNode(
            self.work_dir, port, ["--replicaof", "127.0.0.1", str(master)], "sentinel-rejoined"
        )
        self.wait_healthy()

    def stop(self) -> None:
        for process in [*self.sentinels, *self.nodes.values()]:
            process.stop(5)


class ClusterTopology:
    """Six redis-server in cluster mode: 3 masters, one replica each (`redis-cli --cluster create`)."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.nodes: dict[int, RedisNode] = {}
        self.bus_ports: dict[int, int] = {}
        for _ in range(6):
            port, bus = free_port(), free_port()
            self.bus_ports[port] = bus
            self.nodes[port] = RedisNode(work_dir, port, self._cluster_options(port), "cluster")
        created = subprocess.run(
            [
                _binary("redis-cli"), "--no-auth-warning", "-a", REDIS_PASSWORD,
                "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.nodes),
                "--cluster-replicas", "1", "--cluster-yes",
            ],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout}\n{created.stderr}")
        self.wait_healthy()

    def _cluster_options(self, port: int) -> list[str]:
        return [
            "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
            "--cluster-node-timeout", "1000", "--cluster-port", str(self.bus_ports[port]),
        ]  # fmt: skip

    @property
    def url(self) -> str:
        return f"redis+cluster://:{REDIS_PASSWORD}@" + ",".join(
            f"127.0.0.1:{p}" for p in list(self.nodes)[:3]
        )

    def admin(self) -> RedisCluster:
        """A Cluster client (it routes each key to its master)."""
        port = self.masters()[0]
        return RedisCluster(host="127.0.0.1", port=port, password=REDIS_PASSWORD, socket_timeout=2)

    def masters(self) -> list[int]:
        return [
            p for p in self.nodes if self.nodes[p].alive() and _info(p, "replication").get("role") == "master"
        ]

    def wait_healthy(self, timeout: float = 40.0) -> None:
        """Until every running node says cluster_state:ok and each of 3 masters has a replica online."""

        def healthy() -> bool:
            for port, node in self.nodes.items():
                if not node.alive():
                    return False
                try:
                    with contextlib.closing(_client(port)) as client:
                        state = client.execute_command("CLUSTER", "INFO")
                except redis.exceptions.RedisError:
                    return False
                text = state.decode() if isinstance(state, bytes) else str(state)
                if "cluster_state:ok" not in text:
                    return False
            masters = self.masters()
            if len(masters) != 3:
                return False
            for port in masters:
                replica = _info(port, "replication").get("slave0", {})
                if not isinstance(replica, dict) or replica.get("state") != "online":
                    return False
            return True

        wait_until(healthy, timeout, 0.2, "a healthy Cluster")

    def master_of(self, key: str) -> int:
        with contextlib.closing(_client(next(iter(self.masters())))) as client:
            slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
            for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(master[1])
        raise AssertionError(f"no master holds the slot of {key!r}")

    def kill(self, port: int) -> None:
        self.nodes[port].kill()

    def restart(self, port: int) -> None:
        """The node back with its nodes.conf: it rejoins (as a replica of whoever took over)."""
        self.nodes[port].stop()
        self.nodes[port] = RedisNode(self.work_dir, port, self._cluster_options(port), "cluster-rejoined")
        self.wait_healthy()

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop(5)
