"""Synthetic fluorescence volumes: a procedural neuron, and any SWC skeleton rasterised.

The imaging model is: tubes of the skeleton's radii (soft edges), each filled with a
dye brightness that decays along the tree from the soma (root) to the distal tips
-> anisotropic Gaussian PSF blur (wider along z, as in a confocal stack), scaled so
the soma is full scale -> background offset -> Poisson shot noise at a given photon
count, with a fixed seed.  :func:`synthesize` returns both the noisy volume and the
noise-free one it was drawn from, so fits can be scored against the truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .frames import VolumeGeometry
from .io.swc import Skeleton

SAMPLE_SHAPE = (40, 128, 128)
SAMPLE_SPACING = (1.5, 0.5, 0.5)
"""Voxel spacing (z, y, x) of the built-in sample, micrometres."""

_PIECE = 8.0
"""Longest piece (voxels) a segment is drawn in: keeps each piece's bounding box tight."""


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
    distal_brightness
        Peak brightness of the distal dendrites relative to the soma's in the noise-free
        volume, above the background (the soma/distal ratio of real confocal neurons is
        ~5-10; the default gives ~7-8, see :func:`soma_distal_ratio`).  The dye brightness
        decays exponentially with path length along the tree, from 1 at the roots (soma)
        to the value that a tube of the distal nodes' median radius keeps at
        ``distal_brightness`` after the PSF blur (:func:`dye_brightness`), so thicker
        and thinner parts still image brighter and dimmer.  1 draws every tube at full
        dye brightness.
    soma_scale
        Root (soma) nodes are drawn with a radius of at least ``soma_scale`` times their
        thickest child's: tracings often store a placeholder soma radius (the shared
        real neuron's root has 0.07 voxel).  Edges leaving a widened root keep the
        child's radius (no cone).  0 keeps the skeleton's radii.
    """

    psf_sigma_zyx: tuple[float, float, float] = (1.2, 0.7, 0.7)
    background: float = 0.07
    photons: float = 400.0
    edge: float = 0.7
    distal_brightness: float = 0.11
    soma_scale: float = 2.5


@dataclass(frozen=True)
class SyntheticVolume:
    """One synthetic acquisition: float32 [Z, Y, X] volumes in the same units.

    Attributes
    ----------
    noisy
        What a microscope would record: ``clean`` with Poisson shot noise.
    clean
        The noise-free volume (background offset included; soma peak ~1): the truth
        to score fits against.
    """

    noisy: np.ndarray
    clean: np.ndarray


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


def path_lengths(skeleton: Skeleton) -> np.ndarray:
    """[N] path length (voxels) from each node's root, summed along the parents.

    Roots are at 0.  Nodes no root reaches (a cycle in the parents) get NaN.
    """
    parents = skeleton.parents
    count = len(parents)
    distance = np.full(count, np.nan)
    order = np.argsort(parents, kind="stable")
    sorted_parents = parents[order]
    start = np.searchsorted(sorted_parents, np.arange(count), side="left")
    stop = np.searchsorted(sorted_parents, np.arange(count), side="right")
    frontier = np.nonzero(parents < 0)[0]
    distance[frontier] = 0.0
    while frontier.size:
        children = np.concatenate([order[start[i] : stop[i]] for i in frontier])
        children = children[np.isnan(distance[children])]
        step = np.linalg.norm(skeleton.positions[children] - skeleton.positions[parents[children]], axis=1)
        distance[children] = distance[parents[children]] + step
        frontier = children
    return distance


def distal_nodes(skeleton: Skeleton, fraction: float = 0.75) -> np.ndarray:
    """Row indices of the distal nodes: path length at least ``fraction`` of the largest."""
    distance = path_lengths(skeleton)
    if not np.any(np.isfinite(distance)):
        return np.arange(len(distance))
    return np.nonzero(~(distance < fraction * np.nanmax(distance)))[0]


def node_brightness(skeleton: Skeleton, distal_brightness: float) -> np.ndarray:
    """[N] dye brightness of each node: 1 at the roots, ``distal_brightness`` at the largest path length.

    Exponential in path length (:func:`path_lengths`) between the two; nodes no root
    reaches get ``distal_brightness``.
    """
    if not 0 < distal_brightness <= 1:
        raise ValueError(f"distal_brightness must be in (0, 1], got {distal_brightness}")
    distance = path_lengths(skeleton)
    longest = np.nanmax(distance) if np.any(np.isfinite(distance)) else 0.0
    fraction = np.nan_to_num(distance / longest, nan=1.0) if longest > 0 else np.zeros(len(distance))
    return distal_brightness**fraction


def tube_peak(radius: float, imaging: Imaging | None = None) -> float:
    """Blurred peak of a long tube of ``radius`` voxels lying in the xy plane, relative to a large blob's.

    The soft-edged disc cross-section (z, y) weighted by the PSF: how much of the
    dye brightness a thin dendrite keeps at its centre after the blur.
    """
    imaging = imaging or Imaging()
    sigma_z, sigma_y = (max(float(s), 1e-3) for s in imaging.psf_sigma_zyx[:2])
    reach = radius + imaging.edge + 4 * max(sigma_z, sigma_y)
    grid = np.arange(-reach, reach + 1e-9, 0.02)
    z, y = np.meshgrid(grid, grid, indexing="ij")
    inside = np.clip(0.5 - (np.hypot(z, y) - radius) / (2 * imaging.edge), 0.0, 1.0)
    weight = np.exp(-0.5 * (z / sigma_z) ** 2 - 0.5 * (y / sigma_y) ** 2)
    return float((inside * weight).sum() / weight.sum())


def dye_brightness(skeleton: Skeleton, imaging: Imaging | None = None) -> np.ndarray:
    """[N] dye brightness of each node, so the distal dendrites image at ``imaging.distal_brightness``.

    Exponential in path length from 1 at the roots to ``distal_brightness / tube_peak(r)``
    (at most 1) at the largest path length, with ``r`` the median radius of the
    :func:`distal_nodes`: the blur then takes the rest.
    """
    imaging = imaging or Imaging()
    if not 0 < imaging.distal_brightness <= 1:
        raise ValueError(f"distal_brightness must be in (0, 1], got {imaging.distal_brightness}")
    radius = float(np.median(np.asarray(skeleton.radii)[distal_nodes(skeleton)]))
    distal = min(1.0, imaging.distal_brightness / max(tube_peak(radius, imaging), 1e-6))
    return node_brightness(skeleton, distal)


def _drawn_radii(skeleton: Skeleton, soma_scale: float) -> np.ndarray:
    """Node radii with each root widened to ``soma_scale`` times its thickest child's."""
    radii = np.asarray(skeleton.radii, dtype=np.float64).copy()
    if soma_scale > 0:
        edges = skeleton.edges()
        thickest = np.zeros(len(radii))
        np.maximum.at(thickest, edges[:, 1], radii[edges[:, 0]])
        roots = skeleton.parents < 0
        radii[roots] = np.maximum(radii[roots], soma_scale * thickest[roots])
    return radii


