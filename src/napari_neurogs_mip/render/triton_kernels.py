"""Triton kernels of the tile-binned MIP rasteriser (see ``raster_triton.py`` for the pipeline).

The kernels use only ``tl.exp``, plain arithmetic, loads, stores, sum/max
reductions and atomics (no libdevice, no inline assembly), so they also run in
the Triton CPU interpreter.  ``triton.jit`` picks compiled or interpreted when
this module is imported, from ``TRITON_INTERPRET``; ``raster_triton.kernels()``
re-imports it when that variable has changed since.  Reductions go through the
``_sum`` / ``_max`` aliases so that interpreted kernels work even when triton
itself was first imported without the interpreter.

Data layouts shared with ``raster_triton.py``:

* ``params`` [N, 10] float32 per (view, Gaussian) pair ``n = view * K + k``:
  ``(mx, my, A, B, C, amplitude, x0, y0, x1, y1)``; the inclusive rectangle is
  stored as floats (exact: image sizes are far below 2**24).
* ``grad_params`` [N, 6] float32: gradients of the first six columns.
* ``rects`` [N, 4] int32 ``(x0, y0, x1, y1)``, culled when ``x0 > x1`` or ``y0 > y1``.
* ``view_info`` [V, 4] int32 ``(width, height, tiles_x, first_tile)``.
* ``tile_info`` [T, 5] int32 ``(x0, y0, width, height, pixel_offset)`` of each
  tile: pixel origin of the tile, size and flat offset of its view.
* ``ranges`` [T + 1] int64: tile ``t`` owns ``ids[ranges[t]:ranges[t + 1]]``, in
  descending amplitude when early termination is on (``raster_triton.bin_gaussians``).
* ``visited`` [T] int32: entries of each tile the forward kernel evaluated
  before it stopped (early termination); the backward kernel evaluates the same.

:func:`kernel_specs` lists every kernel with its compile signature so that the
ahead-of-time compile test and the launches cannot drift apart.
"""

# Triton spells compile-time constants (tl.constexpr arguments) in upper case.
# ruff: noqa: N803

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

SOFT = 0
"""``MODE`` constexpr of the soft MIP (online softmax)."""
HARD = 1
"""``MODE`` constexpr of the hard MIP (max + arg-max)."""
MODE_CODES = {"soft": SOFT, "max": HARD}

PARAM_COLUMNS = 10
"""Columns of the packed per-pair parameter array (literal ``10`` in the kernels)."""
GRAD_COLUMNS = 6
"""Columns of the packed per-pair gradient array (literal ``6`` in the kernels)."""

TILE = 8
"""Default tile side in pixels (power of two)."""
BATCH = 32
"""Default number of Gaussians evaluated together per tile iteration (power of two)."""
BLOCK = 256
"""Pairs per program of the binning kernels."""


def interpret_requested() -> bool:
    """Whether ``triton.jit`` decorates for the interpreter now (triton's own reading of ``TRITON_INTERPRET``)."""
    knobs = getattr(triton, "knobs", None)  # triton >= 3.3
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpretable(function: Any) -> Any:
    """``function`` (one of triton.language's own ``@jit`` helpers), callable from this module's kernels.

    ``tl.sum`` and ``tl.max`` are ``@jit`` functions decorated when triton is
    first imported: if that happened without ``TRITON_INTERPRET=1`` they are
    compiled-only and an interpreted kernel cannot call them.  Wrapping their
    Python source in an interpreted function is what triton itself does when
    imported under the interpreter (their reductions keep the fast NumPy path).
    """
    if interpret_requested() and isinstance(function, JITFunction):
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(function.fn)
    return function


# The kernels reduce through these aliases, never through tl.sum / tl.max / tl.min directly.
_sum = _interpretable(tl.sum)
_max = _interpretable(tl.max)
_min = _interpretable(tl.min)


