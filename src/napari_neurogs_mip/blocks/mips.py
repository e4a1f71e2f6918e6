"""MIPs of a model of a large volume, rendered tile by tile, written as TIFF (small) or OME-Zarr (large).

A view of the whole volume can be far larger than one render should be (the
``xy`` MIP of a 20,000^2-pixel slab).  :func:`render_view` renders it in tiles of
at most ``tile`` x ``tile`` pixels: a tile is the same view with its origin moved
(:func:`tile_view`), and only the Gaussians whose projected centres lie within
the renderer's reach of the tile are rendered into it (:func:`near_tile`), so a
tile's pixels are exactly those of a render of the whole view.  Views up to
:data:`LARGE_MIP_PIXELS` are written as one ImageJ TIFF each
(:func:`.io.tiff.write_mips`); larger ones as OME-Zarr images filled tile by
tile (:func:`.io.lazy.write_ome_zarr`), never whole in memory.
:func:`render_footprint` renders a part of a model (a block's Gaussians) only
where it reaches: the napari widget max-composites the blocks' MIPs with it as
they finish.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..model import GaussianModel
from ..render.project import CUTOFF_SIGMA
from ..views import AXIS_VIEWS, View

LARGE_MIP_PIXELS = 1 << 25
"""Views with more pixels (128 MiB as float32) are written as OME-Zarr instead of TIFF."""
TILE = 2048
"""Edge of a rendered tile, pixels."""
_AXIS_NAMES = {"xy": ("y", "x"), "xz": ("z", "x"), "yz": ("z", "y")}


def tile_view(view: View, rows: tuple[int, int], cols: tuple[int, int]) -> View:
    """The part ``rows`` x ``cols`` (pixel ranges) of ``view`` as a view of its own (same pixels)."""
    origin = np.asarray(view.origin) + rows[0] * view.dv * np.asarray(view.v) + cols[0] * view.du * np.asarray(view.u)
    return View(view.name, tuple(origin), view.u, view.v, view.du, view.dv, rows[1] - rows[0], cols[1] - cols[0],
                view.azimuth, view.elevation)  # fmt: skip


def _projected(model: GaussianModel, view: View, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Projected centres (column, row; pixels) of a physical-frame ``model``'s Gaussians in ``view``, and the
    distance in pixels beyond which each reaches no pixel centre.

    A Gaussian reaches pixels within ``CUTOFF_SIGMA`` of its projected centre, in its projected standard
    deviation with the pixel filter ``eps`` (px^2) added; its largest 3D scale bounds the former.
    """
    origin = torch.as_tensor(view.origin, dtype=torch.float64)
    offsets = model.means.detach().double() - origin
    col = offsets @ torch.as_tensor(view.u, dtype=torch.float64) / view.du
    row = offsets @ torch.as_tensor(view.v, dtype=torch.float64) / view.dv
    sigma = torch.exp(model.log_scales.detach().double().amax(dim=1))
    return col, row, CUTOFF_SIGMA * torch.sqrt((sigma / min(view.du, view.dv)) ** 2 + eps) + 1.0


def near_tile(model: GaussianModel, view: View, eps: float) -> GaussianModel | None:
    """The Gaussians of a physical-frame ``model`` that can reach a pixel of ``view`` (``None``: none can)."""
    col, row, reach = _projected(model, view, eps)
    inside = (col + reach >= -0.5) & (col - reach <= view.width - 0.5)
    inside &= (row + reach >= -0.5) & (row - reach <= view.height - 0.5)
    if not bool(inside.any()):
        return None
    rows = torch.nonzero(inside).squeeze(1)
    subset = {n: t.detach()[rows] for n, t in model.tensors().items()}
    return GaussianModel(**subset, frame=model.frame, geometry=model.geometry)


def tiles(view: View, tile: int = TILE) -> Iterator[tuple[tuple[int, int], tuple[int, int]]]:
    """Row and column ranges of the tiles of ``view``."""
    for r in range(0, view.height, tile):
        for c in range(0, view.width, tile):
            yield (r, min(r + tile, view.height)), (c, min(c + tile, view.width))


def render_view(model: GaussianModel, view: View, renderer: Any, out: Any = None, tile: int = TILE) -> Any:
    """Render a physical-frame ``model`` into ``view`` tile by tile, into ``out`` (an array-like of the view's
    shape, e.g. a zarr array) or a new float32 array; returns ``out``."""
    if out is None:
        out = np.zeros(view.shape, dtype=np.float32)
    device = renderer.device
    for rows, cols in tiles(view, tile):
        part = tile_view(view, rows, cols)
        near = near_tile(model, part, renderer.eps)
        if near is None:
            image = np.zeros(part.shape, dtype=np.float32)
        else:
            with torch.no_grad():
                image = renderer.render(near.to(device), [part])[0].cpu().numpy()
        out[rows[0] : rows[1], cols[0] : cols[1]] = image
    return out


