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
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .numba_runtime import IMPORT_ERROR, kernel

__all__ = ["ssim", "unavailable_reason"]


def unavailable_reason() -> str | None:
    """Why these kernels cannot run here, or ``None``."""
    return IMPORT_ERROR


@kernel
def _moments(x: np.ndarray, y: np.ndarray, window: np.ndarray) -> np.ndarray:  # pragma: no cover - numba
    """Blurred ``x, y, x^2, y^2, xy`` as [5, H - taps + 1, W - taps + 1] (separable 'valid' filter)."""
    taps = window.shape[0]
    height, width = x.shape
    out_h, out_w = height - taps + 1, width - taps + 1
    rows = np.zeros((5, height, out_w))
    for r in range(height):
        for t in range(taps):
            w = window[t]
            for c in range(out_w):
                a, b = float(x[r, c + t]), float(y[r, c + t])
                rows[0, r, c] += w * a
                rows[1, r, c] += w * b
                rows[2, r, c] += w * a * a
                rows[3, r, c] += w * b * b
                rows[4, r, c] += w * a * b
    moments = np.zeros((5, out_h, out_w))
    for k in range(5):
        for r in range(out_h):
            for t in range(taps):
                w = window[t]
                for c in range(out_w):
                    moments[k, r, c] += w * rows[k, r + t, c]
    return moments


@kernel
def _ssim_map(moments: np.ndarray, c1: float, c2: float, with_grad: bool) -> tuple[float, np.ndarray]:
    """Mean SSIM and, with ``with_grad``, [5, h, w] partials ``dS/d(mu_x, mu_y, E[x^2], E[y^2], E[xy])``."""
    out_h, out_w = moments.shape[1], moments.shape[2]
    partials = np.empty((5, out_h, out_w) if with_grad else (5, 0, 0))
    total = 0.0
    for r in range(out_h):
        for c in range(out_w):
            mx, my = moments[0, r, c], moments[1, r, c]
            a1 = 2.0 * mx * my + c1
            a2 = 2.0 * (moments[4, r, c] - mx * my) + c2
            b1 = mx * mx + my * my + c1
            b2 = moments[2, r, c] - mx * mx + moments[3, r, c] - my * my + c2
            inv = 1.0 / (b1 * b2)
            s = a1 * a2 * inv
            total += s
            if with_grad:
                spread = s * (1.0 / b1 - 1.0 / b2)
                partials[0, r, c] = 2.0 * my * (a2 - a1) * inv - 2.0 * mx * spread
                partials[1, r, c] = 2.0 * mx * (a2 - a1) * inv - 2.0 * my * spread
                partials[2, r, c] = -s / b2
                partials[3, r, c] = -s / b2
                partials[4, r, c] = 2.0 * a1 * inv
    return total / (out_h * out_w), partials


@kernel
def _backward(
    x: np.ndarray, y: np.ndarray, window: np.ndarray, partials: np.ndarray, scale: float
) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - numba
    """``scale * dS/dx`` and ``scale * dS/dy`` from the partials (transposed separable filter)."""
    taps = window.shape[0]
    height, width = x.shape
    out_h, out_w = partials.shape[1], partials.shape[2]
    cols = np.zeros((5, height, out_w))  # W_cols^T of every partial map
    for k in range(5):
        for r in range(out_h):
            for t in range(taps):
                w = window[t] * scale
                for c in range(out_w):
                    cols[k, r + t, c] += w * partials[k, r, c]
    full = np.zeros((5, height, width))  # then W_rows^T
    for k in range(5):
        for r in range(height):
            for t in range(taps):
                w = window[t]
                for c in range(out_w):
                    full[k, r, c + t] += w * cols[k, r, c]
    grad_x = np.empty((height, width))
    grad_y = np.empty((height, width))
    for r in range(height):
        for c in range(width):
            a, b = float(x[r, c]), float(y[r, c])
            grad_x[r, c] = full[0, r, c] + 2.0 * a * full[2, r, c] + b * full[4, r, c]
            grad_y[r, c] = full[1, r, c] + 2.0 * b * full[3, r, c] + a * full[4, r, c]
    return grad_x, grad_y


class _Ssim(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, y: torch.Tensor, window: np.ndarray, c1: float, c2: float) -> torch.Tensor:
        x_np, y_np = x.detach().contiguous().numpy(), y.detach().contiguous().numpy()
        with_grad = any(ctx.needs_input_grad[:2])
        value, partials = _ssim_map(_moments(x_np, y_np, window), c1, c2, with_grad)
        ctx.arrays = (x_np, y_np, window, partials)
        return torch.tensor(value, dtype=x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_np, y_np, window, partials = ctx.arrays
        scale = float(grad) / (partials.shape[1] * partials.shape[2])
        grad_x, grad_y = _backward(x_np, y_np, window, partials, scale)
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
    """
    if IMPORT_ERROR is not None:
        raise RuntimeError(IMPORT_ERROR)
    return _Ssim.apply(x, y, window, float(c1), float(c2))