def clean_volume(
    skeleton: Skeleton,
    shape_zyx: tuple[int, int, int],
    imaging: Imaging | None = None,
) -> np.ndarray:
    """The noise-free float32 [Z, Y, X] volume of ``skeleton`` (voxel units).

    Background ``imaging.background`` plus the blurred dye scaled so its peak (the
    soma) is ``1 - background``: values lie in [background, 1].
    """
    imaging = imaging or Imaging()
    shape_zyx = tuple(int(n) for n in shape_zyx)
    dye = np.zeros(shape_zyx, dtype=np.float32)
    positions = np.asarray(skeleton.positions, dtype=np.float64)
    radii = _drawn_radii(skeleton, imaging.soma_scale)
    brightness = dye_brightness(skeleton, imaging)
    upper = np.array(shape_zyx[::-1]) - 1
    # Node spheres, then edges (child, parent); an edge leaving a widened root keeps the child's radius.
    pieces = [(positions[i], positions[i], radii[i], radii[i], brightness[i], brightness[i]) for i in range(len(radii))]
    for child, parent in skeleton.edges():
        parent_radius = min(radii[parent], max(skeleton.radii[parent], radii[child]))
        pa, pb = positions[child], positions[parent]
        count = max(1, int(np.ceil(np.linalg.norm(pb - pa) / _PIECE)))
        for k in range(count):
            t0, t1 = k / count, (k + 1) / count
            pieces.append(
                (
                    pa + t0 * (pb - pa),
                    pa + t1 * (pb - pa),
                    radii[child] + t0 * (parent_radius - radii[child]),
                    radii[child] + t1 * (parent_radius - radii[child]),
                    brightness[child] + t0 * (brightness[parent] - brightness[child]),
                    brightness[child] + t1 * (brightness[parent] - brightness[child]),
                )
            )
    for pa, pb, ra, rb, ba, bb in pieces:
        reach = max(ra, rb) + 2 * imaging.edge + 1
        if np.any(np.maximum(pa, pb) + reach < 0) or np.any(np.minimum(pa, pb) - reach > upper):
            continue
        lo = np.clip(np.floor(np.minimum(pa, pb) - reach), 0, upper).astype(int)
        hi = np.clip(np.ceil(np.maximum(pa, pb) + reach), 0, upper).astype(int)
        x, y, z = np.meshgrid(*(np.arange(lo[i], hi[i] + 1) for i in range(3)), indexing="ij")
        points = np.stack([x, y, z], axis=-1).astype(np.float64)
        axis = pb - pa
        length2 = float(axis @ axis)
        t = np.clip(((points - pa) @ axis) / length2, 0, 1) if length2 > 0 else np.zeros(points.shape[:-1])
        nearest = pa + t[..., None] * axis
        distance = np.linalg.norm(points - nearest, axis=-1)
        radius = ra + t * (rb - ra)
        value = np.clip(0.5 - (distance - radius) / (2 * imaging.edge), 0.0, 1.0) * (ba + t * (bb - ba))
        block = dye[lo[2] : hi[2] + 1, lo[1] : hi[1] + 1, lo[0] : hi[0] + 1]
        np.maximum(block, value.astype(np.float32).transpose(2, 1, 0), out=block)
    blurred = _blur(dye, imaging.psf_sigma_zyx)
    blurred /= max(float(blurred.max()), 1e-12)
    return (imaging.background + (1 - imaging.background) * blurred).astype(np.float32)


