"""Helpers shared by the napari front-end tests."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

PLUGIN = "napari-neurogs-mip"
WIDGET = "Fit MIP"


def fast(widget, iterations: int = 30) -> None:
    """Make the widget's fits small and quick: 200 Gaussians, views at half resolution, on the CPU."""
    widget.model_panel.num_gaussians.setValue(200)
    widget.views_panel.resolution_combo.setCurrentText("downsample factor")
    widget.views_panel.factor_spin.setValue(2.0)
    widget.settings_panel.set_value("iterations", iterations)
    widget.settings_panel.set_value("device", "cpu")
    widget.run_panel.snapshot_check.setChecked(True)


def dock_fit_widget(viewer, quick: bool = True):
    """Dock *Fit MIP* through the manifest (and make its fits small and quick)."""
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    if quick:
        fast(widget)
    return widget


def wait_for(qtbot, condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Process Qt events until ``condition()`` holds (fails after ``timeout`` seconds)."""
    qtbot.waitUntil(condition, timeout=int(timeout * 1000))


def wait_idle(qtbot, widget, timeout: float = 60.0) -> None:
    """Wait until the widget's run has ended and its buttons are reset."""
    wait_for(qtbot, lambda: not widget.session.state.busy and widget.run_panel.start_button.isEnabled(), timeout)


def tiny_trainer():
    """A trainer of four Gaussians on a 12^3 random volume (kernels load in it like in any fit)."""
    from napari_neurogs_mip.prepare import FitInputs, prepare_fit
    from napari_neurogs_mip.train import FitConfig, Trainer

    # Raw: pure noise, denoised, has no structure to start on.
    volume = np.random.default_rng(0).random((12, 12, 12)).astype(np.float32)
    prepared = prepare_fit(FitInputs(volume=volume, view_specs=["xy"], num_gaussians=4, denoise=0.0))
    return Trainer(prepared.model, prepared.targets, FitConfig(iterations=1, device="cpu"))


def error_messages(since: int) -> list[str]:
    """Error notifications shown since record ``since``."""
    from napari.utils.notifications import NotificationSeverity, notification_manager

    records = notification_manager.records[since:]
    return [str(n.message) for n in records if n.severity == NotificationSeverity.ERROR]


def info_messages(since: int) -> list[str]:
    """Info notifications shown since record ``since``."""
    from napari.utils.notifications import NotificationSeverity, notification_manager

    records = notification_manager.records[since:]
    return [str(n.message) for n in records if n.severity == NotificationSeverity.INFO]


def record_count() -> int:
    """How many notifications have been shown so far."""
    from napari.utils.notifications import notification_manager

    return len(notification_manager.records)
