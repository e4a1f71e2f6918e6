"""Early termination and tighter culling skip work without changing results beyond the documented bound.

The scene: one broad bright Gaussian that covers the whole view well above
every other amplitude, under many small faint ones.  In descending amplitude a
tile meets the bright one first; after it no faint Gaussian can raise a pixel
(hard MIP) or weigh more than ``e^-T`` in the softmax (soft MIP, ``T`` =
``project.SOFT_SKIP_T``), so the kernels may stop.  Each backend is compared
with itself with early termination off (``EARLY_TERMINATION = False``) and with
the torch reference:

* hard MIP: bitwise equal images and gradients (termination is exact);
* soft MIP: images and gradients within the bound of ``docs/math.md``
  (``n e^-T m`` for ``n`` pairs left out at a pixel whose maximum is ``m``).

The Triton kernels run in the CPU interpreter on a 16 x 16 view (tiles of 8,
batches of 4), as ``tests/test_render_triton.py`` sets them up.
"""

from __future__ import annotations

import math

import pytest
import torch

from napari_neurogs_mip.render import raster_torch
from napari_neurogs_mip.render.project import SOFT_SKIP_T, Projection

BETA = 200.0
MODES = ("soft", "max")


def bright_over_faint(num_faint: int, size: int, dtype: torch.dtype, seed: int = 0) -> Projection:
    """One view of ``size`` x ``size`` pixels: a broad Gaussian of amplitude 1 over ``num_faint`` small ones of
    amplitude 0.02-0.3 (sigma 0.7-2 px)."""
    generator = torch.Generator().manual_seed(seed)
    k = num_faint + 1
    centre = (size - 1) / 2
    means = torch.rand(k, 2, generator=generator, dtype=torch.float64) * (size - 1)
    means[0] = centre
    sigma = 0.7 + 1.3 * torch.rand(k, 2, generator=generator, dtype=torch.float64)
    sigma[0] = 4.0 * size
    rho = 0.6 * (torch.rand(k, generator=generator, dtype=torch.float64) - 0.5)
    rho[0] = 0.0
    sxx, syy, sxy = sigma[:, 0] ** 2, sigma[:, 1] ** 2, rho * sigma[:, 0] * sigma[:, 1]
    det = sxx * syy - sxy * sxy
    conics = torch.stack([syy / det, -sxy / det, sxx / det], dim=-1)
    amplitudes = 0.02 + 0.28 * torch.rand(k, generator=generator, dtype=torch.float64)
    amplitudes[0] = 1.0
    extent_x, extent_y = 3 * sxx.sqrt(), 3 * syy.sqrt()
    rects = torch.stack(
        [
            torch.ceil(means[:, 0] - extent_x).clamp(0, size),
            torch.ceil(means[:, 1] - extent_y).clamp(0, size),
            torch.floor(means[:, 0] + extent_x).clamp(-1, size - 1),
            torch.floor(means[:, 1] + extent_y).clamp(-1, size - 1),
        ],
        dim=-1,
    ).to(torch.int32)
    return Projection(
        means[None].to(dtype), conics[None].to(dtype), amplitudes[None].to(dtype), rects[None], [(size, size)]
    )


def render_with_gradients(rasterize, projection: Projection, mode: str, seed: int = 3):
    """Image and gradients w.r.t. means2d, conics and amplitudes of a fixed random linear loss."""
    leaves = [
        t.detach().clone().requires_grad_(True) for t in (projection.means2d, projection.conics, projection.amplitudes)
    ]
    images = rasterize(Projection(*leaves, projection.rects, projection.shapes), mode, BETA)
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(image.shape, generator=generator, dtype=image.dtype) for image in images]
    loss = sum((image * weight).sum() for image, weight in zip(images, weights))
    grads = torch.autograd.grad(loss, leaves)
    return images[0].detach(), grads