def add_noise(clean: np.ndarray, imaging: Imaging | None = None, seed: int = 0) -> np.ndarray:
    """Poisson shot noise on a noise-free volume: ``Poisson(clean * photons) / photons`` (float32).

    The result has mean ``clean`` and variance ``clean / photons``; ``photons == 0``
    returns a float32 copy of ``clean``.
    """
    imaging = imaging or Imaging()
    clean = np.asarray(clean, dtype=np.float32)
    if imaging.photons <= 0:
        return clean.copy()
    rng = np.random.default_rng(seed)
    return (rng.poisson(clean * np.float64(imaging.photons)) / imaging.photons).astype(np.float32)


def synthesize(
    skeleton: Skeleton,
    shape_zyx: tuple[int, int, int],
    imaging: Imaging | None = None,
    seed: int = 0,
) -> SyntheticVolume:
    """The noisy and the noise-free volume of ``skeleton`` (voxel units) from one call."""
    imaging = imaging or Imaging()
    clean = clean_volume(skeleton, shape_zyx, imaging)
    return SyntheticVolume(noisy=add_noise(clean, imaging, seed), clean=clean)


def rasterize_skeleton(
    skeleton: Skeleton,
    shape_zyx: tuple[int, int, int],
    imaging: Imaging | None = None,
    seed: int = 0,
) -> np.ndarray:
    """The noisy float32 [Z, Y, X] volume (soma ~1, background ~0.07) of ``skeleton`` (voxel units).

    ``synthesize(...).noisy``; use :func:`synthesize` to also get the noise-free volume.
    """
    return synthesize(skeleton, shape_zyx, imaging, seed).noisy


def soma_distal_ratio(
    clean: np.ndarray,
    skeleton: Skeleton,
    background: float = Imaging.background,
    distal_fraction: float = 0.75,
) -> float:
    """How much brighter the soma is than the distal dendrites in a noise-free volume.

    The peak above ``background`` within the drawn soma of the roots, over the median
    of the peaks above ``background`` around the distal nodes (path length at least
    ``distal_fraction`` of the largest; each node's peak is the maximum over the 3 x 3 x 3
    voxels around it).  Real confocal neurons: ~5-10.
    """
    signal = np.asarray(clean, dtype=np.float32) - np.float32(background)
    shape = np.array(signal.shape)
    voxels = np.rint(np.asarray(skeleton.positions)[:, ::-1]).astype(int)  # (z, y, x)

    def peak(index: int, reach: int) -> float:
        lo = np.clip(voxels[index] - reach, 0, shape - 1)
        hi = np.clip(voxels[index] + reach, 0, shape - 1) + 1
        return float(signal[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].max())

    roots = np.nonzero(skeleton.parents < 0)[0]
    soma = max(peak(i, 1 + int(np.ceil(skeleton.radii[i]))) for i in roots)
    distal = distal_nodes(skeleton, distal_fraction)
    return soma / max(float(np.median([peak(i, 1) for i in distal])), 1e-12)


def _blur(volume: np.ndarray, sigma_zyx: tuple[float, float, float]) -> np.ndarray:
    """Separable Gaussian blur with zero padding (voxels), as shifted sums along each axis."""
    tensor = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
    for axis, sigma in enumerate(sigma_zyx):
        if sigma <= 0:
            continue
        radius = int(np.ceil(3.5 * sigma))
        x = np.arange(-radius, radius + 1, dtype=np.float64)
        kernel = np.exp(-0.5 * (x / sigma) ** 2)
        kernel /= kernel.sum()
        n = tensor.shape[axis]
        out = tensor * float(kernel[radius])
        for shift in range(1, min(radius, n - 1) + 1):
            out.narrow(axis, shift, n - shift).add_(
                tensor.narrow(axis, 0, n - shift), alpha=float(kernel[radius - shift])
            )
            out.narrow(axis, 0, n - shift).add_(
                tensor.narrow(axis, shift, n - shift), alpha=float(kernel[radius + shift])
            )
        tensor = out
    return tensor.numpy()


def synthetic_sample(seed: int = 0) -> tuple[SyntheticVolume, VolumeGeometry]:
    """The built-in sample, noisy and noise-free: a procedural neuron, 40 x 128 x 128 voxels of 1.5 x 0.5 x 0.5 um."""
    skeleton = procedural_skeleton(SAMPLE_SHAPE, seed)
    return synthesize(skeleton, SAMPLE_SHAPE, seed=seed), VolumeGeometry(SAMPLE_SHAPE, SAMPLE_SPACING)


def sample_volume(seed: int = 0) -> tuple[np.ndarray, VolumeGeometry]:
    """The built-in sample: a procedural neuron, 40 x 128 x 128 voxels of 1.5 x 0.5 x 0.5 um (noisy)."""
    volume, geometry = synthetic_sample(seed)
    return volume.noisy, geometry
