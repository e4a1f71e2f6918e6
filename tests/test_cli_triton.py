"""The CLI fit runs unchanged with ``--backend triton`` under the Triton interpreter (CPU tensors)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from napari_neurogs_mip.io.checkpoint import load_checkpoint

pytest.importorskip("triton")


def test_cli_fit_with_triton_backend_under_interpreter(tmp_path):
    # A fresh process: TRITON_INTERPRET must be set before triton is first imported.
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [
        sys.executable, "-m", "napari_neurogs_mip.cli", "fit", "--sample", "--downsample", "3",
        "--num_gaussians", "100", "--iterations", "3", "--backend", "triton", "--device", "cpu",
        "--out", str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "renderer backend triton" in result.stdout
    assert "PSNR" in result.stdout
    checkpoint = load_checkpoint(tmp_path / "neurogs_renderer_optimized.pt")
    assert checkpoint.model.num_gaussians == 100
    assert checkpoint.iteration == 3
