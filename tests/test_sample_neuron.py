"""Synthetic neurons look like real confocal ones: bright soma, dim distal dendrites, blur, Poisson noise.

The soma/distal ratio is measured twice: with the module's own
:func:`~napari_neurogs_mip.sample.soma_distal_ratio` (distal = path length >= 75 % of
the longest) and independently here (the volume's peak over the median peak around
the far tips), both above the background, in the noise-free volume.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_neurogs_mip.io.swc import Skeleton, read_swc
from napari_neurogs_mip.sample import (
    SAMPLE_SHAPE,
    Imaging,
    add_noise,
    clean_volume,
    path_lengths,
    procedural_skeleton,
    rasterize_skeleton,
    sample_volume,
    soma_distal_ratio,
    synthesize,
    synthetic_sample,
)

REAL_RATIO = (5.0, 10.0)
"""Soma peak over distal dendrite peak in real confocal neurons."""
SWC_SHAPE = (100, 647, 813)


def _far_tip_ratio(clean: np.ndarray, skeleton: Skeleton, background: float) -> float:
    """Volume peak over the median 3x3x3 peak at the tips at least half the longest path from the soma."""
    signal = clean - background
    children = np.bincount(skeleton.parents[skeleton.parents >= 0], minlength=len(skeleton.parents))
    distance = path_lengths(skeleton)
    tips = np.nonzero((children == 0) & (distance >= 0.5 * distance.max()))[0]
    assert len(tips) >= 3
    voxels = np.rint(skeleton.positions[tips, ::-1]).astype(int)
    peaks = [signal[max(z - 1, 0) : z + 2, max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2].max() for z, y, x in voxels]
    return float(signal.max() / np.median(peaks))


def _assert_realistic(clean: np.ndarray, skeleton: Skeleton, imaging: Imaging) -> tuple[float, float]:
    # The brightest voxel is the soma.
    peak = np.array(np.unravel_index(np.argmax(clean), clean.shape))
    root = skeleton.positions[np.argmax(skeleton.parents < 0), ::-1]
    assert np.all(np.abs(peak - root) <= 2), (peak, root)
    ratios = soma_distal_ratio(clean, skeleton, imaging.background), _far_tip_ratio(clean, skeleton, imaging.background)
    for ratio in ratios:
        assert REAL_RATIO[0] <= ratio <= REAL_RATIO[1], ratios
    return ratios


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_procedural_neuron_soma_is_5_to_10x_the_distal_dendrites(seed):
    skeleton = procedural_skeleton(SAMPLE_SHAPE, seed)
    imaging = Imaging()
    clean = clean_volume(skeleton, SAMPLE_SHAPE, imaging)
    assert clean.dtype == np.float32 and clean.shape == SAMPLE_SHAPE
    assert clean.min() == pytest.approx(imaging.background, abs=1e-6)
    assert clean.max() == pytest.approx(1.0, abs=1e-6)
    ratios = _assert_realistic(clean, skeleton, imaging)
    print(f"\nprocedural seed {seed}: soma/distal {ratios[0]:.2f}, soma/far tips {ratios[1]:.2f}")


def test_small_tracing_with_placeholder_soma_radius(tmp_path):
    # Like the real tracing: the soma node has a placeholder radius (0.07) and the
    # dendrites (radius 1.6 -> 1.0) start a few voxels away from it.
    lines = ["# id type x y z r parent", "1 1 48 48 12 0.07 -1"]
    node = 1
    for angle in np.deg2rad([10, 100, 190, 280]):
        parent, radius = 1, 1.6
        direction = np.array([np.cos(angle), np.sin(angle), 0.05])
        for step in range(1, 11):
            node += 1
            radius = max(1.0, radius - 0.1)
            x, y, z = np.array([48, 48, 12]) + (4 + 4 * step) * direction
            lines.append(f"{node} 3 {x:.2f} {y:.2f} {z:.2f} {radius:.2f} {parent}")
            parent = node
    path = tmp_path / "small.swc"
    path.write_text("\n".join(lines) + "\n")
    skeleton = read_swc(path)
    imaging = Imaging()
    clean = clean_volume(skeleton, (24, 96, 96), imaging)
    ratios = _assert_realistic(clean, skeleton, imaging)
    print(f"\nsmall SWC: soma/distal {ratios[0]:.2f}, soma/far tips {ratios[1]:.2f}")
    # Without the brightness profile the distal dendrites are far brighter (the old model).
    flat = clean_volume(skeleton, (24, 96, 96), Imaging(distal_brightness=1.0))
    assert soma_distal_ratio(flat, skeleton) < 2.5


def test_noisy_volume_is_poisson_around_the_clean_one():
    skeleton = procedural_skeleton(SAMPLE_SHAPE, 0)
    imaging = Imaging(photons=50.0)
    volume = synthesize(skeleton, SAMPLE_SHAPE, imaging, seed=3)
    clean, noisy = volume.clean.astype(np.float64), volume.noisy.astype(np.float64)
    assert volume.noisy.dtype == np.float32 and volume.noisy.shape == SAMPLE_SHAPE
    assert np.array_equal(volume.clean, clean_volume(skeleton, SAMPLE_SHAPE, imaging))
    counts = noisy * imaging.photons
    assert np.allclose(counts, np.rint(counts), atol=1e-3)  # whole photon counts
    residual = noisy - clean
    # Mean: within 4 standard errors of 0, over all voxels and over the bright (soma, dendrite) ones.
    for region in (np.ones_like(clean, bool), clean > 0.3):
        standard_error = np.sqrt(clean[region].sum() / imaging.photons) / region.sum()
        assert abs(residual[region].mean()) < 4 * standard_error, region.sum()
        # Variance = clean / photons: normalised squared residuals average 1.
        assert np.mean(residual[region] ** 2 * imaging.photons / clean[region]) == pytest.approx(1.0, abs=0.05)
    # add_noise is the same draw.
    assert np.array_equal(add_noise(volume.clean, imaging, seed=3), volume.noisy)


def test_same_seed_same_volumes_and_photons_zero_is_clean():
    skeleton = procedural_skeleton(SAMPLE_SHAPE, 1)
    first = synthesize(skeleton, SAMPLE_SHAPE, seed=7)
    second = synthesize(skeleton, SAMPLE_SHAPE, seed=7)
    other = synthesize(skeleton, SAMPLE_SHAPE, seed=8)
    assert np.array_equal(first.noisy, second.noisy) and np.array_equal(first.clean, second.clean)
    assert np.array_equal(first.clean, other.clean) and not np.array_equal(first.noisy, other.noisy)
    assert np.array_equal(rasterize_skeleton(skeleton, SAMPLE_SHAPE, seed=7), first.noisy)
    assert np.array_equal(rasterize_skeleton(skeleton, SAMPLE_SHAPE, Imaging(photons=0.0)), first.clean)


def test_sample_volume_keeps_its_signature():
    volume, geometry = sample_volume(0)
    assert volume.shape == SAMPLE_SHAPE and volume.dtype == np.float32
    assert geometry.shape_zyx == SAMPLE_SHAPE and geometry.spacing_zyx == (1.5, 0.5, 0.5)
    both, same_geometry = synthetic_sample(0)
    assert np.array_equal(both.noisy, volume) and same_geometry == geometry
    assert np.array_equal(sample_volume(0)[0], volume)


def test_path_lengths_follow_the_parents_in_any_order():
    # Rows out of order: 2 -> 0 (root) -> ..., 1 -> 2.
    positions = np.array([[0.0, 0, 0], [3, 4, 0], [0, 0, 2], [5, 0, 0]])
    skeleton = Skeleton(positions, np.ones(4), np.array([-1, 2, 0, 0]))
    assert np.allclose(path_lengths(skeleton), [0.0, 2 + np.sqrt(9 + 16 + 4), 2.0, 5.0])


@pytest.mark.shared
def test_shared_real_neuron_soma_is_5_to_10x_the_distal_dendrites(shared_dir: Path):
    skeleton = read_swc(shared_dir / "data" / "neuron-10-2900-control-cell-05.swc")
    imaging = Imaging()
    clean = clean_volume(skeleton, SWC_SHAPE, imaging)
    ratios = _assert_realistic(clean, skeleton, imaging)
    print(f"\nshared SWC: soma/distal {ratios[0]:.2f}, soma/far tips {ratios[1]:.2f}")
