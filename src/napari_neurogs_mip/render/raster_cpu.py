"""Fast CPU rasteriser: numba kernels, SIMD over 16-pixel rows, threads over tiles and Gaussians.

Same math and cut-off as the reference (``raster_torch.py``): pixel ``p`` receives
Gaussian ``k`` of a view when ``p`` lies in ``k``'s rectangle and
``q = A dx^2 + 2 B dx dy + C dy^2 <= CUTOFF_SIGMA^2``, evaluated in the same
order and precision as the reference so both include the same pixels;
``g = a exp(-q / 2)``.

Layout
    Each view is processed in a *kernel layout*: rows of ``LANES`` (16) pixels
    that LLVM vectorises (AVX2 / AVX-512).  A view whose footprints are mostly
    taller than wide (e.g. ``xz`` at 128 x 128 of a 100 x 647 x 813 stack: 6.4 x
    0.8 voxel pixels) is stored transposed, so that the long axis of the
    footprints runs along the lanes.  Row strides are padded so that 16 lanes
    starting at any pixel of a row stay in memory; lanes outside a footprint
    are masked, never branched on.
Forward
    Gaussians are binned by (view, tile); each tile is rendered by one worker
    (no atomics) in two passes over its Gaussians: (1) the per-pixel maximum
    ``m`` in the log domain (``log a - q / 2``: no exponential), then (2)
    ``S = sum exp(beta (g - m))`` and ``W = sum g exp(beta (g - m))``;
    ``out = W / S``.  Knowing the maximum first removes the running rescale and
    its unpredictable branch.  Hard MIP is pass (1) plus the index of the
    maximising Gaussian.
Backward
    Workers over Gaussians: each (view, Gaussian) walks its own rectangle and
    reads ``dL/dout``, ``out``, ``m`` and ``1 / S`` of its pixels, so every
    gradient is written by exactly one worker (no atomics, deterministic).
    ``d out / d g = s (1 + beta (g - out))`` with ``s = exp(beta (g - m)) / S``.

Exponentials are ``numba_runtime.exp``: inline polynomials that vectorise.
Memory is O(pixels + (Gaussian, tile) intersections); nothing is stored per
(pixel, Gaussian) pair.  A culled pair's rectangle is empty, so every loop over
it is empty too.

Threads: the kernels release the GIL and run on the pool of
``numba_runtime.run_parallel``.
Kernels are compiled once per dtype (float32 for training, float64 for tests)
and cached on disk (``cache=True``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..numba_runtime import IMPORT_ERROR, exp, jit, kernel, numpy_view, run_parallel
from .project import CUTOFF_SIGMA, DEFAULT_BETA, Projection
from .raster_torch import MODES, pixel_offsets, split_views

LANES = 16
"""Pixels per vector row, and the tile size along the lane axis."""
TILE_ROWS = 16
"""Rows per tile (forward pass)."""
ORIENTATION = "auto"
"""Kernel layout of each view: ``auto`` (fewest vector rows), ``rows`` or ``columns`` (transposed); for tests."""

_CUTOFF = CUTOFF_SIGMA**2
_LANE_SHIFT = LANES.bit_length() - 1
_ROW_SHIFT = TILE_ROWS.bit_length() - 1
assert 1 << _LANE_SHIFT == LANES and 1 << _ROW_SHIFT == TILE_ROWS, "tile sides must be powers of two"

# Per-view layout columns (int64 array [V, _NUM_LAYOUT]).
_H, _W, _IMAGE_OFFSET, _TRANSPOSED, _ROWS, _LEN, _STRIDE, _OFFSET, _TILES_L, _TILES_R, _TILE_OFFSET = range(11)
_NUM_LAYOUT = 11


def unavailable_reason() -> str | None:
    """Why this backend cannot run here, or ``None``."""
    return IMPORT_ERROR


# --------------------------------------------------------------------------- kernels


@jit
def _orientation_costs(rects: np.ndarray, v: int) -> tuple[int, int]:
    """Vector rows the footprints of view ``v`` need in row layout and in transposed layout."""
    plain = 0
    flipped = 0
    for k in range(rects.shape[1]):
        x0, y0, x1, y1 = rects[v, k, 0], rects[v, k, 1], rects[v, k, 2], rects[v, k, 3]
        if x0 > x1 or y0 > y1:
            continue
        plain += (x1 // LANES - x0 // LANES + 1) * (y1 - y0 + 1)
        flipped += (y1 // LANES - y0 // LANES + 1) * (x1 - x0 + 1)
    return plain, flipped


@jit
def _bin(rects: np.ndarray, layout: np.ndarray, num_tiles: int) -> tuple[np.ndarray, np.ndarray]:
    """Bin (view, Gaussian) pairs by the kernel-layout tiles their rectangles touch.

    Returns ``starts`` [T + 1] and ``items`` (Gaussian indices): tile ``t`` holds
    ``items[starts[t]:starts[t + 1]]`` in increasing Gaussian order.
    """
    num_views, num_gaussians = rects.shape[0], rects.shape[1]
    counts = np.zeros(num_tiles + 1, np.int64)
    for sweep in range(2):
        if sweep == 1:
            starts = np.cumsum(counts)
            fill = starts[:-1].copy()
            items = np.empty(starts[-1], np.int32)
        for v in range(num_views):
            transposed, tiles_l, tile_offset = layout[v, _TRANSPOSED], layout[v, _TILES_L], layout[v, _TILE_OFFSET]
            for k in range(num_gaussians):
                x0, y0, x1, y1 = rects[v, k, 0], rects[v, k, 1], rects[v, k, 2], rects[v, k, 3]
                if x0 > x1 or y0 > y1:
                    continue
                l0, l1, r0, r1 = (y0, y1, x0, x1) if transposed else (x0, x1, y0, y1)
                # Bounds are >= 0, so shifts are the floor divisions by the (power-of-two) tile sides.
                for tr in range(r0 >> _ROW_SHIFT, (r1 >> _ROW_SHIFT) + 1):
                    for tl in range(l0 >> _LANE_SHIFT, (l1 >> _LANE_SHIFT) + 1):
                        t = tile_offset + tr * tiles_l + tl
                        if sweep == 0:
                            counts[t + 1] += 1
                        else:
                            items[fill[t]] = k
                            fill[t] += 1
    return starts, items


@jit
def _pair(
    means2d: np.ndarray, conics: np.ndarray, rects: np.ndarray, v: int, k: int, transposed: bool
) -> tuple:  # pragma: no cover - compiled by numba
    """Centre, conic ``(A, 2 B, C)`` and rectangle of pair (v, k), the rectangle as kernel-layout
    ``(lane first, lane last, row first, row last)``."""
    # 2 B as B + B: the reference's 2 * B, without promoting float32 to float64.
    cb2 = conics[v, k, 1] + conics[v, k, 1]
    if transposed:
        l0, l1, r0, r1 = rects[v, k, 1], rects[v, k, 3], rects[v, k, 0], rects[v, k, 2]
    else:
        l0, l1, r0, r1 = rects[v, k, 0], rects[v, k, 2], rects[v, k, 1], rects[v, k, 3]
    return means2d[v, k, 0], means2d[v, k, 1], conics[v, k, 0], cb2, conics[v, k, 2], l0, l1, r0, r1


@jit
def _offset(
    fixed: float, lane_coord: float, mx: float, my: float, ca: float, cb2: float, cc: float, transposed: bool
) -> tuple:  # pragma: no cover - compiled by numba
    """``(dx, dy, q)`` of a pixel from its row and lane coordinates: ``q = A dx^2 + 2 B dx dy + C dy^2``,
    evaluated in the reference's order (so both include the same pixels)."""
    if transposed:
        dx = fixed - mx
        dy = lane_coord - my
    else:
        dx = lane_coord - mx
        dy = fixed - my
    return dx, dy, ca * dx * dx + cb2 * dx * dy + cc * dy * dy


