"""Tile-binned MIP rasteriser with Triton kernels (CUDA; CPU under ``TRITON_INTERPRET=1``).

Pipeline, per call (gsplat-like, without depth):

1. **Binning** (non-differentiable, from ``projection.rects``): a kernel counts
   the tiles each (view, Gaussian) pair overlaps, ``torch.cumsum`` turns the
   counts into slots, a second kernel writes one ``(tile key, pair id)`` entry
   per overlap, ``torch.sort`` groups the entries by tile and, with
   ``EARLY_TERMINATION``, orders each tile's entries by descending amplitude
   (one sort of ``tile * pairs + amplitude rank`` keys; stable, so the order
   inside a tile, hence the float rounding, is reproducible) and
   ``torch.searchsorted`` gives each tile its range.  Culled pairs count zero
   tiles; only the integer rectangles are read, so NaN or Inf parameters cannot
   corrupt the bins.
2. **Forward** (one program per tile, ``BATCH`` Gaussians per step): online
   softmax (``soft``) or max + arg-max (``max``); stores the image plus, per
   pixel, ``(m, S)`` or the arg-max pair id for the backward pass.  With early
   termination a tile stops before the first batch whose (largest) amplitude
   cannot matter any more (``triton_kernels.forward_kernel``) and records how
   many entries it evaluated.
3. **Backward** (one program per tile): recomputes ``g`` for the entries the
   forward evaluated, forms ``dL/dg``, reduces the six parameter gradients over
   the tile's pixels in registers and adds them with atomics into per-pair
   buffers.

Pixels of all views share one flat buffer (row-major per view, views one after
the other, as ``raster_torch.pixel_offsets``); tiles never straddle views.

Host synchronisation: sizing the intersection buffer exactly needs the total
count on the host (one ``.item()`` per forward).  With a fixed ``capacity``
(:class:`TritonRasterizer`) nothing syncs and every shape is static, so the
forward and backward can be captured in a CUDA graph; entries beyond the
capacity are dropped, and :meth:`TritonRasterizer.check_capacity` tells (with a
sync, when the caller chooses) whether that happened.

Everything runs in float32; inputs of other dtypes are cast (differentiably).
Hard-mode ties (two Gaussians with bit-identical values at a pixel) send the
whole gradient to one of them (the larger pair id within a batch, the earlier
batch across batches), where the reference splits it evenly.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

from .project import CUTOFF_SIGMA, DEFAULT_BETA, SOFT_SKIP_T, Projection
from .raster_torch import MODES, pixel_offsets, split_views

TILE = 8
"""Default tile side in pixels (must be a power of two)."""
BATCH = 32
"""Default Gaussians per inner-loop step (must be a power of two)."""
EARLY_TERMINATION = True
"""Amplitude-ordered tiles that stop early (see the module docstring); ``False`` evaluates every entry, as
before this was added (for benchmarks and tests; results differ by the bound of ``project.SOFT_SKIP_T``)."""

_KERNELS: ModuleType | None = None
_LAYOUTS: dict[tuple, _Layout] = {}
_WARMUP: dict[tuple[bool, str], str | None] = {}


def kernels() -> ModuleType:
    """The kernel module, decorated for the interpreter iff ``TRITON_INTERPRET=1`` now.

    ``triton.jit`` chooses compiled or interpreted when the module is imported;
    if the environment variable changed since (as in a test session that turns
    the interpreter on for some tests only), the module is reloaded so the
    kernels follow the current setting.  Interpreted kernels work whenever
    triton was imported; compiled ones need triton itself imported without
    the interpreter (its own ``tl.sum`` / ``tl.max`` are decorated then).
    """
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = importlib.import_module(".triton_kernels", __package__)
    if _KERNELS.is_interpreted() != _KERNELS.interpret_requested():
        _KERNELS = importlib.reload(_KERNELS)
    return _KERNELS


def _check_power_of_two(name: str, value: int) -> None:
    if value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two, got {value}")


@dataclass(frozen=True)
class _Layout:
    """Tiling of a list of views (cached per shapes, tile size and device)."""

    view_info: torch.Tensor  # [V, 4] int32 (width, height, tiles_x, first_tile)
    tile_info: torch.Tensor  # [T, 5] int32 (x0, y0, width, height, pixel_offset)
    tile_keys: torch.Tensor  # [T + 1] int32 0..T, the boundaries searched in the sorted keys
    num_tiles: int
    num_pixels: int


def _layout(shapes: list[tuple[int, int]], tile: int, device: torch.device) -> _Layout:
    key = (tuple((int(h), int(w)) for h, w in shapes), tile, str(device))
    cached = _LAYOUTS.get(key)
    if cached is not None:
        return cached
    views, tiles = [], []
    offsets = pixel_offsets(list(key[0]))
    for index, (height, width) in enumerate(key[0]):
        tiles_x, tiles_y = -(-width // tile), -(-height // tile)
        views.append((width, height, tiles_x, len(tiles)))
        tiles += [
            (tx * tile, ty * tile, width, height, offsets[index]) for ty in range(tiles_y) for tx in range(tiles_x)
        ]
    if offsets[-1] >= 2**31:
        raise ValueError(f"{offsets[-1]} pixels in one call exceed the int32 pixel index of the triton kernels")
    layout = _Layout(
        torch.tensor(views, dtype=torch.int32, device=device).reshape(-1, 4),
        torch.tensor(tiles, dtype=torch.int32, device=device).reshape(-1, 5),
        torch.arange(len(tiles) + 1, dtype=torch.int32, device=device),
        len(tiles),
        offsets[-1],
    )
    if len(_LAYOUTS) >= 64:  # shapes rarely change; bound the cache anyway
        _LAYOUTS.clear()
    _LAYOUTS[key] = layout
    return layout


@dataclass
class Binning:
    """Gaussians of every tile.

    Attributes
    ----------
    ranges
        [T + 1] int64: tile ``t`` owns ``ids[ranges[t]:ranges[t + 1]]``.
    ids
        int32 pair ids (``view * K + gaussian``) grouped by tile.
    needed
        int64 scalar tensor (on the device): intersections the scene needs.
    capacity
        Length of the intersection buffer (``needed`` when sized exactly).
    visited
        [T] int32, set by the forward kernel: entries each tile evaluated (all of
        them without early termination).
    """

    ranges: torch.Tensor
    ids: torch.Tensor
    needed: torch.Tensor
    capacity: int
    visited: torch.Tensor | None = None


def bin_gaussians(
    rects: torch.Tensor,
    layout: _Layout,
    tile: int,
    capacity: int | None = None,
    amplitudes: torch.Tensor | None = None,
) -> Binning:
    """Group the (view, Gaussian) pairs by the tiles their rectangles overlap.

    Parameters
    ----------
    rects
        [V, K, 4] int32 inclusive pixel rectangles (culled when empty).
    layout
        Tiling of the views.
    tile
        Tile side in pixels.
    capacity
        Fixed number of intersection slots (no host sync, static shapes); ``None``
        sizes the buffer exactly, which reads the total back to the host once.
    amplitudes
        [V, K] peak values: each tile's entries in descending amplitude (ties by
        pair id); ``None`` keeps pair-id order.
    """
    k = kernels()
    device = rects.device
    num_views, num_gaussians = rects.shape[0], rects.shape[1]
    num_pairs = num_views * num_gaussians
    rects = rects.reshape(-1, 4).to(torch.int32).contiguous()
    if num_pairs >= 2**31 // 10:
        raise ValueError(f"{num_pairs} (view, Gaussian) pairs exceed the int32 indexing of the triton kernels")
    if num_pairs == 0:
        needed = torch.zeros((), dtype=torch.int64, device=device)
        size = 0 if capacity is None else capacity
        keys = torch.full((size,), layout.num_tiles, dtype=torch.int32, device=device)
        ids = torch.zeros(size, dtype=torch.int32, device=device)
    else:
        counts = torch.empty(num_pairs, dtype=torch.int32, device=device)
        grid = (triton_cdiv(num_pairs, k.BLOCK),)
        k.count_tiles_kernel[grid](
            rects, layout.view_info, counts, num_pairs, num_gaussians, TILE=tile, BLOCK=k.BLOCK, **k.BINNING_OPTIONS
        )
        ends = torch.cumsum(counts, 0, dtype=torch.int64)
        needed = ends[-1]
        if capacity is None:
            size = int(needed)  # the one host sync of exact sizing
            keys = torch.empty(size, dtype=torch.int32, device=device)
        else:
            size = capacity
            # Unused slots keep a key past the last tile: they sort last and no range covers them.
            keys = torch.full((size,), layout.num_tiles, dtype=torch.int32, device=device)
        ids = torch.zeros(size, dtype=torch.int32, device=device)
        if size > 0:
            k.expand_tiles_kernel[grid](
                rects,
                layout.view_info,
                ends,
                keys,
                ids,
                num_pairs,
                num_gaussians,
                size,
                TILE=tile,
                BLOCK=k.BLOCK,
                **k.BINNING_OPTIONS,
            )
    bounds = layout.tile_keys
    if amplitudes is not None and num_pairs > 0:
        # Key tile * pairs + rank of the amplitude (descending): one sort groups by tile and orders each tile.
        # Unused slots (key = number of tiles) still sort past every tile.
        ranking = torch.argsort(amplitudes.detach().reshape(-1), descending=True, stable=True)
        rank = torch.empty_like(ranking)
        rank[ranking] = torch.arange(num_pairs, device=device)
        keys = keys.to(torch.int64) * num_pairs + rank[ids.to(torch.int64)]
        bounds = bounds.to(torch.int64) * num_pairs
    sorted_keys, order = torch.sort(keys, stable=True)
    ids = ids[order]
    ranges = torch.searchsorted(sorted_keys, bounds)
    return Binning(ranges, ids, needed, size)


def triton_cdiv(a: int, b: int) -> int:
    """Ceiling division of positive integers."""
    return -(-a // b)


def _nonempty(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` or a one-element stand-in: the CUDA launcher rejects null data pointers."""
    return tensor if tensor.numel() > 0 else torch.zeros(1, dtype=tensor.dtype, device=tensor.device)


