"""Denoising a target volume along its structures: the kernel against its definition, what it does to a noisy
neurite, and how a fit, ``eval`` and the memory check use it."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_neurogs_mip.cli import main
from napari_neurogs_mip.denoise import DIRECTIONS, GUIDE_SIGMA, denoise_along_structures, line_weights
from napari_neurogs_mip.frames import VolumeGeometry
from napari_neurogs_mip.prepare import FitInputs, prepare_fit
from napari_neurogs_mip.targets import targets_for_views
from napari_neurogs_mip.views import make_views


def _reference(volume: np.ndarray, length: float) -> np.ndarray:
    """The definition, voxel by voxel: the average along the direction of least variance of the guide."""
    from scipy.ndimage import gaussian_filter

    guide = gaussian_filter(volume.astype(np.float32), GUIDE_SIGMA, mode="nearest").astype(np.float64)
    weights, reach, spread = line_weights(length)
    shape = np.array(volume.shape)
    out = np.empty(volume.shape)
    for index in np.ndindex(volume.shape):
        lines = []
        for d, step in enumerate(DIRECTIONS):
            if spread[d] == 0:
                continue
            taps = range(-reach[d], reach[d] + 1)
            where = [tuple(np.clip(np.array(index) + k * step, 0, shape - 1)) for k in taps]
            w = weights[d, : len(where)]
            g = np.array([guide[p] for p in where])
            lines.append((float(w @ (g * g) - (w @ g) ** 2) / spread[d], where, w))
        _, where, w = min(lines, key=lambda line: line[0])
        out[index] = w @ np.array([volume[p] for p in where], dtype=np.float64)
    return out


def test_the_kernel_follows_the_definition_at_every_voxel_and_border():
    volume = np.random.default_rng(0).gamma(2.0, 0.2, size=(6, 7, 9)).astype(np.float32)
    for length in (1.0, 0.6):  # at 0.6 only the axes average over 1.5 taps or more
        expected = _reference(volume, length)
        np.testing.assert_allclose(denoise_along_structures(volume, length), expected, rtol=1e-5, atol=1e-6)


def test_line_weights_fall_off_with_the_distance_in_voxel_steps():
    weights, reach, spread = line_weights(1.0)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0)
    assert list(reach) == [3] * 3 + [2] * 10  # 2.5 sigma: 3 axis steps, 2 diagonal ones (2.8 and 3.5 voxels)
    np.testing.assert_allclose(weights[0, 4] / weights[0, 3], np.exp(-0.5))
    np.testing.assert_allclose(weights[3, 3] / weights[3, 2], np.exp(-1.0))  # a face diagonal step is sqrt(2)
    np.testing.assert_allclose(spread, 1.0 - (weights**2).sum(axis=1))
    _, _, short = line_weights(0.6)
    assert (short[:3] > 0).all() and (short[3:] == 0).all()


def _oblique_tube(shape=(24, 40, 40), sigma=0.8) -> np.ndarray:
    """A Gaussian tube of cross-section ``sigma`` voxels along (0, 1, 1), at full scale 1 on a 0.07 background."""
    z, y, x = np.indices(shape, dtype=np.float64)
    centre = np.array([shape[0] / 2, shape[1] / 2, shape[2] / 2])
    direction = np.array([0.0, 1.0, 1.0]) / np.sqrt(2)
    offset = np.stack([z, y, x], axis=-1) - centre
    along = offset @ direction
    across2 = (offset**2).sum(-1) - along**2
    return (0.07 + 0.93 * np.exp(-0.5 * across2 / sigma**2)).astype(np.float32)


def test_a_noisy_oblique_neurite_keeps_its_peak_and_loses_most_of_its_noise():
    clean = _oblique_tube()
    photons = 200.0
    noisy = (np.random.default_rng(1).poisson(clean * photons) / photons).astype(np.float32)
    denoised = denoise_along_structures(noisy, 1.0)
    tube = clean > 0.5
    raw_error = np.mean((noisy[tube] - clean[tube]) ** 2)
    error = np.mean((denoised[tube] - clean[tube]) ** 2)
    assert error < 0.5 * raw_error  # a line of 5 taps 1.4 voxels apart keeps 0.4 of the variance
    # The average runs along the tube, not across it: its ridge keeps its height (an isotropic blur of the same
    # width loses a fifth of it).
    ridge = clean > 0.95
    assert abs(denoised[ridge].mean() - clean[ridge].mean()) < 0.02
    # And its MIP along z is closer to the noise-free one (the MIP keeps the brightest noise of every ray).
    assert np.mean((denoised.max(0) - clean.max(0)) ** 2) < 0.65 * np.mean((noisy.max(0) - clean.max(0)) ** 2)


def test_a_neurite_along_z_is_averaged_along_it():
    # Lengths are in voxel steps whatever the spacing: a neurite through coarse z planes is flat along z, however
    # long the step (with physical lengths the z lines of such a stack were too short to use, and it was
    # averaged across instead).
    _, y, x = np.indices((12, 24, 24), dtype=np.float64)
    clean = (0.07 + 0.93 * np.exp(-0.5 * ((y - 12) ** 2 + (x - 12) ** 2) / 0.8**2)).astype(np.float32)
    noisy = (np.random.default_rng(4).poisson(clean * 200.0) / 200.0).astype(np.float32)
    denoised = denoise_along_structures(noisy, 1.0)
    tube = clean > 0.5
    assert np.mean((denoised[tube] - clean[tube]) ** 2) < 0.5 * np.mean((noisy[tube] - clean[tube]) ** 2)
    ridge = clean > 0.95
    assert abs(denoised[ridge].mean() - clean[ridge].mean()) < 0.02
    with pytest.raises(ValueError, match=r"fewer than 1\.5 voxels in every direction"):
        denoise_along_structures(noisy, 0.3)


def test_a_constant_volume_is_unchanged_and_a_bad_length_is_refused():
    volume = np.full((4, 5, 6), 3.5, np.float32)
    np.testing.assert_allclose(denoise_along_structures(volume, 1.5), 3.5, rtol=1e-6)
    with pytest.raises(ValueError, match="denoising length must be > 0"):
        denoise_along_structures(volume, 0.0)
    with pytest.raises(ValueError, match="3D"):
        denoise_along_structures(volume[0], 1.0)


def test_a_fit_is_prepared_from_the_denoised_volume_or_from_the_raw_one():
    clean = _oblique_tube((16, 32, 32))
    noisy = (np.random.default_rng(2).poisson(clean * 100.0) / 100.0).astype(np.float32)
    geometry = VolumeGeometry(noisy.shape, (1.0, 1.0, 1.0))
    views = make_views(["xy", "xz", "yz"], geometry)
    denoised = prepare_fit(FitInputs(volume=noisy, view_specs=["xy", "xz", "yz"], denoise=1.0))
    smooth = denoise_along_structures(noisy, 1.0)
    expected = targets_for_views(smooth, geometry, views, range_of=noisy)
    # The range is the raw stack's: the denoised stack's own background (the maxima of less noise) is lower.
    raw_range = targets_for_views(noisy, geometry, views)
    assert (denoised.targets.low, denoised.targets.high) == (raw_range.low, raw_range.high)
    assert targets_for_views(smooth, geometry, views).low < raw_range.low
    for got, want in zip(denoised.targets.images, expected.images):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert any("denoised along its structures over 1 voxel " in note for note in denoised.notes)
    raw = prepare_fit(FitInputs(volume=noisy, view_specs=["xy", "xz", "yz"], denoise=0.0))
    for got, want in zip(raw.targets.images, targets_for_views(noisy, geometry, views).images):
        np.testing.assert_array_equal(got, want)
    assert not any("denoised" in note for note in raw.notes)
    mips = prepare_fit(FitInputs(mips={"xy": noisy.max(0), "xz": noisy.max(1), "yz": noisy.max(2)}, denoise=1.0))
    assert any("denoising (--denoise) needs the volume" in note for note in mips.notes)


def test_eval_denoises_as_the_fit_did_unless_told(tmp_path, capsys):
    clean = _oblique_tube((16, 32, 32))
    noisy = (np.random.default_rng(3).poisson(clean * 100.0) / 100.0).astype(np.float32)
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, noisy)
    out = tmp_path / "run"
    fit = ["fit", "--target", str(stack), "--out", str(out), "--iterations", "3", "--views", "xy,xz,yz",
           "--num_gaussians", "20", "--denoise", "1.5", "--device", "cpu"]  # fmt: skip
    assert main(fit) == 0
    checkpoint = str(out / "neurogs_renderer_optimized.pt")
    assert main(["eval", checkpoint, "--target", str(stack), "--device", "cpu"]) == 0
    assert "denoised along its structures over 1.5 voxels (as fitted)" in capsys.readouterr().out
    assert main(["eval", checkpoint, "--target", str(stack), "--device", "cpu", "--denoise", "0"]) == 0
    assert "target volume: raw" in capsys.readouterr().out
    assert main(["eval", checkpoint, "--target", str(stack), "--denoise", "-1"]) == 2
    assert "--denoise" in capsys.readouterr().err
