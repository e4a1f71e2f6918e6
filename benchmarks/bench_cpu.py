"""CPU benchmark of the MIP rasterisers: training-step it/s, forward/backward ms, peak memory, JIT warm-up.

Scenes (``bench_scenes.py``, shared with ``bench_gpu.py``): K = 12,145 random
Gaussians inside the 100 x 647 x 813 (Z, Y, X) volume box; views ``xy``, ``xz``,
``yz`` from ``make_views``.  Targets are the scene rendered once (no gradient);
training starts from a perturbed copy.

=====  =======================================  ==========================
name   views                                    backends
=====  =======================================  ==========================
S1     128 x 128 each                           torch, cpu, dense (if any)
S2     native: 647 x 813, 100 x 813, 100 x 647  torch, cpu
=====  =======================================  ==========================

The soft MIP uses the renderer's default ``beta`` (what a fit uses; ``--beta``
to change it, e.g. 50, the seed's value this benchmark used before) and the
cpu kernels' early termination (``--early-termination off`` measures them
without it: ``raster_cpu.EARLY_TERMINATION = False``).

A training step is what ``Trainer.step`` does, with the backend's two stages
(``Renderer.create(...).stages``: for ``cpu`` the numba projection and
rasteriser, for ``torch`` the PyTorch references) and the PyTorch thread count
a fit uses with it (column ``thr``: 1 around the cpu kernels): project +
rasterise the three views, ``mean(MSE + 0.1 (1 - SSIM))`` over views (``napari_neurogs_mip.losses``),
backward, gradient clipping (norm 1) and Adam with the seed's parameter groups
(means ``lr``, log-scales and quaternions ``0.1 lr``, log-amplitudes ``lr``), fused
as ``Trainer`` runs it on the CPU.

Every (scenario, backend) runs in its own subprocess, so that memory is clean:
after a warm-up step the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``);
``peak MiB`` is the peak resident set during the timed steps and timings minus
the resident set of the warm process (imports, JIT-compiled kernels, scene,
targets, optimiser state), i.e. what a training step needs on top; ``RSS MiB``
is that peak resident set itself.  Timings are repeated in ``--rounds`` rounds; the table shows the best
round (and the median) because a shared machine only ever slows a run down;
``others`` is the share of the machine's CPU time that other processes used
while a row was measured (from ``/proc/stat``): rows with more than a few
percent are not trustworthy on a small machine.
Forward/backward ms time the rasteriser alone on a precomputed projection.
The dense O(H W K) baseline (``benchmarks/dense.py``, when present) takes about
a minute per S1 step on 2 cores, so it is left out unless ``--backends`` names it
(then one round of one call each; the script then runs ~8 minutes on 2 cores,
the default ~3, with a progress line per backend and scenario).  The header
names the CPU and the SIMD width the numba kernels are compiled for
(``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES`` override the host, e.g.
``NUMBA_CPU_NAME=haswell`` with AVX-512 features removed emulates an AVX2 laptop).
For the ``cpu`` backend the child also reports its first call (the float32
rasteriser, forward and backward, loaded from numba's on-disk cache, or compiled
if the cache is cold); ``--cold`` adds a run with an empty cache directory to
measure the full JIT compile.

``--psnr-fit`` instead fits the built-in sample (``prepare_fit(FitInputs(sample=True))``
and ``Trainer`` with ``FitConfig(backend="cpu")``, the CLI's defaults) with early
termination on and off, alternating, each run in its own process, and prints the
training time (steps only; scoring every ``--psnr-every`` steps is not counted)
until the lowest PSNR over the training views reaches 30 and 33 dB.
``--asm`` prints, per hot kernel, how many instructions of its machine code work
on vector registers (ymm / zmm), how many are scalar float operations and how
many are masked moves or gathers (AVX2's masked stores cannot forward to later
loads, and are slow on AMD), from a fresh compile.
``--asm-target aarch64`` counts the same for ARM NEON without an ARM machine: a
child compiles the kernels with ``NUMBA_OPT=0`` for the generic CPU, and each
kernel's LLVM IR, retargeted to ``aarch64-unknown-linux-gnu`` (Cortex-A76, NEON
only; ``aarch64:apple-m1`` for another CPU), goes through the passes numba runs
(``cross_compile``) into AArch64 assembly: instructions on NEON registers
(``v0.4s``, ``q0``), scalar float ones (``s0`` / ``d0``) and single-lane moves,
plus the loop vectoriser's remarks (loops vectorised, loops its cost model
leaves scalar) and the calls left in the kernel.  ``x86-64`` runs the same
pipeline for haswell; its counts agree with ``--asm`` under
``NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=+avx2,+fma`` to about 1 %, which
checks the method (the last usage line prints both).

Usage::

    python benchmarks/bench_cpu.py                       # S1 and S2, torch vs cpu
    python benchmarks/bench_cpu.py --scenarios S1 --rounds 5 --cold
    python benchmarks/bench_cpu.py --backends torch,cpu,dense --scenarios S1   # + the dense baseline
    python benchmarks/bench_cpu.py --beta 50 --early-termination off   # the seed's beta, no early termination
    python benchmarks/bench_cpu.py --torch-threads 1          # PyTorch single-threaded, kernels on all CPUs
    python benchmarks/bench_cpu.py --psnr-fit --rounds 2       # time to 30 / 33 dB on the sample, ET on vs off
    python benchmarks/bench_cpu.py --asm                  # what vectorises in the hot kernels
    python benchmarks/bench_cpu.py --asm-target aarch64   # ... cross-compiled for ARM NEON
    NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=+avx2,+fma python benchmarks/bench_cpu.py --asm --asm-target x86-64,aarch64
    python benchmarks/bench_cpu.py --smoke               # tiny scenes: checks the script only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from bench_scenes import NUM_GAUSSIANS, VOLUME_ZYX, Scenario, perturbed, random_gaussians

MODE, LAMBDA_SSIM, LR, GRAD_CLIP = "soft", 0.1, 1e-3, 1.0
HERE = os.path.dirname(os.path.abspath(__file__))


SCENARIOS = {
    "S1": Scenario("S1", NUM_GAUSSIANS, VOLUME_ZYX, (128, 128), ("torch", "cpu", "dense")),
    "S2": Scenario("S2", NUM_GAUSSIANS, VOLUME_ZYX, None, ("torch", "cpu")),
}
SMOKE = {
    "S1": Scenario("S1", 300, (12, 40, 50), (24, 24), ("torch", "cpu", "dense")),
    "S2": Scenario("S2", 300, (12, 40, 50), None, ("torch", "cpu")),
}
# Seconds per timed round (a round runs at least one call).
ROUND_SECONDS = {"torch": 3.0, "cpu": 2.0, "dense": 0.0}
# The dense baseline takes about a minute per S1 step on 2 cores: one round of one call each.
SINGLE_SHOT = ("dense",)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--scenarios", default="S1,S2", help="comma list of S1, S2")
    parser.add_argument("--backends", default="torch,cpu", help="comma list of torch, cpu, dense")
    parser.add_argument("--beta", type=float, default=None, help="soft-MIP beta (default: the renderer's)")
    parser.add_argument(
        "--early-termination", choices=("on", "off"), default="on", help="cpu kernels' early termination"
    )
    parser.add_argument("--psnr-fit", action="store_true", help="time to 30 / 33 dB on the sample, ET on vs off")
    parser.add_argument("--psnr-every", type=int, default=10, help="steps between PSNR checks (--psnr-fit)")
    parser.add_argument("--psnr-iterations", type=int, default=1000, help="most steps of a --psnr-fit run")
    parser.add_argument("--asm", action="store_true", help="count vector instructions in the hot kernels")
    parser.add_argument(
        "--asm-target",
        default=None,
        help="cross-compile the hot kernels for these targets and count (comma list of aarch64, x86-64; NAME:CPU)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per backend (best and median shown)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per round (default per backend)")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads in the children")
    parser.add_argument(
        "--kernel-threads", type=int, default=None, help="threads of the cpu kernels (default: all CPUs)"
    )
    parser.add_argument("--cold", action="store_true", help="also time a first call with an empty numba cache")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny scenes, one short round: checks the script")
    parser.add_argument("--child", nargs=2, metavar=("SCENARIO", "BACKEND"), help=argparse.SUPPRESS)
    parser.add_argument("--psnr-child", choices=("on", "off"), help=argparse.SUPPRESS)
    parser.add_argument("--asm-child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- machine


def simd_description() -> str:
    """The CPU and the vector width the numba kernels are compiled for (host, or NUMBA_CPU_NAME / _FEATURES)."""
    try:
        import llvmlite.binding as llvm
        from numba.core import config
    except ImportError:
        return "numba unavailable"
    name = config.CPU_NAME or llvm.get_host_cpu_name()
    if config.CPU_FEATURES is not None:
        features = {f[1:]: f[0] == "+" for f in config.CPU_FEATURES.split(",") if f}
    else:
        features = dict(llvm.get_host_cpu_features())
    if features.get("avx512f"):
        width = "AVX-512: 16 float32 lanes"
    elif features.get("avx2"):
        width = "AVX2: 8 float32 lanes"
    elif features.get("neon") or "arm" in name or "apple" in name:
        width = "NEON: 4 float32 lanes"
    else:
        width = "SSE: 4 float32 lanes"
    fma = ", FMA" if features.get("fma") else ""
    source = " (from NUMBA_CPU_NAME/NUMBA_CPU_FEATURES)" if config.CPU_NAME or config.CPU_FEATURES else ""
    return f"numba target {name}{source}: {width}{fma}"


# --------------------------------------------------------------------------- child process


def rss_mib() -> float:
    """Current resident set of this process, MiB."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """Peak resident set of this process since the last :func:`reset_peak_rss`, MiB."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; not resettable


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def timed_rounds(fn, rounds: int, seconds: float, max_steps: int) -> list[float]:
    """Seconds per call of ``fn`` in each round (a round: ``seconds`` of calls, at most ``max_steps``)."""
    per_call = []
    for _ in range(rounds):
        count, begin = 0, time.perf_counter()
        while True:
            fn()
            count += 1
            elapsed = time.perf_counter() - begin
            if elapsed >= seconds or count >= max_steps:
                break
        per_call.append(elapsed / count)
    return per_call


