"""bench/bench_handles_envoy.py runs from this checkout: both stacks measured through real
Envoy, with figures, and ext_proc in the path as the example config puts it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_run_measures_checked_unchecked_and_minting_calls(tmp_path: Path) -> None:
    samples_file = tmp_path / "samples.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "bench_handles_envoy.py"),
            "--quick",
            "--json",
            str(samples_file),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    table = done.stdout.split("\n\n", 1)[1].splitlines()
    assert table[0].split()[:3] == ["way", "req/s", "gateway"]
    rows = {line.split()[0]: line.split() for line in table[1:4]}
    assert sorted(rows) == ["checked", "minting", "unchecked"]
    assert "checked / unchecked gateway CPU per request by round" in table[4]

    recorded = json.loads(samples_file.read_text())
    samples = recorded["samples"]
    assert sorted(samples) == ["checked", "minting", "unchecked"]
    for way, (sample,) in samples.items():
        assert sample["requests"] > 0 and sample["requests_per_s"] > 0, sample
        assert sample["gateway_us"] > 0 and sample["envoy_us"] > 0, sample
        # The example config sends every request's headers to ext_proc: one stream per request
        # (a few more than the requests h2load counted done: those still in flight at its end).
        assert 0.9 < sample["ext_proc"]["streams_started"] < 1.5, (way, sample["ext_proc"])
    # A presented handle on a call that mints nothing: the request headers only (one message,
    # no body); the call that may mint also sends both bodies and the response headers.
    assert samples["checked"][0]["ext_proc"]["stream_msgs_sent"] < 1.5
    assert samples["unchecked"][0]["ext_proc"]["stream_msgs_sent"] < 1.5
    assert samples["minting"][0]["ext_proc"]["stream_msgs_sent"] > 3.5
    (ratio,) = recorded["ratios"]
    assert ratio > 0
