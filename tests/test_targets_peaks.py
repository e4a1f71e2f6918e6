"""Targets from a volume: orbit views binned like axis views, and per-pixel peak positions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import ConvexHull

from napari_neurogs_mip.frames import VolumeGeometry
from napari_neurogs_mip.targets import Normalization, targets_from_mips, targets_from_volume, volume_mips_and_peaks
from napari_neurogs_mip.views import make_views, native_view

ANISOTROPIC = VolumeGeometry((9, 14, 11), (1.5, 0.5, 0.5))
ORBITS = ["0:0", "90:0", "-90:0", "45:0", "30:20", "120:-15", "-60:75"]
RAW = Normalization("fixed", low=0.0, high=1.0)


def unique_volume(geometry: VolumeGeometry, seed: int) -> np.ndarray:
    """A volume of distinct values in [0, 1), so that maxima have no ties."""
    count = int(np.prod(geometry.shape_zyx))
    values = np.random.default_rng(seed).permutation(count) / count
    return values.reshape(geometry.shape_zyx).astype(np.float32)


def voxel_of(position: np.ndarray, geometry: VolumeGeometry) -> tuple[int, int, int]:
    """(z, y, x) index of the voxel centre at a physical (x, y, z) position."""
    x, y, z = np.rint(np.asarray(position, dtype=np.float64) / geometry.spacing_xyz).astype(int)
    return int(z), int(y), int(x)


def image_coordinates(view, points: np.ndarray) -> np.ndarray:
    """[N, 2] (column, row) image coordinates of physical (x, y, z) points."""
    offset = points - np.asarray(view.origin)
    return np.stack([offset @ np.asarray(view.u) / view.du, offset @ np.asarray(view.v) / view.dv], axis=1)


def inside_projected_box(view, geometry: VolumeGeometry) -> np.ndarray:
    """[H, W] bool: pixel centres inside the projection of the box of voxel centres (edges included)."""
    corners = np.array(np.meshgrid(*[[0.0, e] for e in geometry.extent_xyz], indexing="ij")).reshape(3, -1).T
    hull = ConvexHull(image_coordinates(view, corners))
    rows, cols = np.mgrid[: view.height, : view.width]
    points = np.stack([cols.ravel(), rows.ravel(), np.ones(rows.size)], axis=1)
    return (points @ hull.equations.T <= 1e-9).all(axis=1).reshape(view.shape)


@pytest.mark.parametrize("geometry", [VolumeGeometry((9, 14, 11)), ANISOTROPIC], ids=["isotropic", "anisotropic"])
def test_one_bright_voxel_peaks_at_one_in_every_view_and_peaks_point_at_it(geometry):
    volume = np.zeros(geometry.shape_zyx, dtype=np.float32)
    volume[5, 3, 8] = 1.0
    position = np.array([8, 3, 5]) * geometry.spacing_xyz
    specs = ["xy", "xz", "yz", *ORBITS]
    targets = targets_from_volume(volume, geometry, specs, normalization=RAW)
    assert targets.peaks is not None and len(targets.peaks) == len(specs)
    for view, image, peaks in zip(targets.views, targets.images, targets.peaks):
        assert peaks.shape == (*view.shape, 3) and peaks.dtype == np.float32
        assert image.max() == 1.0, view.name
        bright = image == 1.0
        np.testing.assert_allclose(peaks[bright], np.broadcast_to(position, peaks[bright].shape), atol=1e-6)
        pixels = np.argwhere(bright)
        np.testing.assert_allclose(targets.peak_positions(targets.views.index(view), pixels), peaks[bright])


def test_axis_view_peaks_are_the_argmax_along_the_axis():
    geometry = VolumeGeometry((7, 10, 13), (2.0, 0.7, 0.4))
    volume = np.random.default_rng(3).random(geometry.shape_zyx).astype(np.float32)
    targets = targets_from_volume(volume, geometry, ["xy", "xz", "yz"])
    sx, sy, sz = geometry.spacing_xyz
    z, y, x = (np.arange(n, dtype=np.float64) for n in geometry.shape_zyx)
    expected = {
        "xy": np.stack(np.broadcast_arrays(x * sx, y[:, None] * sy, np.argmax(volume, axis=0) * sz), axis=-1),
        "xz": np.stack(np.broadcast_arrays(x * sx, np.argmax(volume, axis=1) * sy, z[:, None] * sz), axis=-1),
        "yz": np.stack(np.broadcast_arrays(np.argmax(volume, axis=2) * sx, y * sy, z[:, None] * sz), axis=-1),
    }
    for view, peaks in zip(targets.views, targets.peaks):
        np.testing.assert_allclose(peaks, expected[view.name], rtol=1e-6, err_msg=view.name)


def test_resampled_axis_view_peaks_point_at_the_brightest_voxel_of_each_block():
    geometry = VolumeGeometry((5, 12, 16), (1.5, 0.5, 0.5))
    volume = unique_volume(geometry, seed=4)
    targets = targets_from_volume(volume, geometry, ["xy"], resolution=(6, 4))
    peaks = targets.peaks[0]
    assert peaks.shape == (6, 4, 3)
    for row in range(6):
        for col in range(4):
            block = volume[:, 2 * row : 2 * row + 2, 4 * col : 4 * col + 4]
            z, y, x = np.unravel_index(np.argmax(block), block.shape)
            expected = np.array([4 * col + x, 2 * row + y, z]) * geometry.spacing_xyz
            np.testing.assert_allclose(peaks[row, col], expected, rtol=1e-6)


def test_resampled_orbit_view_peaks_are_those_of_the_brightest_overlapping_native_pixel():
    geometry = ANISOTROPIC
    volume = unique_volume(geometry, seed=5)
    (native,) = make_views(["30:20"], geometry)
    (coarse,) = make_views(["30:20"], geometry, resolution=3.0)
    (native_image,), (native_peaks,) = volume_mips_and_peaks(volume, geometry, [native])
    _, (coarse_peaks,) = volume_mips_and_peaks(volume, geometry, [coarse])
    native_image = native_image.numpy()
    (height, width), (h, w) = native.shape, coarse.shape
    for row in range(h):
        for col in range(w):
            # Native pixels that overlap the output pixel's area [row H/h, (row + 1) H/h) x (likewise columns).
            rows = slice(row * height // h, -(-(row + 1) * height // h))
            cols = slice(col * width // w, -(-(col + 1) * width // w))
            window = np.where(np.isfinite(native_peaks[rows, cols, 0]), native_image[rows, cols], -np.inf)
            best = np.unravel_index(np.argmax(window), window.shape)
            if np.isfinite(window[best]):
                np.testing.assert_array_equal(coarse_peaks[row, col], native_peaks[rows, cols][best])
            else:
                assert np.isnan(coarse_peaks[row, col]).all()


@pytest.mark.parametrize("spec", ORBITS)
def test_orbit_values_are_the_voxels_at_their_peaks(spec):
    geometry = ANISOTROPIC
    volume = unique_volume(geometry, seed=6) + 2.0
    low, high = float(volume.min()), float(volume.max())
    targets = targets_from_volume(volume, geometry, [spec], normalization=Normalization("fixed", low=low, high=high))
    image, peaks = targets.images[0], targets.peaks[0]
    assert image.max() <= 1.0
    assert image.max() == 1.0  # every voxel projects into the image, the brightest included
    found = np.isfinite(peaks).all(axis=-1)
    assert (np.isnan(peaks[~found]).all()) and (image[~found] == 0.0).all()  # off the volume: its minimum
    values = np.array([volume[voxel_of(p, geometry)] for p in peaks[found]])
    np.testing.assert_allclose(image[found], (values - low) / (high - low), atol=1e-6)


@pytest.mark.parametrize("spec", ["0:0", "45:0", "30:20"])
def test_no_empty_pixels_inside_the_projected_box(spec):
    geometry = ANISOTROPIC
    volume = unique_volume(geometry, seed=7)
    view = native_view(spec, geometry)
    (image,), (peaks,) = volume_mips_and_peaks(volume, geometry, [view])
    inside = inside_projected_box(view, geometry)
    assert np.isfinite(peaks[inside]).all()
    values = np.array([volume[voxel_of(p, geometry)] for p in peaks[inside]])
    np.testing.assert_array_equal(image.numpy()[inside], values)
    if spec == "0:0":
        # Side-on, the z planes (1.5 apart) land on every third row of 0.5-pixels: most rows hold no voxel centre.
        z, y, x = np.indices(geometry.shape_zyx).reshape(3, -1)
        centres = np.stack([x, y, z], axis=1) * geometry.spacing_xyz
        hit = np.unique(np.floor(image_coordinates(view, centres) + 0.5), axis=0)
        assert len(hit) < inside.sum() / 2


def test_side_on_orbit_views_are_the_axis_mips_on_a_finer_row_grid():
    geometry = ANISOTROPIC  # pixels are 0.5 wide, so z planes fall on every third row
    volume = unique_volume(geometry, seed=8)
    images, _ = volume_mips_and_peaks(volume, geometry, make_views(["0:0", "-90:0", "90:0"], geometry))
    yz, xz = volume.max(axis=2), volume.max(axis=1)
    front, side, back = (image.numpy() for image in images)
    assert front.shape == (3 * (geometry.shape_zyx[0] - 1) + 1, geometry.shape_zyx[1])
    np.testing.assert_array_equal(front[::3], yz)  # u = +y, v = +z
    np.testing.assert_array_equal(side[::3], xz)  # u = +x, v = +z
    np.testing.assert_array_equal(back[::3], xz[:, ::-1])  # u = -x, v = +z


def test_thin_neurite_has_the_same_peak_in_orbit_and_axis_views():
    geometry = VolumeGeometry((24, 40, 40))
    z, y, x = np.indices(geometry.shape_zyx, dtype=np.float64)
    # A straight neurite of radius 0.35 voxel along (1, 0.7, 0.3), off the voxel lattice.
    direction = np.array([1.0, 0.7, 0.3]) / np.linalg.norm([1.0, 0.7, 0.3])
    offset = np.stack([x - 20.3, y - 20.6, z - 11.8], axis=-1)
    distance2 = (offset**2).sum(-1) - (offset @ direction) ** 2
    volume = np.exp(-distance2 / (2 * 0.35**2)).astype(np.float32)
    specs = ["xy", "xz", "yz", "30:20", "120:-15", "45:0"]
    targets = targets_from_volume(volume, geometry, specs, normalization=RAW)
    peaks = [float(image.max()) for image in targets.images]
    assert peaks == [float(volume.max())] * len(specs)


def test_targets_from_mips_have_no_peaks():
    targets = targets_from_mips({"xy": np.random.default_rng(9).random((6, 5))}, geometry=VolumeGeometry((3, 6, 5)))
    assert targets.peaks is None
    with pytest.raises(ValueError, match="no peak positions"):
        targets.peak_positions(0, np.zeros((1, 2), dtype=int))
