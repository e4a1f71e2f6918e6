"""Targets of dense stacks: the background rule keeps the dimmest nuclei, and the foreground is found on them."""

from __future__ import annotations

import numpy as np
import torch

from napari_neurogs_mip.frames import VolumeGeometry
from napari_neurogs_mip.targets import Normalization, axis_mip, background_median, targets_from_volume

SHAPE = (24, 96, 96)


def nuclei_volume(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Nuclei over about 60 % of the xy MIP, peaks from 2x to 10x the background, Poisson noise.

    Returns the noisy volume (photon counts, background 100) and the nuclei mask of the xy MIP.
    """
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    clean = np.full(SHAPE, 100.0)
    covered = np.zeros(SHAPE[1:], bool)
    while covered.mean() < 0.6:
        centre = rng.uniform((4, 0, 0), (SHAPE[0] - 4, SHAPE[1], SHAPE[2]))
        radius = rng.uniform(4, 8)
        d2 = ((z - centre[0]) * 2) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2
        peak = rng.uniform(200, 1000)
        clean = np.maximum(clean, np.where(d2 <= radius**2, peak * (1 - 0.3 * d2 / radius**2), 0))
        covered |= ((y[0] - centre[1]) ** 2 + (x[0] - centre[2]) ** 2) <= radius**2
    return rng.poisson(clean).astype(np.float32), covered


def test_dense_nuclei_keep_their_dim_members_and_their_foreground() -> None:
    volume, covered = nuclei_volume()
    raw = axis_mip(torch.as_tensor(volume), "xy").numpy()
    assert np.median(raw) > 200  # the median pixel is a nucleus: a median low would clip the dim ones
    targets = targets_from_volume(volume, VolumeGeometry(SHAPE, (2.0, 1.0, 1.0)), ["xy", "xz", "yz"])
    assert targets.low < 160, targets.low  # the background's median (~100 plus the noise maximum), not a nucleus
    xy, level = targets.images[0], targets.foreground_levels()[0]
    inner = covered & (np.roll(covered, 2, 0) & np.roll(covered, -2, 0) & np.roll(covered, 2, 1))
    # Nuclei, the dimmest too, lie above the background level (a median low put half the image at 0).
    assert np.mean(xy[inner] > level) > 0.995 and np.mean(xy > 0) > 0.7
    found = targets.foregrounds()[0]
    assert abs(found.mean() - covered.mean()) < 0.05 and np.mean(found == covered) > 0.95


def test_sparse_volume_low_stays_the_median() -> None:
    """On a sparse stack (background over most of every MIP) the background median is the median."""
    rng = np.random.default_rng(1)
    clean = np.full(SHAPE, 100.0)
    clean[10:14, 40:44, 10:90] = 800.0
    volume = rng.poisson(clean).astype(np.float32)
    mips = [axis_mip(torch.as_tensor(volume), name).numpy() for name in ("xy", "xz", "yz")]
    low, _ = Normalization().fit(mips)
    assert low == np.median(np.concatenate([m.ravel() for m in mips]))
    assert abs(background_median(mips[0]) - np.median(mips[0])) <= 1.0
