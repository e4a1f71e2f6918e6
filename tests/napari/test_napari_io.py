"""Readers, writers, sample data and the field widget of the napari plugin."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from napari_helpers import PLUGIN, wait_for
from test_rules import write_hyperstack

from napari_neurogs_mip._napari._reader import CheckpointReadError, get_reader, read_checkpoint
from napari_neurogs_mip._napari._tiff_reader import get_tiff_reader
from napari_neurogs_mip._napari._writer import write_checkpoint, write_mip_layers
from napari_neurogs_mip.frames import Frame, VolumeGeometry
from napari_neurogs_mip.io.checkpoint import load_checkpoint, save_checkpoint
from napari_neurogs_mip.io.tiff import read_mips, read_volume
from napari_neurogs_mip.model import GaussianModel

pytestmark = pytest.mark.gui

GEOMETRY = VolumeGeometry((20, 30, 40), (2.0, 0.5, 0.25))


def _model(frame: Frame = Frame.NEUROGS, count: int = 25) -> GaussianModel:
    """Random rotated, anisotropic Gaussians inside GEOMETRY, expressed in ``frame``."""
    generator = torch.Generator().manual_seed(1)
    extent = torch.as_tensor(GEOMETRY.extent_xyz, dtype=torch.float32)
    physical = GaussianModel(
        means=torch.rand(count, 3, generator=generator) * extent,
        log_scales=torch.log(0.3 + torch.rand(count, 3, generator=generator)),
        quaternions=torch.randn(count, 4, generator=generator),
        log_amplitudes=torch.log(0.1 + 0.9 * torch.rand(count, generator=generator)),
        frame=Frame.PHYSICAL,
        geometry=GEOMETRY,
    )
    return physical.to_frame(frame, GEOMETRY)


def test_reader_round_trips_a_checkpoint(tmp_path) -> None:
    model = _model()
    path = save_checkpoint(tmp_path / "model.pt", model)
    reader = get_reader(str(path))
    assert callable(reader)
    [(data, kwargs, layer_type), (projected, projection, _)] = reader(str(path))
    assert layer_type == "points"
    # The 2D view shows every Gaussian through the xy projection (a 3D layer shows one thin z slice at a time).
    np.testing.assert_array_equal(projected, data[:, 1:])
    assert projection["name"] == "model (xy projection)" and tuple(projection["scale"]) == GEOMETRY.spacing_zyx[1:]
    # Points are the means in (z, y, x) voxel units; scale = spacing makes world = physical.
    voxel = model.to_frame(Frame.VOXEL, GEOMETRY).means.double().numpy()
    np.testing.assert_allclose(data, voxel[:, ::-1], atol=1e-4)
    assert tuple(kwargs["scale"]) == GEOMETRY.spacing_zyx
    physical = model.to_frame(Frame.PHYSICAL, GEOMETRY).means.double().numpy()
    np.testing.assert_allclose(data * np.asarray(kwargs["scale"]), physical[:, ::-1], atol=1e-4)
    np.testing.assert_allclose(kwargs["features"]["amplitude"], model.amplitudes().numpy(), rtol=1e-5)
    assert np.all(np.asarray(kwargs["size"]) > 0)


def test_reader_through_napari_and_optional_field(make_napari_viewer, tmp_path) -> None:
    """``viewer.open(path, plugin=None)`` (what ``napari model.pth`` and File > Open do) finds our reader."""
    from napari.layers import Points

    path = save_checkpoint(tmp_path / "model.pth", _model(Frame.UNIT))
    viewer = make_napari_viewer()
    [layer, projection] = viewer.open(path, plugin=None)
    assert isinstance(layer, Points) and len(layer.data) == 25 and layer.ndim == 3
    assert isinstance(projection, Points) and projection.ndim == 2 and len(projection.data) == 25
    layers = read_checkpoint(path, field=True)
    assert [kind for _, _, kind in layers] == ["points", "points", "image"]
    volume, kwargs, _ = layers[2]
    assert volume.shape == GEOMETRY.shape_zyx and volume.max() > 0
    assert tuple(kwargs["scale"]) == GEOMETRY.spacing_zyx


def test_a_file_we_cannot_read_says_why(make_napari_viewer, tmp_path) -> None:
    """Other suffixes, missing files and folders are not ours (``None``); a ``.pt`` we cannot read gets a reader
    that raises the reason, which napari passes on instead of its generic "refused the file"."""
    from napari.errors import ReaderPluginError

    text = tmp_path / "notes.txt"
    text.write_text("hello")
    for path in (text, tmp_path / "missing.pt", tmp_path):
        assert get_reader(str(path)) is None
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00not a torch file at all")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    pickled = tmp_path / "pickled.pt"
    torch.save({"object": object}, pickled)  # weights-only loading refuses it
    good = save_checkpoint(tmp_path / "good.pt", _model())
    for path in (junk, other, pickled, [str(good), str(junk)]):
        reader = get_reader(path if isinstance(path, list) else str(path))
        with pytest.raises(CheckpointReadError, match="is not a NeuRoGS-family Gaussian checkpoint"):
            reader(path)
    assert len(get_reader([str(good), str(good)])(None)) == 4
    viewer = make_napari_viewer()
    with pytest.raises(ReaderPluginError) as raised:
        viewer.open(other, plugin=None)
    assert "other.pt is not a NeuRoGS-family Gaussian checkpoint" in str(raised.value)
    assert "refused the file" not in str(raised.value)


def test_checkpoint_writer_keeps_edits_and_frame(make_napari_viewer, tmp_path) -> None:
    model = _model(Frame.NEUROGS)
    viewer = make_napari_viewer()
    [layer, _] = viewer.open(save_checkpoint(tmp_path / "in.pt", model), plugin=PLUGIN)
    # Delete one point and move another: the features stay aligned with the points.
    layer.selected_data = {3}
    layer.remove_selected()
    moved = layer.data.copy()
    moved[0] += (1.0, 2.0, -1.0)
    layer.data = moved
    written = layer.save(str(tmp_path / "out.pt"), plugin=PLUGIN)
    assert written == [str(tmp_path / "out.pt")]
    loaded = load_checkpoint(tmp_path / "out.pt")
    assert loaded.model.frame is Frame.NEUROGS and loaded.model.num_gaussians == 24
    assert loaded.model.geometry == GEOMETRY
    keep = [i for i in range(25) if i != 3]
    expected = model.to_frame(Frame.PHYSICAL, GEOMETRY)
    got = loaded.model.to_frame(Frame.PHYSICAL, GEOMETRY)
    np.testing.assert_allclose(got.means[1:].numpy(), expected.means[keep][1:].numpy(), atol=1e-4)
    np.testing.assert_allclose(
        got.means[0].numpy(), expected.means[0].numpy() + np.array([-1.0, 2.0, 1.0]) * GEOMETRY.spacing_xyz, atol=1e-4
    )
    np.testing.assert_allclose(got.covariances().numpy(), expected.covariances()[keep].numpy(), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(got.log_amplitudes.numpy(), expected.log_amplitudes[keep].numpy(), atol=1e-5)


def test_checkpoint_writer_takes_hand_drawn_points(tmp_path) -> None:
    data = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    meta = {"name": "drawn", "scale": (1.0, 0.5, 0.5), "size": np.array([4.0, 2.0]), "features": None, "metadata": {}}
    [path] = write_checkpoint(tmp_path / "drawn.pt", data, meta)
    loaded = load_checkpoint(path)
    physical = loaded.model.to_frame(Frame.PHYSICAL)
    np.testing.assert_allclose(physical.means.numpy(), data[:, ::-1] * [0.5, 0.5, 1.0], atol=1e-5)
    # Size is a diameter in x voxels: sigma = size / 2 * spacing_x.
    np.testing.assert_allclose(torch.exp(physical.log_scales).numpy(), [[1.0] * 3, [0.5] * 3], rtol=1e-4)


def test_mip_writer_round_trips(tmp_path) -> None:
    rng = np.random.default_rng(0)
    layers = [
        (rng.random((30, 40), dtype=np.float32), {"name": "rendered xy", "scale": (0.5, 0.25), "metadata": {}}, "image"),
        (rng.random((20, 40), dtype=np.float32), {"name": "rendered xz", "scale": (2.0, 0.25), "metadata": {}}, "image"),
        (rng.random((21, 21), dtype=np.float32), {"name": "tilted", "scale": (0.3, 0.3), "metadata": {"view": "az30_el15"}}, "image"),
    ]  # fmt: skip
    paths = write_mip_layers(tmp_path / "mips.tif", layers)
    assert [Path(p).name for p in paths] == ["mips_xy.tif", "mips_xz.tif", "mips_az30_el15.tif"]
    mips = read_mips(tmp_path / "mips.tif")
    assert list(mips) == ["xy", "xz", "az30_el15"]
    for (data, _, _), image in zip(layers, mips.values()):
        np.testing.assert_array_equal(image, data)
    sizes = {}
    for path in paths:
        with tifffile.TiffFile(path) as tif:  # one calibrated ImageJ image per view
            info = json.loads(tif.imagej_metadata["Info"])
            sizes[info["view"]] = info["pixel_size_rc"]
            assert tif.is_imagej and tif.imagej_metadata["unit"] == "um"
    assert sizes == {"xy": [0.5, 0.25], "xz": [2.0, 0.25], "az30_el15": [0.3, 0.3]}
    with pytest.raises(ValueError, match="2D"):
        write_mip_layers(tmp_path / "bad.tif", [layers[0], (np.zeros((2, 3, 4)), {"name": "v"}, "image")])


def test_volume_layer_writes_with_spacing(tmp_path) -> None:
    volume = np.random.default_rng(0).random((5, 6, 7), dtype=np.float32)
    [path] = write_mip_layers(tmp_path / "vol.tif", [(volume, {"name": "v", "scale": (2.0, 0.5, 0.25)}, "image")])
    read = read_volume(path)
    np.testing.assert_array_equal(read.data, volume)
    assert read.spacing_zyx == pytest.approx((2.0, 0.5, 0.25))


def test_sample_data_loads(make_napari_viewer, tmp_path) -> None:
    viewer = make_napari_viewer()
    [volume] = viewer.open_sample(PLUGIN, "neuron")
    assert volume.data.shape == (40, 128, 128) and tuple(volume.scale) == (1.5, 0.5, 0.5)
    [points] = viewer.open_sample(PLUGIN, "neuron_model")
    assert points.data.shape == (2000, 3) and tuple(points.scale) == (1.5, 0.5, 0.5)
    # The Gaussians sit inside the volume in world coordinates.
    assert np.all(points.data >= -0.5) and np.all(points.data <= np.array(volume.data.shape) - 0.5)
    [path] = points.save(str(tmp_path / "init.pt"), plugin=PLUGIN)
    loaded = load_checkpoint(path)
    assert loaded.model.num_gaussians == 2000 and loaded.model.geometry.shape_zyx == (40, 128, 128)


def test_field_widget_adds_the_volume(make_napari_viewer, qtbot, tmp_path) -> None:
    viewer = make_napari_viewer()
    viewer.open(save_checkpoint(tmp_path / "model.pt", _model()), plugin=PLUGIN)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Model field volume")
    widget.points.value = viewer.layers["model"]
    widget()
    wait_for(qtbot, lambda: "model field" in viewer.layers, timeout=30)
    field = viewer.layers["model field"]
    assert field.data.shape == GEOMETRY.shape_zyx and tuple(field.scale) == GEOMETRY.spacing_zyx


def test_hyperstack_reader_gives_a_calibrated_layer_per_channel(make_napari_viewer, tmp_path) -> None:
    path = tmp_path / "stack.tif"
    data = write_hyperstack(path)
    viewer = make_napari_viewer()
    [builtin] = viewer.open(path)  # napari 0.9's default: its own reader, one 4D layer, uncalibrated
    assert builtin.data.shape == (61, 2, 32, 32) and tuple(builtin.scale) == (1, 1, 1, 1)
    layers = viewer.open(path, plugin=PLUGIN)
    assert [layer.name for layer in layers] == ["stack ch0", "stack ch1"]
    for index, layer in enumerate(layers):
        np.testing.assert_array_equal(layer.data, data[:, index])
        assert tuple(layer.scale) == (2.0, 0.5, 0.5) and tuple(layer.axis_labels) == ("z", "y", "x")
        assert all(str(unit) == "micrometer" for unit in layer.units)
    # Other TIFFs are left to napari's reader.
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, data[:, 0])
    assert get_tiff_reader(str(plain)) is None
    assert get_tiff_reader(str(tmp_path / "missing.tif")) is None


def test_exported_mips_open_with_their_pixel_size(make_napari_viewer, tmp_path) -> None:
    """Each file of an export opens as one 2D layer scaled by its view's pixel size, the view in its metadata."""
    layers = [
        (np.ones((30, 40), np.float32), {"name": "rendered xy", "scale": (0.5, 0.25), "metadata": {}}, "image"),
        (np.ones((20, 40), np.float32), {"name": "rendered xz", "scale": (2.0, 0.25), "metadata": {}}, "image"),
    ]
    xy, xz = write_mip_layers(tmp_path / "mips.tif", layers)
    viewer = make_napari_viewer()
    [opened] = viewer.open(xz, plugin=PLUGIN)
    assert opened.name == "mips_xz" and tuple(opened.scale) == (2.0, 0.25) and opened.metadata["view"] == "xz"
    [opened] = viewer.open(xy, plugin=PLUGIN)
    assert tuple(opened.scale) == (0.5, 0.25) and opened.data.shape == (30, 40)
