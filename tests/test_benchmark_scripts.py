"""The CPU benchmark script still runs (tiny scenes): its numbers are reported, so it must not rot."""

from __future__ import annotations

import os
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


def test_bench_cpu_cross_compiles_a_loop_to_neon_vectors() -> None:
    """``--asm-target aarch64``'s method on one small loop: numba's unoptimised IR, retargeted, comes out as NEON."""
    import llvmlite.binding as llvm

    llvm.initialize_all_targets()
    try:
        llvm.Target.from_triple("aarch64-unknown-linux-gnu")
    except RuntimeError as error:
        pytest.skip(f"llvmlite lacks the AArch64 target: {error}")
    code = (
        "import sys, numpy as np, numba\n"
        f"sys.path.insert(0, {str(BENCHMARKS)!r})\n"
        "import bench_cpu\n"
        "@numba.njit(error_model='numpy')\n"
        "def axpy(a, x, y):\n"
        "    for i in range(x.shape[0]):\n"
        "        y[i] += a * x[i]\n"
        "axpy(np.float32(2), np.ones(8, np.float32), np.ones(8, np.float32))\n"
        "signature = axpy.signatures[0]\n"
        "asm = bench_cpu.cross_compile(axpy.inspect_llvm(signature), *bench_cpu.CROSS_TARGETS['aarch64'])\n"
        "print(*bench_cpu.count_instructions(asm, 'aarch64'))\n"
        "print(asm)\n"
    )
    # NUMBA_OPT=0 and the generic CPU, as bench_cpu.py's child: IR not yet vectorised for this host.
    env = {**os.environ, "NUMBA_OPT": "0", "NUMBA_CPU_NAME": "generic"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    total, vector, _, _ = map(int, done.stdout.split("\n", 1)[0].split())
    assert 0 < vector < total, done.stdout
    # The loop's multiply-add on four float32 lanes: with NUMBA_LOOP_VECTORIZE=0 only the wrappers' q-register
    # copies of array structs are vector instructions, and this fails.
    assert re.search(r"^\tf(?:mla|mul|add)\tv\d+\.4s", done.stdout, re.MULTILINE), done.stdout
