"""Hot reload: the watcher's debounce (with a hand-driven clock), then a real gateway process
whose policy files are edited, broken and removed while it serves."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

from gateway.policy.loader import default_policy_dir
from gateway.policy.watch import PolicyWatcher, fingerprint
from tests.support.checks import CheckClient
from tests.support.otlp import OtlpReceiver
from tests.support.processes import GatewayProcess, health_status, wait_until

pytestmark = pytest.mark.timeout(60)


def blocking(path: str) -> str:
    return (
        "name: paths\n"
        "rules:\n"
        "  - name: not-this-path\n"
        f'    allow: request.path != "{path}"\n'
        "    deny: {status: 403, reason: path_blocked}\n"
    )


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_watcher_waits_until_the_directory_settles(tmp_path: Path) -> None:
    (tmp_path / "10-a.yaml").write_text(blocking("/a"))
    clock = Clock()
    seen: list[str] = []
    watcher = PolicyWatcher(
        tmp_path, lambda: seen.append((tmp_path / "10-a.yaml").read_text()) is None, debounce=0.3, clock=clock
    )
    # A save in two writes, 0.25 s apart: neither poll may reload the half-written file.
    (tmp_path / "10-a.yaml").write_text("name: paths\nrules:\n  - name: not-th")
    clock.now = 0.25
    assert watcher.poll() is False
    (tmp_path / "10-a.yaml").write_text(blocking("/b"))
    clock.now = 0.5
    assert watcher.poll() is False
    clock.now = 0.75
    assert watcher.poll() is False  # stable for 0.25 s only
    clock.now = 1.0
    assert watcher.poll() is True
    assert seen == [blocking("/b")]
    clock.now = 5.0
    assert watcher.poll() is False  # nothing new: no second reload


def test_watcher_treats_the_directory_as_one_unit(tmp_path: Path) -> None:
    (tmp_path / "10-a.yaml").write_text(blocking("/a"))
    clock = Clock()
    reloads: list[int] = []
    watcher = PolicyWatcher(tmp_path, lambda: reloads.append(1) is None, debounce=0.3, clock=clock)
    (tmp_path / "20-b.yaml").write_text(blocking("/b").replace("paths", "paths-b"))
    clock.now = 0.25
    watcher.poll()
    (tmp_path / "10-a.yaml").unlink()
    clock.now = 0.5
    watcher.poll()
    clock.now = 1.0
    watcher.poll()
    clock.now = 2.0
    watcher.poll()
    assert reloads == [1]


def test_fingerprint_ignores_test_files_and_sees_same_size_edits(tmp_path: Path) -> None:
    (tmp_path / "10-a.yaml").write_text(blocking("/a"))
    before = fingerprint(tmp_path)
    (tmp_path / "10-a_test.yaml").write_text("cases: []\n")
    (tmp_path / ".10-a.yaml.swp").write_text("editor junk")
    assert fingerprint(tmp_path) == before
    (tmp_path / "10-a.yaml").write_text(blocking("/b"))  # same size, maybe the same mtime tick
    assert fingerprint(tmp_path) != before
    assert fingerprint(tmp_path / "missing") is None


def test_watcher_thread_stops(tmp_path: Path) -> None:
    watcher = PolicyWatcher(tmp_path, lambda: True, interval=0.05)
    watcher.start()
    assert watcher.running
    watcher.stop()
    assert not watcher.running


def _failures_counted(receiver: OtlpReceiver) -> float:
    points = [
        p for attrs, p in receiver.metric_points("authz_policy_reloads") if attrs.get("result") == "failure"
    ]
    return max((p.as_int for p in points), default=0)


def test_hot_reload_under_a_running_gateway(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    shutil.copy(default_policy_dir() / "10-mcp-session-binding.yaml", policies)
    paths = policies / "20-paths.yaml"
    paths.write_text(blocking("/first"))
    receiver = OtlpReceiver()
    gateway = GatewayProcess(
        {"policies": str(policies), "auth": {"allow_anonymous": True}, "reload_debounce": "300ms"},
        tmp_path,
        env=receiver.exporter_env(),
    )
    client = CheckClient(gateway.address)
    # Checks keep flowing through every reload; none may fail or be answered wrongly.
    stop_traffic = threading.Event()
    traffic: list[int] = []

    def keep_checking() -> None:
        background = CheckClient(gateway.address)
        while not stop_traffic.is_set():
            traffic.append(background.status(path="/always-fine", method="GET"))
        background.close()

    worker = threading.Thread(target=keep_checking)
    worker.start()
    try:
        assert client.status(path="/first", method="GET") == 403
        assert client.status(path="/second", method="GET") == 200

        # A valid edit takes effect within 2 s.
        edited_at = time.monotonic()
        paths.write_text(blocking("/second"))
        wait_until(
            lambda: client.status(path="/second", method="GET") == 403, timeout=2.0, what="edit applied"
        )
        assert time.monotonic() - edited_at < 2.0
        assert client.status(path="/first", method="GET") == 200

        # A broken edit is rejected whole: logged with file:line:col, counted, old set serving.
        paths.write_text(blocking("/third").replace('!= "/third"', '!= 3 && "x"'))
        logged = "20-paths.yaml:4:30: allow: found no matching overload for '_&&_'"
        wait_until(lambda: logged in gateway.log_text(), timeout=3.0, what="rejection logged")
        assert "policy reload rejected" in gateway.log_text()
        assert client.status(path="/second", method="GET") == 403
        assert client.status(path="/third", method="GET") == 200
        assert gateway.alive() and health_status(gateway.address) == "SERVING"
        wait_until(lambda: _failures_counted(receiver) >= 1, timeout=5.0, what="failure counted")

        # A half-written save (two writes 0.1 s apart) never becomes the set, nor an error.
        rejected_before = gateway.log_text().count("policy reload rejected")
        text = blocking("/fourth")
        paths.write_text(text[: len(text) // 2])
        time.sleep(0.1)
        paths.write_text(text)
        wait_until(
            lambda: client.status(path="/fourth", method="GET") == 403, timeout=2.0, what="save applied"
        )
        assert gateway.log_text().count("policy reload rejected") == rejected_before

        # A removed file stops applying.
        paths.unlink()
        wait_until(
            lambda: client.status(path="/fourth", method="GET") == 200, timeout=2.0, what="removal applied"
        )
        # The binding policy still serves.
        assert client.status(path="/mcp", session_id="s-1") == 200
    finally:
        stop_traffic.set()
        worker.join(5)
        client.close()
        exit_code = gateway.stop()
        receiver.stop()
    assert traffic and set(traffic) == {200}, set(traffic)
    # The watcher stops with the process: a clean, prompt exit.
    assert exit_code == 0, gateway.log_text()
    assert "stopped" in gateway.log_text()