@dataclass
class _Settings:
    tile: int
    batch: int
    options: dict[str, Any]
    early: bool = True


class _RasterizeFunction(torch.autograd.Function):
    """Flat image of all views from float32 means2d, conics and amplitudes."""

    @staticmethod
    def forward(
        ctx: Any,
        means2d: torch.Tensor,
        conics: torch.Tensor,
        amplitudes: torch.Tensor,
        rects: torch.Tensor,
        layout: _Layout,
        binning: Binning,
        mode: str,
        beta: float,
        settings: _Settings,
    ) -> torch.Tensor:
        k = kernels()
        device = means2d.device
        num_pairs = means2d.shape[0] * means2d.shape[1]
        params = torch.cat(
            [
                means2d.reshape(num_pairs, 2),
                conics.reshape(num_pairs, 3),
                amplitudes.reshape(num_pairs, 1),
                rects.reshape(num_pairs, 4).to(torch.float32),
            ],
            dim=1,
        )
        params = _nonempty(params.contiguous())
        ids = _nonempty(binning.ids)
        pixels = layout.num_pixels
        out = torch.empty(pixels, dtype=torch.float32, device=device)
        code = k.MODE_CODES[mode]
        if code == k.SOFT:
            peak = torch.empty(pixels, dtype=torch.float32, device=device)
            norm = torch.empty(pixels, dtype=torch.float32, device=device)
            argmax = torch.empty(1, dtype=torch.int32, device=device)
        else:
            peak = norm = torch.empty(1, dtype=torch.float32, device=device)
            argmax = torch.empty(pixels, dtype=torch.int32, device=device)
        visited = torch.empty(max(layout.num_tiles, 1), dtype=torch.int32, device=device)
        binning.visited = visited[: layout.num_tiles]
        k.forward_kernel[(layout.num_tiles,)](
            params,
            layout.tile_info,
            binning.ranges,
            ids,
            out,
            peak,
            norm,
            argmax,
            visited,
            float(beta),
            float(CUTOFF_SIGMA**2),
            SOFT_SKIP_T[torch.float32] / float(beta),
            int(settings.early),
            MODE=code,
            TILE=settings.tile,
            BATCH=settings.batch,
            **settings.options,
        )
        ctx.save_for_backward(out)
        ctx.state = (params, ids, peak, norm, argmax, visited, layout, binning, code, float(beta), settings, num_pairs)
        ctx.shapes = (means2d.shape, conics.shape, amplitudes.shape)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (out,) = ctx.saved_tensors
        params, ids, peak, norm, argmax, visited, layout, binning, code, beta, settings, num_pairs = ctx.state
        k = kernels()
        grads = torch.zeros(max(num_pairs, 1), k.GRAD_COLUMNS, dtype=torch.float32, device=out.device)
        if any(ctx.needs_input_grad[:3]):
            k.backward_kernel[(layout.num_tiles,)](
                params,
                layout.tile_info,
                binning.ranges,
                ids,
                out,
                peak,
                norm,
                argmax,
                visited,
                grad_out.to(torch.float32).contiguous(),
                grads,
                beta,
                float(CUTOFF_SIGMA**2),
                MODE=code,
                TILE=settings.tile,
                BATCH=settings.batch,
                **settings.options,
            )
        grads = grads[:num_pairs]
        means_shape, conics_shape, amps_shape = ctx.shapes
        return (
            grads[:, 0:2].reshape(means_shape),
            grads[:, 2:5].reshape(conics_shape),
            grads[:, 5].reshape(amps_shape),
            None,
            None,
            None,
            None,
            None,
            None,
        )


