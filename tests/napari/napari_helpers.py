"""Helpers shared by the napari front-end tests."""

from __future__ import annotations

from collections.abc import Callable

PLUGIN = "napari-neurogs-mip"
WIDGET = "Fit MIP"


def dock_fit_widget(viewer, fast: bool = True):
    """Dock *Fit MIP* through the manifest and make its fits small and quick."""
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    if fast:
        widget.num_gaussians.setValue(200)
        widget.resolution_combo.setCurrentText("downsample factor")
        widget.factor_spin.setValue(2.0)
        widget.iterations.setValue(30)
        widget.device_combo.setCurrentText("cpu")
        widget.snapshot_check.setChecked(True)
    return widget


def wait_for(qtbot, condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Process Qt events until ``condition()`` holds (fails after ``timeout`` seconds)."""
    qtbot.waitUntil(condition, timeout=int(timeout * 1000))


def wait_idle(qtbot, widget, timeout: float = 60.0) -> None:
    """Wait until the widget's run has ended and its buttons are reset."""
    wait_for(qtbot, lambda: widget.state == "idle" and widget._worker is None, timeout)
