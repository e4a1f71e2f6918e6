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
take about 0.15 ms (``benchmarks/bench_cpu.py``).  Arithmetic is float64.
Large images are split by rows over the thread pool of :mod:`.numba_runtime`;
each pass gathers, so workers write disjoint rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .numba_runtime import IMPORT_ERROR, kernel, numpy_view, run_parallel

__all__ = ["ssim", "unavailable_reason"]

_PIXELS_PER_WORKER = 65_536


def unavailable_reason() -> str | None:
    """Why these kernels cannot run here, or ``None``."""
    return IMPORT_ERROR


@kernel
def _blur_rows(
    x: np.ndarray, y: np.ndarray, window: np.ndarray, worker: int, num_workers: int, rows: np.ndarray
) -> None:  # pragma: no cover - compiled by numba
    """``rows[:, r]`` = the five channels ``x, y, x^2, y^2, xy`` of image rows ``r = worker, worker + num_workers, ...``
    filtered along the row ('valid')."""
    out_w = rows.shape[2]
    for r in range(worker, x.shape[0], num_workers):
        rows[:, r, :] = 0.0  # here rather than np.zeros: the row is written next, while in cache
        for t in range(window.shape[0]):
            w = window[t]
            for c in range(out_w):
                a, b = float(x[r, c + t]), float(y[r, c + t])
                rows[0, r, c] += w * a
                rows[1, r, c] += w * b
                rows[2, r, c] += w * a * a
                rows[3, r, c] += w * b * b
                rows[4, r, c] += w * a * b


@kernel
def _ssim_rows(
    rows: np.ndarray,
    window: np.ndarray,
    c1: float,
    c2: float,
    worker: int,
    num_workers: int,
    row_sums: np.ndarray,
    partials: np.ndarray,
) -> None:  # pragma: no cover - compiled by numba
    """Output rows ``r = worker, ...``: the moments (column filter of ``rows``), ``row_sums[r]`` = the sum of
    the SSIM map over the row and, when ``partials`` has rows, ``dS/d(mu_x, mu_y, E[x^2], E[xy])``
    (``dS/dE[y^2]`` equals ``dS/dE[x^2]``)."""
    taps, out_w = window.shape[0], rows.shape[2]
    with_grad = partials.shape[1] > 0
    moments = np.empty((5, out_w))
    for r in range(worker, row_sums.shape[0], num_workers):
        moments[:] = 0.0
        for k in range(5):
            for t in range(taps):
                w = window[t]
                for c in range(out_w):
                    moments[k, c] += w * rows[k, r + t, c]
        total = 0.0
        for c in range(out_w):
            mx, my = moments[0, c], moments[1, c]
            a1 = 2.0 * mx * my + c1
            a2 = 2.0 * (moments[4, c] - mx * my) + c2
            b1 = mx * mx + my * my + c1
            b2 = moments[2, c] - mx * mx + moments[3, c] - my * my + c2
            inv = 1.0 / (b1 * b2)
            s = a1 * a2 * inv
            total += s
            if with_grad:
                spread = s * (1.0 / b1 - 1.0 / b2)
                partials[0, r, c] = 2.0 * my * (a2 - a1) * inv - 2.0 * mx * spread
                partials[1, r, c] = 2.0 * mx * (a2 - a1) * inv - 2.0 * my * spread
                partials[2, r, c] = -s / b2
                partials[3, r, c] = 2.0 * a1 * inv
        row_sums[r] = total


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
    the partials, gathered per row so that workers write disjoint rows."""
    taps = window.shape[0]
    height, width = x.shape
    out_h, out_w = partials.shape[1], partials.shape[2]
    channels = partials.shape[0]
    cols = np.empty((channels, out_w))  # transposed column filter, this row
    full = np.empty((channels, width))  # then transposed row filter
    for r in range(worker, height, num_workers):
        cols[:] = 0.0
        for t in range(max(0, r - out_h + 1), min(taps, r + 1)):
            w = window[t] * scale
            for k in range(channels):
                for c in range(out_w):
                    cols[k, c] += w * partials[k, r - t, c]
        full[:] = 0.0
        for k in range(channels):
            for t in range(taps):
                w = window[t]
                for c in range(out_w):
                    full[k, c + t] += w * cols[k, c]
        for c in range(width):
            a, b = float(x[r, c]), float(y[r, c])
            grad_x[r, c] = full[0, c] + 2.0 * a * full[2, c] + b * full[3, c]
            grad_y[r, c] = full[1, c] + 2.0 * b * full[2, c] + a * full[3, c]


def _min_rows(width: int) -> int:
    """Rows worth one worker: small images run on the calling thread (a hand-off costs ~0.1 ms)."""
    return max(1, -(-_PIXELS_PER_WORKER // max(width, 1)))


class _Ssim(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, y: torch.Tensor, window: np.ndarray, c1: float, c2: float) -> torch.Tensor:
        x_np, y_np = numpy_view(x), numpy_view(y)
        (height, width), taps = x_np.shape, window.shape[0]
        out_h, out_w = height - taps + 1, width - taps + 1
        rows = np.empty((5, height, out_w))
        run_parallel(_blur_rows, (x_np, y_np, window), (rows,), height, _min_rows(width))
        row_sums = np.empty(out_h)
        partials = np.empty((4, out_h, out_w) if any(ctx.needs_input_grad[:2]) else (4, 0, 0))
        run_parallel(_ssim_rows, (rows, window, c1, c2), (row_sums, partials), out_h, _min_rows(width))
        ctx.arrays = (x_np, y_np, window, partials)
        return torch.tensor(row_sums.sum() / (out_h * out_w), dtype=x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_np, y_np, window, partials = ctx.arrays
        scale = float(grad) / (partials.shape[1] * partials.shape[2])
        grad_x, grad_y = np.empty(x_np.shape), np.empty(x_np.shape)
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

    Callers check :func:`unavailable_reason` first (``losses.ssim`` does).
    """
    return _Ssim.apply(x, y, window, float(c1), float(c2))
