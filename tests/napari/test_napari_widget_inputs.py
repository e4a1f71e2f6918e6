"""The Fit MIP widget's target and start choices become the right core inputs; hyperstacks as napari opens them."""

from __future__ import annotations

import numpy as np
import pytest
from napari_helpers import PLUGIN, dock_fit_widget, error_messages, fast, record_count, wait_idle
from test_rules import write_hyperstack

from napari_neurogs_mip._napari._sample_data import sample_neuron
from napari_neurogs_mip.io.tiff import write_volume
from napari_neurogs_mip.model import GaussianModel
from napari_neurogs_mip.sample import SAMPLE_SPACING
from napari_neurogs_mip.train import FinishedEvent

pytestmark = pytest.mark.gui


@pytest.fixture
def volume() -> np.ndarray:
    return sample_neuron()[0][0]


def test_a_hyperstack_opened_by_napari_is_fitted_on_the_chosen_channel(make_napari_viewer, qtbot, tmp_path) -> None:
    """What a user does: ``viewer.open(stack.tif)`` (napari's reader: one 4D layer, scale 1), dock Fit MIP, pick
    channel 1, Start.  The axes and voxel size come from the file; the fit sees channel 1 as a volume."""
    path = tmp_path / "stack.tif"
    data = np.random.default_rng(0).random((61, 2, 32, 32)).astype(np.float32)
    data[20:40, 1, 10:20, 12:24] += 2.0  # a bright block in channel 1 only
    write_hyperstack(path, data=data)
    viewer = make_napari_viewer()
    [layer] = viewer.open(path)
    assert layer.data.shape == (61, 2, 32, 32) and tuple(layer.scale) == (1, 1, 1, 1)
    widget = dock_fit_widget(viewer)
    panel = widget.target_panel
    assert panel.axes_edit.text() == "ZCYX"
    assert panel.voxel_size() == pytest.approx((2.0, 0.5, 0.5))  # the file's, not the unscaled layer's
    assert "stack.tif (ImageJ)" in panel.info.text()
    [channel] = panel.picker.rows.values()
    assert channel.caption.text() == "channel" and channel.field.maximum() == 1
    channel.field.setValue(1)
    fast(widget, iterations=4)
    widget.views_panel.resolution_combo.setCurrentText("native")
    inputs = widget.fit_inputs()
    np.testing.assert_array_equal(inputs.volume, data[:, 1])
    assert inputs.voxel_size == pytest.approx((2.0, 0.5, 0.5))
    finished: list[FinishedEvent] = []
    widget.fit_finished.connect(finished.append)
    widget.start()
    wait_idle(qtbot, widget)
    assert finished and finished[0].iteration == 4, widget.run_panel.status_label.text()
    # The source now lines up with the MIPs in um, names its axes, and shows the channel fitted.
    assert tuple(layer.scale) == (2.0, 1.0, 0.5, 0.5) and tuple(layer.axis_labels) == ("z", "c", "y", "x")
    assert viewer.dims.current_step[1] == 1
    views = {v.name: v for v in widget.session.views}
    assert tuple(viewer.layers["target xz"].scale) == pytest.approx((2.0, views["xz"].du))
    # The fitted Gaussians take the volume's axes (channel 1): no slider of the volume drives their z.
    qtbot.waitUntil(lambda: "fitted gaussians" in viewer.layers)
    gaussians = viewer.layers["fitted gaussians"]
    assert gaussians.ndim == 4 and np.all(gaussians.data[:, 1] == 1)
    assert tuple(gaussians.scale) == (2.0, 1.0, 0.5, 0.5) and tuple(gaussians.axis_labels) == ("z", "c", "y", "x")
    assert viewer.dims.ndim == 4 and tuple(viewer.dims.axis_labels) == ("z", "c", "y", "x")
    # It converts back to the same model (a start for the next fit).
    widget.model_panel.start_combo.setCurrentText("Points layer")
    widget.model_panel.points_combo.setCurrentText("fitted gaussians")
    model = widget.fit_inputs().model
    assert isinstance(model, GaussianModel) and model.num_gaussians == len(gaussians.data)
    assert model.geometry.shape_zyx == (61, 32, 32)


def test_our_hyperstack_reader_gives_fit_ready_channels(make_napari_viewer, tmp_path) -> None:
    path = tmp_path / "stack.tif"
    write_hyperstack(path, (24, 2, 32, 32))
    viewer = make_napari_viewer()
    viewer.open(path, plugin=PLUGIN)
    widget = dock_fit_widget(viewer)
    panel = widget.target_panel
    panel.layer_combo.setCurrentText("stack ch1")
    assert panel.axes_edit.text() == "ZYX" and panel.picker.rows == {}
    assert panel.voxel_size() == pytest.approx((2.0, 0.5, 0.5))


def test_unnamed_axes_are_guessed_and_a_wrong_guess_is_named(make_napari_viewer, tmp_path) -> None:
    """An array without a file or labels: (61, 2, 32, 32) guessed CZYX gives 2-plane volumes; Start says so,
    naming the axes to type, instead of the trainer's "views are smaller than the SSIM window"."""
    viewer = make_napari_viewer()
    stack = np.random.default_rng(0).random((61, 2, 32, 32)).astype(np.float32)
    viewer.add_image(stack, name="stack")
    widget = dock_fit_widget(viewer)
    panel = widget.target_panel
    assert panel.axes_edit.text() == "CZYX" and "guessed" in panel.info.text()
    before = record_count()
    widget.start()
    assert widget.state == "idle" and widget.trainer is None
    [message] = error_messages(before)
    assert "'stack' as axes CZYX gives a 2 x 32 x 32 (z, y, x) volume with only 2 along z" in message
    assert "type the layer's axes" in message and "SSIM window" not in message.split("\n")[0]
    panel.axes_edit.setText("zcyx")
    panel.axes_edit.editingFinished.emit()
    assert panel.axes_edit.text() == "ZCYX" and list(panel.picker.rows) == [1]
    np.testing.assert_array_equal(widget.fit_inputs().volume, stack[:, 0])
    panel.axes_edit.setText("ZZYX")
    panel.axes_edit.editingFinished.emit()
    assert "once" in panel.info.text()


