"""The numba CPU rasteriser agrees with the torch reference on every shared scene.

Both backends apply the same cut-off with ``q`` evaluated in the same order and
precision, so they include the same pixels; what differs is rounding: the CPU
kernels use polynomial ``exp`` (<= 1 ulp in float32, <= 2 ulp in float64), a
two-pass softmax instead of scatter-reduced sums, and lane-wise partial sums
for the gradients.

Tolerances, relative to the largest magnitude of each reference tensor
(``atol = tol * max|ref|``, ``rtol = tol``):

* float64: ``tol = 1e-10`` for images and all four parameter gradients;
  observed worst case ~1e-14.
* float32: ``tol = 1e-4``; observed worst case ~7e-6 (gradients of the
  ``huge`` scene in soft mode, where beta = 50 amplifies the rounding of ``g``
  in the softmax weights and many pixels cancel in each sum).

Views are rendered in row layout or transposed (``raster_cpu.ORIENTATION``);
float64 runs cover both layouts explicitly, float32 runs the automatic choice,
and ``test_wide_views_gradients`` covers transposed views with more kernel rows
than padded lanes.

Hard MIP in float32 can send a pixel's gradient to a different Gaussian than
the reference when two Gaussians reach that pixel within rounding of each
other (the maximum is taken in the log domain here); the shared scenes have no
such near-ties, but a 12k-Gaussian 647 x 813 scene does (~1e-2 of the largest
gradient entry in float32, 1e-16 in float64).
"""

from __future__ import annotations

import threading
import time
from functools import cache

import pytest
import torch

pytest.importorskip("numba")

from napari_neurogs_mip import numba_runtime
from napari_neurogs_mip.frames import VolumeGeometry
from napari_neurogs_mip.render import Renderer, raster_cpu, raster_torch
from napari_neurogs_mip.views import make_views
from scenes import PARAMETERS, Scene, make_scenes, parameter_gradients

BETA = 50.0
MODES = ("soft", "max")
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}
SCENES = {scene.name: scene for scene in make_scenes()}
DTYPES = {"float64": torch.float64, "float32": torch.float32}


@cache
def reference(name: str, mode: str, dtype_name: str) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Images and parameter gradients of the torch reference (computed once per case)."""
    return parameter_gradients(SCENES[name].fresh(DTYPES[dtype_name]), raster_torch.rasterize, mode, BETA)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    assert torch.isfinite(actual).all(), what
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * max(scale, 1e-30), msg=what)


def check_against_reference(name: str, mode: str, dtype_name: str) -> None:
    dtype = DTYPES[dtype_name]
    tol = TOLERANCE[dtype]
    want_images, want_grads = reference(name, mode, dtype_name)
    images, grads = parameter_gradients(SCENES[name].fresh(dtype), raster_cpu.rasterize, mode, BETA)
    assert len(images) == len(want_images)
    for view, (got, want) in enumerate(zip(images, want_images)):
        assert_close(got, want, tol, f"{name} {mode} {dtype_name} image of view {view}")
    for parameter in PARAMETERS:
        assert_close(grads[parameter], want_grads[parameter], tol, f"{name} {mode} {dtype_name} d/d {parameter}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(SCENES))
@pytest.mark.parametrize("orientation", ["rows", "columns"])
def test_float64_matches_reference(name: str, mode: str, orientation: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(raster_cpu, "ORIENTATION", orientation)
    check_against_reference(name, mode, "float64")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(SCENES))
def test_float32_matches_reference(name: str, mode: str) -> None:
    check_against_reference(name, mode, "float32")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("orientation", ["rows", "columns", "auto"])
def test_wide_views_gradients(mode: str, orientation: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Views far wider than tall: transposed, their kernel rows (300) outnumber their padded lanes (48)."""
    geometry = VolumeGeometry((9, 20, 300))
    generator = torch.Generator().manual_seed(5)
    k = 120
    extent = torch.tensor(geometry.extent_xyz, dtype=torch.float64)
    params = {
        "means": torch.rand(k, 3, generator=generator, dtype=torch.float64) * extent,
        "log_scales": torch.rand(k, 3, generator=generator, dtype=torch.float64) * 1.2 - 0.3,
        "quaternions": torch.randn(k, 4, generator=generator, dtype=torch.float64),
        "log_amplitudes": -torch.rand(k, generator=generator, dtype=torch.float64),
    }
    scene = Scene("wide", params, make_views(["xy", "xz"], geometry))
    want_images, want_grads = parameter_gradients(scene.fresh(torch.float64), raster_torch.rasterize, mode, BETA)
    monkeypatch.setattr(raster_cpu, "ORIENTATION", orientation)
    images, grads = parameter_gradients(scene.fresh(torch.float64), raster_cpu.rasterize, mode, BETA)
    tol = TOLERANCE[torch.float64]
    for view, (got, want) in enumerate(zip(images, want_images)):
        assert_close(got, want, tol, f"wide {mode} {orientation} image of view {view}")
    for parameter in PARAMETERS:
        assert_close(grads[parameter], want_grads[parameter], tol, f"wide {mode} {orientation} d/d {parameter}")


