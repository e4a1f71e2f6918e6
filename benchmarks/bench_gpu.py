"""GPU benchmark of the MIP rasterisers: forward, backward, training step and peak memory.

Scenes: K random Gaussians (sigma 1-3 voxels per principal axis, random
rotation, amplitude 0.2-1) inside the 100 x 647 x 813 (Z, Y, X) volume box;
physical frame = voxel units; views ``xy``, ``xz``, ``yz`` from ``make_views``.

=====  ===========  =================  ==============================================
name   K            views              backends
=====  ===========  =================  ==============================================
S1     12,145       128 x 128 each     torch, triton, triton-graph, dense
S2     12,145       native (Y,X) etc.  torch, triton, triton-graph
S3     1,000,000    1024 x 1024 each   triton, triton-graph (the reference is skipped:
                                       it materialises every pixel of every rectangle,
                                       the script prints how many and how many bytes)
=====  ===========  =================  ==============================================

Per backend: forward ms (rasteriser only, projection precomputed), backward ms
(rasteriser backward only), training-step it/s (project + rasterise + MSE +
0.1 (1 - SSIM) averaged over the 3 views + backward + Adam) and peak GPU
memory (``torch.cuda.max_memory_allocated`` over that backend's runs).

Triton rows are named ``triton[tT]`` / ``triton-graph[tT]`` for each tile side
``T`` of ``--tiles`` (default 8 and 16: at S3 the 16-pixel tiles need ~3x fewer
tile intersections to sort, at the price of ~1.4x more pixel evaluations).

* ``triton`` sizes the intersection buffer exactly: one host sync per step.
* ``triton-graph`` uses a fixed intersection capacity (1.5 x the initial need)
  and captures rasterise + loss, forward and backward, as CUDA graphs with
  ``torch.cuda.make_graphed_callables``; the projection and Adam run eagerly
  (the projection's view constants are cached per device, so it might be
  captured as well; not yet tried on a GPU).  Overflow of the capacity is checked after timing.
* ``dense`` (S1 only): the O(H W K) baseline of ``dense.py``, same process;
  the script prints dense / triton time ratios.

Without CUDA the script prints why and exits 0.  ``--smoke`` runs tiny scenes on
the CPU (Triton interpreter) to check the script itself; its numbers mean nothing.

Usage::

    python benchmarks/bench_gpu.py                 # S1, S2, S3
    python benchmarks/bench_gpu.py --scenarios S1 --steps 200 --tiles 16
    python benchmarks/bench_gpu.py --smoke
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench_scenes import VOLUME_ZYX, Scenario, perturbed, random_gaussians

MODE = "soft"
BETA = 50.0
LAMBDA_SSIM = 0.1
REFERENCE_BYTES_PER_ENTRY = 120
"""Rough bytes the reference rasteriser allocates per (pair, pixel) entry (indices, gathers, temporaries)."""


SCENARIOS = {
    "S1": Scenario("S1", 12_145, VOLUME_ZYX, (128, 128), ("torch", "triton", "triton-graph", "dense")),
    "S2": Scenario("S2", 12_145, VOLUME_ZYX, None, ("torch", "triton", "triton-graph")),
    "S3": Scenario(
        "S3",
        1_000_000,
        VOLUME_ZYX,
        (1024, 1024),
        ("triton", "triton-graph"),
        "torch reference skipped: it would materialise every (pair, pixel) entry of every rectangle",
    ),
}
SMOKE = {
    "S1": Scenario("S1-smoke", 300, (12, 40, 50), (24, 24), ("torch", "triton", "dense")),
    "S2": Scenario("S2-smoke", 300, (12, 40, 50), None, ("torch", "triton")),
}


@dataclass
class Result:
    """Measurements of one backend on one scenario (NaN when not measured)."""

    backend: str
    forward_ms: float = math.nan
    backward_ms: float = math.nan
    steps_per_s: float = math.nan
    peak_mib: float = math.nan
    notes: list[str] = field(default_factory=list)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--scenarios", default="S1,S2,S3", help="comma list of S1, S2, S3")
    parser.add_argument("--steps", type=int, default=100, help="timed training steps per backend")
    parser.add_argument("--repeats", type=int, default=20, help="timed forward/backward repeats")
    parser.add_argument("--warmup", type=int, default=5, help="untimed warm-up runs")
    parser.add_argument("--tiles", default="8,16", help="triton tile sides to run, comma list of powers of two")
    parser.add_argument("--batch", type=int, default=32, help="triton Gaussians per batch (power of two)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run through the Triton interpreter")
    return parser.parse_args(argv)


class Timer:
    """Milliseconds of a callable: CUDA events on the GPU, wall clock on the CPU."""

    def __init__(self, torch_module, device) -> None:
        self.torch = torch_module
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def once(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start = self.torch.cuda.Event(enable_timing=True)
            end = self.torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.tiles = [int(t) for t in args.tiles.split(",") if t.strip()]
    if args.smoke:
        # Must precede the first import of the kernel module (triton.jit decides at decoration).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print(
            "bench_gpu: SKIPPED - no CUDA device (torch.cuda.is_available() is False); "
            "the GPU scenarios S1-S3 need an NVIDIA GPU. Try --smoke for a tiny CPU run of the script."
        )
        return 0

    from napari_neurogs_mip.frames import VolumeGeometry
    from napari_neurogs_mip.model import covariance
    from napari_neurogs_mip.render import raster_torch
    from napari_neurogs_mip.render.project import Projection, project
    from napari_neurogs_mip.views import make_views

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from dense import render_dense

    from napari_neurogs_mip.losses import mse, ssim
    from napari_neurogs_mip.render import raster_triton

    device = torch.device("cpu" if args.smoke else "cuda")
    timer = Timer(torch, device)
    table = SMOKE if args.smoke else SCENARIOS
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in table]
    if unknown:
        print(f"bench_gpu: unknown scenarios {unknown}; choose from {sorted(table)}")
        return 2
    if args.smoke:
        args.steps, args.repeats, args.warmup = min(args.steps, 2), min(args.repeats, 2), 1
    reason = raster_triton.unavailable_reason()
    if reason:
        print(f"bench_gpu: {reason}; triton rows will be skipped")
    describe_device(torch, device)
    print(f"mode {MODE}, beta {BETA}, loss MSE + {LAMBDA_SSIM} (1 - SSIM), tiles {args.tiles}, batch {args.batch}")

    def loss_fn(images: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
        total = sum(mse(i, t) + LAMBDA_SSIM * (1 - ssim(i, t)) for i, t in zip(images, targets))
        return total / len(images)

    def graph_loss_fn(images: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
        # The local SSIM (same formula, window made on the device) was written because losses.ssim
        # once copied its window from the host each call, which stream capture forbids.  The window
        # is now cached per device, so losses.ssim may capture too: not yet checked on a GPU.
        total = sum(_local_mse(i, t) + LAMBDA_SSIM * (1 - _local_ssim(i, t)) for i, t in zip(images, targets))
        return total / len(images)

    for name in names:
        scenario = table[name]
        generator = torch.Generator().manual_seed(args.seed)
        geometry = VolumeGeometry(scenario.volume_zyx)
        views = make_views(["xy", "xz", "yz"], geometry, scenario.resolution)
        params = random_gaussians(scenario.num_gaussians, geometry, generator, device)

        def projection_of(p: dict[str, torch.Tensor], views=views) -> Projection:
            return project(
                p["means"], covariance(p["log_scales"], p["quaternions"]), torch.exp(p["log_amplitudes"]), views
            )

        print()
        shapes = " + ".join(f"{v.name} {v.height}x{v.width}" for v in views)
        print(f"== {scenario.name}: K = {scenario.num_gaussians:,}, views {shapes}")
        if scenario.note:
            print(f"   {scenario.note}")
        with torch.no_grad():
            base = projection_of(params)
            rects = base.rects.long()
            areas = (
                (rects[..., 2] - rects[..., 0] + 1).clamp_min(0) * (rects[..., 3] - rects[..., 1] + 1).clamp_min(0)
            ).sum()
            entries = int(areas)
            print(
                f"   reference entries (pixels of all rectangles): {entries:,} "
                f"(~{entries * REFERENCE_BYTES_PER_ENTRY / 2**30:.1f} GiB for the torch reference)"
            )
            # Targets: the scene itself, rendered once; training starts from a perturbed copy.
            target_render = raster_triton.rasterize if reason is None else raster_torch.rasterize
            targets = [t.detach().clamp(0, 1) for t in target_render(base, MODE, BETA)]
            start = perturbed(params, generator)
        results = []
        runs = []  # (row name, backend, tile)
        for backend in scenario.backends:
            if backend.startswith("triton"):
                if reason is None and (backend == "triton" or device.type == "cuda"):
                    runs += [(f"{backend}[t{tile}]", backend, tile) for tile in args.tiles]
            else:
                runs.append((backend, backend, 0))
        for row, backend, tile in runs:
            exact = raster_triton.TritonRasterizer(tile=tile, batch=args.batch) if tile else None
            result = Result(row)
            reset_peak(torch, device)
            try:
                if backend == "triton-graph":
                    result.steps_per_s = graphed_training(
                        torch, timer, start, projection_of, targets, graph_loss_fn, exact, args, result
                    )
                else:
                    rasterize = exact or {"torch": raster_torch.rasterize, "dense": render_dense}[backend]
                    result.forward_ms, result.backward_ms = forward_backward(
                        torch, timer, rasterize, projection_of(start), args
                    )
                    result.steps_per_s = eager_training(
                        torch, timer, start, projection_of, targets, loss_fn, rasterize, args, device
                    )
                if backend == "triton":
                    needed = exact.check_capacity()
                    result.notes.append(f"{needed:,} tile intersections")
                    if "torch" in scenario.backends:
                        with torch.no_grad():
                            ours = exact(base, MODE, BETA)
                            ref = raster_torch.rasterize(base, MODE, BETA)
                            diff = max(float((a - b).abs().max()) for a, b in zip(ours, ref))
                        result.notes.append(f"max |triton - torch| = {diff:.1e}")
            except torch.cuda.OutOfMemoryError as error:
                result.notes.append(f"out of memory: {str(error).splitlines()[0]}")
            except Exception as error:  # a benchmark reports failures and goes on
                result.notes.append(f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
            result.peak_mib = peak_mib(torch, device)
            results.append(result)
        print_table(results)
        by_name = {r.backend: r for r in results}
        for tile in args.tiles:
            tri = by_name.get(f"triton[t{tile}]")
            for other in ("dense", "torch"):
                if tri is None or other not in by_name:
                    continue
                base_row = by_name[other]
                print(
                    f"   triton[t{tile}] speed-up over {other}: forward {base_row.forward_ms / tri.forward_ms:.1f}x, "
                    f"backward {base_row.backward_ms / tri.backward_ms:.1f}x, "
                    f"training step {tri.steps_per_s / base_row.steps_per_s:.1f}x"
                )
    return 0


def describe_device(torch, device) -> None:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")
    else:
        print(f"device: CPU (smoke run, Triton interpreter), torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton not installed")


def reset_peak(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(torch, device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else math.nan


def forward_backward(torch, timer: Timer, rasterize: Callable, projection, args) -> tuple[float, float]:
    """Median ms of the rasteriser forward and of its backward, projection fixed."""
    from napari_neurogs_mip.render.project import Projection

    leaves = [
        t.detach().contiguous().requires_grad_(True)
        for t in (projection.means2d, projection.conics, projection.amplitudes)
    ]
    proj = Projection(*leaves, projection.rects, projection.shapes)
    generator = torch.Generator().manual_seed(1)
    weights = [torch.randn(shape, generator=generator).to(leaves[0].device) for shape in proj.shapes]

    def forward() -> list:
        return rasterize(proj, MODE, BETA)

    for _ in range(args.warmup):
        images = forward()
        torch.autograd.grad(sum((i * w).sum() for i, w in zip(images, weights)), leaves)
    timer.sync()
    forward_ms = statistics.median(timer.once(forward) for _ in range(args.repeats))
    backward_times = []
    for _ in range(args.repeats):
        images = forward()
        loss = sum((i * w).sum() for i, w in zip(images, weights))
        timer.sync()
        backward_times.append(timer.once(lambda loss=loss: torch.autograd.grad(loss, leaves)))
    return forward_ms, statistics.median(backward_times)


def steps_per_second(step: Callable[[], None], timer, args) -> float:
    """``args.steps`` timed calls of ``step`` after ``args.warmup`` untimed ones, synchronised with the device."""
    for _ in range(args.warmup):
        step()
    timer.sync()
    begin = time.perf_counter()
    for _ in range(args.steps):
        step()
    timer.sync()
    return args.steps / (time.perf_counter() - begin)


def eager_training(torch, timer, start, projection_of, targets, loss_fn, rasterize, args, device) -> float:
    """Training steps per second, everything eager."""
    params = {n: v.detach().clone().requires_grad_(True) for n, v in start.items()}
    optimiser = torch.optim.Adam(params.values(), lr=1e-3, fused=device.type == "cuda")

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        loss = loss_fn(rasterize(projection_of(params), MODE, BETA), targets)
        loss.backward()
        optimiser.step()

    return steps_per_second(step, timer, args)


def graphed_training(torch, timer, start, projection_of, targets, loss_fn, exact, args, result) -> float:
    """Training steps per second with rasterise + loss captured as CUDA graphs (fixed capacity)."""
    from napari_neurogs_mip.render.project import Projection
    from napari_neurogs_mip.render.raster_triton import TritonRasterizer

    params = {n: v.detach().clone().requires_grad_(True) for n, v in start.items()}
    with torch.no_grad():
        sample = projection_of(params)
        exact(sample, MODE, BETA)
        needed = exact.check_capacity()
    capacity = int(needed * 1.5) + 1024
    rasterizer = TritonRasterizer(tile=exact.tile, batch=exact.batch, capacity=capacity)
    shapes = sample.shapes

    def render_loss(means2d, conics, amplitudes, rects):
        images = rasterizer(Projection(means2d, conics, amplitudes, rects, shapes), MODE, BETA)
        return loss_fn(images, targets)

    sample_args = (
        sample.means2d.detach().clone().requires_grad_(True),
        sample.conics.detach().clone().requires_grad_(True),
        sample.amplitudes.detach().contiguous().requires_grad_(True),
        sample.rects.clone(),
    )
    graphed = torch.cuda.make_graphed_callables(render_loss, sample_args)
    optimiser = torch.optim.Adam(params.values(), lr=1e-3, fused=True, capturable=True)

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        projection = projection_of(params)
        loss = graphed(projection.means2d, projection.conics, projection.amplitudes.contiguous(), projection.rects)
        loss.backward()
        optimiser.step()

    rate = steps_per_second(step, timer, args)
    final = rasterizer.check_capacity()  # raises if the fixed buffer overflowed during the run
    result.notes.append(f"capacity {capacity:,}, last need {final:,}")
    return rate


def print_table(results: list[Result]) -> None:
    print(f"   {'backend':<14}{'fwd ms':>10}{'bwd ms':>10}{'step it/s':>12}{'peak MiB':>11}  notes")
    for r in results:
        cells = [f"{r.forward_ms:10.3f}", f"{r.backward_ms:10.3f}", f"{r.steps_per_s:12.1f}", f"{r.peak_mib:11.0f}"]
        cells = [c.replace("nan", "  -") for c in cells]
        print(f"   {r.backend:<14}{''.join(cells)}  {'; '.join(r.notes)}")


def _local_mse(a, b):
    return ((a - b) ** 2).mean()


def _local_ssim(a, b):
    """SSIM (11 x 11 Gaussian window, sigma 1.5, data range 1, valid region) of two [H, W] images."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    x = torch.arange(11, dtype=a.dtype, device=a.device) - 5
    w = torch.exp(-0.5 * (x / 1.5) ** 2)
    w = w / w.sum()

    def blur(t):
        return F.conv2d(F.conv2d(t, w.view(1, 1, 1, -1)), w.view(1, 1, -1, 1))

    stack = torch.stack([a, b, a * a, b * b, a * b])[:, None]
    mu_a, mu_b, aa, bb, ab = blur(stack)
    c1, c2 = 0.01**2, 0.03**2
    var_a, var_b, cov = aa - mu_a**2, bb - mu_b**2, ab - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return (num / den).mean()


if __name__ == "__main__":
    raise SystemExit(main())
