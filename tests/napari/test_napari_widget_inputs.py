"""The Fit MIP widget's target and start choices become the right core inputs."""

from __future__ import annotations

import numpy as np
import pytest
from napari_helpers import PLUGIN, dock_fit_widget, wait_idle

from napari_neurogs_mip._napari._sample_data import sample_neuron
from napari_neurogs_mip.io.checkpoint import load_checkpoint
from napari_neurogs_mip.io.tiff import write_volume
from napari_neurogs_mip.sample import SAMPLE_SPACING
from napari_neurogs_mip.train import FinishedEvent

pytestmark = pytest.mark.gui


@pytest.fixture
def volume() -> np.ndarray:
    return sample_neuron()[0][0]


def test_tiff_target_prefills_voxel_size(make_napari_viewer, tmp_path, volume) -> None:
    path = write_volume(tmp_path / "stack.tif", volume, (2.5, 0.4, 0.3))
    widget = dock_fit_widget(make_napari_viewer())
    widget.source_combo.setCurrentText("TIFF file")
    widget.tiff_file.edit.setText(str(path))
    widget.tiff_file.edit.editingFinished.emit()
    assert widget.voxel_size() == pytest.approx((2.5, 0.4, 0.3))
    assert "ImageJ" in widget.target_info.text()
    widget.voxel_spins[0].setValue(3.0)  # the user's value wins
    inputs = widget.fit_inputs()
    assert inputs.target == str(path) and inputs.volume is None
    assert inputs.voxel_size == pytest.approx((3.0, 0.4, 0.3))
    assert (inputs.channel, inputs.time) == (None, None)
    widget.tiff_kind.setCurrentText("MIP images")
    assert widget.fit_inputs().target_mips == str(path)


def test_4d_layer_asks_for_the_leading_index(make_napari_viewer, volume) -> None:
    viewer = make_napari_viewer()
    stack = np.stack([volume, volume[::-1]])
    viewer.add_image(stack, name="timelapse", scale=(1.0, *SAMPLE_SPACING))
    widget = dock_fit_widget(viewer)
    assert widget.voxel_size() == pytest.approx(SAMPLE_SPACING)
    assert widget._index_rows[0].isVisibleTo(widget) and not widget._index_rows[1].isVisibleTo(widget)
    widget.index_spins[0].setValue(1)
    inputs = widget.fit_inputs()
    np.testing.assert_array_equal(inputs.volume, stack[1])


def test_mip_layers_fit(make_napari_viewer, qtbot, volume) -> None:
    viewer = make_napari_viewer()
    sz, sy, sx = SAMPLE_SPACING
    viewer.add_image(volume.max(axis=0), name="cell xy", scale=(sy, sx))
    viewer.add_image(volume.max(axis=1), name="cell xz", scale=(sz, sx))
    viewer.add_image(volume.max(axis=2), name="cell yz", scale=(sz, sy))
    viewer.open_sample(PLUGIN, "neuron_model")
    widget = dock_fit_widget(viewer)
    widget.layer_combo.setCurrentText("cell xz")
    assert widget.voxel_size() == pytest.approx(SAMPLE_SPACING)
    assert not widget.views_group.isEnabled()  # MIP targets fix the views
    widget.start_combo.setCurrentText("Points layer")
    widget.points_combo.setCurrentText("sample initial model")
    widget.iterations.setValue(3)
    widget.eval_edit.setText("30:20")  # left from a volume target: MIP targets have no views to hold out
    inputs = widget.fit_inputs()
    assert sorted(inputs.mips) == ["xy", "xz", "yz"] and inputs.eval_specs == []
    assert load_checkpoint(inputs.checkpoint).model.num_gaussians == 2000
    finished: list[FinishedEvent] = []
    widget.fit_finished.connect(finished.append)
    widget.residual_check.setChecked(True)
    widget.start()
    wait_idle(qtbot, widget)
    assert finished and finished[0].iteration == 3
    for view in ("xy", "xz", "yz"):
        residual = viewer.layers[f"residual {view}"].data
        rendered, target = viewer.layers[f"rendered {view}"].data, viewer.layers[f"target {view}"].data
        np.testing.assert_allclose(residual, rendered - target, atol=1e-6)
    # Our live layers are never offered as targets themselves.
    names = [widget.layer_combo.itemText(i) for i in range(widget.layer_combo.count())]
    assert "rendered xy" not in names and "residual xy" not in names and "target xy" in names


def test_leading_index_zero_reads_zero_after_a_tiff_source(make_napari_viewer, tmp_path, volume) -> None:
    """A TIFF source labels its channel/time boxes "auto" at -1; a layer's index 0 must not inherit that."""
    viewer = make_napari_viewer()
    viewer.add_image(np.stack([volume, volume[::-1]]), name="timelapse", scale=(1.0, *SAMPLE_SPACING))
    widget = dock_fit_widget(viewer)
    widget.source_combo.setCurrentText("TIFF file")
    widget.tiff_file.edit.setText(str(write_volume(tmp_path / "stack.tif", volume, (2.5, 0.4, 0.3))))
    widget.tiff_file.edit.editingFinished.emit()
    assert widget.index_spins[0].text() == "auto"
    widget.source_combo.setCurrentText("Image layer")
    widget.index_spins[0].setValue(0)
    assert widget.index_spins[0].text() == "0"
