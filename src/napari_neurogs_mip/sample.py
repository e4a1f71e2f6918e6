"""Synthetic fluorescence volumes: a procedural neuron, and any SWC skeleton rasterised.

The imaging model is: tubes of the skeleton's radii (soft edges) -> anisotropic
Gaussian PSF blur (wider along z, as in a confocal stack) -> background offset
-> Poisson shot noise at a given photon count, all with a fixed seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from .frames import VolumeGeometry
from .io.swc import Skeleton

SAMPLE_SHAPE = (40, 128, 128)
SAMPLE_SPACING = (1.5, 0.5, 0.5)
"""Voxel spacing (z, y, x) of the built-in sample, micrometres."""


@dataclass(frozen=True)
class Imaging:
    """How a skeleton becomes a noisy volume.

    Attributes
    ----------
    psf_sigma_zyx
        PSF standard deviation along (z, y, x), voxels.
    background
        Offset as a fraction of the full-scale signal (confocal stacks: ~0.07).
    photons
        Expected photon count at full scale (sets the Poisson noise); 0 disables noise.
    edge
        Width of the soft tube edge, voxels.
    """

    psf_sigma_zyx: tuple[float, float, float] = (1.2, 0.7, 0.7)
    background: float = 0.07
    photons: float = 400.0
    edge: float = 0.7


def procedural_skeleton(shape_zyx: tuple[int, int, int] = SAMPLE_SHAPE, seed: int = 0) -> Skeleton:
    """A branching neuron-like tree inside a volume of ``shape_zyx`` voxels (x, y, z positions)."""
    rng = np.random.default_rng(seed)
    size = np.array(shape_zyx[::-1], dtype=np.float64)
    margin = np.array([6.0, 6.0, 3.0])
    positions = [size / 2 + rng.uniform(-0.1, 0.1, 3) * size]
    radii = [3.0]
    parents = [-1]
    # Primary dendrites leave the soma in spread directions, mostly in the xy plane.
    stack = []
    for angle in np.linspace(0, 2 * np.pi, 5, endpoint=False) + rng.uniform(0, 1):
        direction = np.array([np.cos(angle), np.sin(angle), rng.uniform(-0.25, 0.25)])
        stack.append((0, direction / np.linalg.norm(direction), 1.6, 0))
    while stack:
        parent, direction, radius, depth = stack.pop()
        for _ in range(int(rng.integers(8, 18))):
            direction = direction + rng.normal(0, 0.25, 3) * np.array([1, 1, 0.4])
            direction /= np.linalg.norm(direction)
            step = positions[parent] + 3.0 * direction
            if np.any(step < margin) or np.any(step > size - 1 - margin):
                break
            positions.append(step)
            radius = max(0.6, radius * rng.uniform(0.93, 1.0))
            radii.append(radius)
            parents.append(parent)
            parent = len(positions) - 1
            if depth < 3 and rng.random() < 0.12:
                turn = rng.normal(0, 1, 3) * np.array([1, 1, 0.3])
                branch = direction + turn
                stack.append((parent, branch / np.linalg.norm(branch), radius * 0.8, depth + 1))
    return Skeleton(np.array(positions), np.array(radii), np.array(parents, dtype=np.int64))


def rasterize_skeleton(
    skeleton: Skeleton,
    shape_zyx: tuple[int, int, int],
    imaging: Imaging | None = None,
    seed: int = 0,
) -> np.ndarray:
    """A float32 [Z, Y, X] volume (full scale 1 before noise) of ``skeleton`` (voxel units)."""
    imaging = imaging or Imaging()
    shape_zyx = tuple(int(n) for n in shape_zyx)
    clean = np.zeros(shape_zyx, dtype=np.float32)
    positions, radii = skeleton.positions, skeleton.radii
    segments = [(i, i) for i in range(len(positions))] + [tuple(e) for e in skeleton.edges()]
    upper = np.array(shape_zyx[::-1]) - 1
    for a, b in segments:
        pa, pb = positions[a], positions[b]
        reach = max(radii[a], radii[b]) + 2 * imaging.edge + 1
        lo = np.clip(np.floor(np.minimum(pa, pb) - reach), 0, upper).astype(int)
        hi = np.clip(np.ceil(np.maximum(pa, pb) + reach), 0, upper).astype(int)
        if np.any(hi < lo) or np.any(np.maximum(pa, pb) + reach < 0) or np.any(np.minimum(pa, pb) - reach > upper):
            continue
        x, y, z = np.meshgrid(*(np.arange(lo[i], hi[i] + 1) for i in range(3)), indexing="ij")
        points = np.stack([x, y, z], axis=-1).astype(np.float64)
        axis = pb - pa
        length2 = float(axis @ axis)
        t = np.clip(((points - pa) @ axis) / length2, 0, 1) if length2 > 0 else np.zeros(points.shape[:-1])
        nearest = pa + t[..., None] * axis
        distance = np.linalg.norm(points - nearest, axis=-1)
        radius = radii[a] + t * (radii[b] - radii[a])
        value = np.clip(0.5 - (distance - radius) / (2 * imaging.edge), 0.0, 1.0).astype(np.float32)
        block = clean[lo[2] : hi[2] + 1, lo[1] : hi[1] + 1, lo[0] : hi[0] + 1]
        np.maximum(block, value.transpose(2, 1, 0), out=block)
    blurred = _blur(clean, imaging.psf_sigma_zyx)
    blurred /= max(float(blurred.max()), 1e-12)
    signal = imaging.background + (1 - imaging.background) * blurred
    if imaging.photons > 0:
        rng = np.random.default_rng(seed)
        signal = rng.poisson(signal * imaging.photons).astype(np.float32) / imaging.photons
    return signal.astype(np.float32)


def _blur(volume: np.ndarray, sigma_zyx: tuple[float, float, float]) -> np.ndarray:
    """Separable Gaussian blur with zero padding (voxels)."""
    tensor = torch.from_numpy(volume)[None, None]
    for axis, sigma in enumerate(sigma_zyx):
        if sigma <= 0:
            continue
        radius = int(np.ceil(3.5 * sigma))
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (x / sigma) ** 2)
        kernel = kernel / kernel.sum()
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = -1
        padding = [0, 0, 0]
        padding[axis] = radius
        tensor = F.conv3d(tensor, kernel.view(shape), padding=tuple(padding))
    return tensor[0, 0].numpy()


def sample_volume(seed: int = 0) -> tuple[np.ndarray, VolumeGeometry]:
    """The built-in sample: a procedural neuron, 40 x 128 x 128 voxels of 1.5 x 0.5 x 0.5 um."""
    skeleton = procedural_skeleton(SAMPLE_SHAPE, seed)
    volume = rasterize_skeleton(skeleton, SAMPLE_SHAPE, seed=seed)
    return volume, VolumeGeometry(SAMPLE_SHAPE, SAMPLE_SPACING)
