"""Every Triton kernel compiles to a CUDA cubin for sm_80 (A100) and sm_90 (H100), without a GPU.

The kernels and their launch signatures come from
``triton_kernels.kernel_specs`` (the same table the launches use).  Compilation
runs in one subprocess with ``TRITON_INTERPRET`` removed and a fresh Triton
cache: ``triton.jit`` picks compiled or interpreted kernels at import time, and
other tests in this session may run the interpreter.  Each (kernel, mode, tile,
compute capability) is its own test case, so one failing kernel fails its case
with the compiler's message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from napari_neurogs_mip.render import triton_kernels

CAPABILITIES = (80, 90)
TILES = (8, 16)
CASES = [
    (spec.name, tile, cc) for tile in TILES for spec in triton_kernels.kernel_specs(tile=tile) for cc in CAPABILITIES
]

WORKER = r"""
import json, sys, traceback
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from napari_neurogs_mip.render import triton_kernels

assert not triton_kernels.is_interpreted()
results = {}
for tile in TILES:
    for spec in triton_kernels.kernel_specs(tile=tile):
        for cc in CAPABILITIES:
            key = f"{spec.name}|{tile}|{cc}"
            try:
                source = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs)
                compiled = triton.compile(source, target=GPUTarget("cuda", cc, 32), options=spec.options)
                results[key] = {
                    "cubin_bytes": len(compiled.asm["cubin"]),
                    "libdevice": "__nv_" in compiled.asm["llir"],
                    "num_warps": compiled.metadata.num_warps,
                }
            except Exception:
                results[key] = {"error": traceback.format_exc()[-3000:]}
print("RESULTS " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Compile every case once in a clean subprocess; map ``name|tile|cc`` to its outcome."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the kernels name fusion explicitly; this silences the notice
    script = f"TILES = {TILES!r}\nCAPABILITIES = {CAPABILITIES!r}\n" + WORKER
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULTS ")]
    assert result.returncode == 0 and lines, f"compile worker failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULTS ") :])


@pytest.mark.parametrize(("name", "tile", "cc"), CASES, ids=[f"{n}-tile{t}-sm{c}" for n, t, c in CASES])
def test_kernel_compiles_to_cubin(compiled: dict[str, dict], name: str, tile: int, cc: int) -> None:
    """A non-empty cubin, no libdevice calls (the kernels must also run in the interpreter)."""
    outcome = compiled[f"{name}|{tile}|{cc}"]
    assert "error" not in outcome, outcome.get("error")
    assert outcome["cubin_bytes"] > 0
    assert not outcome["libdevice"], f"{name} calls libdevice (__nv_*): use tl.exp and plain arithmetic only"


def test_every_kernel_is_listed() -> None:
    """The spec table covers every @triton.jit kernel (helpers start with an underscore)."""
    listed = {spec.kernel.__name__ for spec in triton_kernels.kernel_specs()}
    kernels = {name for name in dir(triton_kernels) if name.endswith("_kernel") and not name.startswith("_")}
    assert listed == kernels
    modes = {spec.name for spec in triton_kernels.kernel_specs()}
    for mode in triton_kernels.MODE_CODES:
        assert {f"forward_kernel[{mode}]", f"backward_kernel[{mode}]"} <= modes