def soft_bound(projection: Projection, dtype: torch.dtype) -> float:
    """``n e^-T max a``: the most a soft-MIP pixel may move when ``n`` pairs are left out."""
    num_pairs = projection.amplitudes.shape[1]
    return num_pairs * math.exp(-SOFT_SKIP_T[dtype]) * float(projection.amplitudes.max())


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: float, what: str) -> None:
    difference = float((actual - expected).abs().max())
    assert difference <= bound, f"{what}: differs by {difference:.3g} > {bound:.3g}"


# --------------------------------------------------------------------------- cpu

numba = pytest.importorskip("numba")


@pytest.fixture
def cpu(monkeypatch: pytest.MonkeyPatch):
    from napari_neurogs_mip.render import raster_cpu

    monkeypatch.setattr(raster_cpu, "EARLY_TERMINATION", True)
    return raster_cpu


def cpu_run(raster_cpu, projection: Projection, mode: str, early: bool):
    raster_cpu.EARLY_TERMINATION = early
    try:
        image, grads = render_with_gradients(raster_cpu.rasterize, projection, mode)
        return image, grads, raster_cpu.last_statistics()
    finally:
        raster_cpu.EARLY_TERMINATION = True


def cpu_on_and_off(raster_cpu, dtype: torch.dtype, mode: str, counter: str):
    """The scene rendered with early termination on and off; checks that off visits every Gaussian binned in a
    tile and on visits under a quarter of them (``counter``: the pass that stops)."""
    projection = bright_over_faint(400, 48, dtype)
    on = cpu_run(raster_cpu, projection, mode, early=True)
    off = cpu_run(raster_cpu, projection, mode, early=False)
    assert (off[2][counter] == off[2]["tile_gaussians"]).all()
    assert on[2][counter].sum() * 4 < on[2]["tile_gaussians"].sum(), on[2]
    return projection, on, off


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_hard_mip_stops_early_and_changes_nothing(cpu, dtype: torch.dtype) -> None:
    # Work: pass 1 visits a few Gaussians per tile instead of every one binned there.
    _, (image, grads, stats), (full_image, full_grads, _) = cpu_on_and_off(cpu, dtype, "max", "pass1_visited")
    # Only the bright Gaussian is anyone's arg-max: the backward pass visits no faint one.
    assert stats["backward_rows"][0, 1:].sum() == 0
    # Values: exact.
    assert torch.equal(image, full_image)
    for got, want in zip(grads, full_grads):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_soft_mip_skips_within_the_bound(cpu, dtype: torch.dtype) -> None:
    projection, (image, grads, stats), (full_image, full_grads, full_stats) = cpu_on_and_off(
        cpu, dtype, "soft", "pass2_visited"
    )
    assert stats["backward_rows"].sum() * 4 < full_stats["backward_rows"].sum()
    # Values: the skipped pairs move a pixel by at most n e^-T m (plus rounding of the dtype).
    rounding = 8 * torch.finfo(dtype).eps
    assert_within(image, full_image, soft_bound(projection, dtype) + rounding, "image")
    # Gradients: each pair left out had d out / d g <= e^-T (1 + beta m); the pairs kept see S and out move
    # by the image bound.  Compare relative to the largest gradient entry.
    for name, got, want in zip(("means2d", "conics", "amplitudes"), grads, full_grads):
        scale = float(want.abs().max())
        bound = (1 + BETA) * soft_bound(projection, dtype) * scale + 1e3 * rounding * scale
        assert_within(got, want, bound, f"d/d {name}")


@pytest.mark.parametrize("mode", MODES)
def test_cpu_matches_reference_with_early_termination(cpu, mode: str) -> None:
    projection = bright_over_faint(400, 48, torch.float64)
    image, grads, _ = cpu_run(cpu, projection, mode, early=True)
    ref_image, ref_grads = render_with_gradients(raster_torch.rasterize, projection, mode)
    torch.testing.assert_close(image, ref_image, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))