@kernel
def _forward(
    means2d: np.ndarray,
    conics: np.ndarray,
    amps: np.ndarray,
    rects: np.ndarray,
    layout: np.ndarray,
    tile_view: np.ndarray,
    starts: np.ndarray,
    items: np.ndarray,
    coords: np.ndarray,
    soft: bool,
    beta: float,
    half: float,
    cutoff: float,
    worker: int,
    num_workers: int,
    image: np.ndarray,
    out_k: np.ndarray,
    peak_k: np.ndarray,
    inv_norm_k: np.ndarray,
    argmax_k: np.ndarray,
) -> None:
    """Render the tiles ``worker, worker + num_workers, ...``.

    Writes ``image`` (row-major views) and, in kernel layout, what the backward
    pass reads: ``out_k`` and (soft) ``peak_k`` = m, ``inv_norm_k`` = 1 / S, or
    (hard) ``argmax_k`` (-1 where no Gaussian reaches).  ``beta``, ``half`` and
    ``cutoff`` carry the image dtype so that float32 stays float32.
    """
    num_tiles = tile_view.shape[0]
    zero = half - half
    one = half + half
    lowest = -np.inf * one
    # Tile-local state, row-major [TILE_ROWS, LANES]: stays in L1; the lane loops below vectorise over it.
    best = np.empty(TILE_ROWS * LANES, image.dtype)
    norm = np.empty(TILE_ROWS * LANES, image.dtype)
    weighted = np.empty(TILE_ROWS * LANES, image.dtype)
    arg = np.empty(TILE_ROWS * LANES, np.int32)
    # Neighbouring tiles cost about the same, so striding gives every worker a fair share of every view.
    for t in range(worker, num_tiles, num_workers):
        v = tile_view[t]
        transposed = layout[v, _TRANSPOSED] != 0
        local = t - layout[v, _TILE_OFFSET]
        tiles_l = layout[v, _TILES_L]
        lane0 = (local % tiles_l) * LANES
        row0 = (local // tiles_l) * TILE_ROWS
        num_rows = min(TILE_ROWS, layout[v, _ROWS] - row0)
        u0 = np.uint64(lane0)
        best[:] = lowest
        norm[:] = zero
        weighted[:] = zero
        arg[:] = -1
        # Pass 1: per-pixel maximum of log g = log a - q / 2, and the Gaussian that reaches it.
        for j in range(starts[t], starts[t + 1]):
            k = items[j]
            mx, my, ca, cb2, cc, l0, l1, r0, r1 = _pair(means2d, conics, rects, v, k, transposed)
            log_amp = np.log(amps[v, k])
            lo, hi = l0 - lane0, l1 - lane0
            for r in range(max(r0, row0), min(r1, row0 + num_rows - 1) + 1):
                fixed = coords[r]
                row = np.uint64((r - row0) * LANES)
                for lane in range(LANES):
                    ul = np.uint64(lane)
                    _, _, q = _offset(fixed, coords[u0 + ul], mx, my, ca, cb2, cc, transposed)
                    value = log_amp - half * q
                    i = row + ul
                    better = (lane >= lo) & (lane <= hi) & (q <= cutoff) & (value > best[i])
                    best[i] = value if better else best[i]
                    arg[i] = k if better else arg[i]
        for i in range(num_rows * LANES):
            best[i] = exp(best[i])
        if soft:
            # Pass 2: softmax sums, the maximum known (no rescaling).
            for j in range(starts[t], starts[t + 1]):
                k = items[j]
                mx, my, ca, cb2, cc, l0, l1, r0, r1 = _pair(means2d, conics, rects, v, k, transposed)
                amp = amps[v, k]
                lo, hi = l0 - lane0, l1 - lane0
                for r in range(max(r0, row0), min(r1, row0 + num_rows - 1) + 1):
                    fixed = coords[r]
                    row = np.uint64((r - row0) * LANES)
                    for lane in range(LANES):
                        ul = np.uint64(lane)
                        _, _, q = _offset(fixed, coords[u0 + ul], mx, my, ca, cb2, cc, transposed)
                        # Masked lanes compute with q clamped to the cut-off: their values are discarded,
                        # and the clamp keeps them out of (very slow) subnormal arithmetic.
                        g = amp * exp(-half * min(q, cutoff))
                        i = row + ul
                        e = exp(beta * (g - best[i]))
                        e = e if (lane >= lo) & (lane <= hi) & (q <= cutoff) else zero
                        norm[i] += e
                        weighted[i] += g * e
        # Write back: kernel layout for the backward pass, row-major image for the caller.
        width, image_offset = layout[v, _W], layout[v, _IMAGE_OFFSET]
        stride, offset = layout[v, _STRIDE], layout[v, _OFFSET]
        lanes = min(LANES, layout[v, _LEN] - lane0)
        last_tile = lane0 + LANES == tiles_l * LANES
        for r in range(num_rows):
            base = np.uint64(offset + (row0 + r) * stride + lane0)
            row = np.uint64(r * LANES)
            for lane in range(LANES):
                ul = np.uint64(lane)
                i = row + ul
                p = base + ul
                if soft:
                    s = norm[i]
                    covered = s > zero
                    weighted[i] = weighted[i] / s if covered else zero
                    peak_k[p] = best[i]
                    inv_norm_k[p] = one / s if covered else zero
                else:
                    weighted[i] = best[i] if arg[i] >= 0 else zero
                    argmax_k[p] = arg[i]
                out_k[p] = weighted[i]
                if last_tile:
                    # The last tile of a row also clears the row's padding, which the backward pass reads (masked).
                    pad = p + np.uint64(LANES)
                    out_k[pad] = zero
                    if soft:
                        peak_k[pad] = zero
                        inv_norm_k[pad] = zero
                    else:
                        argmax_k[pad] = -1
            if transposed:
                for lane in range(lanes):
                    image[image_offset + (lane0 + lane) * width + row0 + r] = weighted[row + np.uint64(lane)]
            else:
                target = np.uint64(image_offset + (row0 + r) * width + lane0)
                for lane in range(lanes):
                    image[target + np.uint64(lane)] = weighted[row + np.uint64(lane)]


@jit
def _to_kernel_layout(flat: np.ndarray, layout: np.ndarray, total: int) -> np.ndarray:
    """Copy a flat row-major buffer of all views into kernel layout (zero padding)."""
    result = np.empty(total, flat.dtype)
    for v in range(layout.shape[0]):
        height, width, image_offset = layout[v, _H], layout[v, _W], layout[v, _IMAGE_OFFSET]
        stride, offset, rows, length = layout[v, _STRIDE], layout[v, _OFFSET], layout[v, _ROWS], layout[v, _LEN]
        for r in range(rows):
            result[offset + r * stride + length : offset + (r + 1) * stride] = 0
        if layout[v, _TRANSPOSED] != 0:
            for y in range(height):
                for x in range(width):
                    result[offset + x * stride + y] = flat[image_offset + y * width + x]
        else:
            for y in range(height):
                result[offset + y * stride : offset + y * stride + width] = flat[
                    image_offset + y * width : image_offset + (y + 1) * width
                ]
    return result


@kernel
def _backward(
    means2d: np.ndarray,
    conics: np.ndarray,
    amps: np.ndarray,
    rects: np.ndarray,
    layout: np.ndarray,
    coords: np.ndarray,
    soft: bool,
    beta: float,
    half: float,
    cutoff: float,
    worker: int,
    num_workers: int,
    grad_k: np.ndarray,
    out_k: np.ndarray,
    peak_k: np.ndarray,
    inv_norm_k: np.ndarray,
    argmax_k: np.ndarray,
    grad_means: np.ndarray,
    grad_conics: np.ndarray,
    grad_amps: np.ndarray,
) -> None:
    """Gradients of Gaussians ``worker, worker + num_workers, ...`` in every view.

    ``d g / d a = exp(-q / 2)`` and ``d g / d q = -g / 2``; ``q`` is linear in
    ``(A, B, C)`` and quadratic in ``(dx, dy) = pixel - mean``.  Lane-wise
    partial sums are reduced in float64.
    """
    num_views, num_gaussians = amps.shape
    zero = half - half
    one = half + half
    # Lane-wise partial sums of dg exp(-q/2), dq dx, dq dy, dq dx^2, dq dx dy, dq dy^2.
    acc = np.empty((6, LANES), grad_k.dtype)
    for k in range(worker, num_gaussians, num_workers):
        for v in range(num_views):
            transposed = layout[v, _TRANSPOSED] != 0
            stride, offset = layout[v, _STRIDE], layout[v, _OFFSET]
            mx, my, ca, cb2, cc, l0, l1, r0, r1 = _pair(means2d, conics, rects, v, k, transposed)
            cb = conics[v, k, 1]
            amp = amps[v, k]
            acc[:] = zero
            for r in range(r0, r1 + 1):
                fixed = coords[r]
                base = offset + r * stride
                for c0 in range(l0, l1 + 1, LANES):
                    p0 = np.uint64(base + c0)
                    cu = np.uint64(c0)
                    last = l1 - c0
                    for lane in range(LANES):
                        ul = np.uint64(lane)
                        dx, dy, q = _offset(fixed, coords[cu + ul], mx, my, ca, cb2, cc, transposed)
                        e = exp(-half * min(q, cutoff))  # clamped as in ``_forward``: no subnormals
                        g = amp * e
                        inside = (lane <= last) & (q <= cutoff)
                        p = p0 + ul
                        if soft:
                            s = exp(beta * (g - peak_k[p])) * inv_norm_k[p]
                            dg = grad_k[p] * s * (one + beta * (g - out_k[p]))
                        else:
                            inside = inside & (argmax_k[p] == k)
                            dg = grad_k[p]
                        dg = dg if inside else zero
                        dq = -half * dg * g
                        acc[0, ul] += dg * e
                        acc[1, ul] += dq * dx
                        acc[2, ul] += dq * dy
                        acc[3, ul] += dq * dx * dx
                        acc[4, ul] += dq * dx * dy
                        acc[5, ul] += dq * dy * dy
            s_a = s_x = s_y = s_xx = s_xy = s_yy = 0.0
            for lane in range(LANES):
                s_a += float(acc[0, lane])
                s_x += float(acc[1, lane])
                s_y += float(acc[2, lane])
                s_xx += float(acc[3, lane])
                s_xy += float(acc[4, lane])
                s_yy += float(acc[5, lane])
            fa, fb, fc = float(ca), float(cb), float(cc)
            grad_amps[v, k] = s_a
            grad_conics[v, k, 0] = s_xx
            grad_conics[v, k, 1] = 2 * s_xy
            grad_conics[v, k, 2] = s_yy
            # d q / d mean = -(d q / d dx, d q / d dy) = -2 (A dx + B dy, B dx + C dy).
            grad_means[v, k, 0] = -2 * (fa * s_x + fb * s_y)
            grad_means[v, k, 1] = -2 * (fb * s_x + fc * s_y)


# --------------------------------------------------------------------------- torch glue


def _layout(shapes: list[tuple[int, int]], rects: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-view layout rows (columns ``_H`` ... ``_TILE_OFFSET``), the view of every tile, kernel-layout size."""
    offsets = pixel_offsets(shapes)
    layout = np.zeros((len(shapes), _NUM_LAYOUT), np.int64)
    tile_views: list[np.ndarray] = []
    tile_offset = kernel_offset = 0
    for v, (height, width) in enumerate(shapes):
        if ORIENTATION == "auto":
            plain, flipped = _orientation_costs(rects, v)
            transposed = flipped < plain
        else:
            transposed = ORIENTATION == "columns"
        rows, length = (width, height) if transposed else (height, width)
        # Pad rows so that LANES lanes starting at any pixel of a row stay inside the buffer.
        stride = -(-length // LANES) * LANES + LANES
        tiles_l, tiles_r = -(-length // LANES), -(-rows // TILE_ROWS)
        layout[v] = (
            height, width, offsets[v], int(transposed), rows, length, stride, kernel_offset, tiles_l, tiles_r,
            tile_offset,
        )  # fmt: skip
        tile_views.append(np.full(tiles_l * tiles_r, v, np.int32))
        tile_offset += tiles_l * tiles_r
        kernel_offset += rows * stride
    return layout, np.concatenate(tile_views), kernel_offset


def _scalars(dtype: torch.dtype, beta: float) -> tuple:
    """``beta``, 1/2 and the cut-off as numpy scalars of the image dtype (keeps float32 kernels in float32)."""
    scalar = np.float32 if dtype == torch.float32 else np.float64
    return scalar(beta), scalar(0.5), scalar(_CUTOFF)


class _Rasterize(torch.autograd.Function):
    """Flat buffer of all views' pixels from (means2d, conics, amplitudes)."""

    @staticmethod
    def forward(
        ctx: Any,
        means2d: torch.Tensor,
        conics: torch.Tensor,
        amplitudes: torch.Tensor,
        rects: torch.Tensor,
        shapes: list[tuple[int, int]],
        mode: str,
        beta: float,
    ) -> torch.Tensor:
        dtype = means2d.dtype
        np_dtype = np.float32 if dtype == torch.float32 else np.float64
        rects_np = numpy_view(rects.to(torch.int32))
        layout, tile_view, total_k = _layout(shapes, rects_np)
        starts, items = _bin(rects_np, layout, len(tile_view))
        # Pixel coordinates along both kernel axes: lanes (up to the padded stride) and rows (which, in a
        # transposed layout, run along the image's width and can exceed the stride).
        coords = np.arange(int(max(layout[:, _STRIDE].max(), layout[:, _ROWS].max())) + LANES, dtype=np_dtype)
        soft = mode == "soft"
        image = torch.empty(pixel_offsets(shapes)[-1], dtype=dtype)
        # Every element, padding included, is written by ``_forward``.
        out_k = np.empty(total_k, np_dtype)
        peak_k = np.empty(total_k if soft else 0, np_dtype)
        inv_norm_k = np.empty(total_k if soft else 0, np_dtype)
        argmax_k = np.empty(0 if soft else total_k, np.int32)
        before = (
            numpy_view(means2d), numpy_view(conics), numpy_view(amplitudes), rects_np, layout, tile_view, starts, items, coords,
            soft, *_scalars(dtype, beta),
        )  # fmt: skip
        run_parallel(_forward, before, (image.numpy(), out_k, peak_k, inv_norm_k, argmax_k), len(tile_view))
        ctx.save_for_backward(means2d, conics, amplitudes)
        ctx.arrays = (rects_np, layout, coords, out_k, peak_k, inv_norm_k, argmax_k)
        ctx.soft, ctx.beta = soft, beta
        return image

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_image: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        means2d, conics, amplitudes = ctx.saved_tensors
        rects_np, layout, coords, out_k, peak_k, inv_norm_k, argmax_k = ctx.arrays
        dtype = means2d.dtype
        grad_k = _to_kernel_layout(numpy_view(grad_image.to(dtype)), layout, out_k.shape[0])
        grads = tuple(torch.empty(t.shape, dtype=dtype) for t in (means2d, conics, amplitudes))
        before = (
            numpy_view(means2d), numpy_view(conics), numpy_view(amplitudes), rects_np, layout, coords, ctx.soft,
            *_scalars(dtype, ctx.beta),
        )  # fmt: skip
        after = (grad_k, out_k, peak_k, inv_norm_k, argmax_k, *(g.numpy() for g in grads))
        run_parallel(_backward, before, after, means2d.shape[1])
        return (*grads, None, None, None, None)


def rasterize(projection: Projection, mode: str = "soft", beta: float = DEFAULT_BETA) -> list[torch.Tensor]:
    """Render every view of ``projection`` on the CPU; returns one [H, W] image per view.

    Differentiable w.r.t. ``projection.means2d``, ``conics`` and ``amplitudes``
    (float32 or float64; other dtypes are computed in float32).
    """
    if mode not in MODES:
        raise ValueError(f"unknown render mode {mode!r}; expected one of {MODES}")
    if IMPORT_ERROR is not None:
        raise RuntimeError(IMPORT_ERROR)
    means2d = projection.means2d
    if means2d.device.type != "cpu":
        raise ValueError(f"the cpu backend renders CPU tensors, not {means2d.device}")
    dtype = means2d.dtype if means2d.dtype in (torch.float32, torch.float64) else torch.float32
    shapes = [(int(h), int(w)) for h, w in projection.shapes]
    means2d = means2d.to(dtype)
    conics = projection.conics.to(dtype)
    amplitudes = projection.amplitudes.to(dtype)
    if means2d.shape[1] == 0:
        zeros = torch.zeros(pixel_offsets(shapes)[-1], dtype=dtype)
        # Keep the graph connected so that callers can always backpropagate.
        zeros = zeros + 0 * (means2d.sum() + conics.sum() + amplitudes.sum())
        return split_views(zeros, shapes)
    flat = _Rasterize.apply(means2d, conics, amplitudes, projection.rects, shapes, mode, float(beta))
    return split_views(flat, shapes)