@dataclass
class TritonRasterizer:
    """Triton rasteriser with its settings; call it like :func:`rasterize`.

    Attributes
    ----------
    tile
        Tile side in pixels (power of two; 8 or 16).
    batch
        Gaussians evaluated together per step (power of two).
    capacity
        Fixed intersection-buffer length (no host sync, CUDA-graph friendly), or
        ``None`` to size it exactly every call (one sync).
    num_warps
        Warps per raster program; ``None`` picks about 8 pixel-Gaussian elements per thread.
    last_binning
        Binning of the latest call; ``last_binning.needed`` is the intersection
        count on the device, for :meth:`check_capacity`, and ``last_binning.visited``
        the entries each tile evaluated (early termination), for tests and benchmarks.
    """

    tile: int = TILE
    batch: int = BATCH
    capacity: int | None = None
    num_warps: int | None = None
    last_binning: Binning | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        _check_power_of_two("tile", self.tile)
        _check_power_of_two("batch", self.batch)
        if self.capacity is not None and self.capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {self.capacity}")

    def __call__(self, projection: Projection, mode: str = "soft", beta: float = DEFAULT_BETA) -> list[torch.Tensor]:
        """Render every view of ``projection``; one [H, W] image per view (differentiable)."""
        if mode not in MODES:
            raise ValueError(f"unknown render mode {mode!r}; expected one of {MODES}")
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        dtype = projection.means2d.dtype
        device = projection.means2d.device
        layout = _layout(projection.shapes, self.tile, device)
        early = EARLY_TERMINATION
        amplitudes = projection.amplitudes if early else None
        binning = bin_gaussians(projection.rects, layout, self.tile, self.capacity, amplitudes)
        self.last_binning = binning
        options = kernels().launch_options(self.tile, self.batch, self.num_warps)
        settings = _Settings(self.tile, self.batch, options, early)
        flat = _RasterizeFunction.apply(
            projection.means2d.to(torch.float32),
            projection.conics.to(torch.float32),
            projection.amplitudes.to(torch.float32),
            projection.rects,
            layout,
            binning,
            mode,
            float(beta),
            settings,
        )
        return split_views(flat.to(dtype), projection.shapes)

    def check_capacity(self) -> int:
        """Intersections the latest call needed (host sync); raises if a fixed capacity was too small."""
        if self.last_binning is None:
            raise RuntimeError("nothing rendered yet")
        needed = int(self.last_binning.needed)
        if self.capacity is not None and needed > self.capacity:
            raise RuntimeError(
                f"the triton intersection buffer holds {self.capacity} entries but the scene needs {needed}; "
                "the last render dropped tiles: raise capacity"
            )
        return needed


