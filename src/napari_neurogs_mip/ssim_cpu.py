"""SSIM of CPU images as numba kernels with a hand-written backward pass.

Same definition as the PyTorch path of :func:`napari_neurogs_mip.losses.ssim`
(11-tap separable Gaussian window, 'valid' filtering, mean over the valid
pixels), which stays the reference on other devices and in the tests.  With
``mu``, ``E[x^2]``, ``E[xy]`` the blurred moments and
``S = A1 A2 / (B1 B2)``, ``A1 = 2 mu_x mu_y + c1``, ``A2 = 2 (E[xy] - mu_x mu_y) + c2``,
``B1 = mu_x^2 + mu_y^2 + c1``, ``B2 = E[x^2] - mu_x^2 + E[y^2] - mu_y^2 + c2``:

* ``dS/dmu_x = 2 mu_y (A2 - A1) / (B1 B2) - 2 mu_x S (1 / B1 - 1 / B2)``;
* ``dS/dE[x^2] = -S / B2`` and ``dS/dE[xy] = 2 A1 / (B1 B2)``;
* ``dL/dx = W^T(dS/dmu_x) + 2 x W^T(dS/dE[x^2]) + y W^T(dS/dE[xy])`` with ``W^T``
  the transposed (full) filter; the same with x and y swapped for the target.

Why: in a CPU training step at 128 x 128 the PyTorch formulation costs about
1.6 ms per view (dozens of small ops, forward and backward); these kernels
take about 0.15 ms (``benchmarks/bench_cpu.py``).

Layout of the work: the forward pass runs over bands of output rows (two per
thread of :mod:`.numba_runtime`); a band filters each image row once along the
row (the five channels ``x, y, x^2, y^2, xy``) into a ring of 11 rows that
stays in cache, then filters the ring down the columns, so no full-size
intermediate is stored but the partials the backward pass needs.  The backward
pass gathers per image row (workers write disjoint rows) and filters the
target's partial only when the target needs a gradient.  Every inner loop runs
over a contiguous row with unsigned indices and no branch, so LLVM vectorises
it; the SSIM map is summed in float64 lane-wise.  Arithmetic is in the images'
dtype (float32 in training: twice the vector width and half the memory of
float64; the tests hold it to the float32 PyTorch path), sums in float64.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import numba_runtime
from .numba_runtime import jit, kernel, numpy_view, run_parallel

__all__ = ["ssim"]

_PIXELS_PER_WORKER = 65_536
_SUM_LANES = 16  # float64 partial sums of a row of the SSIM map


@jit
def _window_add(
    source: np.ndarray, window: np.ndarray, out: np.ndarray, count: int, source_step: int, out_step: int
) -> None:  # pragma: no cover - compiled by numba
    """``out[c + t out_step] += window[t] source[c + t source_step]`` for ``c < count``: the 'valid' filter
    along a row with steps (1, 0), its transpose (the 'full' filter) with (0, 1)."""
    for t in range(window.shape[0]):
        w = window[t]
        source_first, out_first = np.uint64(t * source_step), np.uint64(t * out_step)
        for c in range(count):
            u = np.uint64(c)
            out[out_first + u] += w * source[source_first + u]


@jit
def _blurred_row(x: np.ndarray, y: np.ndarray, r: int, window: np.ndarray, inputs: np.ndarray, out: np.ndarray) -> None:
    """``out[k]`` = image row ``r`` of the channels ``x, y, x^2, y^2, xy`` filtered along the row ('valid')."""
    width = x.shape[1]
    for c in range(width):
        u = np.uint64(c)
        a, b = x[r, u], y[r, u]
        inputs[0, u] = a
        inputs[1, u] = b
        inputs[2, u] = a * a
        inputs[3, u] = b * b
        inputs[4, u] = a * b
    out[:] = 0
    for k in range(5):
        _window_add(inputs[k], window, out[k], out.shape[1], 1, 0)


@jit
def _terms(moments: np.ndarray, u: int, two: float, c1: float, c2: float) -> tuple:  # pragma: no cover - numba
    """``(A1, A2, B1, B2)`` of the SSIM at column ``u`` of a row of moments ``(mu_x, mu_y, E[x^2], E[y^2],
    E[xy])``."""
    mx, my = moments[0, u], moments[1, u]
    a1 = two * mx * my + c1
    a2 = two * (moments[4, u] - mx * my) + c2
    b1 = mx * mx + my * my + c1
    b2 = moments[2, u] - mx * mx + moments[3, u] - my * my + c2
    return a1, a2, b1, b2


@kernel
def _ssim_rows(
    x: np.ndarray,
    y: np.ndarray,
    window: np.ndarray,
    c1: float,
    c2: float,
    band: int,
    worker: int,
    num_workers: int,
    row_sums: np.ndarray,
    partials: np.ndarray,
) -> None:  # pragma: no cover - compiled by numba
    """Output rows in bands of ``band`` (bands ``worker, worker + num_workers, ...``): the five moments (row
    filter into a ring of ``taps`` rows, then the column filter), ``row_sums[r]`` = the sum of the SSIM map over
    row ``r`` (float64) and, when ``partials`` has rows, ``dS/d(mu_x, mu_y, E[x^2], E[xy])`` (``dS/dE[y^2]``
    equals ``dS/dE[x^2]``).  Arithmetic in the images' dtype."""
    taps = window.shape[0]
    out_h, out_w = row_sums.shape[0], x.shape[1] - taps + 1
    with_grad = partials.shape[1] > 0
    inputs = np.empty((5, x.shape[1]), x.dtype)
    ring = np.empty((taps, 5, out_w), x.dtype)  # row-filtered rows r % taps
    moments = np.empty((5, out_w), x.dtype)
    values = np.empty(out_w, x.dtype)  # the SSIM map, this row
    lanes = np.empty(_SUM_LANES)
    two = x.dtype.type(2.0)
    one = x.dtype.type(1.0)
    cc1, cc2 = x.dtype.type(c1), x.dtype.type(c2)
    for first in range(worker * band, out_h, num_workers * band):
        last = min(first + band, out_h)
        for r in range(first, first + taps - 1):
            _blurred_row(x, y, r, window, inputs, ring[r % taps])
        for o in range(first, last):
            _blurred_row(x, y, o + taps - 1, window, inputs, ring[(o + taps - 1) % taps])
            moments[:] = 0
            for t in range(taps):
                w = window[t]
                source = ring[(o + t) % taps]
                for k in range(5):
                    for c in range(out_w):
                        u = np.uint64(c)
                        moments[k, u] += w * source[k, u]
            # The mode is tested outside the pixel loops, and the float64 sum runs apart: a branch or a serial
            # float reduction inside would keep them scalar.
            if with_grad:
                for c in range(out_w):
                    u = np.uint64(c)
                    a1, a2, b1, b2 = _terms(moments, u, two, cc1, cc2)
                    inv = one / (b1 * b2)
                    s = a1 * a2 * inv
                    spread = s * (one / b1 - one / b2)
                    mx, my = moments[0, u], moments[1, u]
                    partials[0, o, u] = two * my * (a2 - a1) * inv - two * mx * spread
                    partials[1, o, u] = two * mx * (a2 - a1) * inv - two * my * spread
                    partials[2, o, u] = -s / b2
                    partials[3, o, u] = two * a1 * inv
                    values[u] = s
            else:
                for c in range(out_w):
                    u = np.uint64(c)
                    a1, a2, b1, b2 = _terms(moments, u, two, cc1, cc2)
                    values[u] = a1 * a2 / (b1 * b2)
            # Lane-wise float64 partial sums (a vector loop), then the lanes and the tail.
            lanes[:] = 0.0
            blocks = out_w // _SUM_LANES
            for block in range(blocks):
                base = np.uint64(block * _SUM_LANES)
                for lane in range(_SUM_LANES):
                    lanes[lane] += float(values[base + np.uint64(lane)])
            total = 0.0
            for lane in range(_SUM_LANES):
                total += lanes[lane]
            for c in range(blocks * _SUM_LANES, out_w):
                total += float(values[c])
            row_sums[o] = total