def run_child(args: argparse.Namespace) -> dict:
    """Measure one backend on one scenario; returns a JSON-able dict."""
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    from napari_neurogs_mip import numba_runtime
    from napari_neurogs_mip.frames import VolumeGeometry
    from napari_neurogs_mip.losses import LossWeights, mip_loss
    from napari_neurogs_mip.model import GaussianModel
    from napari_neurogs_mip.render import DEFAULT_BETA, DEFAULT_EPS, Renderer, Stages, raster_cpu
    from napari_neurogs_mip.render.project import Projection, project_model
    from napari_neurogs_mip.views import make_views

    beta = args.beta or DEFAULT_BETA
    raster_cpu.EARLY_TERMINATION = args.early_termination == "on"
    name, backend = args.child
    scenario = (SMOKE if args.smoke else SCENARIOS)[name]
    result: dict = {"scenario": name, "backend": backend}
    first_call_s = math.nan
    if args.kernel_threads:
        numba_runtime.THREADS = args.kernel_threads
    if backend == "dense":
        sys.path.insert(0, HERE)
        from dense import render_dense

        stages = Stages(project_model, render_dense)
    else:
        # The stages, and the PyTorch threads, of a fit with ``--backend torch`` or ``--backend cpu``.
        renderer = Renderer.create("cpu", backend, MODE, beta)
        stages = renderer.stages
        if renderer.torch_threads and not args.torch_threads:
            torch.set_num_threads(renderer.torch_threads)  # what ``Trainer.step`` does around each step
    result["torch_threads"] = torch.get_num_threads()
    rasterize = stages.rasterize

    generator = torch.Generator().manual_seed(args.seed)
    geometry = VolumeGeometry(scenario.volume_zyx)
    views = make_views(["xy", "xz", "yz"], geometry, scenario.resolution)
    truth = random_gaussians(scenario.num_gaussians, geometry, generator)
    start = perturbed(truth, generator)
    params = {n: v.clone().requires_grad_(True) for n, v in start.items()}

    def projection_of(p: dict) -> Projection:
        return stages.project(GaussianModel(**p), views, DEFAULT_EPS, False)

    if backend == "cpu":
        # First call: loads (or compiles) the float32 kernels, forward and backward.
        begin = time.perf_counter()
        leaf = projection_of({n: v.detach() for n, v in start.items()})
        leaf = Projection(*(t.requires_grad_(True) for t in (leaf.means2d, leaf.conics, leaf.amplitudes)),
                          leaf.rects, leaf.shapes)  # fmt: skip
        sum(image.sum() for image in rasterize(leaf, MODE, beta)).backward()
        first_call_s = time.perf_counter() - begin
    with torch.no_grad():
        targets = [image.clamp(0, 1) for image in rasterize(projection_of(truth), MODE, beta)]

    longest = float(max(geometry.extent_xyz))
    optimizer = torch.optim.Adam([
        {"params": [params["means"]], "lr": LR * longest},
        {"params": [params["log_scales"]], "lr": 0.1 * LR},
        {"params": [params["quaternions"]], "lr": 0.1 * LR},
        {"params": [params["log_amplitudes"]], "lr": LR},
    ], fused=True)  # fmt: skip

    model = GaussianModel(**params)  # shares the tensors that Adam updates, as in ``Trainer``
    weights = LossWeights(lambda_mse=1.0, lambda_ssim=LAMBDA_SSIM)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        images = rasterize(stages.project(model, views, DEFAULT_EPS, False), MODE, beta)
        loss, _ = mip_loss(images, targets, weights)  # as ``Trainer.step``
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), GRAD_CLIP)
        optimizer.step()
        return float(loss)

    single = args.smoke or backend in SINGLE_SHOT
    rounds = 1 if single else args.rounds
    seconds = 0.2 if args.smoke else (args.seconds or ROUND_SECONDS[backend])
    max_steps = 2 if args.smoke else (1 if single else 10_000)
    losses = [step()]  # warm-up (and the first loss)
    # Peak memory of training and timing, above the warm process (imports, JIT, scene, targets, optimizer state).
    resettable = reset_peak_rss()
    baseline = rss_mib()
    step_s = timed_rounds(lambda: losses.append(step()), rounds, seconds, max_steps)

    # Rasteriser alone on a fixed projection: forward (with autograd recording, as in training), then backward.
    with torch.no_grad():
        fixed = projection_of(params)
    leaf = Projection(*(t.detach().clone().requires_grad_(True) for t in (fixed.means2d, fixed.conics, fixed.amplitudes)),
                      fixed.rects, fixed.shapes)  # fmt: skip
    grads = [torch.randn(view.shape, generator=generator) for view in views]
    forward_s, backward_s = [], []
    for _ in range(rounds):
        spent, count, begin = [0.0, 0.0], 0, time.perf_counter()
        while True:
            tick = time.perf_counter()
            images = rasterize(leaf, MODE, beta)
            tock = time.perf_counter()
            torch.autograd.backward(images, grads)
            spent[0] += tock - tick
            spent[1] += time.perf_counter() - tock
            count += 1
            if time.perf_counter() - begin >= seconds or count >= max_steps:
                break
        forward_s.append(spent[0] / count)
        backward_s.append(spent[1] / count)
    result.update(
        steps_per_s_best=1 / min(step_s),
        steps_per_s_median=1 / statistics.median(step_s),
        steps_per_s_worst=1 / max(step_s),
        forward_ms=1e3 * min(forward_s),
        backward_ms=1e3 * min(backward_s),
        peak_mib=peak_rss_mib() - baseline if resettable else math.nan,
        process_peak_mib=peak_rss_mib(),
        first_call_s=first_call_s,
        loss_first_last=(losses[0], losses[-1]),
        views=[list(view.shape) for view in views],
    )
    return result


