"""Adaptive density control for MIP fits: spawn, clone, split and prune Gaussians.

A MIP sends gradient only to the Gaussians that win (or nearly win) a pixel, so
a Gaussian never learns about structure it does not already touch, and a fixed
count cannot add detail where the error is.  Every ``densify_every`` steps the
trainer asks this module what to change:

* **spawn** where the target is brighter than the render: a residual pixel is
  back-projected to the voxel where the target volume peaks along that pixel's
  ray (:attr:`Targets.peaks`, exact for axis views); with MIP-only targets, to
  the depth whose projections show a residual in all three axis views
  (:func:`consistent_points`);
* **clone / split** Gaussians whose accumulated position gradient (in pixels of
  the finest voxel spacing) stays large: small ones are cloned a step along the
  direction the loss pulls them, large ones split in two along their major axis;
* **prune** Gaussians that win no visible pixel (hard MIP, value >= ``VISIBLE``)
  in any training view at two consecutive checks.  A Gaussian whose amplitude fell
  below ``VISIBLE`` can win no visible pixel, so it goes too.

All decisions come from the renders, the targets and gradient statistics, never
from random draws, so a fit with density control resumes exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

from .model import GaussianModel, quaternion_to_rotation, rotation_to_quaternion
from .render.project import Projection, project_model
from .render.raster_torch import pair_values
from .targets import Targets
from .views import View

VISIBLE = 0.01
"""Normalised intensity below which a Gaussian's win does not count (targets are in [0, 1])."""
RESIDUAL_SHARE = 0.25
"""A pixel asks for a new Gaussian when the render is below ``1 - RESIDUAL_SHARE`` of the target."""
SPAWN_CELL = 3
"""Spawn at most one Gaussian per ``SPAWN_CELL x SPAWN_CELL`` pixels of a view per check (the brightest residual)."""
GROWTH = 0.25
"""At most this fraction of the current count (and at least ``MIN_GROWTH``) is added per check."""
MIN_GROWTH = 256
CLONE_FRACTION = 0.05
"""Share of the Gaussians with the largest mean position gradient that may be cloned or split per check."""
CLONE_GRADIENT_RATIO = 2.0
"""... provided their mean gradient is at least this many times the median."""
IDLE_CHECKS = 2
"""A Gaussian that wins no visible pixel at this many consecutive checks is pruned."""
_PAIR_CHUNK = 1 << 22


def _by_name(tensors: DensityStats | NewGaussians) -> dict[str, torch.Tensor]:
    """The tensor fields of a dataclass by name, in field order."""
    return {f.name: getattr(tensors, f.name) for f in fields(tensors)}


