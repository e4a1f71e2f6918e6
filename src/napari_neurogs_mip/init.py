"""Initial Gaussian models: from a volume's bright voxels or from an SWC skeleton.

Both return models in the physical frame of the target volume.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .frames import Frame, VolumeGeometry
from .io.swc import Skeleton
from .model import GaussianModel, rotation_to_quaternion


def init_from_volume(
    volume: np.ndarray, geometry: VolumeGeometry, num_gaussians: int, low: float, high: float, seed: int = 0
) -> GaussianModel:
    """``num_gaussians`` Gaussians on bright voxels of ``volume``.

    Voxels are drawn without replacement with probability proportional to
    their normalised intensity above the background (``(v - low) / (high - low)``,
    clipped, squared so the structure wins over the noise).  Means are jittered
    within the voxel; the scale is isotropic and sized so that the Gaussians
    together fill the bright volume; amplitudes are the voxel intensities.
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
    return _model(
        means, np.full((num_gaussians, 3), scale), np.eye(3)[None].repeat(num_gaussians, 0), amplitudes, geometry
    )


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