def run_with_empty_cache(code: str, check: bool) -> subprocess.CompletedProcess:
    """Run ``python -c code`` with an empty numba cache directory (every kernel compiles afresh)."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=check)


def cold_first_call(args: argparse.Namespace) -> float:
    """Seconds of the first cpu-backend call (float32, forward + backward) with an empty numba cache."""
    code = (
        "import time, torch; t = time.perf_counter();"
        "from napari_neurogs_mip.render import raster_cpu;"
        "from napari_neurogs_mip.render.project import Projection;"
        "p = Projection(torch.tensor([[[3.0, 4.0]]], requires_grad=True), torch.tensor([[[0.5, 0.1, 0.5]]]),"
        " torch.tensor([[0.7]]), torch.tensor([[[0, 0, 7, 7]]], dtype=torch.int32), [(8, 8)]);"
        "sum(i.sum() for i in raster_cpu.rasterize(p, 'soft', 50.0)).backward();"
        "print(time.perf_counter() - t)"
    )
    return float(run_with_empty_cache(code, check=True).stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- time to PSNR on the sample

PSNR_LEVELS = (30.0, 33.0)


def psnr_fit(early: bool, every: int, iterations: int) -> dict:
    """Fit the built-in sample with the CLI's defaults and the cpu backend; training seconds (steps only) and
    steps until the lowest PSNR over the training views reaches each of :data:`PSNR_LEVELS`."""
    from napari_neurogs_mip.prepare import FitInputs, prepare_fit
    from napari_neurogs_mip.render import raster_cpu
    from napari_neurogs_mip.train import FitConfig, Trainer

    raster_cpu.EARLY_TERMINATION = early
    prepared = prepare_fit(FitInputs(sample=True))
    trainer = Trainer(prepared.model, prepared.targets, FitConfig(backend="cpu", device="cpu", iterations=iterations))
    trainer.warm_up()
    reached: dict[str, tuple[float, int] | None] = {f"{level:g}": None for level in PSNR_LEVELS}
    trained, history = 0.0, []
    for step in range(1, iterations + 1):
        begin = time.perf_counter()
        trainer.step()
        trained += time.perf_counter() - begin
        if step % every and step != iterations:
            continue
        worst = min(scores["psnr"] for name, scores in trainer.metrics().items()
                    if name in {view.name for view in prepared.targets.views})  # fmt: skip
        history.append((step, round(trained, 3), round(worst, 2)))
        for level in PSNR_LEVELS:
            if reached[f"{level:g}"] is None and worst >= level:
                reached[f"{level:g}"] = (trained, step)
        if all(value is not None for value in reached.values()):
            break
    return {"early": early, "reached": reached, "history": history, "gaussians": int(trainer.model.means.shape[0])}


def run_psnr_fits(args: argparse.Namespace) -> int:
    """``--psnr-fit``: early termination on and off, alternating, ``--rounds`` times each."""
    print(simd_description())
    print(f"time to {' / '.join(f'{level:g}' for level in PSNR_LEVELS)} dB (lowest PSNR over the training views) on "
          f"the sample, cpu backend, CLI defaults; PSNR scored every {args.psnr_every} steps (not timed)", flush=True)  # fmt: skip
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    for round_index in range(args.rounds):
        for setting in ("on", "off"):
            print(f"[{round_index + 1}/{args.rounds}] early termination {setting} ...", flush=True)
            command = [sys.executable, os.path.abspath(__file__), "--psnr-child", setting,
                       "--psnr-every", str(args.psnr_every), "--psnr-iterations", str(args.psnr_iterations)]  # fmt: skip
            done, foreign = run_measured(command)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                print(f"FAILED\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
                continue
            result = json.loads(lines[-1][len("RESULT ") :])
            runs[setting].append(result)
            cells = [f"{level} dB: " + (f"{value[0]:.1f} s ({value[1]} steps)" if value else "not reached")
                     for level, value in result["reached"].items()]  # fmt: skip
            print(f"    {', '.join(cells)}; others {foreign:.0%}", flush=True)
    for level in (f"{level:g}" for level in PSNR_LEVELS):
        times = {
            setting: [r["reached"][level][0] for r in found if r["reached"][level]] for setting, found in runs.items()
        }
        if times["on"] and times["off"]:
            print(f"{level} dB: on {min(times['on']):.1f}-{max(times['on']):.1f} s, off {min(times['off']):.1f}-"
                  f"{max(times['off']):.1f} s, ratio of medians {statistics.median(times['off']) / statistics.median(times['on']):.2f}")  # fmt: skip
    return 0


# --------------------------------------------------------------------------- vectorisation


# Cross-compile targets of ``--asm-target``: LLVM triple, default CPU (``NAME:CPU`` picks another), features.
CROSS_TARGETS: dict[str, tuple[str, str, str]] = {
    # NEON only, no SVE: the 128-bit vectors every AArch64 core has.  Cortex-A76 is the core of the Raspberry
    # Pi 5 and, as Neoverse N1, of AWS Graviton2 and Ampere Altra; ``aarch64:apple-m1`` models Apple's cores.
    "aarch64": ("aarch64-unknown-linux-gnu", "cortex-a76", "+neon"),
    # The method's own check: numba's compile for haswell (``--asm`` with NUMBA_CPU_NAME=haswell, AVX-512 off)
    # gives nearly the same counts as this pipeline retargeted to it.
    "x86-64": ("x86_64-unknown-linux-gnu", "haswell", ""),
}
_AARCH64_VECTOR = re.compile(r"\bv\d+\.\d+[bhsd]\b|\bq\d+\b")  # v0.4s / v1.2d / q2: a full NEON register
_AARCH64_SCALAR = re.compile(r"\b[hsd]\d+\b")  # s0 / d1: one float in the low lane of a NEON register
# Element-wise inserts and extracts (ld1 {v0.s}[1], mov v0.s[1], w8, ...): NEON's gathers and scatters.
_AARCH64_LANE = re.compile(r"\t(ld1|st1|ins|mov|umov|smov)\t.*\bv\d+\.[bhsd]\}?\[\d+\]")


def hot_kernels() -> list[tuple[str, Any, Any]]:
    """Compile the hot kernels by calling them on tiny inputs; ``(label, dispatcher, signature)`` of each float32
    compilation (the rasteriser's float64 ones, which only tests use, left out)."""
    import torch

    from napari_neurogs_mip import ssim_cpu
    from napari_neurogs_mip.losses import ssim
    from napari_neurogs_mip.render import raster_cpu
    from napari_neurogs_mip.render.project import Projection

    for mode in ("soft", "max"):
        p = Projection(torch.tensor([[[3.0, 4.0]]], requires_grad=True), torch.tensor([[[0.5, 0.1, 0.5]]]),
                       torch.tensor([[0.7]]), torch.tensor([[[0, 0, 7, 7]]], dtype=torch.int32), [(20, 20)])  # fmt: skip
        sum(i.sum() for i in raster_cpu.rasterize(p, mode, 50.0)).backward()
    x = torch.rand(20, 20, requires_grad=True)
    ssim(x, torch.rand(20, 20)).backward()
    kernels = []
    for module, name in ((raster_cpu, "_forward"), (raster_cpu, "_backward"), (ssim_cpu, "_ssim_rows"),
                         (ssim_cpu, "_gradient_rows")):  # fmt: skip
        dispatcher = getattr(module, name)
        for signature in dispatcher.overloads:
            if module is raster_cpu and "float32" not in str(signature):
                continue
            kernels.append((f"{module.__name__.rsplit('.', 1)[-1]}.{name}", dispatcher, signature))
    return kernels


def count_instructions(asm: str, arch: str) -> tuple[int, int, int, int]:
    """Instructions of assembly text, and how many work on vector registers, are scalar float operations, and
    are masked moves or gathers (x86) / single-lane moves (aarch64).

    x86: vector means on ymm / zmm (xmm is also where scalar floats live), scalar ``...ss`` / ``...sd``.
    aarch64: vector means a full NEON register (``v0.4s``, ``q0``), scalar an ``s`` / ``d`` register operand
    (``fadd s0, s1, s2``, ``ldr s0``), the NEON counterpart of ``vaddss`` / ``vmovss``.
    """
    lines = [line for line in asm.splitlines() if line.startswith("\t") and not line.startswith("\t.")]
    if arch == "aarch64":
        vector = [bool(_AARCH64_VECTOR.search(line)) for line in lines]
        scalar = sum(not v and bool(_AARCH64_SCALAR.search(line.partition("\t")[2].partition("\t")[2]))
                     for v, line in zip(vector, lines))  # fmt: skip
        lane = sum(bool(_AARCH64_LANE.match(line)) for line in lines)
        return len(lines), sum(vector), scalar, lane
    packed = sum(bool(re.search(r"[yz]mm", line)) for line in lines)
    scalar = sum(bool(re.match(r"\tv?\w+s[sd]\t", line)) for line in lines)
    masked = sum(bool(re.match(r"\tv(p?maskmov|\w+gather)", line)) for line in lines)
    return len(lines), packed, scalar, masked


def describe_counts(label: str, counts: tuple[int, int, int, int], arch: str) -> str:
    """One line of the ``--asm`` table."""
    total, vector, scalar, other = counts
    if arch == "aarch64":
        return (f"{label}: {total} instructions, {vector} on NEON registers (v.4s / v.2d / q), {scalar} scalar "
                f"float, {other} single-lane moves")  # fmt: skip
    return f"{label}: {total} instructions, {vector} on ymm/zmm, {scalar} scalar float, {other} masked moves / gathers"


def called_functions(asm: str, function: str) -> list[str]:
    """Names that ``function`` calls in assembly text (x86 ``call``, aarch64 ``bl``), without local labels."""
    body = asm.partition(f"\n{function}:\n")[2].partition(".Lfunc_end")[0]
    # x86-64 code for the JIT's large code model calls through a register loaded with ``movabsq $name``.
    pattern = r"^\t(?:call[lq]?\t|bl\t|movabsq\t\$)([A-Za-z_][\w.$@]*)"
    return sorted(set(re.findall(pattern, body, re.MULTILINE)))


@contextlib.contextmanager
def stderr_into(path: str) -> Iterator[None]:
    """Redirect file descriptor 2 (where LLVM writes its optimisation remarks) into ``path``."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "w") as handle:
            os.dup2(handle.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cross_compile(ir: str, triple: str, cpu: str, features: str) -> str:
    """Assembly for ``triple`` / ``cpu`` of numba's unoptimised IR, through the passes numba itself runs.

    The IR comes from a ``NUMBA_OPT=0`` compile for the generic CPU: no host-specific vectorisation yet, and
    only target-independent intrinsics (``llvm.maxnum``, ``llvm.cttz``, ...), which is checked.  Its data
    layout (x86-64's, which numba used for struct sizes and alignments) is replaced by the target's; both are
    LP64 with 8-byte ``i64`` and pointers, so the layouts numba computed hold there too.  The passes mirror
    ``numba.core.codegen``: each function at O3, then a cheap module pass (loop rotation, instcombine, jump
    threading) and the full O3 module pipeline, each followed by numba's reference-count pruning (left out,
    the leftover ``NRT_incref`` calls keep loops scalar that vectorise in numba's own compile); the loop
    vectoriser on and the SLP vectoriser off, as numba's defaults (``NUMBA_LOOP_VECTORIZE`` /
    ``NUMBA_SLP_VECTORIZE`` are honoured).
    """
    import llvmlite.binding as llvm
    from numba.core import config

    llvm.initialize_all_targets()  # idempotent; numba initialises only the host's
    llvm.initialize_all_asmprinters()
    target = llvm.Target.from_triple(triple)
    machine = target.create_target_machine(cpu=cpu, features=features, opt=3)
    foreign = sorted(set(re.findall(r"@(llvm\.(?:x86|aarch64|arm)\.[\w.]+)", ir)))
    if foreign:
        raise RuntimeError(f"the IR uses target-specific intrinsics, which do not retarget: {foreign}")
    ir = re.sub(r"^target triple = .*$", f'target triple = "{triple}"', ir, flags=re.MULTILINE)
    ir = re.sub(r"^target datalayout = .*$", f'target datalayout = "{machine.target_data}"', ir, flags=re.MULTILINE)
    # Host attributes would override the target machine's CPU per function (there are none with
    # NUMBA_CPU_NAME=generic, but a cached or host compile has them).
    ir = re.sub(r'\s*"target-(?:cpu|features)"="[^"]*"', "", ir)
    module = llvm.parse_assembly(ir)
    module.verify()

    def builder(level: int, vectorise: bool) -> Any:
        options = llvm.create_pipeline_tuning_options(speed_level=level)
        options.loop_vectorization = vectorise and bool(config.LOOP_VECTORIZE)
        options.slp_vectorization = vectorise and bool(config.SLP_VECTORIZE)
        return llvm.create_pass_builder(machine, options)

    functions = builder(3, True)
    function_passes = functions.getFunctionPassManager()
    function_passes.add_refprune_pass()
    for function in module.functions:
        if not function.is_declaration:
            function_passes.run(function, functions)
    cheap = builder(0, False)
    cheap_passes = cheap.getModulePassManager()
    cheap_passes.add_loop_rotate_pass()
    cheap_passes.add_instruction_combine_pass()
    cheap_passes.add_jump_threading_pass()
    cheap_passes.add_refprune_pass()
    cheap_passes.run(module, cheap)
    full = builder(3, True)
    full_passes = full.getModulePassManager()
    full_passes.add_refprune_pass()
    full_passes.run(module, full)
    return machine.emit_assembly(module)


def loop_remarks(text: str) -> str:
    """Summary of the loop vectoriser's remarks: loops vectorised (by width) and loops its cost model left
    scalar (other refusals, such as loops with early exits or calls, are the same on every target)."""
    widths = re.findall(r"vectorized loop \(vectorization width: (\d+)", text)
    by_width = ", ".join(f"{widths.count(w)} x {w}" for w in sorted(set(widths), key=int))
    rejected = text.count("vectorization is not beneficial")
    vectorised = f"{len(widths)} ({by_width} lanes)" if widths else "none"
    return f"loops vectorised: {vectorised}, left scalar by the cost model: {rejected}"


def run_asm_child(what: str) -> None:
    """Print the ``--asm`` table: ``native`` (numba's own compile for this process's target), or each target of
    a comma list of :data:`CROSS_TARGETS` names (``NAME`` or ``NAME:CPU``), cross-compiled."""
    import llvmlite.binding as llvm

    kernels = hot_kernels()
    if what == "native":
        arch = "aarch64" if llvm.get_process_triple().startswith(("aarch64", "arm64")) else "x86"
        for label, dispatcher, signature in kernels:
            print(describe_counts(label, count_instructions(dispatcher.inspect_asm(signature), arch), arch))
        return
    llvm.initialize_all_targets()
    for kind in ("", "-missed", "-analysis"):  # the cost model's verdict is an analysis remark
        llvm.set_option("", f"-pass-remarks{kind}=loop-vectorize")
    for item in what.split(","):
        name, _, cpu = item.strip().partition(":")
        triple, default_cpu, features = CROSS_TARGETS[name]
        arch = "aarch64" if triple.startswith("aarch64") else "x86"
        try:
            llvm.Target.from_triple(triple)
        except RuntimeError as error:
            print(f"{name}: llvmlite has no {triple} target ({error})")
            continue
        print(f"cross-compiled for {triple}, cpu {cpu or default_cpu} {features}".rstrip() + ":")
        for label, dispatcher, signature in kernels:
            with tempfile.NamedTemporaryFile("r", suffix=".txt") as remarks:
                with stderr_into(remarks.name):
                    asm = cross_compile(dispatcher.inspect_llvm(signature), triple, cpu or default_cpu, features)
                remark_text = remarks.read()
            print("  " + describe_counts(label, count_instructions(asm, arch), arch))
            calls = called_functions(asm, dispatcher.overloads[signature].fndesc.mangled_name)
            print(f"    {loop_remarks(remark_text)}; calls: {', '.join(calls) or 'none'}")


def print_vector_instructions(targets: str | None) -> None:
    """Count, per hot kernel (float32), the instructions of its machine code on vector registers, the scalar
    float ones and the masked moves and gathers: from numba's own compile (``targets`` None), or cross-compiled
    from numba's IR for ``targets`` (see :func:`cross_compile`)."""
    env = {} if targets is None else {"NUMBA_OPT": "0", "NUMBA_CPU_NAME": "generic", "NUMBA_CPU_FEATURES": ""}
    with tempfile.TemporaryDirectory() as cache:
        # An empty cache: every kernel compiles afresh (a cached one has no IR to show).
        env = {**os.environ, **env, "NUMBA_CACHE_DIR": cache}
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--asm-child", targets or "native"],
                              env=env, capture_output=True, text=True)  # fmt: skip
    print(done.stdout.strip())
    if done.returncode != 0:
        print(done.stderr[-3000:])