def test_cpu_statistics_are_exposed(cpu) -> None:
    projection = bright_over_faint(50, 40, torch.float32)
    image, _, stats = cpu_run(cpu, projection, "soft", early=True)
    assert image.shape == (40, 40)
    for key in ("tile_gaussians", "pass1_visited", "pass2_visited", "pass2_rows", "pass2_rows_skipped"):
        assert stats[key].ndim == 1 and (stats[key] >= 0).all(), key
    assert (stats["pass1_visited"] <= stats["tile_gaussians"]).all()
    assert stats["backward_rows"].shape == (1, 51)


def test_cpu_ellipse_binning_drops_corner_tiles(cpu) -> None:
    """A long thin diagonal Gaussian: its rectangle spans the view, its ellipse only the diagonal tiles."""
    size = 64
    sxx = syy = 300.0
    sxy = 0.995 * sxx
    det = sxx * syy - sxy * sxy
    conics = torch.tensor([[[syy / det, -sxy / det, sxx / det]]], dtype=torch.float64)
    projection = Projection(
        torch.tensor([[[31.5, 31.5]]], dtype=torch.float64),
        conics,
        torch.tensor([[0.8]], dtype=torch.float64),
        torch.tensor([[[0, 0, size - 1, size - 1]]], dtype=torch.int32),
        [(size, size)],
    )
    image, grads, stats = cpu_run(cpu, projection, "soft", early=True)
    tiles = len(stats["tile_gaussians"])
    assert 0 < stats["tile_gaussians"].sum() < tiles, "the ellipse misses the corner tiles"
    ref_image, ref_grads = render_with_gradients(raster_torch.rasterize, projection, "soft")
    torch.testing.assert_close(image, ref_image, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * float(want.abs().max()))


# --------------------------------------------------------------------------- triton (interpreter)


@pytest.fixture(scope="module")
def triton_backend():
    """``raster_triton`` with its kernels running in the Triton CPU interpreter (as in test_render_triton.py)."""
    pytest.importorskip("triton")
    from napari_neurogs_mip.render import raster_triton

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        assert raster_triton.kernels().is_interpreted()
        yield raster_triton
    raster_triton.kernels()  # back to what the environment asks for


def triton_run(backend, projection: Projection, mode: str, early: bool):
    rasterizer = backend.TritonRasterizer(tile=8, batch=4)
    previous = backend.EARLY_TERMINATION
    backend.EARLY_TERMINATION = early
    try:
        image, grads = render_with_gradients(rasterizer, projection, mode)
    finally:
        backend.EARLY_TERMINATION = previous
    binning = rasterizer.last_binning
    entries = (binning.ranges[1:] - binning.ranges[:-1]).to(torch.int64)
    return image, grads, binning.visited.to(torch.int64), entries


@pytest.mark.parametrize("mode", MODES)
def test_triton_stops_early_within_the_bound(triton_backend, mode: str) -> None:
    projection = bright_over_faint(40, 16, torch.float32)
    image, grads, visited, entries = triton_run(triton_backend, projection, mode, early=True)
    full_image, full_grads, full_visited, full_entries = triton_run(triton_backend, projection, mode, early=False)
    assert torch.equal(full_visited, full_entries) and torch.equal(entries, full_entries)
    # Work: each tile stops after its first batch (the bright Gaussian leads every tile).
    assert (visited <= 4).all() and visited.sum() * 2 < entries.sum(), (visited, entries)
    # Values: exact for the hard MIP (up to float rounding of the atomics), within the bound for the soft MIP.
    bound = soft_bound(projection, torch.float32) if mode == "soft" else 0.0
    assert_within(image, full_image, bound + 1e-6, "image")
    for got, want in zip(grads, full_grads):
        scale = float(want.abs().max())
        assert_within(got, want, (1 + BETA) * bound * scale + 1e-5 * scale, "gradient")
    # And the reference.
    ref_image, ref_grads = render_with_gradients(raster_torch.rasterize, projection, mode)
    torch.testing.assert_close(image, ref_image, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5 * max(float(want.abs().max()), 1e-3))