def test_tiff_target_prefills_voxel_size_and_channels(make_napari_viewer, tmp_path, volume) -> None:
    path = write_volume(tmp_path / "volume.tif", volume, (2.5, 0.4, 0.3))
    widget = dock_fit_widget(make_napari_viewer())
    panel = widget.target_panel
    panel.source_combo.setCurrentText("TIFF file")
    panel.tiff_file.edit.setText(str(path))
    panel.tiff_file.edit.editingFinished.emit()
    assert panel.voxel_size() == pytest.approx((2.5, 0.4, 0.3))
    assert "ImageJ" in panel.info.text() and panel.picker.rows == {}
    panel.voxel_spins[0].setValue(3.0)  # the user's value wins
    inputs = widget.fit_inputs()
    assert inputs.target == str(path) and inputs.volume is None
    assert inputs.voxel_size == pytest.approx((3.0, 0.4, 0.3))
    assert (inputs.channel, inputs.time) == (None, None)
    panel.tiff_kind.setCurrentText("MIP images")
    assert widget.fit_inputs().target_mips == str(path)
    # A hyperstack offers its channels.
    stack = tmp_path / "stack.tif"
    write_hyperstack(stack, (24, 3, 32, 32))
    panel.tiff_kind.setCurrentText("volume")
    panel.tiff_file.edit.setText(str(stack))
    panel.tiff_file.edit.editingFinished.emit()
    assert panel.axes_edit.text() == "ZCYX" and panel.axes_edit.isReadOnly()
    panel.picker.rows[1].field.setValue(2)
    inputs = widget.fit_inputs()
    assert (inputs.channel, inputs.time, inputs.target) == (2, None, str(stack))
    assert panel.voxel_size() == pytest.approx((2.0, 0.5, 0.5))


def test_4d_layer_asks_for_the_leading_index(make_napari_viewer, volume) -> None:
    viewer = make_napari_viewer()
    stack = np.stack([volume, volume[::-1]])
    viewer.add_image(stack, name="timelapse", scale=(1.0, *SAMPLE_SPACING), axis_labels=("t", "z", "y", "x"))
    widget = dock_fit_widget(viewer)
    panel = widget.target_panel
    assert panel.axes_edit.text() == "TZYX" and panel.voxel_size() == pytest.approx(SAMPLE_SPACING)
    [row] = panel.picker.rows.values()
    assert row.caption.text() == "time" and row.isVisibleTo(widget)
    row.field.setValue(1)
    np.testing.assert_array_equal(widget.fit_inputs().volume, stack[1])


def test_mip_layers_fit(make_napari_viewer, qtbot, volume) -> None:
    viewer = make_napari_viewer()
    sz, sy, sx = SAMPLE_SPACING
    viewer.add_image(volume.max(axis=0), name="cell xy", scale=(sy, sx))
    viewer.add_image(volume.max(axis=1), name="cell xz", scale=(sz, sx))
    viewer.add_image(volume.max(axis=2), name="cell yz", scale=(sz, sy))
    viewer.open_sample(PLUGIN, "neuron_model")
    widget = dock_fit_widget(viewer)
    widget.target_panel.layer_combo.setCurrentText("cell xz")
    assert widget.target_panel.voxel_size() == pytest.approx(SAMPLE_SPACING)
    assert not widget.views_panel.isEnabled()  # MIP targets fix the views
    widget.model_panel.start_combo.setCurrentText("Points layer")
    widget.model_panel.points_combo.setCurrentText("sample initial model")
    widget.settings_panel.set_value("iterations", 3)
    widget.views_panel.eval_edit.setText("30:20")  # left from a volume target: MIP targets have no views to hold out
    inputs = widget.fit_inputs()
    assert sorted(inputs.mips) == ["xy", "xz", "yz"] and inputs.eval_specs == []
    assert inputs.model.num_gaussians == 2000 and inputs.checkpoint is None  # in memory, no temporary file
    finished: list[FinishedEvent] = []
    widget.fit_finished.connect(finished.append)
    widget.run_panel.residual_check.setChecked(True)
    widget.start()
    wait_idle(qtbot, widget)
    assert finished and finished[0].iteration == 3
    for view in ("xy", "xz", "yz"):
        residual = viewer.layers[f"residual {view}"].data
        rendered, target = viewer.layers[f"rendered {view}"].data, viewer.layers[f"target {view}"].data
        np.testing.assert_allclose(residual, rendered - target, atol=1e-6)
        low, high = viewer.layers[f"residual {view}"].contrast_limits
        assert low == -high < 0  # diverging, centred at 0
    # Our live outputs are never offered as targets themselves.
    names = [widget.target_panel.layer_combo.itemText(i) for i in range(widget.target_panel.layer_combo.count())]
    assert "rendered xy" not in names and "residual xy" not in names and "target xy" in names
