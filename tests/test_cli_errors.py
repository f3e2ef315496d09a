"""Every CLI error is one clear line on stderr with exit 2, never a traceback; signals stop `serve`.

The installed command, run as a user runs it, in a subprocess.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gateway.cli import build_parser
from tests.support.processes import REPO, free_port

COMMAND = [sys.executable, "-m", "gateway"]


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def _fails_with_one_line(argv: list[str], expected: str, cwd: Path = REPO) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=cwd)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    # Log lines (with a timestamp) may come first; the error itself is one line.
    errors = [line for line in result.stderr.splitlines() if not line[:4].isdigit()]
    assert len(errors) == 1, result.stderr
    assert expected in errors[0], errors[0]


def _config(tmp_path: Path, **settings: object) -> str:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(settings))
    return str(path)


def test_a_grpc_port_in_use(taken_port: int) -> None:
    argv = [*COMMAND, "serve", "--listen", f"127.0.0.1:{taken_port}"]
    _fails_with_one_line(argv, f"cannot listen on 127.0.0.1:{taken_port}: Address already in use")


def test_a_metrics_port_in_use(tmp_path: Path, taken_port: int) -> None:
    config = _config(tmp_path, telemetry={"metrics_listen": f"127.0.0.1:{taken_port}"})
    argv = [*COMMAND, "serve", "--config", config, "--listen", f"127.0.0.1:{free_port()}"]
    _fails_with_one_line(argv, "in use")


def test_an_unknown_store_scheme(tmp_path: Path) -> None:
    argv = [*COMMAND, "serve", "--store", "postgres://db/sessions", "--listen", f"127.0.0.1:{free_port()}"]
    _fails_with_one_line(argv, "unsupported store URL scheme 'postgres'")


def test_a_token_key_that_is_missing() -> None:
    _fails_with_one_line([*COMMAND, "token", "--key", "missing.pem"], "cannot read the key missing.pem")


def test_a_token_algorithm_that_is_not_offered() -> None:
    _fails_with_one_line([*COMMAND, "token", "--alg", "HS256"], "invalid choice: 'HS256'")


def test_a_usage_error_is_one_line() -> None:
    _fails_with_one_line([*COMMAND, "serve", "--no-such-flag"], "unrecognized arguments: --no-such-flag")


def test_a_token_key_that_does_not_fit_the_algorithm() -> None:
    _fails_with_one_line([*COMMAND, "token", "--alg", "ES256"], "cannot sign ES256")


def test_every_token_flag_says_what_it_is() -> None:
    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    token = subcommands.choices["token"]
    flags = [action for action in token._actions if action.option_strings and action.dest != "help"]
    assert {a.option_strings[0] for a in flags} >= {"--key", "--kid", "--alg", "--iss", "--aud", "--sub"}
    assert [a.option_strings[0] for a in flags if not a.help] == []


def test_try_check_without_a_gateway() -> None:
    argv = [sys.executable, "scripts/try_check.py", "--address", f"127.0.0.1:{free_port()}"]
    _fails_with_one_line(argv, "no gateway answers at")


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_serve_stops_on_sigint_even_when_it_was_inherited_ignored(tmp_path: Path) -> None:
    # Started as nohup or a background shell would start it.
    port = free_port()
    process = subprocess.Popen(
        [*COMMAND, "serve", "--listen", f"127.0.0.1:{port}"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_ignore_sigint,
    )
    try:
        deadline_reached = False
        for _ in range(200):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            try:
                process.wait(0.1)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            deadline_reached = True
        assert not deadline_reached and process.poll() is None, "serve did not start"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=20)
        assert process.returncode == 0, stderr
        assert "stopped" in stderr
    finally:
        if process.poll() is None:
            process.kill()
