"""The Fit MIP widget: opening, a full fit and what it shows, pause/resume/stop, errors, closing."""

from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest
from napari_helpers import (
    PLUGIN,
    WIDGET,
    dock_fit_widget,
    error_messages,
    info_messages,
    record_count,
    wait_for,
    wait_idle,
)
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QAbstractButton, QLabel, QWidget

from napari_neurogs_mip._napari._qt.fit_widget import REFRESH_S, FitWidget
from napari_neurogs_mip._napari._responsiveness import measure_stalls
from napari_neurogs_mip._napari._summary import TOAST_LINE
from napari_neurogs_mip._napari._threads import worker_pool
from napari_neurogs_mip.device import available_devices
from napari_neurogs_mip.io.checkpoint import load_checkpoint
from napari_neurogs_mip.io.tiff import read_mips
from napari_neurogs_mip.prepare import VOLUME_VIEWS, FitInputs
from napari_neurogs_mip.settings import settings_of
from napari_neurogs_mip.train import FinishedEvent, FitConfig, Trainer

pytestmark = pytest.mark.gui


def _shown_gaussians(widget) -> int:
    """The number of Gaussians the status line shows."""
    match = re.search(r"([\d,]+) Gaussians", widget.run_panel.status_label.text())
    assert match, widget.run_panel.status_label.text()
    return int(match.group(1).replace(",", ""))


def _truncated(widget: QWidget) -> list[str]:
    """Visible labels, buttons and fields narrower than they need to be to show their content."""
    found = []
    for child in widget.findChildren(QWidget):
        if not child.isVisibleTo(widget) or (isinstance(child, QLabel) and child.wordWrap()):
            continue
        if isinstance(child, (QLabel, QAbstractButton)) and child.width() < child.minimumSizeHint().width():
            found.append(f"{type(child).__name__} {getattr(child, 'text', lambda: '')()!r}")
    return found


def test_widget_opens_through_the_manifest(make_napari_viewer, qtbot) -> None:
    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1600, 1000)
    viewer.open_sample(PLUGIN, "neuron")
    dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    assert isinstance(widget, FitWidget)
    # One control per described FitConfig setting, with its default and its help, and nothing else re-typed.
    panel = widget.settings_panel
    assert set(panel.controls) == {item.name for item in settings_of(FitConfig)}
    for item in settings_of(FitConfig):
        assert item.setting.help in panel.controls[item.name].native.toolTip()
    device = panel.value("device")
    assert widget.fit_config().to_dict() == FitConfig(device=device).to_dict()
    assert panel.controls["device"].choices == tuple(available_devices())
    inputs, default_inputs = widget.fit_inputs(), FitInputs()
    for name in ("view_specs", "resolution", "normalize", "denoise", "num_gaussians", "max_gaussians", "init",
                 "eval_specs"):  # fmt: skip
        assert getattr(inputs, name) == getattr(default_inputs, name), name
    assert inputs.view_specs is None  # the core's default views, whatever they are
    assert widget.views_panel.info.text() == "fits xy, xz, yz, az45_el35, az135_el-35"
    # "auto" boxes say what they stand for.
    assert widget.model_panel.num_gaussians.text().startswith("auto")
    assert panel.controls["max_gaussians"].native.text() == "auto (60,000 on CPU)"
    assert panel.controls["densify_until"].native.text() == f"auto (step {FitConfig().last_densify})"
    panel.set_value("iterations", 400)
    assert panel.controls["densify_until"].native.text() == "auto (step 300)"
    widget.model_panel.num_gaussians.setValue(500)
    panel.set_value("max_gaussians", 9000)
    panel.set_value("densify_until", 0)
    panel.set_value("densify", False)
    panel.set_value("denoise", 0.0)
    assert not panel.controls["densify_every"].enabled and panel.controls["max_gaussians"].enabled
    config, inputs = widget.fit_config(), widget.fit_inputs()
    assert (config.densify, config.densify_until, config.max_gaussians) == (False, 0, 9000)
    assert (inputs.num_gaussians, inputs.max_gaussians, inputs.denoise) == (500, 9000, 0.0)
    # Voxel size from the layer scale (the sample's spacing); the axes from its labels and scale.
    assert widget.target_panel.layer_combo.currentText() == "sample neuron"
    assert widget.target_panel.voxel_size() == pytest.approx((1.5, 0.5, 0.5))
    run = widget.run_panel
    assert run.start_button.isEnabled() and not run.pause_button.isEnabled() and not run.save_button.isEnabled()
    # The common settings and Start show without scrolling in a 1000-pixel window; the rest is folded away.
    wait_for(qtbot, widget.isVisible)
    qtbot.wait(50)
    assert not panel.advanced.isExpanded()
    assert widget.scroll.verticalScrollBar().maximum() == 0, "the settings need scrolling"
    # Nothing is cut off at the dock's default width.
    assert widget.width() <= dock.width() and not _truncated(widget), _truncated(widget)


