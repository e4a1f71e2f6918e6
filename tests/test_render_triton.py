"""The Triton rasteriser agrees with the torch reference (CPU, through the Triton interpreter).

``triton.jit`` decides between compiled and interpreted kernels when the kernel
module is imported, so ``TRITON_INTERPRET=1`` must be set before that.  The
``backend`` fixture sets it for the tests of this module only (setting it at
import time would leak into every test collected in the same session) and
lets ``raster_triton.kernels()`` (re)import the kernel module under it; on
teardown the variable is restored and the kernels follow it again.  triton
itself may already be imported without the interpreter (``importorskip``
below does that): the kernels reduce through interpreter-safe aliases of
``tl.sum`` / ``tl.max`` for exactly this case.

Tolerances (float32 on both sides, same cut-off and same formula for ``q``):

* images: ``rtol=1e-4, atol=1e-5``.  Both sides compute the same per-pixel
  softmax; only the order of the sums (online rescaling per batch here,
  scatter-adds there) and ``exp`` rounding differ, i.e. a few float32 ulps.
* gradients: ``rtol=1e-3`` and ``atol = 1e-5 * max|reference|`` per parameter.
  A gradient is a sum over many pixels of terms of both signs (the loss is a
  random +-1-ish linear form), accumulated in a different order (per-tile
  partial sums + atomics vs. ``index_add``) and chained through the projection;
  cancellation leaves an absolute error of order ``eps32 * sum |terms|``,
  which relative to the largest entry is ~1e-6 here, so components near zero
  need an absolute floor that scales with the gradient's magnitude.  beta = 50
  multiplies the rounding of ``g`` in the soft weights by up to 50.

Observed worst cases use about 0.5 % (images) and 12 % (gradients) of these
tolerances.  On a CUDA machine the same comparisons also run with compiled
kernels (``test_matches_reference_on_cuda``; FMA contraction moves results by
rounding only).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from napari_neurogs_mip.render import Renderer, raster_torch
from napari_neurogs_mip.render.project import Projection
from scenes import PARAMETERS, make_scenes, parameter_gradients

BETA = 50.0
MODES = ("soft", "max")
IMAGE_TOL = {"rtol": 1e-4, "atol": 1e-5}
GRAD_RTOL = 1e-3
GRAD_ATOL_FRACTION = 1e-5
SCENES = {scene.name: scene for scene in make_scenes()}


@pytest.fixture(scope="module")
def backend():
    """``raster_triton`` with its kernels running in the Triton CPU interpreter."""
    from napari_neurogs_mip.render import raster_triton

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        assert raster_triton.kernels().is_interpreted()
        yield raster_triton
    raster_triton.kernels()  # back to what the environment asks for


def assert_images_close(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, **IMAGE_TOL)


def assert_gradients_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for name in PARAMETERS:
        got, want = actual[name], expected[name]
        assert torch.isfinite(got).all(), name
        scale = float(want.abs().max()) if want.numel() else 0.0
        torch.testing.assert_close(got, want, rtol=GRAD_RTOL, atol=GRAD_ATOL_FRACTION * max(scale, 1e-3), msg=name)


def compare_with_reference(scene_name: str, mode: str, rasterize) -> None:
    scene = SCENES[scene_name]
    images, grads = parameter_gradients(scene.fresh(torch.float32), rasterize, mode, BETA)
    ref_images, ref_grads = parameter_gradients(scene.fresh(torch.float32), raster_torch.rasterize, mode, BETA)
    assert_images_close(images, ref_images)
    assert_gradients_close(grads, ref_grads)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scene_name", list(SCENES))
def test_matches_reference(backend, scene_name: str, mode: str) -> None:
    """Images and all parameter gradients of every shared scene match the reference."""
    compare_with_reference(scene_name, mode, backend.rasterize)


@pytest.mark.parametrize(("tile", "batch"), [(16, 16), (4, 64)])
@pytest.mark.parametrize("mode", MODES)
def test_other_tile_and_batch_sizes(backend, tile: int, batch: int, mode: str) -> None:
    """Tile and batch sizes change only the schedule, never the result."""
    compare_with_reference("k50", mode, backend.TritonRasterizer(tile=tile, batch=batch))


def test_defaults_agree_with_kernel_module(backend) -> None:
    kernels = backend.kernels()
    assert (backend.TILE, backend.BATCH) == (kernels.TILE, kernels.BATCH)


@pytest.mark.parametrize("mode", MODES)
def test_fixed_capacity(backend, mode: str) -> None:
    """A fixed intersection buffer renders exactly like exact sizing when large enough, and reports overflow."""
    projection = SCENES["k500"].fresh(torch.float32).project()
    exact = backend.TritonRasterizer()
    expected = exact(projection, mode, BETA)
    needed = exact.check_capacity()
    assert needed > 0
    for capacity in (needed, needed + 1000):
        fixed = backend.TritonRasterizer(capacity=capacity)
        for got, want in zip(fixed(projection, mode, BETA), expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert fixed.check_capacity() == needed
    small = backend.TritonRasterizer(capacity=needed // 2)
    images = small(projection, mode, BETA)
    assert all(torch.isfinite(image).all() for image in images)
    with pytest.raises(RuntimeError, match="raise capacity"):
        small.check_capacity()


def _hand_made_projection(dtype: torch.dtype) -> tuple[Projection, Projection]:
    """Two views; some pairs culled with NaN/Inf parameters, one rectangle far past the image.

    Returns the projection and the equivalent one the reference can take
    (rectangles clipped to the images, culled pairs' parameters made finite).
    """
    means2d = torch.tensor(
        [[[3.0, 4.0], [float("nan"), 2.0], [10.5, 2.5], [6.0, 6.0]], [[1.0, 8.0], [4.0, 4.0], [0.0, 0.0], [2.0, 3.0]]],
        dtype=dtype,
    )
    conics = torch.tensor([0.3, 0.05, 0.2], dtype=dtype).repeat(2, 4, 1)
    conics[1, 2] = float("inf")
    amplitudes = torch.tensor([[0.7, 0.9, 0.5, 0.4], [0.6, 0.8, float("nan"), 0.3]], dtype=dtype)
    culled = [1, 1, 0, 0]
    rects = torch.tensor(
        [[[0, 0, 8, 9], culled, [5, 0, 10**6, 7], [1, 1, 11, 10]], [[0, 2, 6, 12], [0, 0, 8, 8], culled, [0, 0, 6, 8]]],
        dtype=torch.int32,
    )
    shapes = [(11, 13), (14, 9)]
    projection = Projection(means2d, conics, amplitudes, rects, shapes)
    clean_rects = rects.clone()
    clean_rects[0, 2, 2] = 12
    clean_means, clean_conics, clean_amps = means2d.clone(), conics.clone(), amplitudes.clone()
    clean_means[0, 1, 0] = 0.0
    clean_conics[1, 2] = 1.0
    clean_amps[1, 2] = 1.0
    return projection, Projection(clean_means, clean_conics, clean_amps, clean_rects, shapes)


@pytest.mark.parametrize("mode", MODES)
def test_culled_nonfinite_and_oversized_pairs(backend, mode: str) -> None:
    """Culled pairs with NaN/Inf parameters and rectangles past the image neither corrupt binning nor leak."""
    projection, clean = _hand_made_projection(torch.float32)
    leaves = [t.clone().requires_grad_(True) for t in (projection.means2d, projection.conics, projection.amplitudes)]
    images = backend.rasterize(Projection(*leaves, projection.rects, projection.shapes), mode, BETA)
    clean_leaves = [t.clone().requires_grad_(True) for t in (clean.means2d, clean.conics, clean.amplitudes)]
    expected = raster_torch.rasterize(Projection(*clean_leaves, clean.rects, clean.shapes), mode, BETA)
    assert_images_close(images, expected)
    generator = torch.Generator().manual_seed(3)
    weights = [torch.randn(image.shape, generator=generator) for image in expected]
    sum((i * w).sum() for i, w in zip(images, weights)).backward()
    sum((i * w).sum() for i, w in zip(expected, weights)).backward()
    for leaf, clean_leaf in zip(leaves, clean_leaves):
        assert torch.isfinite(leaf.grad).all()
        torch.testing.assert_close(leaf.grad, clean_leaf.grad, rtol=GRAD_RTOL, atol=1e-5)


def test_float64_projection(backend) -> None:
    """Other dtypes are computed in float32 and returned in their own dtype."""
    scene = SCENES["k50"].fresh(torch.float64)
    images = backend.rasterize(scene.project(), "soft", BETA)
    expected = raster_torch.rasterize(scene.project(), "soft", BETA)
    for got, want in zip(images, expected):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_renderer_uses_triton_under_interpreter(backend) -> None:
    """``Renderer.create('cpu', backend='triton')`` resolves to the Triton kernels when interpreted."""
    renderer = Renderer.create("cpu", backend="triton")
    assert renderer.backend == "triton" and renderer.fallback_reason is None
    assert backend.unavailable_reason() is None
    scene = SCENES["k50"].fresh(torch.float32)
    images = renderer.stages.rasterize(scene.project(), "soft", BETA)
    assert_images_close(images, raster_torch.rasterize(scene.project(), "soft", BETA))


@pytest.fixture
def compiled_backend(monkeypatch: pytest.MonkeyPatch):
    """``raster_triton`` with compiled kernels (for the CUDA tests), whatever the module fixture set."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    from napari_neurogs_mip.render import raster_triton

    if not isinstance(tl.sum, JITFunction):
        pytest.skip("triton was imported under TRITON_INTERPRET=1; compiled kernels need a process without it")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not raster_triton.kernels().is_interpreted()
    return raster_triton


def _cuda_gradients(scene_name: str, mode: str, rasterize) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """``scenes.parameter_gradients`` on the GPU (its loss weights are drawn on the CPU, then moved)."""
    scene = SCENES[scene_name].fresh(torch.float32, "cuda")
    images = rasterize(scene.project(), mode, BETA)
    generator = torch.Generator().manual_seed(7)
    weights = [torch.randn(image.shape, generator=generator).cuda() for image in images]
    loss = sum((image * weight).sum() for image, weight in zip(images, weights))
    grads = torch.autograd.grad(loss, [scene.params[p] for p in PARAMETERS], allow_unused=True)
    out = {n: (torch.zeros_like(scene.params[n]) if g is None else g).cpu() for n, g in zip(PARAMETERS, grads)}
    return [image.detach().cpu() for image in images], out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scene_name", list(SCENES))
def test_matches_reference_on_cuda(compiled_backend, scene_name: str, mode: str) -> None:
    """Compiled kernels on the GPU agree with the reference on the GPU."""
    images, grads = _cuda_gradients(scene_name, mode, compiled_backend.rasterize)
    ref_images, ref_grads = _cuda_gradients(scene_name, mode, raster_torch.rasterize)
    assert_images_close(images, ref_images)
    assert_gradients_close(grads, ref_grads)


def test_unavailable_reason_without_cuda_or_interpreter() -> None:
    """With no CUDA and no interpreter the backend says why, and the renderer falls back to torch."""
    script = (
        "from napari_neurogs_mip.render import Renderer, raster_triton\n"
        "print('REASON', raster_triton.unavailable_reason())\n"
        "renderer = Renderer.create('cuda', backend='triton')\n"
        "print('BACKEND', renderer.backend)\n"
        "print('FALLBACK', renderer.fallback_reason)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    for key in ("REASON", "FALLBACK"):
        assert "no CUDA device" in lines[key] and "TRITON_INTERPRET=1" in lines[key], lines[key]
    assert lines["BACKEND"] == "torch"


def test_unavailable_reason_without_triton() -> None:
    """A missing triton install is reported, not raised."""
    script = (
        "import sys\n"
        "sys.modules['triton'] = None  # import triton now raises ImportError\n"
        "from napari_neurogs_mip.render import raster_triton\n"
        "print('REASON', raster_triton.unavailable_reason())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "cannot import triton" in result.stdout, result.stdout
