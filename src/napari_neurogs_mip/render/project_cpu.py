"""Stage 1 on the CPU: numba kernels that project Gaussian parameters into every view.

Same math and outputs as the reference (``project.py`` after ``model.covariance``),
fused from the model's parameters, with a hand-written backward pass.  For each
Gaussian ``k``: rotation ``R`` of the normalised quaternion, variances
``s^2 = exp(2 log_scales)``, ``Sigma = R diag(s^2) R^T``; in each view with
pixel axes ``a = u / du``, ``b = v / dv`` and origin ``o``:

* mean ``m = (a.(mu - o), b.(mu - o))``;
* ``S2 = [[a^T Sigma a, a^T Sigma b], [., b^T Sigma b]] + eps I``, computed as
  sums over principal axes of ``s_i^2 (R^T a)_i (R^T b)_i``;
* conic ``S2^-1 = (syy, -sxy, sxx) / det``; amplitude ``exp(log_amplitude)``
  (times ``sqrt(det(S2 - eps I) / det S2)`` with compensation); the same
  enumeration rectangle and culling rules as the reference.

Backward: ``dL/dSigma`` is gathered in the principal frame,
``P = R^T (dL/dSigma) R = sum_views (g_xx ra ra^T + g_yy rb rb^T + g_xy (ra rb^T + rb ra^T) / 2)``
with ``ra = R^T a``, ``rb = R^T b``; then ``dL/d log s_i = 2 s_i^2 P_ii`` and
``dL/dR = 2 R P diag(s^2)``, pulled back through the quaternion formula and its
normalisation.  Every Gaussian is handled by one worker: no atomics.

The arithmetic runs in float64 and results are rounded to the parameters' dtype,
so float32 values agree with the reference to its own rounding.  At 12k
Gaussians and three views, forward plus backward take about 1.5 ms on two
cores against about 5.5 ms in the PyTorch ops they replace.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch

from ..model import GaussianModel
from ..numba_runtime import IMPORT_ERROR, exp, jit, kernel, numpy_view, run_parallel
from ..views import View
from .project import CUTOFF_SIGMA, Projection, view_constants

__all__ = ["project_model", "unavailable_reason"]

_CUTOFF_SIGMA = float(CUTOFF_SIGMA)
_BLOCK = 256  # Gaussians per block; its scratch (about 40 KiB) stays in L1/L2
_MIN_BLOCKS = 8  # blocks worth one worker: below this, a thread hand-off costs more than the work


def _blocks(num_gaussians: int) -> int:
    """Blocks of ``_BLOCK`` Gaussians (the work items of the kernels)."""
    return -(-num_gaussians // _BLOCK)


def unavailable_reason() -> str | None:
    """Why this backend cannot run here, or ``None``."""
    return IMPORT_ERROR


@functools.lru_cache(maxsize=64)
def _view_table(views: tuple[View, ...]) -> np.ndarray:
    """[V, 11] float64 rows ``(a, b, origin, width, height)`` with ``a = u / du``, ``b = v / dv``
    (the reference's :func:`~.project.view_constants`, as one array for the kernels)."""
    axes, origins, widths, heights = view_constants(views, torch.float64, torch.device("cpu"))
    return torch.cat([axes.transpose(1, 2).reshape(len(views), 6), origins, widths, heights], dim=1).numpy()


# --------------------------------------------------------------------------- kernels
#
# Each worker takes blocks of ``_BLOCK`` consecutive Gaussians: their rotations
# and variances are computed once into a small scratch table, then each view
# streams through the block (about 3x faster than a Gaussian-at-a-time loop).


@jit
def _block_scratch() -> tuple:  # pragma: no cover - compiled by numba
    """A worker's arrays for :func:`_principal`: ``unit`` [5, B], ``rot`` [9, B], ``s2`` [3, B], ``amp0`` [B]."""
    return np.empty((5, _BLOCK)), np.empty((9, _BLOCK)), np.empty((3, _BLOCK)), np.empty(_BLOCK)


@jit
def _principal(
    quaternions: np.ndarray,
    log_scales: np.ndarray,
    log_amplitudes: np.ndarray,
    start: int,
    count: int,
    unit: np.ndarray,
    rot: np.ndarray,
    s2: np.ndarray,
    amp0: np.ndarray,
) -> None:  # pragma: no cover - compiled by numba
    """Per Gaussian ``start ... start + count - 1``: the normalised quaternion and ``1 / |q|`` (``unit[0:4]``,
    ``unit[4]``), the rotation ``rot[3 i + j]`` = R_ij, variances ``s2`` and amplitude ``amp0``."""
    for n in range(count):
        k = start + n
        w, x, y, z = (
            float(quaternions[k, 0]),
            float(quaternions[k, 1]),
            float(quaternions[k, 2]),
            float(quaternions[k, 3]),
        )
        inv = 1.0 / max(math.sqrt(w * w + x * x + y * y + z * z), 1e-12)  # the reference's clamp
        w, x, y, z = w * inv, x * inv, y * inv, z * inv
        unit[0, n], unit[1, n], unit[2, n], unit[3, n], unit[4, n] = w, x, y, z, inv
        rot[0, n] = 1 - 2 * (y * y + z * z)
        rot[1, n] = 2 * (x * y - w * z)
        rot[2, n] = 2 * (x * z + w * y)
        rot[3, n] = 2 * (x * y + w * z)
        rot[4, n] = 1 - 2 * (x * x + z * z)
        rot[5, n] = 2 * (y * z - w * x)
        rot[6, n] = 2 * (x * z - w * y)
        rot[7, n] = 2 * (y * z + w * x)
        rot[8, n] = 1 - 2 * (x * x + y * y)
        s2[0, n] = exp(2.0 * float(log_scales[k, 0]))
        s2[1, n] = exp(2.0 * float(log_scales[k, 1]))
        s2[2, n] = exp(2.0 * float(log_scales[k, 2]))
        amp0[n] = exp(float(log_amplitudes[k]))


@jit
def _view_covariance(
    rot: np.ndarray, s2: np.ndarray, n: int, ax: float, ay: float, az: float, bx: float, by: float, bz: float
) -> tuple:  # pragma: no cover - compiled by numba
    """``R^T a``, ``R^T b`` (the view's pixel axes in the principal frame of block entry ``n``) and
    ``(a^T Sigma a, a^T Sigma b, b^T Sigma b)``."""
    ra0 = rot[0, n] * ax + rot[3, n] * ay + rot[6, n] * az
    ra1 = rot[1, n] * ax + rot[4, n] * ay + rot[7, n] * az
    ra2 = rot[2, n] * ax + rot[5, n] * ay + rot[8, n] * az
    rb0 = rot[0, n] * bx + rot[3, n] * by + rot[6, n] * bz
    rb1 = rot[1, n] * bx + rot[4, n] * by + rot[7, n] * bz
    rb2 = rot[2, n] * bx + rot[5, n] * by + rot[8, n] * bz
    sxx = s2[0, n] * ra0 * ra0 + s2[1, n] * ra1 * ra1 + s2[2, n] * ra2 * ra2
    sxy = s2[0, n] * ra0 * rb0 + s2[1, n] * ra1 * rb1 + s2[2, n] * ra2 * rb2
    syy = s2[0, n] * rb0 * rb0 + s2[1, n] * rb1 * rb1 + s2[2, n] * rb2 * rb2
    return (ra0, ra1, ra2), (rb0, rb1, rb2), sxx, sxy, syy


@kernel
def _forward(
    means: np.ndarray,
    log_scales: np.ndarray,
    quaternions: np.ndarray,
    log_amplitudes: np.ndarray,
    table: np.ndarray,
    eps: float,
    compensate: bool,
    worker: int,
    num_workers: int,
    means2d: np.ndarray,
    conics: np.ndarray,
    amps: np.ndarray,
    rects: np.ndarray,
) -> None:  # pragma: no cover - compiled by numba; covered through project_model
    """Project the blocks ``worker, worker + num_workers, ...`` of Gaussians into every view."""
    num_gaussians = means.shape[0]
    unit, rot, s2, amp0 = _block_scratch()
    scale_amplitudes = compensate and eps > 0
    for start in range(worker * _BLOCK, num_gaussians, num_workers * _BLOCK):
        count = min(_BLOCK, num_gaussians - start)
        _principal(quaternions, log_scales, log_amplitudes, start, count, unit, rot, s2, amp0)
        for v in range(table.shape[0]):
            ax, ay, az, bx, by, bz = table[v, 0], table[v, 1], table[v, 2], table[v, 3], table[v, 4], table[v, 5]
            ox, oy, oz, width, height = table[v, 6], table[v, 7], table[v, 8], table[v, 9], table[v, 10]
            for n in range(count):
                k = start + n
                cx, cy, cz = float(means[k, 0]) - ox, float(means[k, 1]) - oy, float(means[k, 2]) - oz
                mx = ax * cx + ay * cy + az * cz
                my = bx * cx + by * cy + bz * cz
                _, _, sxx_raw, sxy, syy_raw = _view_covariance(rot, s2, n, ax, ay, az, bx, by, bz)
                sxx, syy = sxx_raw + eps, syy_raw + eps
                det = sxx * syy - sxy * sxy
                inv = 1.0 / det if det > 0 else 1.0
                ca, cb, cc = syy * inv, -sxy * inv, sxx * inv
                ratio = min(max((sxx_raw * syy_raw - sxy * sxy) * inv, 0.0), 1.0)
                amp = amp0[n] * math.sqrt(ratio) if scale_amplitudes else amp0[n]
                means2d[v, k, 0] = mx
                means2d[v, k, 1] = my
                conics[v, k, 0] = ca
                conics[v, k, 1] = cb
                conics[v, k, 2] = cc
                amps[v, k] = amp
                # The reference's enumeration rectangle and culling (``project._rects``).
                extent_x = _CUTOFF_SIGMA * math.sqrt(max(sxx, 0.0))
                extent_y = _CUTOFF_SIGMA * math.sqrt(max(syy, 0.0))
                keep = (det > 0) & (amp > 0) & math.isfinite(amp) & math.isfinite(mx) & math.isfinite(my)
                keep = keep & math.isfinite(extent_x) & math.isfinite(extent_y)
                keep = keep & math.isfinite(ca) & math.isfinite(cb) & math.isfinite(cc)
                # Clamping to integers before rounding equals rounding then clamping, and keeps the casts in range.
                x0 = math.ceil(min(max(mx - extent_x, 0.0), width)) if keep else 1
                x1 = math.floor(min(max(mx + extent_x, -1.0), width - 1)) if keep else 0
                y0 = math.ceil(min(max(my - extent_y, 0.0), height)) if keep else 1
                y1 = math.floor(min(max(my + extent_y, -1.0), height - 1)) if keep else 0
                empty = (x0 > x1) | (y0 > y1)
                rects[v, k, 0] = 1 if empty else x0
                rects[v, k, 1] = 1 if empty else y0
                rects[v, k, 2] = 0 if empty else x1
                rects[v, k, 3] = 0 if empty else y1


@kernel
def _backward(
    means: np.ndarray,
    log_scales: np.ndarray,
    quaternions: np.ndarray,
    log_amplitudes: np.ndarray,
    table: np.ndarray,
    eps: float,
    compensate: bool,
    worker: int,
    num_workers: int,
    grad_means2d: np.ndarray,
    grad_conics: np.ndarray,
    grad_amps: np.ndarray,
    grad_means: np.ndarray,
    grad_log_scales: np.ndarray,
    grad_quaternions: np.ndarray,
    grad_log_amplitudes: np.ndarray,
) -> None:  # pragma: no cover - compiled by numba; covered through project_model
    """Parameter gradients of the blocks ``worker, worker + num_workers, ...`` (see the module docstring)."""
    num_gaussians = means.shape[0]
    unit, rot, s2, amp0 = _block_scratch()
    # Per Gaussian: P_00, P_01, P_02, P_11, P_12, P_22 (P = R^T dL/dSigma R), dL/dmu, dL/d log a.
    acc = np.empty((10, _BLOCK))
    scale_amplitudes = compensate and eps > 0
    for start in range(worker * _BLOCK, num_gaussians, num_workers * _BLOCK):
        count = min(_BLOCK, num_gaussians - start)
        _principal(quaternions, log_scales, log_amplitudes, start, count, unit, rot, s2, amp0)
        acc[:, :count] = 0.0
        for v in range(table.shape[0]):
            ax, ay, az, bx, by, bz = table[v, 0], table[v, 1], table[v, 2], table[v, 3], table[v, 4], table[v, 5]
            for n in range(count):
                k = start + n
                gmx, gmy = float(grad_means2d[v, k, 0]), float(grad_means2d[v, k, 1])
                ga, gb, gc = float(grad_conics[v, k, 0]), float(grad_conics[v, k, 1]), float(grad_conics[v, k, 2])
                g_amp = float(grad_amps[v, k])
                ra, rb, sxx_raw, sxy, syy_raw = _view_covariance(rot, s2, n, ax, ay, az, bx, by, bz)
                ra0, ra1, ra2 = ra
                rb0, rb1, rb2 = rb
                sxx, syy = sxx_raw + eps, syy_raw + eps
                det = sxx * syy - sxy * sxy
                positive = det > 0
                # conic_j = n_j / det with n = (syy, -sxy, sxx): d conic_j = dn_j / det - n_j ddet / det^2;
                # where det <= 0 the reference divides by a constant 1.
                inv = 1.0 / det if positive else 1.0
                shared = -(ga * syy - gb * sxy + gc * sxx) * inv * inv if positive else 0.0
                g_xx = gc * inv + shared * syy
                g_yy = ga * inv + shared * sxx
                g_xy = -gb * inv - 2.0 * shared * sxy
                # Compensation: amp = a0 sqrt(ratio), ratio = det_raw / det clamped to [0, 1] (inv moves only if det > 0).
                ratio = (sxx_raw * syy_raw - sxy * sxy) * inv
                root = math.sqrt(min(max(ratio, 0.0), 1.0))
                live = scale_amplitudes & (ratio > 0.0) & (ratio <= 1.0)
                g_ratio = g_amp * amp0[n] * 0.5 / root if live else 0.0
                scaled = ratio * inv if positive else 0.0
                g_xx += g_ratio * (syy_raw * inv - scaled * syy)
                g_yy += g_ratio * (sxx_raw * inv - scaled * sxx)
                g_xy += g_ratio * 2.0 * sxy * (scaled - inv)
                h = 0.5 * g_xy
                acc[0, n] += g_xx * ra0 * ra0 + g_yy * rb0 * rb0 + g_xy * ra0 * rb0
                acc[1, n] += g_xx * ra0 * ra1 + g_yy * rb0 * rb1 + h * (ra0 * rb1 + rb0 * ra1)
                acc[2, n] += g_xx * ra0 * ra2 + g_yy * rb0 * rb2 + h * (ra0 * rb2 + rb0 * ra2)
                acc[3, n] += g_xx * ra1 * ra1 + g_yy * rb1 * rb1 + g_xy * ra1 * rb1
                acc[4, n] += g_xx * ra1 * ra2 + g_yy * rb1 * rb2 + h * (ra1 * rb2 + rb1 * ra2)
                acc[5, n] += g_xx * ra2 * ra2 + g_yy * rb2 * rb2 + g_xy * ra2 * rb2
                acc[6, n] += gmx * ax + gmy * bx
                acc[7, n] += gmx * ay + gmy * by
                acc[8, n] += gmx * az + gmy * bz
                acc[9, n] += g_amp * (amp0[n] * root if scale_amplitudes else amp0[n])
        for n in range(count):
            k = start + n
            grad_means[k, 0], grad_means[k, 1], grad_means[k, 2] = acc[6, n], acc[7, n], acc[8, n]
            grad_log_amplitudes[k] = acc[9, n]
            p00, p01, p02, p11, p12, p22 = acc[0, n], acc[1, n], acc[2, n], acc[3, n], acc[4, n], acc[5, n]
            d0, d1, d2 = s2[0, n], s2[1, n], s2[2, n]
            grad_log_scales[k, 0] = 2.0 * d0 * p00
            grad_log_scales[k, 1] = 2.0 * d1 * p11
            grad_log_scales[k, 2] = 2.0 * d2 * p22
            # G = dL/dR = 2 R P diag(s^2).
            r00, r01, r02, r10, r11, r12, r20, r21, r22 = (
                rot[0, n],
                rot[1, n],
                rot[2, n],
                rot[3, n],
                rot[4, n],
                rot[5, n],
                rot[6, n],
                rot[7, n],
                rot[8, n],
            )
            g00 = 2.0 * (r00 * p00 + r01 * p01 + r02 * p02) * d0
            g01 = 2.0 * (r00 * p01 + r01 * p11 + r02 * p12) * d1
            g02 = 2.0 * (r00 * p02 + r01 * p12 + r02 * p22) * d2
            g10 = 2.0 * (r10 * p00 + r11 * p01 + r12 * p02) * d0
            g11 = 2.0 * (r10 * p01 + r11 * p11 + r12 * p12) * d1
            g12 = 2.0 * (r10 * p02 + r11 * p12 + r12 * p22) * d2
            g20 = 2.0 * (r20 * p00 + r21 * p01 + r22 * p02) * d0
            g21 = 2.0 * (r20 * p01 + r21 * p11 + r22 * p12) * d1
            g22 = 2.0 * (r20 * p02 + r21 * p12 + r22 * p22) * d2
            w, x, y, z, inv = unit[0, n], unit[1, n], unit[2, n], unit[3, n], unit[4, n]
            gw = 2 * (-z * g01 + y * g02 + z * g10 - x * g12 - y * g20 + x * g21)
            gx = 2 * (y * g01 + z * g02 + y * g10 - 2 * x * g11 - w * g12 + z * g20 + w * g21 - 2 * x * g22)
            gy = 2 * (-2 * y * g00 + x * g01 + w * g02 + x * g10 + z * g12 - w * g20 + z * g21 - 2 * y * g22)
            gz = 2 * (-2 * z * g00 - w * g01 + x * g02 + w * g10 - 2 * z * g11 + y * g12 + x * g20 + y * g21)
            # q_hat = q / |q|: dL/dq = (g_hat - q_hat (q_hat . g_hat)) / |q|; the clamp of |q| at 1e-12
            # (inv = 1e12) passes no norm gradient.
            radial = (w * gw + x * gx + y * gy + z * gz) if inv < 1e12 else 0.0
            grad_quaternions[k, 0] = (gw - w * radial) * inv
            grad_quaternions[k, 1] = (gx - x * radial) * inv
            grad_quaternions[k, 2] = (gy - y * radial) * inv
            grad_quaternions[k, 3] = (gz - z * radial) * inv


# --------------------------------------------------------------------------- torch glue


class _Project(torch.autograd.Function):
    """(means2d, conics, amplitudes, rects) of every (view, Gaussian) pair from the model's parameters."""

    @staticmethod
    def forward(
        ctx: Any,
        means: torch.Tensor,
        log_scales: torch.Tensor,
        quaternions: torch.Tensor,
        log_amplitudes: torch.Tensor,
        table: np.ndarray,
        eps: float,
        compensate: bool,
    ) -> tuple[torch.Tensor, ...]:
        num_views, num_gaussians, dtype = table.shape[0], means.shape[0], means.dtype
        means2d = torch.empty(num_views, num_gaussians, 2, dtype=dtype)
        conics = torch.empty(num_views, num_gaussians, 3, dtype=dtype)
        amps = torch.empty(num_views, num_gaussians, dtype=dtype)
        rects = torch.empty(num_views, num_gaussians, 4, dtype=torch.int32)
        inputs = tuple(numpy_view(t) for t in (means, log_scales, quaternions, log_amplitudes))
        outputs = (means2d.numpy(), conics.numpy(), amps.numpy(), rects.numpy())
        run_parallel(_forward, (*inputs, table, eps, compensate), outputs, _blocks(num_gaussians), _MIN_BLOCKS)
        ctx.mark_non_differentiable(rects)
        ctx.save_for_backward(means, log_scales, quaternions, log_amplitudes)
        ctx.settings = (table, eps, compensate)
        return means2d, conics, amps, rects

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: Any,
        grad_means2d: torch.Tensor | None,
        grad_conics: torch.Tensor | None,
        grad_amps: torch.Tensor | None,
        _grad_rects: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        params = ctx.saved_tensors
        table, eps, compensate = ctx.settings
        dtype, num_views, num_gaussians = params[0].dtype, table.shape[0], params[0].shape[0]
        upstream = []
        for grad, shape in ((grad_means2d, (num_views, num_gaussians, 2)), (grad_conics, (num_views, num_gaussians, 3)),
                            (grad_amps, (num_views, num_gaussians))):  # fmt: skip
            upstream.append(numpy_view(grad.to(dtype) if grad is not None else torch.zeros(shape, dtype=dtype)))
        grads = tuple(torch.empty(p.shape, dtype=dtype) for p in params)
        before = (*(numpy_view(p) for p in params), table, eps, compensate)
        run_parallel(_backward, before, (*upstream, *(g.numpy() for g in grads)), _blocks(num_gaussians), _MIN_BLOCKS)
        return (*grads, None, None, None)


def project_model(model: GaussianModel, views: list[View], eps: float, compensate: bool = False) -> Projection:
    """Project a model in the physical frame into every view (differentiable w.r.t. its four parameters).

    Parameters
    ----------
    model
        Gaussians in the physical frame, CPU tensors (float32 or float64; other
        floating dtypes are computed in float32).
    views
        Views in the physical frame.
    eps
        Pixel filter, px^2 (>= 0).
    compensate
        Scale amplitudes so that filtered sub-pixel Gaussians keep their integral.
    """
    if IMPORT_ERROR is not None:
        raise RuntimeError(IMPORT_ERROR)
    if eps < 0:
        raise ValueError(f"pixel filter eps must be >= 0, got {eps}")
    if model.means.device.type != "cpu":
        raise ValueError(f"the cpu backend projects CPU tensors, not {model.means.device}")
    dtype = model.means.dtype if model.means.dtype in (torch.float32, torch.float64) else torch.float32
    params = (t.to(dtype) for t in (model.means, model.log_scales, model.quaternions, model.log_amplitudes))
    means2d, conics, amps, rects = _Project.apply(*params, _view_table(tuple(views)), float(eps), bool(compensate))
    return Projection(means2d, conics, amps, rects, [view.shape for view in views])