@triton.jit
def _tile_bounds(rects_ptr, view_info_ptr, pair, valid, num_gaussians, TILE: tl.constexpr):
    """Tile rectangle touched by each pair: first tile (tx0, ty0), width in tiles, tile count, view tiling."""
    view = pair // num_gaussians
    # Dead lanes read an empty rectangle so that they count zero tiles.
    x0 = tl.load(rects_ptr + pair * 4 + 0, mask=valid, other=1)
    y0 = tl.load(rects_ptr + pair * 4 + 1, mask=valid, other=1)
    x1 = tl.load(rects_ptr + pair * 4 + 2, mask=valid, other=0)
    y1 = tl.load(rects_ptr + pair * 4 + 3, mask=valid, other=0)
    width = tl.load(view_info_ptr + view * 4 + 0, mask=valid, other=0)
    height = tl.load(view_info_ptr + view * 4 + 1, mask=valid, other=0)
    tiles_x = tl.load(view_info_ptr + view * 4 + 2, mask=valid, other=0)
    first_tile = tl.load(view_info_ptr + view * 4 + 3, mask=valid, other=0)
    # Clip again: rects from `project` are already clipped, but a hand-made projection
    # must not write outside its view's tiles.  After clipping every live bound is >= 0,
    # so integer division is the same in C (truncating) and numpy (flooring).
    x0 = tl.maximum(x0, 0)
    y0 = tl.maximum(y0, 0)
    x1 = tl.minimum(x1, width - 1)
    y1 = tl.minimum(y1, height - 1)
    live = valid & (x0 <= x1) & (y0 <= y1)
    tx0 = tl.where(live, x0 // TILE, 0)
    ty0 = tl.where(live, y0 // TILE, 0)
    nx = tl.where(live, x1 // TILE - tx0 + 1, 0)
    ny = tl.where(live, y1 // TILE - ty0 + 1, 0)
    return tx0, ty0, nx, nx * ny, tiles_x, first_tile


# Sizes change from call to call: no value specialisation (== 1, % 16), so one compiled variant serves all.
@triton.jit(do_not_specialize=["num_pairs", "num_gaussians"])
def count_tiles_kernel(
    rects_ptr, view_info_ptr, counts_ptr, num_pairs, num_gaussians, TILE: tl.constexpr, BLOCK: tl.constexpr
):
    """Number of tiles each (view, Gaussian) pair overlaps (0 when culled)."""
    pair = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = pair < num_pairs
    _tx0, _ty0, _nx, count, _tiles_x, _first = _tile_bounds(rects_ptr, view_info_ptr, pair, valid, num_gaussians, TILE)
    tl.store(counts_ptr + pair, count, mask=valid)


@triton.jit(do_not_specialize=["num_pairs", "num_gaussians", "capacity"])
def expand_tiles_kernel(
    rects_ptr,
    view_info_ptr,
    ends_ptr,
    keys_ptr,
    ids_ptr,
    num_pairs,
    num_gaussians,
    capacity,
    TILE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Write one (tile key, pair id) entry per overlapped tile at the pair's prefix-sum slot.

    ``ends`` is the inclusive prefix sum of the counts.  Entries at or past
    ``capacity`` are dropped (fixed-size buffers never overflow; the caller
    compares the needed total with the capacity).
    """
    pair = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = pair < num_pairs
    tx0, ty0, nx, count, tiles_x, first_tile = _tile_bounds(rects_ptr, view_info_ptr, pair, valid, num_gaussians, TILE)
    end = tl.load(ends_ptr + pair, mask=valid, other=0)
    start = end - count
    steps = _max(count, axis=0)
    # Dead lanes have nx == 0; keep the divisor non-zero (their stores are masked anyway).
    nx_safe = tl.maximum(nx, 1)
    for j in range(0, steps):
        slot = start + j
        ok = (j < count) & (slot < capacity)
        key = first_tile + (ty0 + j // nx_safe) * tiles_x + tx0 + j % nx_safe
        tl.store(keys_ptr + slot, key, mask=ok)
        tl.store(ids_ptr + slot, pair, mask=ok)


@triton.jit
def _tile_pixels(tiles_ptr, tile, TILE: tl.constexpr):
    """Pixels of one tile: column, row, in-image mask and flat index across views."""
    x0 = tl.load(tiles_ptr + tile * 5 + 0)
    y0 = tl.load(tiles_ptr + tile * 5 + 1)
    width = tl.load(tiles_ptr + tile * 5 + 2)
    height = tl.load(tiles_ptr + tile * 5 + 3)
    offset = tl.load(tiles_ptr + tile * 5 + 4)
    local = tl.arange(0, TILE * TILE)
    x = x0 + local % TILE
    y = y0 + local // TILE
    inside = (x < width) & (y < height)
    pixel = offset + y * width + x
    return x.to(tl.float32), y.to(tl.float32), inside, pixel


@triton.jit
def _gaussian_batch(params_ptr, ids_ptr, start, end, fx, fy, inside, cutoff2, BATCH: tl.constexpr):
    """Evaluate up to BATCH Gaussians of a tile at its pixels ([pixels, BATCH] blocks).

    The forward and backward kernels both call this, so they agree exactly on
    which (pixel, Gaussian) pairs are hit.  ``q`` is written in the same
    operation order as the reference (``A dx dx + 2 B dx dy + C dy dy``) so the
    cut-off ``q <= cutoff2`` decides the same way up to rounding.
    """
    index = start + tl.arange(0, BATCH)
    valid = index < end
    gid = tl.load(ids_ptr + index, mask=valid, other=0)
    base = params_ptr + gid.to(tl.int64) * 10
    mx = tl.load(base + 0, mask=valid, other=0.0)
    my = tl.load(base + 1, mask=valid, other=0.0)
    ca = tl.load(base + 2, mask=valid, other=0.0)
    cb = tl.load(base + 3, mask=valid, other=0.0)
    cc = tl.load(base + 4, mask=valid, other=0.0)
    amp = tl.load(base + 5, mask=valid, other=0.0)
    rx0 = tl.load(base + 6, mask=valid, other=1.0)
    ry0 = tl.load(base + 7, mask=valid, other=1.0)
    rx1 = tl.load(base + 8, mask=valid, other=0.0)
    ry1 = tl.load(base + 9, mask=valid, other=0.0)
    dx = fx[:, None] - mx[None, :]
    dy = fy[:, None] - my[None, :]
    q = ca[None, :] * dx * dx + 2 * cb[None, :] * dx * dy + cc[None, :] * dy * dy
    # The reference enumerates only pixels inside each pair's rectangle; tiles are coarser.
    in_rect = (fx[:, None] >= rx0[None, :]) & (fx[:, None] <= rx1[None, :])
    in_rect = in_rect & (fy[:, None] >= ry0[None, :]) & (fy[:, None] <= ry1[None, :])
    hit = in_rect & (q <= cutoff2) & valid[None, :] & inside[:, None]
    e = tl.exp(-0.5 * q)
    g = amp[None, :] * e
    return gid, valid, dx, dy, e, g, hit, ca, cb, cc


# ``early`` is 0 or 1: no value specialisation, so both share one compiled variant.
@triton.jit(do_not_specialize=["early"])
def forward_kernel(
    params_ptr,
    tiles_ptr,
    ranges_ptr,
    ids_ptr,
    out_ptr,
    peak_ptr,
    norm_ptr,
    argmax_ptr,
    visited_ptr,
    beta,
    cutoff2,
    skip,
    early,
    MODE: tl.constexpr,
    TILE: tl.constexpr,
    BATCH: tl.constexpr,
):
    """One program per tile: soft MIP by online softmax, or hard MIP with arg-max.

    Soft mode keeps per pixel the running maximum ``m``, ``S = sum exp(beta (g - m))``
    and ``W = sum g exp(beta (g - m))``, rescaling both when ``m`` grows; it stores
    ``out = W / S`` plus ``m`` and ``S`` for the backward pass.  Hard mode stores
    ``max g`` and the pair id of the maximum (-1 where nothing is hit).

    Early termination (``early != 0``; the tile's entries in descending amplitude):
    before each batch, the tile stops when the batch's first amplitude, the
    largest of all that remain, cannot matter at any pixel of the tile: hard
    mode, not above every pixel's maximum (exact); soft mode, below every
    pixel's running maximum minus ``skip`` = ``T / beta`` (each pair left out
    then weighs less than ``e^-T``: the bound of ``docs/math.md``).  The entries
    evaluated are stored in ``visited`` for the backward pass.
    """
    tile = tl.program_id(0)
    fx, fy, inside, pixel = _tile_pixels(tiles_ptr, tile, TILE)
    first = tl.load(ranges_ptr + tile)
    last = tl.load(ranges_ptr + tile + 1)
    peak = tl.full([TILE * TILE], float("-inf"), tl.float32)
    norm = tl.full([TILE * TILE], 0.0, tl.float32)
    acc = tl.full([TILE * TILE], 0.0, tl.float32)
    best = tl.full([TILE * TILE], -1, tl.int32)
    start = first
    going = start < last
    while going:
        gid, _valid, _dx, _dy, _e, g, hit, _ca, _cb, _cc = _gaussian_batch(
            params_ptr, ids_ptr, start, last, fx, fy, inside, cutoff2, BATCH
        )
        masked = tl.where(hit, g, float("-inf"))
        batch_peak = _max(masked, axis=1)
        if MODE == 0:
            new_peak = tl.maximum(peak, batch_peak)
            # Rows with no hit so far keep peak == new_peak == -inf and S == W == 0;
            # subtracting a finite shift avoids (-inf) - (-inf) = NaN (the rescale
            # factor becomes exp(-inf) = 0, harmless on S == W == 0).
            shift = tl.where(new_peak > float("-inf"), new_peak, 0.0)
            rescale = tl.exp(beta * (peak - shift))
            weight = tl.where(hit, tl.exp(beta * (g - shift[:, None])), 0.0)
            norm = norm * rescale + _sum(weight, axis=1)
            acc = acc * rescale + _sum(weight * g, axis=1)
            peak = new_peak
        else:
            # Pair id of the batch maximum (largest id among exact ties).
            batch_best = _max(tl.where(hit & (masked == batch_peak[:, None]), gid[None, :], -1), axis=1)
            better = batch_peak > peak
            best = tl.where(better, batch_best, best)
            peak = tl.where(better, batch_peak, peak)
        start += BATCH
        more = start < last
        # The largest amplitude left (column 5 of the next entry's parameters) against the tile's floor.
        following = tl.load(ids_ptr + start, mask=more, other=0)
        amplitude = tl.load(params_ptr + following.to(tl.int64) * 10 + 5, mask=more, other=0.0)
        lowest = _min(tl.where(inside, peak, float("inf")), axis=0)
        if MODE == 0:
            needed = amplitude >= lowest - skip
        else:
            needed = amplitude > lowest
        going = more & ((early == 0) | needed)
    tl.store(visited_ptr + tile, (tl.minimum(start, last) - first).to(tl.int32))
    if MODE == 0:
        result = tl.where(norm > 0, acc / tl.where(norm > 0, norm, 1.0), 0.0)
        tl.store(peak_ptr + pixel, peak, mask=inside)
        tl.store(norm_ptr + pixel, norm, mask=inside)
    else:
        result = tl.where(best >= 0, peak, 0.0)
        tl.store(argmax_ptr + pixel, best, mask=inside)
    tl.store(out_ptr + pixel, result, mask=inside)


@triton.jit
def backward_kernel(
    params_ptr,
    tiles_ptr,
    ranges_ptr,
    ids_ptr,
    out_ptr,
    peak_ptr,
    norm_ptr,
    argmax_ptr,
    visited_ptr,
    grad_out_ptr,
    grad_params_ptr,
    beta,
    cutoff2,
    MODE: tl.constexpr,
    TILE: tl.constexpr,
    BATCH: tl.constexpr,
):
    """One program per tile: recompute g, chain dL/dout into the six per-pair parameters.

    ``dL/dg_k = dL/dout * s_k * (1 + beta (g_k - out))`` with
    ``s_k = exp(beta (g_k - m)) / S`` (soft), or ``dL/dout`` for the arg-max only
    (hard).  Per-pair sums over the tile's pixels are formed in registers and
    added with one atomic per parameter, and only for pairs that received a
    non-zero gradient.  Only the entries the forward kernel evaluated
    (``visited``) take part, as in the forward value.
    """
    tile = tl.program_id(0)
    fx, fy, inside, pixel = _tile_pixels(tiles_ptr, tile, TILE)
    first = tl.load(ranges_ptr + tile)
    last = first + tl.load(visited_ptr + tile).to(tl.int64)
    dout = tl.load(grad_out_ptr + pixel, mask=inside, other=0.0)
    if MODE == 0:
        peak = tl.load(peak_ptr + pixel, mask=inside, other=0.0)
        norm = tl.load(norm_ptr + pixel, mask=inside, other=0.0)
        out = tl.load(out_ptr + pixel, mask=inside, other=0.0)
        # Unhit pixels have S == 0 and no hit below; keep them finite.
        scale = tl.where(norm > 0, dout / tl.where(norm > 0, norm, 1.0), 0.0)
        shift = tl.where(norm > 0, peak, 0.0)
    else:
        best = tl.load(argmax_ptr + pixel, mask=inside, other=-1)
    for start in range(first, last, BATCH):
        gid, valid, dx, dy, e, g, hit, ca, cb, cc = _gaussian_batch(
            params_ptr, ids_ptr, start, last, fx, fy, inside, cutoff2, BATCH
        )
        if MODE == 0:
            dg = scale[:, None] * tl.exp(beta * (g - shift[:, None])) * (1 + beta * (g - out[:, None]))
        else:
            dg = tl.where(gid[None, :] == best[:, None], dout[:, None], 0.0)
        dg = tl.where(hit, dg, 0.0)
        # g = a exp(-q / 2): dL/dq = -g dL/dg / 2, dL/da = exp(-q / 2) dL/dg.
        dq = -0.5 * dg * g
        grad_mx = _sum(-dq * (2 * ca[None, :] * dx + 2 * cb[None, :] * dy), axis=0)
        grad_my = _sum(-dq * (2 * cb[None, :] * dx + 2 * cc[None, :] * dy), axis=0)
        grad_a = _sum(dq * dx * dx, axis=0)
        grad_b = _sum(dq * 2 * dx * dy, axis=0)
        grad_c = _sum(dq * dy * dy, axis=0)
        grad_amp = _sum(dg * e, axis=0)
        # `dg != 0` is also true for NaN, so a NaN gradient still reaches the parameters.
        touched = valid & (_max(tl.where(dg != 0, 1, 0), axis=0) > 0)
        base = grad_params_ptr + gid.to(tl.int64) * 6
        tl.atomic_add(base + 0, grad_mx, mask=touched, sem="relaxed")
        tl.atomic_add(base + 1, grad_my, mask=touched, sem="relaxed")
        tl.atomic_add(base + 2, grad_a, mask=touched, sem="relaxed")
        tl.atomic_add(base + 3, grad_b, mask=touched, sem="relaxed")
        tl.atomic_add(base + 4, grad_c, mask=touched, sem="relaxed")
        tl.atomic_add(base + 5, grad_amp, mask=touched, sem="relaxed")


def num_warps_for(tile: int, batch: int) -> int:
    """Warps per raster program: about 8 [pixel, Gaussian] elements per thread.

    With 8 x 8 tiles and 32-Gaussian batches this is 8 warps; ptxas (sm_90)
    then needs about 80 registers in the forward and 110 in the backward kernel,
    without spills, against 90 / 165 at 4 warps.
    """
    return int(min(16, max(2, tile * tile * batch // 256)))


@dataclass(frozen=True)
class KernelSpec:
    """One kernel configuration to launch or compile ahead of time.

    Attributes
    ----------
    name
        Test id (kernel name plus mode).
    kernel
        The ``@triton.jit`` function.
    signature
        Argument name -> Triton type (``*fp32``, ``i32``, ``fp32``, ``constexpr``).
    constexprs
        Values of the ``constexpr`` arguments.
    options
        Compile options (``num_warps``, ``enable_fp_fusion``) used by the launches too.
    """

    name: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, int]
    options: dict[str, Any] = field(default_factory=dict)


def launch_options(tile: int = TILE, batch: int = BATCH, num_warps: int | None = None) -> dict[str, Any]:
    """Options of the raster kernels (also given to ``triton.compile`` by the tests).

    FP fusion is requested explicitly (contracting ``a * b + c`` into FMA): it
    only moves results by rounding, and naming it silences Triton 3.9's warning
    about the default changing in 3.10.
    """
    return {"num_warps": num_warps or num_warps_for(tile, batch), "enable_fp_fusion": True}


BINNING_OPTIONS = {"num_warps": 4, "enable_fp_fusion": True}
"""Options of the binning kernels (integer only; fusion named to silence the same warning)."""


def kernel_specs(
    tile: int = TILE, batch: int = BATCH, block: int = BLOCK, num_warps: int | None = None
) -> list[KernelSpec]:
    """Every kernel with the signature it is launched with, for each render mode.

    Integer scalars are ``i32`` except the capacity (``i64``: intersection counts
    may pass 2**31 on large scenes); ``ranges`` and the prefix sums are int64.
    """
    binning = {"TILE": tile, "BLOCK": block}
    specs = [
        KernelSpec(
            "count_tiles_kernel",
            count_tiles_kernel,
            {
                "rects_ptr": "*i32",
                "view_info_ptr": "*i32",
                "counts_ptr": "*i32",
                "num_pairs": "i32",
                "num_gaussians": "i32",
                "TILE": "constexpr",
                "BLOCK": "constexpr",
            },
            binning,
            BINNING_OPTIONS,
        ),
        KernelSpec(
            "expand_tiles_kernel",
            expand_tiles_kernel,
            {
                "rects_ptr": "*i32",
                "view_info_ptr": "*i32",
                "ends_ptr": "*i64",
                "keys_ptr": "*i32",
                "ids_ptr": "*i32",
                "num_pairs": "i32",
                "num_gaussians": "i32",
                "capacity": "i64",
                "TILE": "constexpr",
                "BLOCK": "constexpr",
            },
            binning,
            BINNING_OPTIONS,
        ),
    ]
    raster = {
        "params_ptr": "*fp32",
        "tiles_ptr": "*i32",
        "ranges_ptr": "*i64",
        "ids_ptr": "*i32",
        "out_ptr": "*fp32",
        "peak_ptr": "*fp32",
        "norm_ptr": "*fp32",
        "argmax_ptr": "*i32",
        "visited_ptr": "*i32",
    }
    constants = {"TILE": tile, "BATCH": batch}
    tail = {"beta": "fp32", "cutoff2": "fp32", "MODE": "constexpr", "TILE": "constexpr", "BATCH": "constexpr"}
    termination = {"skip": "fp32", "early": "i32"}
    for mode, code in MODE_CODES.items():
        specs.append(
            KernelSpec(
                f"forward_kernel[{mode}]",
                forward_kernel,
                {**raster, "beta": "fp32", "cutoff2": "fp32", **termination, **tail},
                {**constants, "MODE": code},
                launch_options(tile, batch, num_warps),
            )
        )
        specs.append(
            KernelSpec(
                f"backward_kernel[{mode}]",
                backward_kernel,
                {**raster, "grad_out_ptr": "*fp32", "grad_params_ptr": "*fp32", **tail},
                {**constants, "MODE": code},
                launch_options(tile, batch, num_warps),
            )
        )
    return specs


def is_interpreted() -> bool:
    """Whether these kernels were decorated for the CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return not isinstance(forward_kernel, triton.runtime.jit.JITFunction)