@kernel
def _gradient_rows(
    x: np.ndarray,
    y: np.ndarray,
    window: np.ndarray,
    partials: np.ndarray,
    scale: float,
    worker: int,
    num_workers: int,
    grad_x: np.ndarray,
    grad_y: np.ndarray,
) -> None:  # pragma: no cover - compiled by numba
    """Image rows ``r = worker, ...`` of ``scale dS/dx`` and ``scale dS/dy``: the transposed (full) filter of
    the partials, gathered per row so that workers write disjoint rows.  Arithmetic in the images' dtype."""
    taps = window.shape[0]
    height, width = x.shape
    out_h, out_w = partials.shape[1], partials.shape[2]
    channels = partials.shape[0]
    cols = np.empty((channels, out_w), x.dtype)  # transposed column filter, this row
    full = np.empty((channels, width), x.dtype)  # then transposed row filter
    two = x.dtype.type(2.0)
    with_y = grad_y.shape[0] > 0
    for r in range(worker, height, num_workers):
        cols[:] = 0
        for t in range(max(0, r - out_h + 1), min(taps, r + 1)):
            w = window[t] * x.dtype.type(scale)
            for k in range(channels):
                if k == 1 and not with_y:
                    continue  # dS/dmu_y feeds dS/dy only
                source = partials[k, r - t]
                target = cols[k]
                for c in range(out_w):
                    u = np.uint64(c)
                    target[u] += w * source[u]
        full[:] = 0
        for k in range(channels):
            if k != 1 or with_y:
                _window_add(cols[k], window, full[k], out_w, 0, 1)
        for c in range(width):
            u = np.uint64(c)
            a, b = x[r, u], y[r, u]
            grad_x[r, u] = full[0, u] + two * a * full[2, u] + b * full[3, u]
        if with_y:
            for c in range(width):
                u = np.uint64(c)
                a, b = x[r, u], y[r, u]
                grad_y[r, u] = full[1, u] + two * b * full[2, u] + a * full[3, u]