def footprint(model: GaussianModel, view: View, eps: float) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """Row and column ranges of the pixels of ``view`` that a Gaussian of a physical-frame ``model`` can reach
    (:func:`near_tile`'s rule); ``None`` when none can."""
    if model.num_gaussians == 0:
        return None
    col, row, reach = _projected(model, view, eps)
    ranges = []
    for centre, size in ((row, view.height), (col, view.width)):
        first = max(0, math.floor(float((centre - reach).min()) - 0.5))
        stop = min(size, math.ceil(float((centre + reach).max()) + 0.5) + 1)
        if first >= stop:
            return None
        ranges.append((first, stop))
    return ranges[0], ranges[1]


def render_footprint(
    model: GaussianModel, view: View, renderer: Any
) -> tuple[tuple[int, int], tuple[int, int], np.ndarray] | None:
    """The MIP of a physical-frame ``model`` in ``view`` where it can be non-zero: ``(rows, cols, image)``, the
    pixels of a render of the whole view in those ranges (zero elsewhere); ``None`` when it reaches no pixel.

    A part of a large model (one block's Gaussians) costs a render of its own size, not the whole view's; the
    hard MIP of the whole model is the pixel-wise maximum of its parts' (docs/blocks.md).
    """
    box = footprint(model, view, renderer.eps)
    if box is None:
        return None
    rows, cols = box
    return rows, cols, render_view(model, tile_view(view, rows, cols), renderer)


def model_renderer(config: Any) -> Any:
    """The renderer of a run's :class:`.train.FitConfig`: its device, backend, mode, beta and pixel filter."""
    from ..device import resolve_device
    from ..render import Renderer

    device, _ = resolve_device(config.device)
    return Renderer.create(device, config.backend, config.mode, config.beta, config.eps, config.compensate)


def image_axes(view: View) -> tuple[str, str]:
    """Names of a view's (row, column) axes: the volume's axes for axis views, ``v``/``u`` for orbit views."""
    return _AXIS_NAMES.get(view.name, ("v", "u"))


def zarr_path(folder: Path, name: str) -> Path:
    """Where a large view's OME-Zarr goes: ``<folder>/<view>.ome.zarr`` (the name made file-safe)."""
    return Path(folder) / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.ome.zarr"


def write_model_mips(
    model: GaussianModel, views: Sequence[View], folder: Path, renderer: Any, overwrite: bool = True
) -> list[Path]:
    """Render ``model`` into ``views`` and write each: TIFF up to :data:`LARGE_MIP_PIXELS`, else OME-Zarr."""
    from ..io.lazy import write_ome_zarr
    from ..io.tiff import write_mips

    written: list[Path] = []
    small: dict[str, np.ndarray] = {}
    for view in views:
        if view.height * view.width <= LARGE_MIP_PIXELS:
            small[view.name] = render_view(model, view, renderer)
            continue
        path = zarr_path(folder, view.name)
        chunks = (min(TILE, view.height), min(TILE, view.width))
        with write_ome_zarr(path, view.shape, "float32", chunks, (view.dv, view.du), image_axes(view), view.name,
                            overwrite=overwrite) as array:  # fmt: skip
            render_view(model, view, renderer, out=array)
        written.append(path)
    if small:
        sizes = {v.name: (v.dv, v.du) for v in views}
        written = [*write_mips(folder, small, {n: sizes[n] for n in small}), *written]
    return written


def write_images(
    images: dict[str, np.ndarray], views: Sequence[View], folder: Path, overwrite: bool = True
) -> list[Path]:
    """Write images already in memory (e.g. the volume's axis MIPs) as :func:`write_model_mips` writes renders."""
    from ..io.lazy import write_ome_zarr
    from ..io.tiff import write_mips

    by_name = {v.name: v for v in views}
    small = {n: i for n, i in images.items() if i.size <= LARGE_MIP_PIXELS}
    written = list(write_mips(folder, small, {n: (by_name[n].dv, by_name[n].du) for n in small})) if small else []
    for name, image in images.items():
        if name in small:
            continue
        view = by_name[name]
        chunks = (min(TILE, view.height), min(TILE, view.width))
        with write_ome_zarr(zarr_path(folder, name), image.shape, "float32", chunks, (view.dv, view.du),
                            image_axes(view), name, overwrite=overwrite) as array:  # fmt: skip
            for rows, cols in tiles(view):
                array[rows[0] : rows[1], cols[0] : cols[1]] = image[rows[0] : rows[1], cols[0] : cols[1]]
        written.append(zarr_path(folder, name))
    return written


def axis_views(geometry: Any) -> list[View]:
    """The three axis views of a volume at native resolution."""
    from ..views import make_views

    return make_views(list(AXIS_VIEWS), geometry)
