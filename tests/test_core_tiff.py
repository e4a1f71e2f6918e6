"""TIFF volumes and MIP images: real files written by tifffile, read back by the package."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from napari_neurogs_mip.frames import VolumeGeometry
from napari_neurogs_mip.io.tiff import read_metadata, read_mips, read_volume, write_mips, write_volume
from napari_neurogs_mip.targets import Normalization, targets_from_mips, targets_from_volume


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12)


def test_plain_3d_tiff(tmp_path, rng):
    data = (rng.random((6, 8, 9)) * 4000).astype(np.uint16)
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, data)
    volume = read_volume(path)
    assert volume.data.dtype == np.float32 and volume.data.shape == (6, 8, 9)
    np.testing.assert_array_equal(volume.data, data.astype(np.float32))
    assert volume.spacing_zyx == (1.0, 1.0, 1.0)
    assert volume.spacing_source == "default"


def test_stack_of_pages_written_one_by_one(tmp_path, rng):
    # Many tools write a stack page by page; tifffile then names the page axis I, not Q.
    data = rng.random((5, 8, 9)).astype(np.float32)
    path = tmp_path / "pages.tif"
    with tifffile.TiffWriter(path) as writer:
        for page in data:
            writer.write(page, contiguous=False, metadata=None)
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].axes == "IYX"
    volume = read_volume(path)
    np.testing.assert_array_equal(volume.data, data)


def test_plain_tiff_resolution_tags_give_xy_spacing(tmp_path, rng):
    path = tmp_path / "res.tif"
    # tifffile's resolution is (X, Y) pixels per unit: 2 px/um in x, 4 px/um in y.
    tifffile.imwrite(path, rng.random((5, 7, 9)).astype(np.float32), resolution=(2.0, 4.0))
    volume = read_volume(path)
    assert volume.spacing_zyx == pytest.approx((1.0, 0.25, 0.5))
    assert volume.spacing_source == "resolution tags"


def test_imagej_hyperstack_channel_and_time_selection(tmp_path, rng):
    data = rng.random((3, 5, 2, 8, 9)).astype(np.float32)  # T, Z, C, Y, X
    path = tmp_path / "hyper.tif"
    tifffile.imwrite(
        path,
        data,
        imagej=True,
        resolution=(1 / 0.25, 1 / 0.4),
        metadata={"axes": "TZCYX", "spacing": 2.5, "unit": "um"},
    )
    volume = read_volume(path, channel=1, time=2)
    assert volume.axes == "TZCYX"
    np.testing.assert_array_equal(volume.data, data[2, :, 1])
    assert volume.spacing_zyx == pytest.approx((2.5, 0.4, 0.25))
    assert volume.spacing_source == "ImageJ"
    np.testing.assert_array_equal(read_volume(path, channel=0, time=0).data, data[0, :, 0])
    with pytest.raises(ValueError, match=r"hyper\.tif.*choose a time point"):
        read_volume(path, channel=1)
    with pytest.raises(ValueError, match=r"hyper\.tif.*choose a channel"):
        read_volume(path, time=1)
    with pytest.raises(ValueError, match=r"index 2 is out of range for axis C of size 2"):
        read_volume(path, channel=2, time=0)


def test_metadata_without_pixels_matches_read_volume(tmp_path, rng):
    data = rng.random((3, 5, 2, 8, 9)).astype(np.float32)
    path = tmp_path / "hyper.tif"
    tifffile.imwrite(path, data, imagej=True, resolution=(4.0, 2.5), metadata={"axes": "TZCYX", "spacing": 2.5})
    metadata = read_metadata(path)
    assert (metadata.axes, metadata.shape) == ("TZCYX", (3, 5, 2, 8, 9))
    assert metadata.spacing_zyx == pytest.approx((2.5, 0.4, 0.25))
    assert metadata.spacing_source == "ImageJ"
    assert metadata.spacing_zyx == read_volume(path, channel=0, time=0).spacing_zyx
    (tmp_path / "notes.tif").write_text("not an image")
    with pytest.raises(ValueError, match=r"notes\.tif is not a readable TIFF"):
        read_metadata(tmp_path / "notes.tif")
    with pytest.raises(FileNotFoundError, match=r"missing\.tif"):
        read_metadata(tmp_path / "missing.tif")


def test_single_channel_axes_go_silently(tmp_path, rng):
    data = rng.random((1, 4, 1, 6, 7)).astype(np.float32)
    path = tmp_path / "single.tif"
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "TZCYX", "spacing": 3.0})
    volume = read_volume(path)
    np.testing.assert_array_equal(volume.data, data[0, :, 0])
    assert volume.spacing_zyx[0] == pytest.approx(3.0)


def test_ome_tiff_physical_sizes(tmp_path, rng):
    data = rng.random((3, 6, 8, 9)).astype(np.float32)
    path = tmp_path / "stack.ome.tif"
    tifffile.imwrite(
        path, data, ome=True,
        metadata={"axes": "CZYX", "PhysicalSizeX": 0.3, "PhysicalSizeY": 0.4, "PhysicalSizeZ": 1.7},
    )  # fmt: skip
    volume = read_volume(path, channel=2)
    np.testing.assert_array_equal(volume.data, data[2])
    assert volume.spacing_zyx == pytest.approx((1.7, 0.4, 0.3))
    assert volume.spacing_source == "OME"
    with pytest.raises(ValueError, match=r"stack\.ome\.tif.*choose a channel"):
        read_volume(path)


def test_spacing_override_wins(tmp_path, rng):
    path = tmp_path / "stack.ome.tif"
    tifffile.imwrite(path, rng.random((4, 5, 6)).astype(np.float32), ome=True,
                     metadata={"axes": "ZYX", "PhysicalSizeX": 0.3, "PhysicalSizeY": 0.4, "PhysicalSizeZ": 1.7})  # fmt: skip
    volume = read_volume(path, spacing_zyx=(3.0, 2.0, 1.0))
    assert volume.spacing_zyx == (3.0, 2.0, 1.0)
    assert volume.spacing_source == "user"


def test_write_volume_round_trip(tmp_path, rng):
    data = rng.random((5, 7, 6)).astype(np.float32)
    path = write_volume(tmp_path / "v.tif", data, (2.0, 0.5, 0.25))
    volume = read_volume(path)
    np.testing.assert_array_equal(volume.data, data)
    assert volume.spacing_zyx == pytest.approx((2.0, 0.5, 0.25))
    assert [p.name for p in tmp_path.iterdir()] == ["v.tif"]  # no temporary file left


def test_mips_round_trip_with_names_and_pixel_sizes(tmp_path, rng):
    images = {
        "xy": rng.random((8, 9)).astype(np.float32),
        "xz": rng.random((6, 9)).astype(np.float32),
        "yz": rng.random((6, 8)).astype(np.float32),
        "30:15": rng.random((10, 11)).astype(np.float32),
    }
    sizes = {"xy": (0.5, 0.25), "xz": (2.0, 0.25), "yz": (2.0, 0.5), "30:15": (0.25, 0.25)}
    written = write_mips(tmp_path / "mips.tif", images, sizes)
    assert [p.name for p in written] == ["mips_xy.tif", "mips_xz.tif", "mips_yz.tif", "mips_30_15.tif"]
    back = read_mips(tmp_path / "mips.tif")  # the path given to write_mips reads the set back
    assert list(back) == list(images)
    for name in images:
        np.testing.assert_array_equal(back[name], images[name])
        np.testing.assert_array_equal(read_mips(tmp_path)[name], images[name])  # and so does their folder
    for path, name in zip(written, images):
        np.testing.assert_array_equal(tifffile.imread(path), images[name])  # the whole image, not a first series
        with tifffile.TiffFile(path) as tif:
            assert tif.is_imagej and tif.imagej_metadata["unit"] == "um"
            info = json.loads(tif.imagej_metadata["Info"])
            assert info["view"] == name and info["pixel_size_rc"] == pytest.approx(list(sizes[name]))
            dv, du = sizes[name]
            x_num, x_den = tif.pages[0].tags["XResolution"].value
            y_num, y_den = tif.pages[0].tags["YResolution"].value
            assert x_num / x_den == pytest.approx(1 / du, rel=1e-6)
            assert y_num / y_den == pytest.approx(1 / dv, rel=1e-6)
    # Names given by the caller win.
    assert list(read_mips(tmp_path / "mips.tif", ["a", "b", "c", "d"])) == ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match="4 MIP files but 2 view names"):
        read_mips(tmp_path / "mips.tif", ["a", "b"])


def test_read_mips_from_plain_files(tmp_path, rng):
    stack = rng.random((3, 8, 8)).astype(np.float32)
    labelled = tmp_path / "labelled.tif"
    tifffile.imwrite(labelled, stack, imagej=True, metadata={"axes": "ZYX", "Labels": ["xy", "xz", "yz"]})
    back = read_mips(labelled)
    assert list(back) == ["xy", "xz", "yz"]
    np.testing.assert_array_equal(back["yz"], stack[2])
    unnamed = tmp_path / "unnamed.tif"
    tifffile.imwrite(unnamed, stack, photometric="minisblack")
    with pytest.raises(ValueError, match=r"unnamed\.tif does not name its views"):
        read_mips(unnamed)
    assert list(read_mips(unnamed, ["xy", "xz", "yz"])) == ["xy", "xz", "yz"]


def test_targets_from_named_axis_mips_match_targets_from_volume(tmp_path, rng):
    volume = rng.random((7, 12, 10)).astype(np.float32) ** 4
    spacing = (2.0, 0.5, 0.75)
    mips = {"xy": volume.max(axis=0), "xz": volume.max(axis=1), "yz": volume.max(axis=2)}
    path = tmp_path / "mips"
    write_mips(path, mips, {"xy": (0.5, 0.75), "xz": (2.0, 0.75), "yz": (2.0, 0.5)})
    from_file = targets_from_mips(read_mips(path), spacing, normalization=Normalization("minmax"))
    geometry = VolumeGeometry(volume.shape, spacing)
    from_volume = targets_from_volume(volume, geometry, ["xy", "xz", "yz"], normalization=Normalization("minmax"))
    assert from_file.geometry == geometry
    assert [v.name for v in from_file.views] == ["xy", "xz", "yz"]
    assert from_file.views == from_volume.views
    assert (from_file.low, from_file.high) == (from_volume.low, from_volume.high)
    for a, b in zip(from_file.images, from_volume.images):
        np.testing.assert_allclose(a, b, atol=1e-7)
    # An orbit image beside the axis images takes its pixel grid from the volume they define.
    with_orbit = targets_from_mips({**mips, "30:15": rng.random((9, 9)).astype(np.float32)}, spacing)
    assert with_orbit.views[-1].name == "az30_el15" and with_orbit.views[-1].shape == (9, 9)


def test_targets_from_mips_reject_inconsistent_images(rng):
    with pytest.raises(ValueError, match="disagree on the x size"):
        targets_from_mips({"xy": rng.random((12, 10)), "xz": rng.random((7, 11))})
    with pytest.raises(ValueError, match="cannot tell the volume's z size"):
        targets_from_mips({"xy": rng.random((12, 10))})
    bad = rng.random((12, 10))
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="'xy' holds NaN"):
        targets_from_mips({"xy": bad, "xz": rng.random((7, 10)), "yz": rng.random((7, 12))})