# --------------------------------------------------------------------------- parent


def busy_cpu_seconds() -> float:
    """CPU seconds all processes spent busy since boot (``/proc/stat``); NaN where unavailable."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return math.nan
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """CPU seconds used by finished child processes of this process."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_measured(command: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``command``; also return the share of the machine's CPUs other processes used meanwhile."""
    busy, own, begin = busy_cpu_seconds(), children_cpu_seconds(), time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - begin
    foreign = (busy_cpu_seconds() - busy) - (children_cpu_seconds() - own)
    return done, max(0.0, foreign) / (wall * (os.cpu_count() or 1))


def cpu_pressure() -> str:
    """The kernel's CPU pressure line (share of time runnable tasks waited for a CPU), if available."""
    try:
        with open("/proc/pressure/cpu") as handle:
            return handle.readline().strip()
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_child(args)))
        return 0
    if args.psnr_child:
        print("RESULT " + json.dumps(psnr_fit(args.psnr_child == "on", args.psnr_every, args.psnr_iterations)))
        return 0
    if args.asm_child:
        run_asm_child(args.asm_child)
        return 0
    if args.asm or args.asm_target:
        if args.asm:
            print(simd_description())
            print_vector_instructions(None)
        if args.asm_target:
            unknown = [t for t in args.asm_target.split(",") if t.strip().partition(":")[0] not in CROSS_TARGETS]
            if unknown:
                print(f"bench_cpu: unknown --asm-target {unknown}; choose from {sorted(CROSS_TARGETS)} (NAME:CPU)")
                return 2
            print_vector_instructions(args.asm_target)
        return 0
    if args.psnr_fit:
        return run_psnr_fits(args)
    import torch

    from napari_neurogs_mip.render import DEFAULT_BETA

    table = SMOKE if args.smoke else SCENARIOS
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [n for n in names if n not in table]
    if unknown:
        print(f"bench_cpu: unknown scenarios {unknown}; choose from {sorted(table)}")
        return 2
    has_dense = os.path.exists(os.path.join(HERE, "dense.py"))
    print(f"bench_cpu: {os.cpu_count()} CPUs, torch {torch.__version__}, torch threads "
          f"{args.torch_threads or 'as a fit sets them (column thr)'}, kernel threads {args.kernel_threads or 'all CPUs'}")  # fmt: skip
    print(simd_description())
    print(f"mode {MODE}, beta {args.beta or DEFAULT_BETA}, cpu early termination {args.early_termination}, "
          f"loss mean over views of MSE + {LAMBDA_SSIM} (1 - SSIM), Adam + clip {GRAD_CLIP}")  # fmt: skip
    print(f"cpu pressure before: {cpu_pressure()}")
    if not has_dense:
        print("dense baseline: benchmarks/dense.py not found, skipped")
    passthrough = [
        "--rounds",
        str(args.rounds),
        "--seed",
        str(args.seed),
        "--early-termination",
        args.early_termination,
    ]
    for flag, value in (("--seconds", args.seconds), ("--torch-threads", args.torch_threads),
                        ("--kernel-threads", args.kernel_threads), ("--beta", args.beta)):  # fmt: skip
        if value:
            passthrough += [flag, str(value)]
    if args.smoke:
        passthrough.append("--smoke")
    jobs = [(name, backend) for name in names for backend in table[name].backends
            if backend in wanted and (backend != "dense" or has_dense)]  # fmt: skip
    done_jobs = 0
    for name in names:
        scenario = table[name]
        results = {}
        for backend in scenario.backends:
            if (name, backend) not in jobs:
                continue
            done_jobs += 1
            print(f"[{done_jobs}/{len(jobs)}] {name} {backend} ...", flush=True)
            command = [sys.executable, os.path.abspath(__file__), "--child", name, backend, *passthrough]
            done, foreign = run_measured(command)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                print(f"{name} {backend}: FAILED\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
                continue
            results[backend] = json.loads(lines[-1][len("RESULT ") :])
            results[backend]["foreign"] = foreign
        if not results:
            continue
        first = next(iter(results.values()))
        shapes = ", ".join("x".join(map(str, shape)) for shape in first["views"])
        print(f"\n== {name}: K = {scenario.num_gaussians:,}, views {shapes}")
        print(f"{'backend':<8} {'thr':>3} {'step it/s':>10} {'(median)':>9} {'(worst)':>8} {'fwd ms':>9} {'bwd ms':>9} "
              f"{'peak MiB':>9} {'RSS MiB':>8} {'others':>7} {'loss first -> last':>22}")  # fmt: skip
        for backend, r in results.items():
            loss0, loss1 = r["loss_first_last"]
            print(f"{backend:<8} {r['torch_threads']:>3} {r['steps_per_s_best']:>10.2f} {r['steps_per_s_median']:>9.2f} "
                  f"{r['steps_per_s_worst']:>8.2f} {r['forward_ms']:>9.2f} {r['backward_ms']:>9.2f} {r['peak_mib']:>9.1f} "
                  f"{r['process_peak_mib']:>8.0f} {r['foreign']:>6.0%} {loss0:>10.5f} -> {loss1:.5f}", flush=True)  # fmt: skip
        if "cpu" in results:
            cpu = results["cpu"]
            for other in ("torch", "dense"):
                if other in results:
                    o = results[other]
                    print(f"cpu vs {other}: step {cpu['steps_per_s_best'] / o['steps_per_s_best']:.1f}x faster, "
                          f"forward {o['forward_ms'] / cpu['forward_ms']:.1f}x, "
                          f"backward {o['backward_ms'] / cpu['backward_ms']:.1f}x, "
                          f"step peak memory {cpu['peak_mib']:.1f} vs {o['peak_mib']:.1f} MiB")  # fmt: skip
            print(f"cpu first call (float32 forward + backward, numba cache as found): {cpu['first_call_s']:.2f} s")
    if args.cold:
        print(f"\ncpu first call with an empty numba cache (compiles float32 kernels): {cold_first_call(args):.1f} s")
    print(f"\ncpu pressure after: {cpu_pressure()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
