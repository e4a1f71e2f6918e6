"""Fast CPU rasteriser: numba kernels over amplitude-ordered tiles with early termination.

Same math and cut-off as the reference (``raster_torch.py``): pixel ``p`` receives
Gaussian ``k`` of a view when ``p`` lies in ``k``'s rectangle and
``q = A dx^2 + 2 B dx dy + C dy^2 <= CUTOFF_SIGMA^2``, evaluated in the same
order and precision as the reference so both include the same pixels;
``g = a exp(-q / 2)``.  The hard MIP is exact; the soft MIP leaves out pairs
whose softmax weight is below ``e^-T`` (``project.SOFT_SKIP_T``; the bound is in
``docs/math.md``).

Layout
    Each view is processed in a *kernel layout*: rows of ``LANES`` (16) pixels,
    the vector width of the lane loops, in tiles of ``TILE_ROWS`` x ``LANES``.
    A view whose footprints are mostly taller than wide (e.g. ``xz`` at
    128 x 128 of a 100 x 647 x 813 stack: 6.4 x 0.8 voxel pixels) is stored
    transposed, so that the long axis of the footprints runs along the lanes.
    Row strides are padded so that 16 lanes starting at any pixel of a row stay
    in memory; lanes outside a footprint are masked, never branched on.
Binning (``_bin``, serial)
    The live (view, Gaussian) pairs are numbered in descending amplitude per
    view (a counting sort of ``log a``, ``_amplitude_order``) and packed by
    that number (``pair_values``, ``pair_ints``), then binned into the tiles
    their *ellipse* ``q <= 9`` touches: a rectangle that spans several tiles
    both ways skips the tiles the ellipse misses (``_lane_range``: the exact
    lane extent of the ellipse over a band of rows, widened by a bound on the
    float rounding of ``q``).  Each tile's list stays in amplitude order.
Forward (workers over tiles)
    Each tile copies its pairs next to each other, then (1) takes the
    per-pixel maximum ``m`` in the log domain (``log a - q / 2``: no
    exponential), stopping once the largest amplitude left cannot raise any
    pixel of the tile (exact); then, soft MIP, (2) ``S = sum exp(beta (g - m))``
    and ``W = sum g exp(beta (g - m))``, ``out = W / S``, over the pairs whose
    ``log g`` reaches the pixel's *floor*, a lower bound of ``log(m - T / beta)``:
    a cheap vector test per row (``q`` only) skips rows where no lane does,
    the lanes taken are queued and their exponentials computed over the full
    queue (every vector lane useful), and the tile stops at the first
    amplitude below every floor.  It records, per (pair, tile), the rows it
    took pixels in (soft) or where the pair is the arg-max (hard).
Backward (workers over pairs)
    Each pair visits only those rows (``trailing_zeros`` over a bit mask; the
    rows of the tiles in one band of rows are merged, and each row is walked in
    windows from the pair's first lane, so a row across two tiles costs one
    window), tests each lane as the forward did and reads ``dL/dout``, ``out``,
    ``m``, ``1 / S`` and the floor there, so every gradient is written by
    exactly one worker (no atomics, deterministic).
    ``d out / d g = s (1 + beta (g - out))`` with ``s = exp(beta (g - m)) / S``.

Vectorisation (``benchmarks/bench_cpu.py --asm`` counts vector instructions per
kernel): the lane loops run 16 iterations without calls or branches, with
unsigned indices (a signed one adds numba's negative-index wrap-around, which
blocks the vectoriser) and the exponentials inlined (``numba_runtime.exp``), so
LLVM turns them into two ymm (AVX2, float32) or one zmm (AVX-512) instruction
per operation; on NEON (four-lane registers) the same loops vectorise as long
as no load is conditional on a lane's mask: NEON has no masked load, so LLVM
keeps such a loop scalar (the backward's lane loops did, by the cross-compiled
check ``bench_cpu.py --asm-target aarch64``), and on AVX2 it is a
``vmaskmov``, slow on AMD; the kernels load in every lane (rows are padded) and
select afterwards.  Loops of 8 would fit
one AVX2 register, but LLVM unrolls such short loops completely before the loop
vectoriser runs and the SLP vectoriser then leaves them scalar (checked on this
code).  Lane masks compare float coordinates, not the 64-bit lane counter; the
per-row "any lane?" tests are 32-bit integer maximum reductions (no fast-math
needed; numba widens sums and ors of ``uint32`` to 64 bits, which halves the
vector width of the whole loop); running maxima stored back to the tile use
``numba_runtime.maximum`` (a compare and select would be stored as a masked
store, which later loads of those pixels cannot forward from); a
test of the render mode inside a lane loop makes it scalar (the other mode's
arrays are empty, so their loads cannot be hoisted), so the mode is tested
outside; tile-wide loops use unsigned indices too, and the divisions vectorise
because the kernels use numpy's error model (``numba_runtime``: Python's adds a
zero test per division).  Scalar by nature: the queue's compaction and
scatter-add, the tile and row bookkeeping, binning.

``EARLY_TERMINATION = False`` keeps all of the above but the amplitude-dependent
skipping (pass-1 stop, floors): every pair within the cut-off counts, as before
this was added (for benchmarks and tests).  ``last_statistics()`` returns the
work counters of the latest call.  Memory is O(pixels + (pair, tile)
intersections); nothing is stored per (pixel, Gaussian) pair.  Threads: the
kernels release the GIL and run on the pool of ``numba_runtime.run_parallel``
(four tasks per thread: tiles and pairs are many and uneven).  Kernels are
compiled once per dtype (float32 for training, float64 for tests) and cached
on disk (``cache=True``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..numba_runtime import IMPORT_ERROR, exp, jit, kernel, maximum, numpy_view, run_parallel, trailing_zeros
from .project import CUTOFF_SIGMA, DEFAULT_BETA, SOFT_SKIP_T, Projection
from .raster_torch import MODES, pixel_offsets, split_views

LANES = 16
"""Pixels per vector row, and the tile side along the lanes: two AVX2 (one AVX-512, four NEON) registers of
float32."""
TILE_ROWS = 16
"""Tile side across the lanes (rows)."""
ORIENTATION = "auto"
"""Kernel layout of each view: ``auto`` (fewest vector rows), ``rows`` or ``columns`` (transposed); for tests."""
EARLY_TERMINATION = True
"""Amplitude-ordered early termination (pass-1 stop, soft-MIP floors).  ``False`` evaluates every pair within
the cut-off, as before this was added (for benchmarks and tests); results then differ only by the bound of
``project.SOFT_SKIP_T``."""

_CUTOFF = CUTOFF_SIGMA**2
_SLACK = 1e-6  # pixels added to float64 ellipse extents, for their own rounding
_BIG = 1e9  # lane bound that stands for "unbounded" (clipped to the rectangle by the callers)
_BUCKETS = 4096  # amplitude steps of the tile order
_QUEUE = 512  # pairs queued for the exponentials (a few KiB per array: stays in L1)
_DENSE = 4  # a soft-pass row with more lanes taken than this is summed in place rather than queued
_LANE_SHIFT = LANES.bit_length() - 1
_ROW_SHIFT = TILE_ROWS.bit_length() - 1
assert 1 << _LANE_SHIFT == LANES and 1 << _ROW_SHIFT == TILE_ROWS, "tile sides must be powers of two"

# Per-view layout columns (int64 array [V, _NUM_LAYOUT]).
_H, _W, _IMAGE_OFFSET, _TRANSPOSED, _ROWS, _LEN, _STRIDE, _OFFSET, _TILES_L, _TILES_R, _TILE_OFFSET = range(11)
_NUM_LAYOUT = 11
# Columns of the per-tile work counters (see :func:`last_statistics`).
_STAT_COLUMNS = ("tile_gaussians", "pass1_visited", "pass2_visited", "pass2_rows", "pass2_rows_skipped")

_LAST_STATISTICS: dict[str, np.ndarray] = {}


def unavailable_reason() -> str | None:
    """Why this backend cannot run here, or ``None``."""
    return IMPORT_ERROR


def last_statistics() -> dict[str, np.ndarray]:
    """Work counters of the latest :func:`rasterize` call in this process (and of its backward pass, once run).

    Returns
    -------
    dict
        Per kernel-layout tile (int64 [T]): ``tile_gaussians`` binned into it,
        ``pass1_visited`` Gaussians pass 1 evaluated before it stopped,
        ``pass2_visited`` the same for the soft pass (0 in hard mode),
        ``pass2_rows`` and ``pass2_rows_skipped`` vector rows of the soft pass
        with and without exponentials.  After the backward pass, per
        (view, Gaussian) (int64 [V, K]): ``backward_rows``, the vector rows it
        evaluated.  Meant for tests and benchmarks; calls from several threads
        at once overwrite each other's counters.
    """
    return dict(_LAST_STATISTICS)


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
def _record(pair_values: np.ndarray, pair_ints: np.ndarray, pair: int) -> tuple:  # pragma: no cover - numba
    """Pair ``pair`` as :func:`_bin` packed it: ``(mx, my, A, 2 B, C, B, a, log a, lane first, lane last,
    row first, row last)``."""
    values, ints = pair_values[pair], pair_ints[pair]
    return (
        values[0], values[1], values[2], values[3], values[4], values[5], values[6], values[7],
        ints[0], ints[1], ints[2], ints[3],
    )  # fmt: skip


@jit
def _ellipse(
    means2d: np.ndarray, conics: np.ndarray, rects: np.ndarray, v: int, k: int, transposed: bool, unit: float
) -> tuple:  # pragma: no cover - compiled by numba
    """Pair (v, k) in kernel-layout axes, float64, for :func:`_lane_range`: centre ``(lane, row)``, the conic
    as ``P l^2 + 2 B l r + Q r^2`` (``l`` along the lanes), its determinant (0 where it cannot bound the
    lanes: the rectangle does) and the cut-off ``9 + E``.

    ``E = 8 u (|P| L^2 + 2 |B| L R + |Q| R^2)``, with ``L``, ``R`` the largest offsets from the centre in the
    rectangle plus a pixel and ``u`` the unit roundoff of the dtype, bounds the rounding of ``q`` as the lanes
    compute it (three products, two sums and the offsets, each within ``u`` relative): every pixel with a
    computed ``q <= 9`` lies in the ellipse ``q <= 9 + E``.
    """
    a, b, c = float(conics[v, k, 0]), float(conics[v, k, 1]), float(conics[v, k, 2])
    mx, my = float(means2d[v, k, 0]), float(means2d[v, k, 1])
    reach_x = max(abs(rects[v, k, 0] - mx), abs(rects[v, k, 2] - mx)) + 1.0
    reach_y = max(abs(rects[v, k, 1] - my), abs(rects[v, k, 3] - my)) + 1.0
    cut = _CUTOFF + 8.0 * unit * (
        abs(a) * reach_x * reach_x + 2.0 * abs(b) * reach_x * reach_y + abs(c) * reach_y * reach_y
    )
    det = a * c - b * b
    usable = (det > 0.0) & (a > 0.0) & (c > 0.0) & math.isfinite(det) & math.isfinite(cut)
    det = det if usable else 0.0
    if transposed:
        return my, mx, c, b, a, det, cut
    return mx, my, a, b, c, det, cut


@jit
def _lane_range(
    centre_l: float, centre_r: float, pp: float, bb: float, qq: float, det: float, cut: float, row_lo: int, row_hi: int
) -> tuple[int, int]:  # pragma: no cover - compiled by numba
    """First and last lane the ellipse ``P l^2 + 2 B l r + Q r^2 <= cut`` (:func:`_ellipse`) reaches in rows
    ``row_lo ... row_hi``; first > last when it reaches none, +-``_BIG`` when the conic cannot tell.

    At row offset ``r`` the lanes run over ``(-B r -+ sqrt(cut P - det r^2)) / P``; the upper end is concave in
    ``r`` with its maximum at ``r = -B sqrt(cut / (det Q))`` (the lower end mirrors it), so over a band of rows
    the extremes sit at those offsets clamped to the band.
    """
    if det <= 0.0:
        return -int(_BIG), int(_BIG)
    reach = math.sqrt(cut * pp / det) + _SLACK
    d_lo = max(row_lo - centre_r, -reach)
    d_hi = min(row_hi - centre_r, reach)
    if d_lo > d_hi:
        return 1, 0
    turn = bb * math.sqrt(cut / (det * qq))
    r_hi = min(max(-turn, d_lo), d_hi)
    r_lo = min(max(turn, d_lo), d_hi)
    hi = (-bb * r_hi + math.sqrt(max(cut * pp - det * r_hi * r_hi, 0.0))) / pp
    lo = (-bb * r_lo - math.sqrt(max(cut * pp - det * r_lo * r_lo, 0.0))) / pp
    first = math.ceil(min(max(centre_l + lo - _SLACK, -_BIG), _BIG))
    last = math.floor(min(max(centre_l + hi + _SLACK, -_BIG), _BIG))
    return first, last


@kernel
def _bin_sizes(
    rects: np.ndarray, layout: np.ndarray, worker: int, num_workers: int, sizes: np.ndarray
) -> None:  # pragma: no cover - compiled by numba
    """Per view ``v = worker, worker + num_workers, ...``: ``sizes[v]`` = (tiles its rectangles cover at most:
    an upper bound of its entries, live pairs)."""
    for v in range(worker, rects.shape[0], num_workers):
        transposed = layout[v, _TRANSPOSED] != 0
        capacity = 0
        live = 0
        for k in range(rects.shape[1]):
            x0, y0, x1, y1 = rects[v, k, 0], rects[v, k, 1], rects[v, k, 2], rects[v, k, 3]
            if x0 <= x1 and y0 <= y1:
                l0, l1, r0, r1 = (y0, y1, x0, x1) if transposed else (x0, x1, y0, y1)
                lanes = (l1 >> _LANE_SHIFT) - (l0 >> _LANE_SHIFT) + 1
                capacity += lanes * ((r1 >> _ROW_SHIFT) - (r0 >> _ROW_SHIFT) + 1)
                live += 1
        sizes[v, 0] = capacity
        sizes[v, 1] = live


@kernel
def _bin(
    means2d: np.ndarray,
    conics: np.ndarray,
    amps: np.ndarray,
    log_amps: np.ndarray,
    rects: np.ndarray,
    layout: np.ndarray,
    unit: float,
    bases: np.ndarray,
    worker: int,
    num_workers: int,
    tile_range: np.ndarray,
    items: np.ndarray,
    item_entry: np.ndarray,
    entry_origin: np.ndarray,
    pair_values: np.ndarray,
    pair_ints: np.ndarray,
    pair_span: np.ndarray,
) -> None:  # pragma: no cover - compiled by numba
    """Bin the live pairs of views ``worker, worker + num_workers, ...`` by the kernel-layout tiles their
    ellipses touch.

    A view's pairs are numbered from ``bases[v, 1]`` in descending amplitude (:func:`_amplitude_order`), and
    what the kernels read of a pair is packed by that number, so that a tile's Gaussians and a pair's tiles are
    read from a few contiguous lines.  Its entries (tile, pair) and its tiles' items share the index range from
    ``bases[v, 0]`` (sized by :func:`_bin_sizes`; the tail a view does not use is never read).

    Writes
    ------
    tile_range, items
        Tile ``t`` holds the pairs ``items[tile_range[t, 0]:tile_range[t, 1]]`` (in amplitude order).
    pair_values
        [P, 8] ``(mx, my, A, 2 B, C, B, a, log a)`` (:func:`_pair`'s axes).
    pair_ints
        [P, 6] ``(lane first, lane last, row first, row last, view, Gaussian)`` (kernel layout).
    pair_span, entry_origin, item_entry
        Pair ``s`` lies in the tiles whose first (lane, row) is ``entry_origin[e]``, ``e`` in
        ``pair_span[s, 0] ... pair_span[s, 1] - 1``; item ``j`` is entry ``item_entry[j]``.
    """
    for v in range(worker, rects.shape[0], num_workers):
        transposed = layout[v, _TRANSPOSED] != 0
        tiles_l, tile_offset = layout[v, _TILES_L], layout[v, _TILE_OFFSET]
        num_tiles = tiles_l * layout[v, _TILES_R]
        first_entry, pair = bases[v, 0], bases[v, 1]
        entry_tile = np.empty(bases[v + 1, 0] - first_entry, np.int32)
        entry_pair = np.empty(bases[v + 1, 0] - first_entry, np.int32)
        counts = np.zeros(num_tiles + 1, np.int64)
        size = 0
        for k in _amplitude_order(log_amps, rects, v):
            x0, y0, x1, y1 = rects[v, k, 0], rects[v, k, 1], rects[v, k, 2], rects[v, k, 3]
            if x0 > x1 or y0 > y1:
                continue
            mx, my, ca, cb2, cc, l0, l1, r0, r1 = _pair(means2d, conics, rects, v, k, transposed)
            pair_values[pair, 0], pair_values[pair, 1], pair_values[pair, 2] = mx, my, ca
            pair_values[pair, 3], pair_values[pair, 4], pair_values[pair, 5] = cb2, cc, conics[v, k, 1]
            pair_values[pair, 6], pair_values[pair, 7] = amps[v, k], log_amps[v, k]
            pair_ints[pair, 0], pair_ints[pair, 1], pair_ints[pair, 2], pair_ints[pair, 3] = l0, l1, r0, r1
            pair_ints[pair, 4], pair_ints[pair, 5] = v, k
            pair_span[pair, 0] = first_entry + size
            # Bounds are >= 0, so shifts are the floor divisions by the (power-of-two) tile sides.
            # Every row of the rectangle meets the ellipse, and the ellipse spans the rectangle's lanes over
            # its rows: only a rectangle over several tiles both ways has tiles the ellipse misses.
            corners = (l0 >> _LANE_SHIFT) != (l1 >> _LANE_SHIFT) and (r0 >> _ROW_SHIFT) != (r1 >> _ROW_SHIFT)
            cl = cr = pp = bb = qq = det = cut = 0.0
            if corners:
                cl, cr, pp, bb, qq, det, cut = _ellipse(means2d, conics, rects, v, k, transposed, unit)
            for tr in range(r0 >> _ROW_SHIFT, (r1 >> _ROW_SHIFT) + 1):
                lo, hi = l0, l1
                if corners:
                    band_lo = max(r0, tr << _ROW_SHIFT)
                    band_hi = min(r1, ((tr + 1) << _ROW_SHIFT) - 1)
                    lo, hi = _lane_range(cl, cr, pp, bb, qq, det, cut, band_lo, band_hi)
                    lo, hi = max(lo, l0), min(hi, l1)
                for tl in range(lo >> _LANE_SHIFT, (hi >> _LANE_SHIFT) + 1):
                    local = tr * tiles_l + tl
                    entry_tile[size] = local
                    entry_pair[size] = pair
                    entry_origin[first_entry + size, 0] = tl << _LANE_SHIFT
                    entry_origin[first_entry + size, 1] = tr << _ROW_SHIFT
                    counts[local + 1] += 1
                    size += 1
            pair_span[pair, 1] = first_entry + size
            pair += 1
        # A stable counting sort by tile keeps each tile's pairs in the order of the sweep.
        starts = np.cumsum(counts) + first_entry
        for local in range(num_tiles):
            tile_range[tile_offset + local, 0] = starts[local]
            tile_range[tile_offset + local, 1] = starts[local + 1]
        for e in range(size):
            local = entry_tile[e]
            items[starts[local]] = entry_pair[e]
            item_entry[starts[local]] = first_entry + e
            starts[local] += 1


@jit
def _amplitude_order(log_amps: np.ndarray, rects: np.ndarray, v: int) -> np.ndarray:
    """The Gaussian indices of view ``v`` in descending ``log a``, quantised to ``_BUCKETS`` steps between the
    view's extremes (a counting sort: O(K), stable; culled pairs last).  Tiles visit their Gaussians in this
    order; :func:`_forward` bounds what follows by suffix maxima, so the quantisation costs no exactness."""
    num_gaussians = log_amps.shape[1]
    order = np.empty(num_gaussians, np.int32)
    keys = np.empty(num_gaussians, np.int64)
    top, bottom = -np.inf, np.inf
    for k in range(num_gaussians):
        if rects[v, k, 0] <= rects[v, k, 2] and rects[v, k, 1] <= rects[v, k, 3]:
            top = max(top, float(log_amps[v, k]))
            bottom = min(bottom, float(log_amps[v, k]))
    scale = (_BUCKETS - 1) / (top - bottom) if top > bottom else 0.0
    counts = np.zeros(_BUCKETS + 2, np.int64)
    for k in range(num_gaussians):
        live = rects[v, k, 0] <= rects[v, k, 2] and rects[v, k, 1] <= rects[v, k, 3]
        keys[k] = int((top - float(log_amps[v, k])) * scale) if live else _BUCKETS
        counts[keys[k] + 1] += 1
    starts = np.cumsum(counts)
    for k in range(num_gaussians):
        order[starts[keys[k]]] = k
        starts[keys[k]] += 1
    return order


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


@jit
def _tile_min(values: np.ndarray, num_rows: int, num_lanes: int, scratch: np.ndarray) -> float:
    """Smallest of ``values`` over the tile's pixels inside the view (``num_rows`` x ``num_lanes``).

    Lane-wise minima first (a vector loop), then one short scalar reduction: a float reduction in one loop
    would stay scalar (LLVM may not reorder it without fast-math).
    """  # pragma: no cover - compiled by numba
    top = values.dtype.type(np.inf)  # not inf * (v - v + 1): NaN when the first value is itself infinite
    for lane in range(LANES):
        scratch[lane] = top
    limit = np.uint64(num_lanes)
    for r in range(num_rows):
        row = np.uint64(r * LANES)
        for lane in range(LANES):
            ul = np.uint64(lane)
            value = values[row + ul] if ul < limit else top
            scratch[ul] = min(scratch[ul], value)
    lowest = top
    for lane in range(LANES):
        lowest = min(lowest, scratch[lane])
    return lowest


@jit
def _tile_argmin(values: np.ndarray, num_rows: int, num_lanes: int, scratch: np.ndarray) -> int:
    """Index of a smallest of ``values`` over the tile's pixels inside the view (:func:`_tile_min`)."""
    lowest = _tile_min(values, num_rows, num_lanes, scratch)
    for i in range(num_rows * LANES):
        if (i & (LANES - 1)) < num_lanes and values[i] == lowest:
            return i
    return 0  # pragma: no cover - unreachable: the minimum is one of the values


@jit
def _soft_sums(
    count: int,
    q: np.ndarray,
    amp: np.ndarray,
    peak: np.ndarray,
    pixel: np.ndarray,
    half: float,
    beta: float,
    e: np.ndarray,
    ge: np.ndarray,
    norm: np.ndarray,
    weighted: np.ndarray,
) -> None:  # pragma: no cover - compiled by numba
    """Add the first ``count`` queued pairs to the softmax sums of their tile pixels: ``g = a exp(-q / 2)``,
    ``e = exp(beta (g - m))``; ``norm += e``, ``weighted += g e``.

    The exponentials run in a vector loop over the queue; the sums in a scalar loop in queue order (a pixel
    may appear several times), so each pixel adds its terms in the tile's Gaussian order.
    """
    for m in range(count):
        n = np.uint64(m)
        g = amp[n] * exp(-half * q[n])
        e[n] = exp(beta * (g - peak[n]))
        ge[n] = g * e[n]
    for m in range(count):
        n = np.uint64(m)
        i = pixel[n]
        norm[i] += e[n]
        weighted[i] += ge[n]


@kernel
def _forward(
    pair_values: np.ndarray,
    pair_ints: np.ndarray,
    layout: np.ndarray,
    tile_view: np.ndarray,
    tile_range: np.ndarray,
    items: np.ndarray,
    coords: np.ndarray,
    soft: bool,
    early: bool,
    beta: float,
    half: float,
    cutoff: float,
    skip: float,
    infinity: float,
    max_items: int,
    worker: int,
    num_workers: int,
    item_entry: np.ndarray,
    row_bits: np.ndarray,
    entry_bits: np.ndarray,
    image: np.ndarray,
    out_k: np.ndarray,
    peak_k: np.ndarray,
    inv_norm_k: np.ndarray,
    floor_k: np.ndarray,
    argmax_k: np.ndarray,
    tile_stats: np.ndarray,
) -> None:
    """Render the tiles ``worker, worker + num_workers, ...``.

    Writes ``image`` (row-major views) and, in kernel layout, what the backward
    pass reads: ``out_k`` and (soft) ``peak_k`` = m, ``inv_norm_k`` = 1 / S and
    ``floor_k`` (the log-domain floor of the pairs taken: +inf where nothing
    reaches), or (hard) ``argmax_k`` (-1 where nothing reaches); and the work
    counters ``tile_stats`` [T, 5].  ``beta``, ``half``, ``cutoff``, ``skip``
    (``T / beta``) and ``infinity`` carry the image dtype so that float32 stays
    float32.  ``infinity`` is an argument, not a constant, so that LLVM cannot
    fold ``max(m, -inf) = m`` into a masked store (see pass 1).
    """
    num_tiles = tile_view.shape[0]
    zero = half - half
    one = half + half
    lowest = -infinity
    highest = infinity
    size = TILE_ROWS * LANES
    # Tile-local state, row-major [TILE_ROWS, LANES]: stays in L1; the lane loops below vectorise over it.
    best = np.empty(size, image.dtype)  # log m
    peak = np.empty(size, image.dtype)  # m
    floor = np.empty(size, image.dtype)
    norm = np.empty(size, image.dtype)
    weighted = np.empty(size, image.dtype)
    arg = np.empty(size, np.int32)
    lane_min = np.empty(LANES, image.dtype)
    tile_values = np.empty((max_items, 8), image.dtype)
    tile_ints = np.empty((max_items, 4), np.int32)
    ceiling = np.empty(max_items, image.dtype)
    q_row = np.empty(LANES, image.dtype)
    taken_row = np.empty(LANES, np.uint32)  # 32-bit like the float32 lanes: one mask register, no widening
    # The soft pass's queue of (pixel, Gaussian) pairs taken, and their terms.
    q_queue = np.empty(_QUEUE, image.dtype)
    amp_queue = np.empty(_QUEUE, image.dtype)
    peak_queue = np.empty(_QUEUE, image.dtype)
    e_queue = np.empty(_QUEUE, image.dtype)
    ge_queue = np.empty(_QUEUE, image.dtype)
    pixel_queue = np.empty(_QUEUE, np.uint64)
    # Neighbouring tiles cost about the same, so striding gives every worker a fair share of every view.
    for t in range(worker, num_tiles, num_workers):
        v = tile_view[t]
        transposed = layout[v, _TRANSPOSED] != 0
        local = t - layout[v, _TILE_OFFSET]
        tiles_l = layout[v, _TILES_L]
        lane0 = (local % tiles_l) * LANES
        row0 = (local // tiles_l) * TILE_ROWS
        num_rows = min(TILE_ROWS, layout[v, _ROWS] - row0)
        num_lanes = min(LANES, layout[v, _LEN] - lane0)
        u0 = np.uint64(lane0)
        first, end = tile_range[t, 0], tile_range[t, 1]
        # The tile's pairs, copied next to each other: the cache misses of this gather overlap, where the
        # passes below would meet them one at a time.
        for j in range(first, end):
            # Every field loaded before any is stored: LLVM then copies each row with one vector load and store
            # (interleaved loads and stores stay scalar, as the arrays might overlap), and the store queue,
            # whose entries wait for these mostly missing loads, holds many more pairs' copies in flight.
            mx, my, ca, cb2, cc, cb, amp, log_amp, l0, l1, r0, r1 = _record(pair_values, pair_ints, items[j])
            row = j - first
            tile_values[row, 0], tile_values[row, 1], tile_values[row, 2], tile_values[row, 3] = mx, my, ca, cb2
            tile_values[row, 4], tile_values[row, 5], tile_values[row, 6], tile_values[row, 7] = cc, cb, amp, log_amp
            tile_ints[row, 0], tile_ints[row, 1], tile_ints[row, 2], tile_ints[row, 3] = l0, l1, r0, r1
        # ceiling[j]: the largest log a from item j on (the order is descending up to its quantisation).
        running = lowest
        for j in range(end - 1, first - 1, -1):
            running = max(running, tile_values[j - first, 7])
            ceiling[j - first] = running
        best[:] = lowest
        arg[:] = -1
        # Pass 1: per-pixel maximum of log g = log a - q / 2 and the Gaussian that reaches it.  Values never
        # exceed log a, so once the ceiling is <= every pixel's maximum nothing can raise one: stop there.
        # The test reads the whole tile, so a *witness* pixel screens it: the tile's minimum is at most the
        # witness's value, so while the ceiling stays above that the tile cannot stop (one scalar compare per
        # Gaussian).  A full scan runs only once the witness is raised to the ceiling; it stops the tile, or
        # names the pixel now lowest as the next witness.  Most tiles hold pixels no Gaussian reaches (at
        # -inf for good): they never scan more than once.
        stop = end
        witness = 0
        for j in range(first, end):
            if early and j > first and ceiling[j - first] <= best[witness]:
                witness = _tile_argmin(best, num_rows, num_lanes, lane_min)
                if ceiling[j - first] <= best[witness]:
                    stop = j
                    break
            mx, my, ca, cb2, cc, _, _, log_amp, l0, l1, r0, r1 = _record(tile_values, tile_ints, j - first)
            # The rectangle's lanes as coordinates: float compares are cheaper in the vector loops than
            # compares of the 64-bit lane counter (exact: coordinates are small integers).
            lo, hi = coords[l0], coords[l1]
            item = np.int32(j)
            for r in range(max(r0, row0), min(r1, row0 + num_rows - 1) + 1):
                fixed = coords[r]
                row = np.uint64((r - row0) * LANES)
                for lane in range(LANES):
                    ul = np.uint64(lane)
                    at = coords[u0 + ul]
                    _, _, q = _offset(fixed, at, mx, my, ca, cb2, cc, transposed)
                    # q >= 0 in exact arithmetic; the clamp keeps value <= log a after rounding too.
                    value = log_amp - half * max(q, zero)
                    i = row + ul
                    inside = (at >= lo) & (at <= hi) & (q <= cutoff)
                    better = inside & (value > best[i])
                    # Both updates as maxima (items arrive in increasing order, so the arg-max is the largest
                    # item that was better), not as selects between the new and the stored value, which LLVM
                    # stores with a masked store (see ``numba_runtime.maximum``); the integer one is a max
                    # instruction already.
                    best[i] = maximum(best[i], value if inside else lowest)
                    arg[i] = max(arg[i], item if better else np.int32(-1))
        tile_stats[t, 0] = end - first
        tile_stats[t, 1] = stop - first
        tile_stats[t, 2] = 0
        tile_stats[t, 3] = 0
        tile_stats[t, 4] = 0
        for n in range(size):
            i = np.uint64(n)
            peak[i] = exp(best[i])
        # row_bits[j]: the tile rows where item j takes pixels (soft: pass 2; hard: its arg-max pixels), which
        # are all the backward pass visits.
        row_bits[first:end] = 0
        if not soft:
            for i in range(num_rows * LANES):
                if arg[i] >= 0:
                    row_bits[arg[i]] |= np.uint32(1) << np.uint32(i // LANES)
        if soft:
            # Floor of the pairs that count: log(m - T / beta) >= log m - (T / beta) / (m - T / beta)
            # (log(1 - x) >= -x / (1 - x)), i.e. a pair below it weighs less than e^-T.
            # Branch-free selects (a vector loop; the floor itself in the image dtype).
            if early:
                for n in range(size):
                    i = np.uint64(n)
                    gap = peak[i] - skip
                    has_floor = gap > zero
                    bound = best[i] - skip / (gap if has_floor else one)
                    floor[i] = (bound if has_floor else lowest) if best[i] > lowest else highest
            else:
                for n in range(size):
                    i = np.uint64(n)
                    floor[i] = lowest if best[i] > lowest else highest
            norm[:] = zero
            weighted[:] = zero
            floor_min = _tile_min(floor, num_rows, num_lanes, lane_min)
            # Pass 2: softmax sums, the maximum known (no rescaling).  Each row of a pair is tested cheaply
            # (vector loop: q, and whether the lane reaches its floor); the lanes taken are queued, and the
            # exponentials run over the full queue, every lane useful (about a quarter of a row's lanes are).
            visited = 0
            evaluated = 0
            skipped = 0
            queued = np.uint64(0)
            for j in range(first, end):
                if ceiling[j - first] < floor_min:
                    break  # values never exceed log a: this and every later pair is below every floor
                visited += 1
                mx, my, ca, cb2, cc, _, amp, log_amp, l0, l1, r0, r1 = _record(tile_values, tile_ints, j - first)
                lo, hi = coords[l0], coords[l1]
                first_lane, last_lane = max(l0 - lane0, 0), min(l1 - lane0, LANES - 1)
                for r in range(max(r0, row0), min(r1, row0 + num_rows - 1) + 1):
                    fixed = coords[r]
                    row = np.uint64((r - row0) * LANES)
                    # "Any lane taken?" as a maximum of 32-bit flags: numba widens sums (and ors) of uint32 to
                    # 64 bits, which halves the vector width of the whole loop (xmm, not ymm, on AVX2).
                    any_taken = np.uint32(0)
                    for lane in range(LANES):
                        ul = np.uint64(lane)
                        at = coords[u0 + ul]
                        _, _, q = _offset(fixed, at, mx, my, ca, cb2, cc, transposed)
                        value = log_amp - half * max(q, zero)
                        taken = np.uint32((at >= lo) & (at <= hi) & (q <= cutoff) & (value >= floor[row + ul]))
                        q_row[ul] = q
                        taken_row[ul] = taken
                        any_taken = max(any_taken, taken)
                    if any_taken == 0:
                        skipped += 1
                        continue
                    taken_count = 0
                    for lane in range(LANES):
                        taken_count += taken_row[lane]
                    evaluated += 1
                    row_bits[j] |= np.uint32(1) << np.uint32(r - row0)
                    if taken_count > _DENSE:
                        # Most lanes taken: the row's own vector loop wastes less than queueing them.
                        for lane in range(LANES):
                            ul = np.uint64(lane)
                            i = row + ul
                            g = amp * exp(-half * min(q_row[ul], cutoff))  # masked lanes: clamped, no subnormals
                            e = exp(beta * (g - peak[i]))
                            e = e if taken_row[ul] != 0 else zero
                            norm[i] += e
                            weighted[i] += g * e
                        continue
                    # Few lanes taken: branch-free compaction (every lane is written, the queue grows by the
                    # lanes taken); the exponentials run later over the full queue.
                    for lane in range(first_lane, last_lane + 1):
                        ul = np.uint64(lane)
                        at = np.uint64(queued)
                        q_queue[at] = q_row[ul]
                        amp_queue[at] = amp
                        peak_queue[at] = peak[row + ul]
                        pixel_queue[at] = row + ul
                        queued += np.uint64(taken_row[ul])
                    if queued > _QUEUE - LANES:
                        _soft_sums(queued, q_queue, amp_queue, peak_queue, pixel_queue, half, beta, e_queue, ge_queue,
                                   norm, weighted)  # fmt: skip
                        queued = np.uint64(0)
            _soft_sums(
                queued, q_queue, amp_queue, peak_queue, pixel_queue, half, beta, e_queue, ge_queue, norm, weighted
            )
            tile_stats[t, 2] = visited
            tile_stats[t, 3] = evaluated
            tile_stats[t, 4] = skipped
        # The backward pass reads the bits per pair: in entry order, which keeps each pair's together.
        for j in range(first, end):
            entry_bits[item_entry[j]] = row_bits[j]
        if soft:
            # out = W / S and 1 / S (in ``norm``), where anything reaches; a vector loop over the tile, apart from
            # the copies below (a loop over as many arrays keeps scalar).
            for n in range(size):
                i = np.uint64(n)
                s = norm[i]
                covered = s > zero
                denominator = s if covered else one
                w = weighted[i]  # loaded in every lane: see _pair_row on conditional loads
                weighted[i] = w / denominator if covered else zero
                norm[i] = one / denominator if covered else zero
        # Write back: kernel layout for the backward pass, row-major image for the caller.
        width, image_offset = layout[v, _W], layout[v, _IMAGE_OFFSET]
        stride, offset = layout[v, _STRIDE], layout[v, _OFFSET]
        last_tile = lane0 + LANES == tiles_l * LANES
        for r in range(num_rows):
            base = np.uint64(offset + (row0 + r) * stride + lane0)
            row = np.uint64(r * LANES)
            # The mode is tested outside the lane loops (a branch inside keeps them scalar).
            if soft:
                for lane in range(LANES):
                    ul = np.uint64(lane)
                    i = row + ul
                    p = base + ul
                    peak_k[p] = peak[i]
                    inv_norm_k[p] = norm[i]
                    floor_k[p] = floor[i]
                    out_k[p] = weighted[i]
                if last_tile:
                    # The last tile of a row also fills the row's padding, which the backward pass reads (masked).
                    for lane in range(LANES):
                        pad = base + np.uint64(LANES + lane)
                        out_k[pad] = zero
                        peak_k[pad] = zero
                        inv_norm_k[pad] = zero
                        floor_k[pad] = highest
            else:
                for lane in range(LANES):
                    ul = np.uint64(lane)
                    i = row + ul
                    p = base + ul
                    weighted[i] = peak[i] if arg[i] >= 0 else zero
                    argmax_k[p] = items[arg[i]] if arg[i] >= 0 else -1  # the pair, as the backward pass numbers it
                    out_k[p] = weighted[i]
                if last_tile:
                    for lane in range(LANES):
                        pad = base + np.uint64(LANES + lane)
                        out_k[pad] = zero
                        argmax_k[pad] = -1
            if transposed:
                for lane in range(num_lanes):
                    image[image_offset + (lane0 + lane) * width + row0 + r] = weighted[row + np.uint64(lane)]
            else:
                target = np.uint64(image_offset + (row0 + r) * width + lane0)
                for lane in range(num_lanes):
                    image[target + np.uint64(lane)] = weighted[row + np.uint64(lane)]


@kernel
def _to_kernel_layout(
    flat: np.ndarray, layout: np.ndarray, worker: int, num_workers: int, result: np.ndarray
) -> None:  # pragma: no cover - compiled by numba
    """Copy views ``worker, worker + num_workers, ...`` of a flat row-major buffer into kernel layout (zero
    padding)."""
    for v in range(worker, layout.shape[0], num_workers):
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


@jit
def _accumulate(
    acc: np.ndarray, lane: int, dg: float, e: float, g: float, dx: float, dy: float, half: float
) -> None:  # pragma: no cover - compiled by numba
    """Add one lane's terms to the partial sums ``acc[:, lane]`` of ``dL/dg exp(-q / 2)``, ``dq dx``, ``dq dy``,
    ``dq dx^2``, ``dq dx dy``, ``dq dy^2``, with ``dq = dL/dq = -g dL/dg / 2``."""
    dq = -half * dg * g
    acc[0, lane] += dg * e
    acc[1, lane] += dq * dx
    acc[2, lane] += dq * dy
    acc[3, lane] += dq * dx * dx
    acc[4, lane] += dq * dx * dy
    acc[5, lane] += dq * dy * dy


@jit
def _pair_row(
    soft: bool,
    pair: int,
    fixed: float,
    coords: np.ndarray,
    u0: int,
    p0: int,
    lo: float,
    hi: float,
    mx: float,
    my: float,
    ca: float,
    cb2: float,
    cc: float,
    amp: float,
    log_amp: float,
    transposed: bool,
    beta: float,
    half: float,
    cutoff: float,
    grad_k: np.ndarray,
    out_k: np.ndarray,
    peak_k: np.ndarray,
    inv_norm_k: np.ndarray,
    floor_k: np.ndarray,
    argmax_k: np.ndarray,
    acc: np.ndarray,
) -> None:  # pragma: no cover - compiled by numba
    """Add one window of ``LANES`` pixels (first lane ``u0``, kernel-layout index ``p0``) of a row to the pair's
    partial sums ``acc``, with the forward pass's test per lane (soft: the floor; hard: the arg-max)."""
    zero = half - half
    one = half + half
    # The mode is tested outside the lane loops: a branch inside keeps them scalar (the arrays of the other
    # mode are empty, so LLVM may not hoist their loads).
    if soft:
        for lane in range(LANES):
            ul = np.uint64(lane)
            p = p0 + ul
            at = coords[u0 + ul]
            dx, dy, q = _offset(fixed, at, mx, my, ca, cb2, cc, transposed)
            value = log_amp - half * max(q, zero)
            taken = (at >= lo) & (at <= hi) & (q <= cutoff) & (value >= floor_k[p])
            e_q = exp(-half * min(q, cutoff))  # clamped as in ``_forward``: no subnormals
            g = amp * e_q
            # Masked lanes take exp(0): far below the peak their exp(beta (g - m)) / S can be subnormal, and
            # subnormal arithmetic is slow even when the result is then discarded.
            # Loaded in every lane (rows are padded, p is in range): a load made conditional on ``taken`` is a
            # masked load on AVX2 (slow on AMD) and keeps the loop scalar on NEON, which has none
            # (``bench_cpu.py --asm-target aarch64``).
            pk, gk, ok, ik = peak_k[p], grad_k[p], out_k[p], inv_norm_k[p]
            s = exp(beta * (g - pk) if taken else zero) * ik
            dg = gk * s * (one + beta * (g - ok))
            _accumulate(acc, ul, dg if taken else zero, e_q, g, dx, dy, half)
    else:
        for lane in range(LANES):
            ul = np.uint64(lane)
            p = p0 + ul
            at = coords[u0 + ul]
            dx, dy, q = _offset(fixed, at, mx, my, ca, cb2, cc, transposed)
            taken = (at >= lo) & (at <= hi) & (q <= cutoff) & (argmax_k[p] == pair)
            e_q = exp(-half * min(q, cutoff))
            gk = grad_k[p]  # loaded in every lane, as above
            _accumulate(acc, ul, gk if taken else zero, e_q, amp * e_q, dx, dy, half)


@kernel
def _backward(
    pair_values: np.ndarray,
    pair_ints: np.ndarray,
    layout: np.ndarray,
    coords: np.ndarray,
    pair_span: np.ndarray,
    entry_origin: np.ndarray,
    entry_bits: np.ndarray,
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
    floor_k: np.ndarray,
    argmax_k: np.ndarray,
    grad_means: np.ndarray,
    grad_conics: np.ndarray,
    grad_amps: np.ndarray,
    pair_rows: np.ndarray,
) -> None:
    """Gradients of the pairs ``worker, worker + num_workers, ...`` (:func:`_bin`'s numbering).

    A pair visits only the rows where the forward pass took some of its pixels (``entry_bits`` of its tiles),
    in windows of ``LANES`` from its first lane, with the forward's test per lane (:func:`_pair_row`).  ``d g / d a = exp(-q / 2)`` and ``d g / d q = -g / 2``; ``q`` is
    linear in ``(A, B, C)`` and quadratic in ``(dx, dy) = pixel - mean``.  Lane-wise partial sums are reduced
    in float64.  ``pair_rows[v, k]`` counts the windows visited.  Culled pairs are not visited: their gradients
    stay as the caller initialised them (zero).
    """
    # Lane-wise partial sums of dg exp(-q/2), dq dx, dq dy, dq dx^2, dq dx dy, dq dy^2.
    acc = np.empty((6, LANES), grad_k.dtype)
    for pair in range(worker, pair_ints.shape[0], num_workers):
        v, k = pair_ints[pair, 4], pair_ints[pair, 5]
        taken = np.uint32(0)
        for e in range(pair_span[pair, 0], pair_span[pair, 1]):
            taken |= entry_bits[e]
        if taken == 0:
            pair_rows[v, k] = 0  # nothing taken (about a third of the pairs at the default beta)
            continue
        mx, my, ca, cb2, cc, cb, amp, log_amp, l0, l1, _, _ = _record(pair_values, pair_ints, pair)
        transposed = layout[v, _TRANSPOSED] != 0
        stride, offset = layout[v, _STRIDE], layout[v, _OFFSET]
        lo, hi = coords[l0], coords[l1]
        visited = 0
        # A literal 0, not ``zero``: LLVM then writes it as a memset, in vector stores; ``zero`` (not known to
        # be 0) is stored one element at a time, and the vector loads of the first window cannot take their
        # values from several narrow stores (they wait until the stores reach the cache).
        acc[:] = 0
        e = pair_span[pair, 0]
        while e < pair_span[pair, 1]:
            # The pair's tiles in one band of rows (consecutive entries): the union of their rows, each walked
            # once in windows from the pair's first lane, so a row across two tiles costs one window, not two.
            row0 = entry_origin[e, 1]
            bits = np.uint32(0)
            while e < pair_span[pair, 1] and entry_origin[e, 1] == row0:
                bits |= entry_bits[e]
                e += 1
            while bits != 0:
                r = row0 + trailing_zeros(bits)
                bits &= bits - np.uint32(1)
                fixed = coords[r]
                for c0 in range(l0, l1 + 1, LANES):
                    u0 = np.uint64(c0)
                    p0 = np.uint64(offset + r * stride + c0)
                    _pair_row(soft, pair, fixed, coords, u0, p0, lo, hi, mx, my, ca, cb2, cc, amp, log_amp, transposed,
                              beta, half, cutoff, grad_k, out_k, peak_k, inv_norm_k, floor_k, argmax_k, acc)  # fmt: skip
                    visited += 1
        pair_rows[v, k] = visited
        # Halves first (vector adds), then the remaining lanes in float64.
        for sum_index in range(6):
            for lane in range(LANES // 2):
                acc[sum_index, lane] += acc[sum_index, lane + LANES // 2]
        s_a = s_x = s_y = s_xx = s_xy = s_yy = 0.0
        for lane in range(LANES // 2):
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
    """``beta``, 1/2, the cut-off and ``T / beta`` as numpy scalars of the image dtype (keeps float32 kernels in
    float32), and the dtype's unit roundoff (float64)."""
    scalar = np.float32 if dtype == torch.float32 else np.float64
    unit = float(np.finfo(scalar).eps) / 2
    return scalar(beta), scalar(0.5), scalar(_CUTOFF), scalar(SOFT_SKIP_T[dtype] / beta), unit


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
        beta_s, half, cutoff, skip, unit = _scalars(dtype, beta)
        rects_np = numpy_view(rects.to(torch.int32))
        means_np, conics_np, amps_np = numpy_view(means2d), numpy_view(conics), numpy_view(amplitudes)
        with np.errstate(divide="ignore", invalid="ignore"):  # culled pairs may have a <= 0; never read
            log_amps = np.log(amps_np)
        layout, tile_view, total_k = _layout(shapes, rects_np)
        # Binning, one view per worker: sizes first, then each view fills its own part of the arrays.
        num_views = layout.shape[0]
        sizes = np.empty((num_views, 2), np.int64)
        run_parallel(_bin_sizes, (rects_np, layout), (sizes,), num_views)
        bases = np.zeros((num_views + 1, 2), np.int64)
        bases[1:] = np.cumsum(sizes, axis=0)
        capacity, num_pairs = int(bases[-1, 0]), int(bases[-1, 1])
        tile_range = np.empty((len(tile_view), 2), np.int64)
        items, item_entry = np.empty(capacity, np.int32), np.empty(capacity, np.int32)
        entry_origin = np.empty((capacity, 2), np.int32)
        pair_values, pair_ints = np.empty((num_pairs, 8), np_dtype), np.empty((num_pairs, 6), np.int32)
        pair_span = np.empty((num_pairs, 2), np.int64)
        before = (means_np, conics_np, amps_np, log_amps, rects_np, layout, unit, bases)
        after = (tile_range, items, item_entry, entry_origin, pair_values, pair_ints, pair_span)
        run_parallel(_bin, before, after, num_views)
        # Pixel coordinates along both kernel axes: lanes (up to the padded stride) and rows (which, in a
        # transposed layout, run along the image's width and can exceed the stride).
        coords = np.arange(int(max(layout[:, _STRIDE].max(), layout[:, _ROWS].max())) + LANES, dtype=np_dtype)
        soft = mode == "soft"
        image = torch.empty(pixel_offsets(shapes)[-1], dtype=dtype)
        # Every element, padding included, is written by ``_forward``.
        out_k = np.empty(total_k, np_dtype)
        peak_k, inv_norm_k, floor_k = (np.empty(total_k if soft else 0, np_dtype) for _ in range(3))
        argmax_k = np.empty(0 if soft else total_k, np.int32)
        tile_stats = np.empty((len(tile_view), len(_STAT_COLUMNS)), np.int64)
        entry_bits = np.empty(capacity, np.uint32)
        before = (
            pair_values, pair_ints, layout, tile_view, tile_range, items, coords, soft, EARLY_TERMINATION, beta_s, half,
            cutoff, skip, np_dtype(np.inf), int((tile_range[:, 1] - tile_range[:, 0]).max()),
        )  # fmt: skip
        after = (
            item_entry, np.empty(capacity, np.uint32), entry_bits, image.numpy(), out_k, peak_k, inv_norm_k, floor_k,
            argmax_k, tile_stats,
        )  # fmt: skip
        run_parallel(_forward, before, after, len(tile_view))
        _LAST_STATISTICS.clear()
        _LAST_STATISTICS.update({name: tile_stats[:, i] for i, name in enumerate(_STAT_COLUMNS)})
        ctx.save_for_backward(means2d, conics, amplitudes)
        ctx.arrays = (pair_values, pair_ints, layout, coords, pair_span, entry_origin, entry_bits, out_k, peak_k,
                      inv_norm_k, floor_k, argmax_k)  # fmt: skip
        ctx.soft, ctx.beta = soft, beta
        return image

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_image: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        means2d, conics, amplitudes = ctx.saved_tensors
        pair_values, pair_ints, layout, coords, pair_span, entry_origin, entry_bits, *state = ctx.arrays
        dtype = means2d.dtype
        beta_s, half, cutoff, _, _ = _scalars(dtype, ctx.beta)
        grad_k = np.empty(state[0].shape[0], state[0].dtype)
        run_parallel(_to_kernel_layout, (numpy_view(grad_image.to(dtype)), layout), (grad_k,), layout.shape[0])
        # Culled pairs are not visited: their gradients stay zero.
        grads = tuple(torch.zeros(t.shape, dtype=dtype) for t in (means2d, conics, amplitudes))
        pair_rows = np.zeros(amplitudes.shape, np.int64)
        before = (pair_values, pair_ints, layout, coords, pair_span, entry_origin, entry_bits, ctx.soft, beta_s, half,
                  cutoff)  # fmt: skip
        after = (grad_k, *state, *(g.numpy() for g in grads), pair_rows)
        run_parallel(_backward, before, after, pair_ints.shape[0])
        _LAST_STATISTICS["backward_rows"] = pair_rows
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