def test_short_fit_runs_to_completion(sample_viewer, qtbot, tmp_path) -> None:
    viewer, widget = sample_viewer
    errors: list[float] = []
    updates: list[float] = []

    def measure(_: int) -> None:
        updates.append(time.perf_counter())
        pairs = [(viewer.layers[f"rendered {v}"].data, viewer.layers[f"target {v}"].data) for v in ("xy", "xz", "yz")]
        errors.append(float(np.mean([np.abs(r - t).mean() for r, t in pairs])))

    widget.layers_updated.connect(measure)
    threads: set[str] = set()
    viewer.layers.events.inserted.connect(
        lambda event: event.value.events.data.connect(lambda _: threads.add(threading.current_thread().name))
    )
    messages: list[str] = []
    widget.session.status.events.message.connect(lambda text: messages.append(text))
    finished: list[FinishedEvent] = []
    widget.fit_finished.connect(finished.append)
    before = record_count()
    start = time.perf_counter()
    qtbot.mouseClick(widget.run_panel.start_button, Qt.MouseButton.LeftButton)
    assert not widget.run_panel.start_button.isEnabled()
    wait_idle(qtbot, widget)
    elapsed = time.perf_counter() - start

    assert len(finished) == 1 and finished[0].iteration == 30 and not finished[0].stopped
    assert widget.state == "finished" and widget.run_panel.start_button.isEnabled()
    assert "compiling CPU kernels (once per machine)…" in messages
    assert "renderer backend cpu" in widget.run_panel.backend_label.text()
    assert "PSNR" in widget.run_panel.summary_label.text() and "xz" in widget.run_panel.summary_label.text()
    assert len(widget.run_panel.loss_plot.losses) == 30 and widget.run_panel.progress.value() == 30
    # The render reached the layers, from the main thread only, and at most once per refresh interval.
    assert len(errors) >= 2 and errors[-1] < errors[0]
    assert threads == {threading.main_thread().name}
    assert len(updates) <= elapsed / REFRESH_S + 2
    # Layers carry the views' physical pixel sizes, sit side by side right of the volume, the top row level with it.
    views = {v.name: v for v in widget.session.views}
    volume_right = viewer.layers["sample neuron"].extent.world[1][-1]
    right = volume_right
    for name in ("xy", "xz", "yz"):
        target, rendered = viewer.layers[f"target {name}"], viewer.layers[f"rendered {name}"]
        assert tuple(target.scale) == pytest.approx((views[name].dv, views[name].du))
        assert tuple(rendered.scale) == tuple(target.scale)
        assert target.translate[0] == 0.0 and rendered.translate[1] == pytest.approx(target.translate[1])
        assert rendered.translate[0] > target.translate[0] + target.data.shape[0] * target.scale[0]
        assert target.translate[1] >= right
        right = target.translate[1] + target.data.shape[1] * target.scale[1]
    # Each image is named on the canvas; the camera shows the MIPs and the volume beside them, filling the canvas.
    labels = viewer.layers["view labels"]
    assert {"target xy", "rendered xy", "xz", "az135_el-35"} <= set(labels.features["label"])
    centre, zoom = np.asarray(viewer.camera.center[-2:]), viewer.camera.zoom
    half = np.asarray(viewer.canvas.size) / (2 * zoom)
    boxes = [np.asarray(layer.extent.world)[:, -2:] for layer in viewer.layers if layer.name != "fitted gaussians"]
    for low, high in boxes:
        assert np.all(low >= centre - half - 1e-6) and np.all(high <= centre + half + 1e-6)
    shown = np.max([b[1] for b in boxes], axis=0) - np.min([b[0] for b in boxes], axis=0)
    assert np.max(shown * zoom / np.asarray(viewer.canvas.size)) > 0.9
    # The finish notification leads with a short, complete line.
    [message] = [m for m in info_messages(before) if m.startswith("Fit MIP finished")]
    assert len(message.split("\n")[0]) <= TOAST_LINE and "dB" in message.split("\n")[0]
    # The fitted model is offered as a Points layer of the same Gaussians.
    wait_for(qtbot, lambda: "fitted gaussians" in viewer.layers)
    assert len(viewer.layers["fitted gaussians"].data) == 200

    saved: list[str] = []
    widget.checkpoint_saved.connect(saved.append)
    widget.save_checkpoint(tmp_path / "fit.pt")
    wait_for(qtbot, lambda: bool(saved))
    checkpoint = load_checkpoint(tmp_path / "fit.pt")
    assert checkpoint.iteration == 30 and checkpoint.model.num_gaussians == 200
    (tmp_path / "a file").write_text("not a folder")
    before = record_count()
    widget.save_checkpoint(tmp_path / "a file" / "fit.pt")  # a SaveError (a RuntimeError) must reach the user
    wait_for(qtbot, lambda: bool(error_messages(before)))
    assert error_messages(before)[0].startswith("Fit MIP: the checkpoint was not saved\n")

    written = widget.export_mips(tmp_path / "mips.tif")
    assert [p.name for p in written[:3]] == ["mips_xy.tif", "mips_xz.tif", "mips_yz.tif"]
    mips = read_mips(tmp_path / "mips.tif")
    assert len(mips) == len(VOLUME_VIEWS) and set(mips) == set(views)
    np.testing.assert_allclose(mips["xy"], viewer.layers["rendered xy"].data)
    [reopened] = viewer.open(written[1], plugin=PLUGIN)
    assert tuple(reopened.scale) == pytest.approx((views["xz"].dv, views["xz"].du))


