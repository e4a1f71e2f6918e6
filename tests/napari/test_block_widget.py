"""The Fit blocks widget: docked through the manifest, prefilled from a layer, a tiny run to the end, its layers.

A procedural neuron of 16 x 64 x 64 voxels as a TIFF, 4 blocks of 10 steps on two
worker threads of the test process (``test_block_session.py`` tests the session's
events and MIPs in detail).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from napari_helpers import PLUGIN, error_messages, info_messages, record_count

from napari_neurogs_mip._napari._block_session import BlockState
from napari_neurogs_mip._napari._qt.block_widget import BlockWidget
from napari_neurogs_mip.io.tiff import write_volume
from napari_neurogs_mip.sample import procedural_skeleton, synthesize

pytest.importorskip("dask.distributed")

pytestmark = pytest.mark.gui

SHAPE = (16, 64, 64)
SPACING = (1.5, 0.5, 0.5)


def test_a_block_run_shows_progress_and_the_merged_mips(make_napari_viewer, qtbot, tmp_path: Path) -> None:
    volume = write_volume(tmp_path / "neuron.tif", synthesize(procedural_skeleton(SHAPE, seed=1), SHAPE, seed=1).noisy,
                          SPACING)  # fmt: skip
    viewer = make_napari_viewer()
    viewer.open(str(volume), plugin="napari")  # napari's own reader: our TIFF reader takes hyperstacks
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Fit blocks")
    assert isinstance(widget, BlockWidget)
    assert widget.target_row.text() == str(volume)  # from the layer's source file
    # Nothing starts without a run folder; the notification says what is missing.
    since = record_count()
    widget.start()
    assert widget.session.state is BlockState.IDLE and any("choose a run folder" in m for m in error_messages(since))

    widget.out_row.edit.setText(str(tmp_path / "run"))
    widget.block_spin.setValue(32)
    widget.halo_spin.setValue(4)
    widget.views_edit.setText("xy, xz, yz")
    widget.workers_spin.setValue(2)
    widget.processes_check.setChecked(False)  # threads: worker processes would spend the test importing torch
    for name, value in (("iterations", 10), ("densify_every", 5), ("device", "cpu")):
        widget.settings_panel.set_value(name, value)
    shown: list[int] = []
    widget.layers_updated.connect(shown.append)
    with qtbot.waitSignal(widget.run_ended, timeout=120_000):
        widget.start()
        assert not widget.start_button.isEnabled() and widget.stop_button.isEnabled()
    assert widget.session.state is BlockState.FINISHED, widget.status_label.text()
    assert widget.progress.value() == widget.progress.maximum() == 4
    assert widget.progress.text() == "blocks: 4 / 4"
    assert shown and shown[-1] == 4
    assert any("4 blocks fitted now" in m for m in info_messages(since))
    assert widget.start_button.isEnabled() and not widget.stop_button.isEnabled()
    # One layer per view, in micrometres, holding the merged MIP of every block.
    for view, image in zip(widget.session.views, widget.session.images):
        layer = viewer.layers[f"merged {view.name}"]
        assert tuple(layer.scale) == (view.dv, view.du)
        assert layer.data.shape == view.shape and layer.data.max() > 0.5
        assert layer.data is image  # the session's merged MIP itself (it grows in place; refreshes repaint it)
    assert tuple(viewer.layers["merged xz"].scale) == (1.5, 0.5)
    # Side by side, right of the volume: none overlaps another.
    lefts = sorted(float(viewer.layers[f"merged {n}"].translate[-1]) for n in ("xy", "xz", "yz"))
    assert lefts[0] > SHAPE[2] * SPACING[2] and lefts[1] >= lefts[0] + 64 * 0.5