_DEFAULT = TritonRasterizer()


def rasterize(projection: Projection, mode: str = "soft", beta: float = DEFAULT_BETA) -> list[torch.Tensor]:
    """Render every view of ``projection`` with default settings; one [H, W] image per view.

    Differentiable w.r.t. ``projection.means2d``, ``conics`` and ``amplitudes``;
    same results as ``raster_torch.rasterize`` up to float32 rounding.
    """
    return _DEFAULT(projection, mode, beta)


def _warm_up(device: torch.device) -> None:
    """Render and differentiate a tiny two-view scene in both modes (compiles the default kernels)."""
    means2d = torch.tensor([[[2.0, 3.0], [7.5, 1.0], [-3.0, 2.0]], [[1.0, 1.0], [2.0, 6.0], [9.0, 9.0]]], device=device)
    conics = torch.tensor([0.5, 0.1, 0.4], device=device).expand(2, 3, 3).clone()
    amplitudes = torch.full((2, 3), 0.8, device=device)
    rects = torch.tensor(
        [[[0, 0, 6, 6], [3, 0, 10, 4], [1, 1, 0, 0]], [[0, 0, 4, 4], [0, 2, 2, 8], [1, 1, 0, 0]]],
        dtype=torch.int32,
        device=device,
    )
    for mode in MODES:
        leaves = [t.clone().requires_grad_(True) for t in (means2d, conics, amplitudes)]
        images = rasterize(Projection(*leaves, rects, [(5, 11), (9, 3)]), mode, 20.0)
        sum(image.sum() for image in images).backward()
        values = [image.detach() for image in images] + [leaf.grad for leaf in leaves]
        if not all(bool(torch.isfinite(v).all()) for v in values) or not float(values[0].max()) > 0:
            raise RuntimeError(f"warm-up render ({mode}) gave wrong values")