def test_pause_resume_and_stop(sample_viewer, qtbot, tmp_path) -> None:
    _, widget = sample_viewer
    widget.settings_panel.set_value("iterations", 100_000)
    finished: list[FinishedEvent] = []
    widget.fit_finished.connect(finished.append)
    widget.start()
    wait_for(qtbot, lambda: widget.trainer is not None and widget.trainer.iteration >= 3)
    run = widget.run_panel
    qtbot.mouseClick(run.pause_button, Qt.MouseButton.LeftButton)
    trainer = widget.trainer
    assert widget.state == "paused" and run.pause_button.text() == "Resume" and trainer.paused
    qtbot.wait(300)  # a step in flight may still finish
    held = trainer.iteration
    qtbot.wait(400)
    assert trainer.iteration == held, "the fit stepped while paused"

    # Saving while paused writes the paused state.
    saved: list[str] = []
    widget.checkpoint_saved.connect(saved.append)
    widget.save_checkpoint(tmp_path / "paused.pt")
    wait_for(qtbot, lambda: bool(saved))
    assert load_checkpoint(tmp_path / "paused.pt").iteration == held

    qtbot.mouseClick(run.pause_button, Qt.MouseButton.LeftButton)
    assert widget.state == "running" and not trainer.paused
    wait_for(qtbot, lambda: trainer.iteration > held + 2)

    qtbot.mouseClick(run.stop_button, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, widget)
    assert len(finished) == 1 and finished[0].stopped and finished[0].iteration < 100_000
    assert run.start_button.isEnabled() and not run.stop_button.isEnabled()
    # A stopped fit leaves a consistent model that can be saved.
    saved.clear()
    widget.save_checkpoint(tmp_path / "stopped.pt")
    wait_for(qtbot, lambda: bool(saved))
    assert load_checkpoint(tmp_path / "stopped.pt").iteration == finished[0].iteration


def test_error_in_the_trainer_is_notified_and_resets(sample_viewer, qtbot, monkeypatch) -> None:
    _, widget = sample_viewer

    def broken_step(self):
        # A RuntimeError is what superqt's GeneratorWorker would otherwise swallow (e.g. CUDA OOM).
        raise RuntimeError("forced failure in Trainer.step")

    monkeypatch.setattr(Trainer, "step", broken_step)
    before = record_count()
    failed: list[str] = []
    widget.fit_failed.connect(failed.append)
    widget.start()
    wait_idle(qtbot, widget)
    assert failed and "forced failure" in failed[0] and widget.state == "failed"
    assert any("forced failure in Trainer.step" in message for message in error_messages(before))
    run = widget.run_panel
    assert run.start_button.isEnabled() and not run.stop_button.isEnabled() and run.pause_button.text() == "Pause"


def test_bad_settings_are_notified_without_starting(sample_viewer) -> None:
    _, widget = sample_viewer
    views = widget.views_panel
    views.default_views_check.setChecked(False)
    assert widget.fit_inputs().view_specs == ["xy", "xz", "yz"]
    for check in views.axis_checks.values():
        check.setChecked(False)
    before = record_count()
    widget.start()
    assert widget.state == "idle" and widget.trainer is None
    assert any(m.startswith("Fit MIP cannot start\n") and "view" in m for m in error_messages(before))
    views.orbit_edit.setText("not-a-view")
    widget.start()
    assert widget.state == "idle"
    assert any("not-a-view" in message for message in error_messages(before))


