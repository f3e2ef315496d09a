"""bench/bench_envoy.py runs from this checkout and prints every way with measured figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WAYS = ("envoy", "native", "noop", "gateway", "gateway-redis")


def test_quick_run_prints_every_way_with_positive_figures(tmp_path: Path) -> None:
    samples_file = tmp_path / "samples.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_envoy.py"), "--quick", "--json", str(samples_file)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    table = done.stdout.split("\n\n", 1)[1].split("\n(", 1)[0].splitlines()
    assert table[0].split()[:2] == ["way", "req/s"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert sorted(rows) == sorted(WAYS)
    for way, columns in rows.items():
        figures = [float(c) for c in columns[1:] if c != "-"]
        assert len(figures) >= 6 and all(f > 0 for f in figures[:2]), f"{way}: {columns}"

    samples = json.loads(samples_file.read_text())["samples"]
    assert sorted(samples) == sorted(WAYS)
    for way, (sample,) in samples.items():
        assert sample["requests_per_s"] > 0 and sample["requests"] > 0
        assert sample["p50_ms"] > 0 and sample["p99_ms"] >= sample["p50_ms"]
        assert sample["achieved"] > 0
        expected = {"envoy"} | ({"noop"} if way == "noop" else set())
        if way.startswith("gateway"):
            expected |= {"gateway"}
        if way == "gateway-redis":
            expected |= {"redis"}
        assert set(sample["cpu_us"]) == expected
        # Envoy and any authorization server spent CPU on every request (redis may round to 0 ticks).
        assert all(sample["cpu_us"][label] > 0 for label in expected - {"redis"}), sample["cpu_us"]
