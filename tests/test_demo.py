"""`authz-gateway demo`, run as a user runs it: the installed command, in a subprocess."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from gateway.config import MCP_SDK_SESSION_NOT_FOUND_BODY
from tests.support.processes import REPO, wait_until

pytestmark = pytest.mark.timeout(120)


def command() -> list[str]:
    found = Path(sys.executable).with_name("authz-gateway")
    return [str(found if found.exists() else shutil.which("authz-gateway"))]


def marked_processes(mark: str) -> list[int]:
    """Processes whose environment carries this test's mark: the demo and all it started."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if f"AUTHZ_DEMO_TEST_MARK={mark}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _ignore_sigint() -> None:
    # As nohup, a background shell or some CI runners leave it for their children.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def start_demo(tmp_path: Path, *args: str, sigint_ignored: bool = False) -> tuple[subprocess.Popen[str], str]:
    mark = uuid.uuid4().hex
    env = {**os.environ, "AUTHZ_DEMO_TEST_MARK": mark, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [*command(), "demo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
        preexec_fn=_ignore_sigint if sigint_ignored else None,
    )
    return process, mark


def test_demo_tells_the_whole_story_and_exits_0(tmp_path: Path) -> None:
    process, mark = start_demo(tmp_path)
    stdout, stderr = process.communicate(timeout=90)
    assert process.returncode == 0, stdout + stderr
    for line in (
        "1. alice opens an MCP session, with access token AT1 [",
        "mallory  uses it before alice's client sends its next request -> HTTP 404",
        "mallory  the same with a made-up session id -> HTTP 404",
        "2. alice's token is refreshed: AT2 [",
        "3. mallory replays alice's session id, with a valid token of her own",
        f"mallory  tools/call whoami -> HTTP 404 {MCP_SDK_SESSION_NOT_FOUND_BODY}",
        "4. alice ends the session (an MCP DELETE); her client still holds the old id",
        "client   tools/call echo on the old id -> SDK error 'Session not found'",
        "5. alice's client starts a new session and carries on",
        "All 5 steps went as expected",
        "Stopped Envoy, authz-gateway and the MCP server.",
    ):
        assert line in stdout, f"missing {line!r} in:\n{stdout}"
    # The gateway's own reasons, one decision per line, as the spans said.
    assert re.search(r"POST notifications/initialized +allow +allowed\n", stdout)
    assert stdout.count("(the session id was bound to the token's iss+sub when the server issued it)") == 2
    # mallory's early use (step 1) and her replay (step 3); the made-up id is unknown.
    assert len(re.findall(r"POST tools/call whoami +deny 404 +subject_mismatch", stdout)) == 2
    assert re.search(r"POST tools/call whoami +deny 404 +session_unknown", stdout)
    assert re.search(r"POST tools/call whoami +allow +allowed", stdout)
    assert re.search(r"POST tools/call whoami +deny 404 +subject_mismatch", stdout)
    assert re.search(r"DELETE +allow +allowed", stdout)
    assert re.search(r"POST tools/call echo +deny 404 +session_terminated", stdout)
    assert "!!" not in stdout and "FAILED" not in stdout
    # The same session id before and after the refresh and the hijack; a new one at the end.
    sessions = re.findall(r"session \[([0-9a-f]{8})\]", stdout)
    assert len(sessions) == 4 and len(set(sessions[:3])) == 1 and sessions[3] != sessions[0]
    # No token and no raw session id anywhere (the SDK server's ids are 32 hex digits).
    everything = stdout + stderr
    assert not re.search(r"eyJ[\w-]+\.[\w-]+", everything)
    assert not re.search(r"[0-9a-f]{32}", everything)
    assert marked_processes(mark) == []
    # The README shows a real run: the same lines, but for ports, fingerprints and timing.
    readme = (REPO / "README.md").read_text()
    shown = readme[readme.index("$ authz-gateway demo\n") :].split("\n", 1)[1].split("\n```", 1)[0]
    assert normalized(shown) == normalized(stdout.rstrip("\n"))


def normalized(output: str) -> str:
    output = re.sub(r"127\.0\.0\.1:\d+ *", "127.0.0.1:PORT ", output)
    output = re.sub(r"\[[0-9a-f]{8}\]", "[fingerprint]", output)
    return re.sub(r"started in \d+\.\ds", "started in N s", output)


@pytest.mark.parametrize(
    ("signum", "sigint_ignored"),
    [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["sigint", "sigterm", "sigint-inherited-ignored"],
)
def test_an_interrupted_demo_stops_everything_it_started(
    tmp_path: Path, signum: int, sigint_ignored: bool
) -> None:
    process, mark = start_demo(tmp_path, "--keep-running", sigint_ignored=sigint_ignored)
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("Still running:"):
                break
        else:
            pytest.fail(f"the demo ended early:\n{process.communicate()[1]}")
        children = [pid for pid in marked_processes(mark) if pid != process.pid]
        assert len(children) >= 3  # the MCP server, the gateway, Envoy
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=30)
        assert process.returncode == 130, stderr
        assert "Stopped Envoy, authz-gateway and the MCP server." in stdout
        assert "interrupted" in stderr
        assert marked_processes(mark) == []
    finally:  # a failure here must not leave the demo's processes running after pytest
        for pid in marked_processes(mark):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def test_a_failed_start_stops_what_had_started(tmp_path: Path) -> None:
    broken = tmp_path / "envoy"
    broken.write_text("#!/bin/sh\necho 'this envoy is broken' >&2\nexit 3\n")
    broken.chmod(0o755)
    process, mark = start_demo(tmp_path, "--envoy", str(broken))
    # The MCP server and the gateway start before Envoy fails.
    wait_until(lambda: len(marked_processes(mark)) >= 3 or process.poll() is not None, timeout=30)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "envoy exited with status 3" in stderr and "this envoy is broken" in stderr
    assert "Stopped Envoy, authz-gateway and the MCP server." in stdout
    assert marked_processes(mark) == []


def test_the_packaged_envoy_config_is_the_example() -> None:
    # The demo ships the example inside the package (it must work from an installed wheel).
    packaged = REPO / "gateway" / "examples" / "envoy.yaml"
    assert packaged.read_bytes() == (REPO / "examples" / "envoy" / "envoy.yaml").read_bytes()