@pytest.mark.parametrize("mode", MODES)
def test_deterministic_for_any_thread_count(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every pixel and every gradient is computed by one worker in a fixed order: results are bitwise equal."""
    scene = SCENES["k500"]
    runs = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(numba_runtime, "THREADS", threads)
        runs.append(parameter_gradients(scene.fresh(torch.float32), raster_cpu.rasterize, mode, BETA))
    (first_images, first_grads), *others = runs
    for images, grads in others:
        for got, want in zip(images, first_images):
            assert torch.equal(got, want)
        for parameter in PARAMETERS:
            assert torch.equal(grads[parameter], first_grads[parameter]), parameter


def test_run_parallel_runs_every_worker_once_with_concurrent_callers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each call runs each worker index once (on the caller and the pool), also with two callers at once (a GUI
    thread and a fit thread share the pool)."""
    monkeypatch.setattr(numba_runtime, "THREADS", 2)
    lock = threading.Lock()

    def record(seen: list, worker: int, num_workers: int) -> None:
        time.sleep(0.001)  # long enough for the helpers to take tasks too
        with lock:
            seen.append((worker, num_workers, threading.get_ident()))

    def call(seen: list) -> None:
        for _ in range(5):
            numba_runtime.run_parallel(record, (seen,), (), 100)

    runs: list[list] = [[], []]
    callers = [threading.Thread(target=call, args=(seen,)) for seen in runs]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    workers = 2 * numba_runtime._TASKS_PER_THREAD
    for seen in runs:
        assert sorted((worker, count) for worker, count, _ in seen) == sorted(
            (worker, workers) for worker in range(workers) for _ in range(5)
        )
    assert len({ident for seen in runs for _, _, ident in seen}) >= 2


def test_float32_stays_float32() -> None:
    scene = SCENES["k50"].fresh(torch.float32)
    projection = scene.project()
    images = raster_cpu.rasterize(projection, "soft", BETA)
    assert all(image.dtype == torch.float32 for image in images)
    assert [tuple(image.shape) for image in images] == [view.shape for view in scene.views]
    sum(image.sum() for image in images).backward()
    assert all(scene.params[p].grad.dtype == torch.float32 for p in PARAMETERS)


def test_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="unknown render mode"):
        raster_cpu.rasterize(SCENES["single"].fresh(torch.float32).project(), "sum", BETA)


def test_auto_backend_on_cpu_is_cpu() -> None:
    assert raster_cpu.unavailable_reason() is None
    renderer = Renderer.create("cpu", backend="auto")
    assert renderer.backend == "cpu"
    assert renderer.fallback_reason is None
