"""Lazy volumes (OME-Zarr, TIFF) read region by region, and OME-Zarr written atomically."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("zarr")
pytest.importorskip("dask")

import tifffile
import zarr

from napari_neurogs_mip.io.lazy import LazyVolume, open_volume, write_ome_zarr
from napari_neurogs_mip.io.tiff import read_volume, write_volume


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return (np.random.default_rng(0).random((12, 40, 30)) * 1000).astype(np.uint16)


def test_tiff_is_read_lazily_region_by_region_with_its_spacing(tmp_path: Path, data: np.ndarray) -> None:
    path = write_volume(tmp_path / "stack.tif", data.astype(np.float32), (1.5, 0.5, 0.25))
    volume = open_volume(path)
    assert volume.memmap and volume.shape_zyx == data.shape
    # The spacing rules are read_volume's (here: ImageJ spacing and resolution tags).
    assert volume.spacing_zyx == pytest.approx(read_volume(path).spacing_zyx)
    region = (slice(2, 5), slice(3, 9), slice(10, 30))
    np.testing.assert_array_equal(volume.read(region), data[region].astype(np.float32))
    lazy = volume.to_dask()
    assert type(lazy).__module__.startswith("dask") and lazy.dtype == np.float32
    np.testing.assert_array_equal(lazy[5:7, ::2].compute(), data[5:7, ::2])
    # Tasks on other workers get the description, not the data.
    assert len(pickle.dumps(volume)) < 2000
    assert pickle.loads(pickle.dumps(volume)) == volume


def test_compressed_tiff_is_read_through_the_zarr_store(tmp_path: Path, data: np.ndarray) -> None:
    tifffile.imwrite(tmp_path / "zlib.tif", data, compression="zlib")
    volume = open_volume(tmp_path / "zlib.tif")
    assert not volume.memmap
    np.testing.assert_array_equal(volume.read((slice(1, 3), slice(0, 40), slice(5, 6))), data[1:3, :, 5:6])


def test_tiff_hyperstack_needs_a_channel_and_time_like_read_volume(tmp_path: Path) -> None:
    stack = (np.random.default_rng(1).random((2, 6, 3, 20, 16)) * 100).astype(np.uint16)
    tifffile.imwrite(tmp_path / "hyper.tif", stack, imagej=True, metadata={"axes": "TZCYX", "spacing": 2.0})
    with pytest.raises(ValueError, match=r"hyper\.tif has axes TZCYX .*choose a time point"):
        open_volume(tmp_path / "hyper.tif")
    volume = open_volume(tmp_path / "hyper.tif", channel=1, time=1)
    np.testing.assert_array_equal(volume.read(), stack[1, :, 1])
    assert volume.spacing_zyx[0] == 2.0


def _ome_zarr(path: Path, data: np.ndarray) -> None:
    """An OME-Zarr written by the reference implementation (ome-zarr-py), two levels, units in nanometres."""
    writer = pytest.importorskip("ome_zarr.writer")
    writer.write_image(
        data, zarr.open_group(str(path), mode="w"), axes="zyx", scale={"z": 2000.0, "y": 500.0, "x": 500.0},
        axes_units={"z": "nanometer", "y": "nanometer", "x": "nanometer"}, scale_factors=[2],
    )  # fmt: skip


def test_ome_zarr_levels_and_voxel_sizes_come_from_the_scale_transformations(tmp_path: Path, data: np.ndarray) -> None:
    _ome_zarr(tmp_path / "image.ome.zarr", data)
    full = open_volume(tmp_path / "image.ome.zarr")
    assert full.shape_zyx == data.shape and full.spacing_zyx == pytest.approx((2.0, 0.5, 0.5))  # nm -> um
    np.testing.assert_array_equal(full.read((slice(3, 4), slice(0, 40), slice(7, 19))), data[3:4, :, 7:19])
    coarse = open_volume(tmp_path / "image.ome.zarr", level=1)
    assert coarse.shape_zyx == (12, 20, 15) and coarse.spacing_zyx == pytest.approx((2.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"image\.ome\.zarr has 2 multiscale level\(s\).*--level 4 does not exist"):
        open_volume(tmp_path / "image.ome.zarr", level=4)
    assert open_volume(tmp_path / "image.ome.zarr", voxel_size=(1, 1, 1)).spacing_source == "user"


def test_ome_zarr_channel_axis_and_bad_inputs_are_named(tmp_path: Path) -> None:
    stack = np.arange(2 * 4 * 6 * 5, dtype=np.float32).reshape(2, 4, 6, 5)
    group = zarr.open_group(str(tmp_path / "channels.zarr"), mode="w", zarr_format=2)
    group.create_array("0", data=stack, chunks=(1, 4, 6, 5))
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [
        {"name": "c", "type": "channel"}, {"name": "z", "type": "space", "unit": "micrometer"},
        {"name": "y", "type": "space", "unit": "micrometer"}, {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 3, 1, 1]}]}]}]  # fmt: skip
    with pytest.raises(ValueError, match=r"channels\.zarr has axes CZYX .*choose a channel"):
        open_volume(tmp_path / "channels.zarr")
    volume = open_volume(tmp_path / "channels.zarr", channel=1)
    np.testing.assert_array_equal(volume.read(), stack[1])
    assert volume.spacing_zyx == (3.0, 1.0, 1.0)
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="plain"):
        open_volume(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match=r"missing\.zarr"):
        open_volume(tmp_path / "missing.zarr")
    with pytest.raises(ValueError, match="outside the volume"):
        volume.read((slice(0, 5), slice(0, 6), slice(0, 5)))


def test_nan_voxels_are_refused_naming_the_file(tmp_path: Path) -> None:
    bad = np.zeros((4, 8, 8), np.float32)
    bad[2, 3, 3] = np.nan
    with write_ome_zarr(tmp_path / "nan.ome.zarr", bad.shape, "float32", (2, 8, 8), (1, 1, 1)) as array:
        array[:] = bad
    volume = open_volume(tmp_path / "nan.ome.zarr")
    volume.read((slice(0, 2), slice(0, 8), slice(0, 8)))  # the NaN is elsewhere
    with pytest.raises(ValueError, match=r"nan\.ome\.zarr: the region \[0:4, 0:8, 0:8\].* 1 non-finite"):
        volume.read()


def test_written_ome_zarr_appears_whole_and_reads_back(tmp_path: Path, data: np.ndarray) -> None:
    path = tmp_path / "out.ome.zarr"
    with pytest.raises(RuntimeError), write_ome_zarr(path, data.shape, "uint16", (6, 20, 30), (1.5, 0.5, 0.5)) as arr:
        arr[:6] = data[:6]
        raise RuntimeError("killed half-way")
    assert not path.exists() and not list(tmp_path.iterdir())  # no partial image, no temporary folder left
    with write_ome_zarr(path, data.shape, "uint16", (6, 20, 30), (1.5, 0.5, 0.5)) as arr:
        arr[:] = data
    volume = open_volume(path)
    assert isinstance(volume, LazyVolume) and volume.spacing_zyx == (1.5, 0.5, 0.5)
    np.testing.assert_array_equal(volume.read(), data)
    with (
        pytest.raises(FileExistsError, match=r"out\.ome\.zarr exists"),
        write_ome_zarr(path, (2, 2), "f4", (2, 2), (1, 1), ("y", "x")),
    ):
        pass
    # The reference reader takes it too.
    reader = pytest.importorskip("ome_zarr.reader")
    io = pytest.importorskip("ome_zarr.io")
    node = next(iter(reader.Reader(io.parse_url(str(path)))()))
    assert node.metadata["coordinateTransformations"][0][0]["scale"] == [1.5, 0.5, 0.5]
    np.testing.assert_array_equal(np.asarray(node.data[0]), data)