def unavailable_reason() -> str | None:
    """Why this backend cannot run here, or ``None`` when it can.

    Needs triton and either CUDA or ``TRITON_INTERPRET=1`` (the slow CPU
    interpreter, for tests); then renders a tiny scene once per setting to
    catch compiler, driver or launch problems early.
    """
    try:
        interpreted = kernels().is_interpreted()
    except ImportError as error:
        return f"triton backend unavailable: cannot import triton ({error}); install napari-neurogs-mip[cuda]"
    except Exception as error:  # e.g. a triton whose API these kernels do not match
        return f"triton backend unavailable: the kernels do not load ({type(error).__name__}: {error})"
    if not interpreted and not torch.cuda.is_available():
        return (
            "triton backend unavailable: no CUDA device (torch.cuda.is_available() is False); "
            "set TRITON_INTERPRET=1 to run its kernels (slowly) on the CPU"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    key = (interpreted, device)
    if key not in _WARMUP:
        try:
            _warm_up(torch.device(device))
            _WARMUP[key] = None
        except Exception as error:  # any compiler/driver/launch failure means "do not use this backend"
            text = f"{type(error).__name__}: {error}".strip()
            _WARMUP[key] = f"triton backend unavailable: warm-up render on {device} failed: {text[:500]}"
    return _WARMUP[key]
