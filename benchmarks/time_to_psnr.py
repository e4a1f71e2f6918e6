"""Time for a fit of the built-in sample to reach a PSNR on every axis view, per backend.

Prints, for each backend, the wall time (including the first step, which
loads the numba kernels from their on-disk cache or compiles them, reported
separately) and iterations until every view's PSNR is at least ``--psnr`` dB,
with the ratio to the torch reference.  Each backend runs in a fresh process,
so each pays its own kernel loading (the torch backend's loss uses the numba
SSIM on the CPU too).

Run: ``python benchmarks/time_to_psnr.py [--psnr 30] [--iterations 300]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

from napari_neurogs_mip.prepare import FitInputs, prepare_fit
from napari_neurogs_mip.train import FitConfig, StepEvent, Trainer


def time_to_psnr(backend: str, threshold: float, iterations: int) -> tuple[float | None, int | None, float]:
    """(seconds, iterations) until every view reaches ``threshold`` dB, and the first step's seconds."""
    prepared = prepare_fit(FitInputs(sample=True, num_gaussians=2000))
    trainer = Trainer(
        prepared.model,
        prepared.targets,
        FitConfig(iterations=iterations, device="cpu", backend=backend, preview_every=1),
    )
    targets = prepared.targets.images
    start = time.perf_counter()
    first = None
    for event in trainer.run():
        if not isinstance(event, StepEvent):
            continue
        if first is None:
            first = time.perf_counter() - start
        errors = [float(np.mean((image - target) ** 2)) for image, target in zip(event.images, targets)]
        if min(10 * np.log10(1 / max(e, 1e-12)) for e in errors) >= threshold:
            return time.perf_counter() - start, event.iteration, first
    return None, None, first or 0.0


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--psnr", type=float, default=30.0)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--child", choices=["torch", "cpu"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(time_to_psnr(args.child, args.psnr, args.iterations)))
        return
    results = {}
    for backend in ("torch", "cpu"):
        command = [sys.executable, __file__, "--child", backend, "--psnr", str(args.psnr),
                   "--iterations", str(args.iterations)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        line = next(row for row in done.stdout.splitlines() if row.startswith("RESULT "))
        results[backend] = json.loads(line[len("RESULT ") :])
    reference = results["torch"][0]
    print(f"sample neuron, 2000 Gaussians, 3 axis views, time to >= {args.psnr:g} dB on every view (CPU)")
    print(f"{'backend':<8}{'seconds':>10}{'iterations':>12}{'first step s':>14}{'speed-up':>10}")
    for backend, (seconds, steps, first) in results.items():
        ratio = f"{reference / seconds:.1f}x" if seconds and reference else "-"
        shown = f"{seconds:.2f}" if seconds is not None else "not reached"
        print(f"{backend:<8}{shown:>10}{steps or '-':>12}{first:>14.2f}{ratio:>10}")


if __name__ == "__main__":
    main()