@dataclass
class DensityStats:
    """Per-Gaussian statistics gathered between checks.

    Attributes
    ----------
    gradient_norm
        [K] sum over steps of the norm of dL/d(mean), in loss per pixel of the finest spacing.
    gradient_sum
        [K, 3] sum over steps of dL/d(mean) (physical frame), for the clone direction.
    steps
        [K] steps that gave the Gaussian a non-zero gradient.
    idle
        [K] consecutive checks at which the Gaussian won no visible pixel.
    """

    gradient_norm: torch.Tensor
    gradient_sum: torch.Tensor
    steps: torch.Tensor
    idle: torch.Tensor

    @classmethod
    def zeros(cls, count: int, device: torch.device | str = "cpu") -> DensityStats:
        """Empty statistics for ``count`` Gaussians."""
        return cls(
            torch.zeros(count, dtype=torch.float64, device=device),
            torch.zeros(count, 3, dtype=torch.float64, device=device),
            torch.zeros(count, dtype=torch.int64, device=device),
            torch.zeros(count, dtype=torch.int64, device=device),
        )

    def accumulate(self, mean_gradient: torch.Tensor, pixel: float) -> None:
        """Add one step's dL/d(mean) [K, 3] (physical units; ``pixel`` = finest spacing)."""
        gradient = mean_gradient.detach().double()
        norm = gradient.norm(dim=1) * pixel
        self.gradient_norm += norm
        self.gradient_sum += gradient
        self.steps += (norm > 0).long()

    def reset_gradients(self) -> None:
        """Start a new gathering period (the idle counts are kept)."""
        self.gradient_norm.zero_()
        self.gradient_sum.zero_()
        self.steps.zero_()

    def select(self, keep: torch.Tensor, added: int) -> DensityStats:
        """Statistics of the rows ``keep`` followed by ``added`` new, empty rows."""
        fresh = DensityStats.zeros(added, self.steps.device)
        return DensityStats(
            *(torch.cat([old[keep], new]) for old, new in zip(self.tensors().values(), fresh.tensors().values()))
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The statistics by name (saved in checkpoints for exact resuming)."""
        return _by_name(self)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], count: int, device: torch.device | str) -> DensityStats:
        """Statistics saved by :meth:`tensors`; ``ValueError`` when they do not match ``count`` Gaussians."""
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if not isinstance(tensors.get(n), torch.Tensor)]
        if missing:
            raise ValueError(f"density statistics lack {missing}")
        if any(int(tensors[n].shape[0]) != count for n in names):
            raise ValueError(f"density statistics do not match the model's {count} Gaussians")
        dtypes = (torch.float64, torch.float64, torch.int64, torch.int64)
        return cls(*(tensors[n].to(device=device, dtype=d) for n, d in zip(names, dtypes)))


@dataclass
class NewGaussians:
    """Parameters of Gaussians to add (physical frame)."""

    means: torch.Tensor
    log_scales: torch.Tensor
    quaternions: torch.Tensor
    log_amplitudes: torch.Tensor

    @classmethod
    def empty(cls, dtype: torch.dtype = torch.float32) -> NewGaussians:
        """No Gaussians."""
        return cls(
            torch.zeros(0, 3, dtype=dtype),
            torch.zeros(0, 3, dtype=dtype),
            torch.zeros(0, 4, dtype=dtype),
            torch.zeros(0, dtype=dtype),
        )

    def __len__(self) -> int:
        return int(self.means.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        """The four parameters by name."""
        return _by_name(self)

    def cat(self, other: NewGaussians) -> NewGaussians:
        """Both sets, this one first."""
        return NewGaussians(**{n: torch.cat([t, other.tensors()[n].to(t)]) for n, t in self.tensors().items()})

    def head(self, count: int) -> NewGaussians:
        """The first ``count`` Gaussians."""
        return NewGaussians(**{n: t[:count] for n, t in self.tensors().items()})


@dataclass
class DensityChange:
    """What one check decided: rows to keep (in order), then Gaussians to append."""

    keep: torch.Tensor
    added: NewGaussians
    pruned: int
    spawned: int
    cloned: int
    split: int

    def describe(self) -> str:
        """One line for logs."""
        return f"spawned {self.spawned}, cloned {self.cloned}, split {self.split}, pruned {self.pruned}"


# ----------------------------------------------------------------------------- winners


def _slice(projection: Projection, start: int, stop: int) -> Projection:
    return Projection(
        projection.means2d[:, start:stop],
        projection.conics[:, start:stop],
        projection.amplitudes[:, start:stop],
        projection.rects[:, start:stop],
        projection.shapes,
    )


def _chunks(projection: Projection) -> list[tuple[int, int]]:
    """Gaussian ranges whose (pixel, Gaussian) pairs stay under ``_PAIR_CHUNK``."""
    rects = projection.rects.long()
    area = ((rects[..., 2] - rects[..., 0] + 1).clamp_min(0) * (rects[..., 3] - rects[..., 1] + 1).clamp_min(0)).sum(0)
    bounds, start, total = [], 0, 0
    for k, pairs in enumerate(area.tolist()):
        if total and total + pairs > _PAIR_CHUNK:
            bounds.append((start, k))
            start, total = k, 0
        total += pairs
    bounds.append((start, int(area.shape[0])))
    return bounds


def _pair_values(projection: Projection, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Gaussian index, flat pixel index, value) of every pair reaching a pixel, Gaussians ``start:stop``."""
    pair, pixel, value = pair_values(_slice(projection, start, stop))
    return start + pair % (stop - start), pixel, value


@torch.no_grad()
def win_counts(model: GaussianModel, views: list[View], eps: float, level: float = VISIBLE) -> torch.Tensor:
    """Pixels each Gaussian wins under the hard MIP, over all ``views``, counting pixels worth >= ``level``.

    Uses the reference projection and rasterisation rule (same cut-off as every
    backend), in chunks of Gaussians so memory stays bounded.  Ties go to every
    Gaussian that reaches the maximum.
    """
    projection = project_model(model, views, eps)
    total = sum(h * w for h, w in projection.shapes)
    device = projection.means2d.device
    peak = torch.zeros(total, dtype=projection.amplitudes.dtype, device=device)
    chunks = _chunks(projection)
    for start, stop in chunks:
        _, pixel, value = _pair_values(projection, start, stop)
        peak.scatter_reduce_(0, pixel, value, reduce="amax")
    counts = torch.zeros(model.num_gaussians, dtype=torch.int64, device=device)
    for start, stop in chunks:
        gaussian, pixel, value = _pair_values(projection, start, stop)
        wins = (value >= peak[pixel]) & (value >= level)
        counts.index_add_(0, gaussian[wins], torch.ones_like(gaussian[wins]))
    return counts


# ----------------------------------------------------------------------------- spawning


def _cell_maxima(residual: torch.Tensor, wanted: torch.Tensor, cell: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and columns of the largest residual of each ``cell x cell`` block among ``wanted`` pixels."""
    masked = torch.where(wanted, residual, torch.full_like(residual, -math.inf))
    height, width = masked.shape
    pad = (0, (-width) % cell, 0, (-height) % cell)
    padded = torch.nn.functional.pad(masked[None, None], pad, value=-math.inf)
    best, index = torch.nn.functional.max_pool2d(padded, cell, return_indices=True)
    found = torch.isfinite(best.reshape(-1))
    flat = index.reshape(-1)[found]
    padded_width = width + pad[1]
    return flat // padded_width, flat % padded_width


def asking_pixels(
    target: torch.Tensor, rendered: torch.Tensor, level: float, foreground: torch.Tensor | None = None
) -> torch.Tensor:
    """bool [H, W]: the pixels that ask for a new Gaussian.

    A pixel asks when it is foreground (``foreground``, e.g. :meth:`.targets.Targets.foregrounds`:
    above ``level``, its view's background level, and not an isolated noise spike; default: above
    ``level``) and the render falls short of the target by more than ``RESIDUAL_SHARE`` of it and by
    more than ``level`` (a shortfall that noise alone would not give: on noisy stacks, spawning on
    smaller ones fitted the noise of the long-ray views).
    """
    residual = target - rendered
    structure = target > level if foreground is None else foreground
    return structure & (residual > RESIDUAL_SHARE * target) & (residual > level)


def residual_pixels(
    target: torch.Tensor,
    rendered: torch.Tensor,
    level: float,
    cell: int = SPAWN_CELL,
    foreground: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixels that ask for a new Gaussian (:func:`asking_pixels`): rows, columns and residuals (largest
    first); of each ``cell x cell`` block only the largest residual is kept."""
    residual = target - rendered
    rows, cols = _cell_maxima(residual, asking_pixels(target, rendered, level, foreground), cell)
    values = residual[rows, cols]
    order = torch.argsort(values, descending=True, stable=True)
    return rows[order], cols[order], values[order]


def _view_point(view: View, rows: torch.Tensor, cols: torch.Tensor) -> np.ndarray:
    """Physical positions [N, 3] of pixel centres on the view's image plane."""
    origin, u, v = (np.asarray(a, dtype=np.float64) for a in (view.origin, view.u, view.v))
    r = rows.cpu().numpy().astype(np.float64)[:, None]
    c = cols.cpu().numpy().astype(np.float64)[:, None]
    return origin + c * view.du * u + r * view.dv * v


def _pixel_of(view: View, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest pixel (rows, cols) of physical points in ``view`` and whether it lies in the image."""
    centred = points - np.asarray(view.origin)
    cols = np.rint(centred @ np.asarray(view.u) / view.du).astype(np.int64)
    rows = np.rint(centred @ np.asarray(view.v) / view.dv).astype(np.int64)
    inside = (rows >= 0) & (rows < view.height) & (cols >= 0) & (cols < view.width)
    return np.clip(rows, 0, view.height - 1), np.clip(cols, 0, view.width - 1), inside


def consistent_points(
    views: list[View], maps: list[np.ndarray], level: float | list[float], cell: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """3D points whose projections exceed ``level`` in all three axis views (``xy``, ``xz``, ``yz``).

    For every chosen ``xy`` pixel (``cell``-block maxima above the level) the depth
    is the ``xz`` row at which ``min(map_xz, map_yz)`` is largest.  Used to seed
    and to spawn from MIP-only targets, where no volume says where a ray peaks.

    Returns
    -------
    points
        [N, 3] physical positions (x, y, z).
    values
        [N] ``min`` of the three maps at the point (largest first).
    depth_scale
        The ``xz`` row spacing (physical), the depth resolution of the points.
    """
    by_name = {v.name: (v, np.asarray(m, dtype=np.float64)) for v, m in zip(views, maps)}
    levels = dict(zip([v.name for v in views], level if isinstance(level, list) else [level] * len(views)))
    missing = [n for n in ("xy", "xz", "yz") if n not in by_name]
    if missing:
        raise ValueError(f"back-projection from MIPs needs the xy, xz and yz views; missing {missing}")
    view_xy, map_xy = by_name["xy"]
    view_xz, map_xz = by_name["xz"]
    view_yz, map_yz = by_name["yz"]
    tensor = torch.as_tensor(map_xy)
    rows, cols = _cell_maxima(tensor, tensor > levels["xy"], cell)
    if rows.numel() == 0:
        return np.zeros((0, 3)), np.zeros(0), np.zeros(3)
    plane = _view_point(view_xy, rows, cols)  # z = 0 plane
    depths = np.asarray(view_xz.origin)[2] + np.arange(view_xz.height) * view_xz.dv
    candidates = np.repeat(plane[:, None, :], len(depths), axis=1)
    candidates[..., 2] = depths[None, :]
    flat = candidates.reshape(-1, 3)
    score = np.full(flat.shape[0], math.inf)
    for view, image in ((view_xz, map_xz), (view_yz, map_yz)):
        r, c, inside = _pixel_of(view, flat)
        value = np.where(inside, image[r, c], -math.inf)
        score = np.minimum(score, np.where(value > levels[view.name], value, -math.inf))
    score = score.reshape(len(plane), len(depths))
    best = np.argmax(score, axis=1)
    chosen = score[np.arange(len(plane)), best]
    keep = np.isfinite(chosen)
    points = candidates[np.arange(len(plane)), best][keep]
    values = np.minimum(chosen[keep], map_xy[rows.numpy()[keep], cols.numpy()[keep]])
    order = np.argsort(-values, kind="stable")
    spacing = np.array([view_xy.du, view_xy.dv, view_xz.dv])
    return points[order], values[order], spacing


def spawn(
    targets: Targets,
    target_images: list[torch.Tensor],
    rendered: list[torch.Tensor],
    levels: list[float],
    limit: int,
    foregrounds: list[torch.Tensor] | None = None,
) -> NewGaussians:
    """Up to ``limit`` Gaussians where the targets are brighter than the render.

    Each sits at the back-projected peak of its pixel (a :func:`residual_pixels` pixel, within
    ``foregrounds`` when given), is as wide as half a voxel (or half the view's pixel where the views
    are coarser), round, and as bright as the target pixel.  Targets from MIP images alone (no peaks)
    spawn where the axis views' residuals agree (:func:`consistent_points`), at pixels that ask
    (:func:`asking_pixels`) in every axis view.
    """
    if limit <= 0:
        return NewGaussians.empty()
    geometry = targets.geometry
    spacing = geometry.spacing_xyz
    points: list[np.ndarray] = []
    values: list[np.ndarray] = []
    scales: list[np.ndarray] = []
    masks = foregrounds if foregrounds is not None else [None] * len(levels)
    if targets.peaks is not None:
        views = zip(targets.views, targets.peaks, target_images, rendered, levels, masks)
        for view, peaks, target, image, level, mask in views:
            rows, cols, _ = residual_pixels(target, image, level, foreground=mask)
            r, c = rows.cpu().numpy(), cols.cpu().numpy()
            points.append(np.asarray(peaks)[r, c].astype(np.float64))
            values.append(target[rows, cols].cpu().numpy().astype(np.float64))
            pixel = 0.5 * max(view.du, view.dv)
            scales.append(np.repeat(np.maximum(0.5 * spacing, pixel)[None], len(r), 0))
    elif {"xy", "xz", "yz"} <= {v.name for v in targets.views}:
        residual = []
        for target, image, level, mask in zip(target_images, rendered, levels, masks):
            short = target - image
            wanted = asking_pixels(target, image, level, mask)
            residual.append(torch.where(wanted, short, torch.zeros_like(short)).cpu().numpy())
        found, _, depth = consistent_points(targets.views, residual, levels, SPAWN_CELL)
        # The amplitude is the target's (the residual only chose where): the smallest of the three views.
        brightness = np.full(len(found), math.inf)
        for view, target in zip(targets.views, target_images):
            if view.name in ("xy", "xz", "yz"):
                r, c, _ = _pixel_of(view, found)
                brightness = np.minimum(brightness, target.cpu().numpy()[r, c])
        points.append(found)
        values.append(brightness)
        scales.append(np.repeat(np.maximum(0.5 * spacing, 0.5 * depth)[None], len(found), 0))
    else:
        return NewGaussians.empty()
    point = np.concatenate(points) if points else np.zeros((0, 3))
    value = np.concatenate(values) if values else np.zeros(0)
    scale = np.concatenate(scales) if scales else np.zeros((0, 3))
    # One Gaussian per voxel: several views often point at the same peak.
    order = np.argsort(-value, kind="stable")
    voxel = np.rint(point[order] / spacing).astype(np.int64)
    _, first = np.unique(voxel, axis=0, return_index=True)
    chosen = order[np.sort(first)][:limit]
    count = len(chosen)
    quaternions = np.zeros((count, 4))
    quaternions[:, 0] = 1.0
    return NewGaussians(
        torch.as_tensor(point[chosen], dtype=torch.float32),
        torch.as_tensor(np.log(scale[chosen]), dtype=torch.float32),
        torch.as_tensor(quaternions, dtype=torch.float32),
        torch.as_tensor(np.log(np.clip(value[chosen], VISIBLE, 1.0)), dtype=torch.float32),
    )


# ----------------------------------------------------------------------------- clone / split


def clone_and_split(
    params: dict[str, torch.Tensor], stats: DensityStats, limit: int, split_scale: float, exclude: torch.Tensor
) -> tuple[torch.Tensor, NewGaussians, int, int]:
    """Gaussians with a persistently large position gradient: cloned (small) or split (large).

    Candidates are the ``CLONE_FRACTION`` with the largest mean gradient, when it
    is at least ``CLONE_GRADIENT_RATIO`` times the median; at most ``limit`` new
    Gaussians.  A Gaussian whose largest scale exceeds ``split_scale`` (physical)
    is replaced by two halves along its major axis; a smaller one gets a copy one
    scale along the direction the loss pulls it.  Rows in ``exclude`` (being pruned)
    are never chosen.

    Returns
    -------
    replaced
        [K] bool, the split parents (to remove).
    added
        The new Gaussians (clones, then split halves).
    cloned, split
        Counts.
    """
    count = stats.steps.shape[0]
    replaced = torch.zeros(count, dtype=torch.bool, device=stats.steps.device)
    active = (stats.steps > 0) & ~exclude
    if limit <= 0 or int(active.sum()) < 2:
        return replaced, NewGaussians.empty(params["means"].dtype), 0, 0
    mean_gradient = torch.where(
        active, stats.gradient_norm / stats.steps.clamp_min(1), torch.zeros_like(stats.gradient_norm)
    )
    floor = CLONE_GRADIENT_RATIO * float(mean_gradient[active].median())
    wanted = max(1, math.floor(CLONE_FRACTION * count))
    order = torch.argsort(mean_gradient, descending=True, stable=True)[:wanted]
    chosen = order[mean_gradient[order] > floor]
    log_scales = params["log_scales"].detach()
    large = log_scales[chosen].amax(dim=1) > math.log(split_scale)
    # A split adds one Gaussian net (two halves replace the parent), a clone one: both fit in ``limit``.
    chosen, large = chosen[:limit], large[:limit]
    to_clone, to_split = chosen[~large], chosen[large]
    means = params["means"].detach()
    quaternions = params["quaternions"].detach()
    amplitudes = params["log_amplitudes"].detach()
    # Clones: one mean scale along minus the summed gradient.
    direction = -stats.gradient_sum[to_clone].to(means)
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-30)
    step = log_scales[to_clone].exp().mean(dim=1, keepdim=True)
    clones = NewGaussians(means[to_clone] + step * direction, log_scales[to_clone].clone(),
                          quaternions[to_clone].clone(), amplitudes[to_clone].clone())  # fmt: skip
    # Splits: halves at +-half the major scale, the major scale halved (a little overlap), the others kept.
    rotations = quaternion_to_rotation(quaternions[to_split].double())
    major = log_scales[to_split].argmax(dim=1)
    axis = rotations[torch.arange(len(to_split)), :, major].to(means)
    offset = 0.5 * log_scales[to_split].gather(1, major[:, None]).exp() * axis
    halved = log_scales[to_split].clone()
    halved.scatter_(1, major[:, None], halved.gather(1, major[:, None]) - math.log(1.8))
    unit = rotation_to_quaternion(rotations).to(means)
    halves = NewGaussians(
        torch.cat([means[to_split] + offset, means[to_split] - offset]),
        torch.cat([halved, halved]),
        torch.cat([unit, unit]),
        torch.cat([amplitudes[to_split], amplitudes[to_split]]),
    )
    replaced[to_split] = True
    return replaced, clones.cat(halves), len(to_clone), len(to_split)


# ----------------------------------------------------------------------------- one check


def growth_limit(count: int, budget: int) -> int:
    """New Gaussians allowed at one check for ``count`` Gaussians and a ``budget``."""
    return max(0, min(budget - count, max(MIN_GROWTH, math.floor(GROWTH * count))))


def plan_change(
    params: dict[str, torch.Tensor],
    stats: DensityStats,
    wins: torch.Tensor,
    new: NewGaussians,
    budget: int,
    split_scale: float,
) -> DensityChange:
    """Combine pruning (from ``wins``), the spawned Gaussians ``new`` and clone/split into one change.

    ``stats.idle`` is updated in place: reset where the Gaussian won a pixel.
    """
    count = wins.shape[0]
    stats.idle = torch.where(wins > 0, torch.zeros_like(stats.idle), stats.idle + 1)
    prune = stats.idle >= IDLE_CHECKS
    room = growth_limit(count - int(prune.sum()), budget)
    spawned = new.head(room)
    room -= len(spawned)
    replaced, extra, cloned, split = clone_and_split(params, stats, room, split_scale, prune)
    keep = torch.nonzero(~(prune | replaced)).squeeze(1)
    return DensityChange(keep, spawned.cat(extra), int(prune.sum()), len(spawned), cloned, split)
