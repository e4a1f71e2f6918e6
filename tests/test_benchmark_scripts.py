"""The CPU benchmark script still runs (tiny scenes): its numbers are reported, so it must not rot."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_bench_cpu_smoke_prints_both_backends_and_ratios() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_cpu.py"), "--smoke", "--backends", "torch,cpu"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FAILED" not in done.stdout, done.stdout
    for scenario in ("S1", "S2"):
        assert f"== {scenario}:" in done.stdout
    rows = re.findall(r"^(torch|cpu)\s+(\d+)\s+([\d.]+)", done.stdout, re.MULTILINE)
    assert [(backend, threads) for backend, threads, _ in rows] == [("torch", rows[0][1]), ("cpu", "1")] * 2
    assert all(float(rate) > 0 for _, _, rate in rows)
    assert len(re.findall(r"^cpu vs torch: step [\d.]+x faster", done.stdout, re.MULTILINE)) == 2