def _min_rows(width: int) -> int:
    """Rows worth one worker: small images run on the calling thread (a hand-off costs ~0.1 ms)."""
    return max(1, -(-_PIXELS_PER_WORKER // max(width, 1)))


class _Ssim(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, y: torch.Tensor, window: np.ndarray, c1: float, c2: float) -> torch.Tensor:
        x_np, y_np = numpy_view(x), numpy_view(y)
        window = window.astype(x_np.dtype)
        (height, width), taps = x_np.shape, window.shape[0]
        out_h, out_w = height - taps + 1, width - taps + 1
        row_sums = np.empty(out_h)
        partials = np.empty((4, out_h, out_w) if any(ctx.needs_input_grad[:2]) else (4, 0, 0), x_np.dtype)
        # Bands of output rows, two per thread, each worth a hand-off to the pool (small images: one band, on the
        # calling thread); a band also filters a halo of ``taps - 1`` rows.
        threads = numba_runtime.worker_threads()
        bands = max(1, min(2 * threads, out_h * out_w // _PIXELS_PER_WORKER))
        band = -(-out_h // bands)
        run_parallel(_ssim_rows, (x_np, y_np, window, c1, c2, band), (row_sums, partials), -(-out_h // band))
        ctx.arrays = (x_np, y_np, window, partials)
        return torch.tensor(row_sums.sum() / (out_h * out_w), dtype=x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_np, y_np, window, partials = ctx.arrays
        scale = float(grad) / (partials.shape[1] * partials.shape[2])
        # Both gradients share the filtered partials; dS/dy (the target's, usually not needed) is only computed
        # on request.  dS/dx is always computed: the kernel writes it, and it costs little more than the partials.
        grad_x = np.empty(x_np.shape, x_np.dtype)
        grad_y = np.empty(x_np.shape if ctx.needs_input_grad[1] else (0, 0), x_np.dtype)
        before = (x_np, y_np, window, partials, scale)
        run_parallel(_gradient_rows, before, (grad_x, grad_y), x_np.shape[0], _min_rows(x_np.shape[1]))
        dtype = grad.dtype
        return (
            torch.from_numpy(grad_x).to(dtype) if ctx.needs_input_grad[0] else None,
            torch.from_numpy(grad_y).to(dtype) if ctx.needs_input_grad[1] else None,
            None,
            None,
            None,
        )


def ssim(x: torch.Tensor, y: torch.Tensor, window: np.ndarray, c1: float, c2: float) -> torch.Tensor:
    """Mean SSIM of two [H, W] CPU images of one float dtype (differentiable w.r.t. both).

    Parameters
    ----------
    x, y
        Images, at least ``len(window)`` pixels along each side (checked by the caller).
    window
        Normalised 1D Gaussian window (float64).
    c1, c2
        The stabilising constants ``(0.01 L)^2`` and ``(0.03 L)^2`` for data range ``L``.

    Callers check that numba is present first (``losses.ssim`` does).
    """
    return _Ssim.apply(x, y, window, float(c1), float(c2))
