"""The quality benchmark's noise-free reference: one normalisation for every view, as a model is one volume."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from napari_neurogs_mip.frames import VolumeGeometry
from napari_neurogs_mip.sample import Imaging, add_noise, procedural_skeleton, rasterize_skeleton
from napari_neurogs_mip.targets import targets_from_volume

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality

# Rays along x four times longer than along z: the noise maxima of yz sit above those of xy.
GEOMETRY = VolumeGeometry((16, 48, 192), (1.0, 1.0, 1.0))


def test_the_noise_free_volume_is_its_own_perfect_reference_in_every_view():
    imaging = Imaging(photons=100.0)
    clean = rasterize_skeleton(procedural_skeleton(GEOMETRY.shape_zyx, seed=5), GEOMETRY.shape_zyx, imaging)
    noisy = add_noise(clean, imaging, seed=6)
    targets = targets_from_volume(noisy, GEOMETRY, ["xy", "xz", "yz"])
    # The noisy targets' own lows differ by view (else this test could not tell the two references apart).
    assert max(targets.view_lows) > min(targets.view_lows)
    dataset = quality.Dataset("test", noisy, clean, GEOMETRY)
    reference = quality.clean_targets(dataset, targets)
    for axis, image in zip((0, 1, 2), reference.images):
        expected = np.clip((clean.max(axis=axis) - targets.low) / (targets.high - targets.low), 0, 1)
        np.testing.assert_allclose(np.asarray(image), expected, atol=1e-6)