def test_bad_held_out_views_are_notified_without_starting(sample_viewer) -> None:
    _, widget = sample_viewer
    views = widget.views_panel
    before = record_count()
    views.eval_edit.setText("30:20, sideways")
    assert "sideways" in views.info.text()  # said as it is typed
    widget.start()
    assert widget.state == "idle" and widget.trainer is None
    assert any("held-out views" in m and "'sideways'" in m for m in error_messages(before))
    # A held-out view must not be one of the views fitted (xy is a default view).
    before = record_count()
    views.eval_edit.setText("30:20, xy")
    widget.start()
    assert widget.state == "idle"
    assert any("['xy']" in m and "held-out" in m for m in error_messages(before))
    views.eval_edit.setText(" 30:20 ,120:-15")
    assert widget.fit_inputs().eval_specs == ["30:20", "120:-15"]
    assert views.info.text().endswith("holds out az30_el20, az120_el-15")


def test_density_control_and_held_out_views(sample_viewer, qtbot) -> None:
    """K changes while the fit runs, the widget shows it, and held-out views are scored and marked."""
    viewer, widget = sample_viewer
    panel = widget.settings_panel
    panel.set_value("iterations", 40)
    panel.set_value("densify_every", 8)  # after the first preview, which shows the initial count
    panel.set_value("max_gaussians", 600)
    widget.views_panel.eval_edit.setText("30:20, 120:-15")
    # A Gaussian layer of another size from an earlier fit: the new one must replace its points.
    [earlier] = viewer.open_sample(PLUGIN, "neuron_model")
    earlier.name = "fitted gaussians"
    shown: list[int] = []
    widget.layers_updated.connect(lambda _: shown.append(_shown_gaussians(widget)))
    finished: list[FinishedEvent] = []
    widget.fit_finished.connect(finished.append)
    widget.start()
    wait_idle(qtbot, widget)

    assert len(finished) == 1
    event, trainer = finished[0], widget.trainer
    assert trainer.config.densify and trainer.config.densify_every == 8 and trainer.budget == 600
    # The count shown started at the initial model's, changed, and ends at the trainer's (how many refreshes fall
    # in between depends on the machine's speed: the viewer refreshes at most twice a second).
    assert shown[0] == 200
    assert event.num_gaussians == trainer.model.num_gaussians == _shown_gaussians(widget) != 200
    assert "density control at step" in widget.run_panel.status_label.text()
    assert event.held_out == ["az30_el20", "az120_el-15"]
    assert set(event.metrics) == {v.name for v in widget.session.views} | set(event.held_out)
    summary = widget.run_panel.summary_label.text()
    for name in event.held_out:
        assert f"<td>{name}</td><td>held-out</td>" in summary
    assert "<td>xy</td><td>trained</td>" in summary
    assert all(title in summary for title in ("PSNR", "fg PSNR", "recall", "SSIM"))
    table = widget.run_panel.summary_label.toolTip()
    assert re.search(r"az30_el20\s+held-out", table) and re.search(r"xy\s+trained", table)
    # The layer of Gaussians follows the final count, features and all.
    wait_for(qtbot, lambda: len(viewer.layers["fitted gaussians"].data) == event.num_gaussians)
    layer = viewer.layers["fitted gaussians"]
    assert layer is earlier and len(layer.features) == len(layer.size) == event.num_gaussians


def test_closing_the_viewer_stops_a_paused_fit(make_napari_viewer, qtbot) -> None:
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "neuron")
    widget = dock_fit_widget(viewer)
    widget.settings_panel.set_value("iterations", 100_000)
    widget.start()
    wait_for(qtbot, lambda: widget.trainer is not None and widget.trainer.iteration >= 2)
    widget.toggle_pause()
    trainer = widget.trainer
    viewer.close()
    qtbot.wait(100)  # let Qt delete the dock widgets
    wait_for(qtbot, lambda: trainer._stop.is_set(), timeout=10)
    # The worker thread ends (a paused trainer would otherwise block the thread pool forever).
    assert worker_pool().waitForDone(20_000)


def test_the_responsiveness_benchmark_runs(sample_viewer) -> None:
    """``measure_stalls`` (what ``benchmarks/bench_responsiveness.py`` reports) runs a fit and times the main
    thread; its numbers depend on the machine's load, so only that it measures is tested here."""
    _, widget = sample_viewer
    stalls = measure_stalls(widget, iterations=20)
    assert stalls.iterations == 20 and len(stalls.gaps) > 10 and stalls.longest >= stalls.longest_stepping > 0
