"""Initial Gaussian models: over a volume's foreground, from MIPs alone, or along an SWC skeleton.

All return models in the physical frame of the target volume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .frames import Frame, VolumeGeometry
from .io.swc import Skeleton
from .model import GaussianModel, rotation_to_quaternion
from .targets import Targets

FOREGROUND_SIGMAS = 4.0
"""A voxel is foreground when its smoothed value exceeds the background by this many noise sigmas ..."""
FOREGROUND_FLOOR = 0.02
"""... and by this fraction of the normalisation range (noise-free stacks have no noise to measure)."""
SAMPLE_CELL = 3.0
"""Default sample spacing over the foreground, in finest voxel spacings (sets the default count)."""
_STATISTICS_SAMPLES = 1 << 21


@dataclass(frozen=True)
class Foreground:
    """Where the structure is: a voxel mask and the level that made it.

    Attributes
    ----------
    mask
        [Z, Y, X] bool, voxels of the smoothed volume above ``level``.
    smoothed
        [Z, Y, X] float32, the volume blurred by one voxel (noise averaged out).
    background, noise, level
        Background estimate, its robust standard deviation and the threshold (raw intensity units).
    """

    mask: np.ndarray
    smoothed: np.ndarray
    background: float
    noise: float
    level: float

    @property
    def count(self) -> int:
        """Foreground voxels."""
        return int(np.count_nonzero(self.mask))


def find_foreground(volume: np.ndarray, high: float) -> Foreground:
    """The foreground of a fluorescence ``volume`` (any dtype), with ``high`` the intensity that maps to 1.

    The volume is blurred by one voxel so that Poisson noise does not pass for
    structure.  The background is the median of the blurred values and the noise
    the scaled median absolute deviation of the values below it: the lower half
    is background even where nuclei fill a third of the stack, so the estimate
    is not inflated by the structure.  A voxel is foreground above ``background
    + max(FOREGROUND_SIGMAS * noise, FOREGROUND_FLOOR * (high - background))``,
    which keeps distal dendrites at 5 % of a bright soma in 16-bit and 8-bit stacks.
    """
    from scipy.ndimage import gaussian_filter

    smoothed = gaussian_filter(np.asarray(volume, dtype=np.float32), sigma=1.0, mode="nearest")
    flat = smoothed.ravel()
    sample = flat[:: max(1, flat.size // _STATISTICS_SAMPLES)].astype(np.float64)
    background = float(np.median(sample))
    lower = sample[sample <= background]
    noise = 1.4826 * float(np.median(background - lower)) if lower.size else 0.0
    level = background + max(FOREGROUND_SIGMAS * noise, FOREGROUND_FLOOR * max(high - background, 0.0))
    return Foreground(smoothed > level, smoothed, background, noise, level)


def spread(points: np.ndarray, values: np.ndarray, count: int, spacing: np.ndarray) -> tuple[np.ndarray, float]:
    """Indices of about ``count`` of ``points`` spread evenly in space, and the cell size that spread them.

    Space is cut into cubes of one size (physical units), chosen by bisection
    so that about ``count`` cubes hold a point; each such cube keeps its
    brightest point (``values``), which lies on the ridge of thin structures.
    Unlike sampling by intensity, a faint dendrite gets as many samples per
    micrometre as the soma.
    """
    if count >= len(points):
        return np.arange(len(points)), float(np.min(spacing))
    low, high = float(np.min(spacing)) * 0.5, float(np.ptp(points, axis=0).max()) + float(np.max(spacing))
    for _ in range(40):
        middle = 0.5 * (low + high)
        cells = np.unique(np.floor(points / middle).astype(np.int64), axis=0).shape[0]
        low, high = (middle, high) if cells > count else (low, middle)
    cell = high
    keys = np.floor(points / cell).astype(np.int64)
    order = np.lexsort((-values, keys[:, 2], keys[:, 1], keys[:, 0]))
    _, first = np.unique(keys[order], axis=0, return_index=True)
    chosen = order[first]
    return chosen[np.argsort(-values[chosen], kind="stable")][:count], cell


def default_count(foreground: Foreground, geometry: VolumeGeometry, budget: int) -> int:
    """Initial Gaussians for a volume: one per ``SAMPLE_CELL`` finest spacings of foreground, within half the budget."""
    cell_volume = (SAMPLE_CELL * float(np.min(geometry.spacing_xyz))) ** 3
    voxel_volume = float(np.prod(geometry.spacing_xyz))
    wanted = math.ceil(foreground.count * voxel_volume / cell_volume)
    return int(np.clip(wanted, min(256, budget), max(1, budget // 2)))


def init_from_volume(
    volume: np.ndarray,
    geometry: VolumeGeometry,
    num_gaussians: int | None,
    low: float,
    high: float,
    budget: int = 60_000,
) -> GaussianModel:
    """Gaussians spread over the foreground of ``volume`` (structure, not brightness).

    Positions are the brightest voxel of evenly sized cells of the foreground
    (:func:`find_foreground`, :func:`spread`); the scale is half the cell
    (at least half a voxel along each axis); amplitudes are the smoothed local
    intensity, normalised by ``(low, high)``.  ``num_gaussians=None`` takes
    :func:`default_count`.
    """
    foreground = find_foreground(volume, high)
    if foreground.count == 0:
        raise ValueError("the volume has no voxel above its background level; nothing to place Gaussians on")
    count = num_gaussians if num_gaussians is not None else default_count(foreground, geometry, budget)
    if count < 1:
        raise ValueError(f"the number of Gaussians must be >= 1, got {count}")
    z, y, x = np.nonzero(foreground.mask)
    values = foreground.smoothed[z, y, x]
    means = np.stack([x, y, z], axis=1) * geometry.spacing_xyz
    chosen, cell = spread(means, values, count, geometry.spacing_xyz)
    if len(chosen) < count:
        # Fewer foreground voxels than Gaussians: repeat them (the fit separates them).
        chosen = np.resize(chosen, count)
    amplitudes = np.clip((values[chosen] - low) / (high - low), 0.05, 1.0)
    scales = np.maximum(0.5 * cell, 0.5 * geometry.spacing_xyz)
    return _model(means[chosen], np.repeat(scales[None], count, 0), _identity(count), amplitudes, geometry)


def init_from_mips(targets: Targets, num_gaussians: int | None, budget: int = 60_000) -> GaussianModel:
    """Gaussians on points whose projections are bright in all three axis MIPs (no volume needed).

    Candidate points come from :func:`.densify.consistent_points` on the
    normalised targets above each view's background level; they are spread
    like :func:`init_from_volume`'s voxels.  ``num_gaussians=None`` takes one per
    candidate, within half the budget.
    """
    from .densify import consistent_points

    levels = targets.foreground_levels()
    points, values, depth = consistent_points(targets.views, targets.images, levels)
    if len(points) == 0:
        raise ValueError("no point is bright in all three axis MIPs; nothing to place Gaussians on")
    count = num_gaussians if num_gaussians is not None else int(min(len(points), max(1, budget // 2)))
    chosen, cell = spread(points, values, count, targets.geometry.spacing_xyz)
    if len(chosen) < count:
        chosen = np.resize(chosen, count)
    scales = np.maximum(0.5 * cell, 0.5 * np.maximum(targets.geometry.spacing_xyz, depth))
    amplitudes = np.clip(values[chosen], 0.05, 1.0)
    return _model(points[chosen], np.repeat(scales[None], count, 0), _identity(count), amplitudes, targets.geometry)


def init_from_bright_voxels(
    volume: np.ndarray, geometry: VolumeGeometry, num_gaussians: int, low: float, high: float, seed: int = 0
) -> GaussianModel:
    """The seed design's start: ``num_gaussians`` Gaussians on voxels drawn by brightness.

    Voxels are drawn without replacement with probability proportional to the
    square of their normalised intensity, so most land in the brightest
    structure (the soma) and faint dendrites get few or none; kept to compare
    against (``init="intensity"``).  Means are jittered within the voxel; the
    scale is isotropic and sized so that the Gaussians together fill the bright
    volume; amplitudes are the voxel intensities.
    """
    if num_gaussians < 1:
        raise ValueError(f"the number of Gaussians must be >= 1, got {num_gaussians}")
    rng = np.random.default_rng(seed)
    normalised = np.clip((np.asarray(volume, dtype=np.float64) - low) / (high - low), 0.0, 1.0).ravel()
    weights = normalised**2
    bright = int(np.count_nonzero(weights))
    if bright == 0:
        raise ValueError("the volume has no voxel above its background level; nothing to place Gaussians on")
    chosen = rng.choice(normalised.size, size=num_gaussians, replace=num_gaussians > bright, p=weights / weights.sum())
    z, y, x = np.unravel_index(chosen, geometry.shape_zyx)
    voxels = np.stack([x, y, z], axis=1) + rng.uniform(-0.5, 0.5, (num_gaussians, 3))
    means = voxels * geometry.spacing_xyz
    # Volume of the structure (voxels above half of the mean bright level) shared among the Gaussians.
    occupied = max(float(np.count_nonzero(normalised > 0.5 * normalised[normalised > 0].mean())), 1.0)
    share = occupied * float(np.prod(geometry.spacing_xyz)) / num_gaussians
    finest = float(np.min(geometry.spacing_xyz))
    scale = float(np.clip(0.5 * share ** (1 / 3), 0.5 * finest, 4 * float(np.max(geometry.spacing_xyz))))
    amplitudes = np.clip(normalised[chosen], 0.05, 1.0)
    return _model(means, np.full((num_gaussians, 3), scale), _identity(num_gaussians), amplitudes, geometry)


def init_from_swc(skeleton: Skeleton, geometry: VolumeGeometry, amplitude: float = 0.5) -> GaussianModel:
    """Gaussians along every parent-child edge of a skeleton given in voxel units.

    Each edge gets Gaussians spaced by about the local radius (at least one per
    edge, one per node for roots), elongated along the edge (half the spacing) and
    as wide as the node radii (at least half a voxel).
    """
    if amplitude <= 0:
        raise ValueError(f"amplitude must be > 0, got {amplitude}")
    spacing = geometry.spacing_xyz
    means, scales, rotations, amps = [], [], [], []
    min_radius = 0.5 * float(np.min(spacing))
    for child, parent in skeleton.edges():
        start, end = skeleton.positions[parent] * spacing, skeleton.positions[child] * spacing
        r_start, r_end = (max(skeleton.radii[i] * float(np.min(spacing)), min_radius) for i in (parent, child))
        axis = end - start
        length = float(np.linalg.norm(axis))
        count = max(1, math.ceil(length / max(0.5 * (r_start + r_end), min_radius)))
        frame = _frame_along(axis / length if length > 0 else np.array([1.0, 0.0, 0.0]))
        for t in (np.arange(count) + 0.5) / count:
            radius = r_start + t * (r_end - r_start)
            means.append(start + t * axis)
            scales.append([max(0.5 * length / count, radius), radius, radius])
            rotations.append(frame)
            amps.append(amplitude)
    if not means:
        for position, radius in zip(skeleton.positions, skeleton.radii):
            means.append(position * spacing)
            scales.append([max(radius, min_radius)] * 3)
            rotations.append(np.eye(3))
            amps.append(amplitude)
    return _model(np.array(means), np.array(scales), np.array(rotations), np.array(amps), geometry)


def _identity(count: int) -> np.ndarray:
    return np.eye(3)[None].repeat(count, 0)


def _frame_along(direction: np.ndarray) -> np.ndarray:
    """A rotation whose first column is ``direction``."""
    helper = np.array([0.0, 0.0, 1.0]) if abs(direction[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    second = np.cross(direction, helper)
    second /= np.linalg.norm(second)
    return np.stack([direction, second, np.cross(direction, second)], axis=1)


def _model(
    means: np.ndarray, scales: np.ndarray, rotations: np.ndarray, amplitudes: np.ndarray, geometry: VolumeGeometry
) -> GaussianModel:
    return GaussianModel(
        means=torch.as_tensor(means, dtype=torch.float32),
        log_scales=torch.log(torch.as_tensor(scales, dtype=torch.float32)),
        quaternions=rotation_to_quaternion(torch.as_tensor(rotations, dtype=torch.float64)).float(),
        log_amplitudes=torch.log(torch.as_tensor(amplitudes, dtype=torch.float32)),
        frame=Frame.PHYSICAL,
        geometry=geometry,
    )
