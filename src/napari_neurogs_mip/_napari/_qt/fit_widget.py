"""The *Fit MIP* dock widget: composes the panels, runs a :class:`.._session.FitSession`, shows it live.

The widget owns no fit state: the session holds it (state, trainer, latest
step and images) and the widget listens to its events.  The panels each return
their part of the core's inputs; :class:`.live_layers.LiveLayers` changes the
layers.  Layer updates are throttled to one refresh per :data:`REFRESH_S`
(:class:`.throttled.ThrottledCall`), however fast the fit steps.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import QFileDialog, QScrollArea, QSizePolicy, QVBoxLayout, QWidget

from ...io.tiff import write_mips
from ...metrics import format_table
from ...prepare import FitInputs
from ...train import FinishedEvent, FitConfig, StepEvent, Trainer
from .._axes import planes_needed
from .._fit_events import Ready
from .._session import FitSession, FitState
from .._summary import exported_message, finished_message, progress_line, refused_message, summary_html
from .._threads import forget_at_close, qt_runner, start_worker, stop_at_exit
from .._triton_guard import guard_triton_import
from .live_layers import LiveLayers
from .model_panel import ModelPanel
from .rows import bare
from .run_panel import RunPanel
from .settings_panel import SettingsPanel
from .target_panel import TargetPanel
from .throttled import ThrottledCall
from .views_panel import ViewsPanel

if TYPE_CHECKING:
    import napari

LOGGER = logging.getLogger(__name__)
REFRESH_S = 0.5
"""Shortest interval between two refreshes of the viewer (the worker may step much faster)."""


class FitWidget(QWidget):
    """Dock widget that fits Gaussians to the MIPs of a target and shows the fit live.

    Signals
    -------
    layers_updated(int)
        Live layers show the render of this iteration.
    fit_finished(object)
        The run ended with this :class:`~napari_neurogs_mip.train.FinishedEvent`.
    fit_failed(str)
        The run failed with this message (also a notification).
    run_ended()
        The run is over, however it went (buttons are reset).
    checkpoint_saved(str)
        *Save checkpoint* wrote this file.
    """

    layers_updated = Signal(int)
    fit_finished = Signal(object)
    fit_failed = Signal(str)
    run_ended = Signal()
    checkpoint_saved = Signal(str)

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        guard_triton_import()  # before anything can import torch's compiler stack (see _triton_guard)
        self.viewer = napari_viewer
        self.session = FitSession(runner=qt_runner)
        stop_at_exit(self.session)
        self.live = LiveLayers(napari_viewer, parent=self)  # deleted with the widget, its timer too
        self.target_panel, self.views_panel = TargetPanel(napari_viewer), ViewsPanel()
        self.model_panel, self.settings_panel, self.run_panel = ModelPanel(napari_viewer), SettingsPanel(), RunPanel()
        self._build()
        self._refreshes = ThrottledCall(self._refresh, REFRESH_S, self)
        self._shown_iteration = -1
        """The iteration whose render the live layers were last given."""
        self._source = None
        """The layer the current fit's volume comes from (its axes and picks), if any."""
        self._connect()

    def _build(self) -> None:
        self.settings = QWidget()
        column = bare(QVBoxLayout(self.settings), spacing=4)
        for panel in (self.target_panel, self.views_panel, self.model_panel, self.settings_panel):
            column.addWidget(panel)
        column.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(self.settings)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Expanding)
        self.scroll = scroll
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(scroll, 1)
        layout.addWidget(self.run_panel)

    def _connect(self) -> None:
        run, session = self.run_panel, self.session
        run.start_button.clicked.connect(self.start)
        run.pause_button.clicked.connect(self.toggle_pause)
        run.stop_button.clicked.connect(self.stop)
        run.save_button.clicked.connect(lambda: self.save_checkpoint())
        run.export_button.clicked.connect(lambda: self.export_mips())
        self.target_panel.changed.connect(lambda: self.views_panel.setEnabled(not self.target_panel.is_mips()))
        self.views_panel.setEnabled(not self.target_panel.is_mips())
        self.live.updated.connect(self.layers_updated.emit)
        session.status.events.state.connect(self._on_state)
        session.status.events.message.connect(lambda text: run.status_label.setText(text))
        session.status.events.backend.connect(lambda text: run.backend_label.setText(text or "backend: …"))
        session.events.ready.connect(self._on_ready)
        session.events.step.connect(lambda _: self._refreshes.request())
        session.events.checkpoint.connect(lambda e: run.backend_label.setToolTip(f"last checkpoint: {e.path}"))
        session.events.finished.connect(self._on_finished)
        session.events.fitted.connect(self._on_fitted)
        session.events.failed.connect(self._on_failed)
        session.events.ended.connect(self._on_ended)
        for name in ("inserted", "removed", "moved", "reordered"):
            getattr(self.viewer.layers.events, name).connect(self._on_layers_changed)
        for layer in self.viewer.layers:
            layer.events.name.connect(self._on_layers_changed)
        forget_at_close(self, session)

    # ================================================================= inputs
    def fit_config(self) -> FitConfig:
        """The fit settings as the core takes them (validated)."""
        return self.settings_panel.config()

    def fit_inputs(self, config: FitConfig | None = None) -> FitInputs:
        """The target and start as the core takes them (``ValueError`` names a missing or bad choice)."""
        config = config or self.fit_config()
        views = self.views_panel.inputs(volume=not self.target_panel.is_mips())
        return FitInputs(
            **self.target_panel.inputs(planes_needed(views["resolution"], config.lambda_ssim > 0)),
            **views,
            **self.model_panel.inputs(),
            denoise=config.denoise,
            max_gaussians=config.max_gaussians,
            seed=config.seed,
            device=config.device,
        )

    def _on_layers_changed(self, event: Any = None) -> None:
        value = getattr(event, "value", None)
        if getattr(event, "type", None) == "inserted" and value is not None:
            value.events.name.connect(self._on_layers_changed)
        self.target_panel.refresh_layers()
        self.model_panel.refresh_layers()

    # ================================================================ control
    @property
    def trainer(self) -> Trainer | None:
        """The trainer of the current or last run (``None`` before the first run)."""
        return self.session.trainer

    @property
    def state(self) -> str:
        """The session's state: ``idle``, ``preparing``, ``running``, ``paused``, ``stopping``, ``finished``..."""
        return self.session.state.value

    def start(self) -> None:
        """Start a fit with the current settings (a setting that cannot work is a notification)."""
        from napari.utils.notifications import show_error

        if self.session.state.busy:
            return
        try:
            config = self.fit_config()
            inputs = self.fit_inputs(config)
        except (ValueError, OSError) as error:  # bad settings: say why, start nothing
            show_error(refused_message(error))
            return
        self._source = self.target_panel.source_volume()
        run = self.run_panel
        run.summary_label.setText("")
        run.summary_label.setToolTip("")
        run.loss_plot.reset(config.iterations)
        run.progress.setRange(0, config.iterations)
        run.progress.setValue(0)
        self._refreshes.reset()
        self.session.start(inputs, config, hold=True, snapshot=run.snapshot_check.isChecked())

    def toggle_pause(self) -> None:
        """Pause a running fit, or resume a paused one (the trainer holds between steps)."""
        if self.session.state is FitState.PAUSED:
            self.session.resume()
        else:
            self.session.pause()
            self._refreshes.request()

    def stop(self) -> None:
        """End the fit after the current step (a paused fit ends at once)."""
        self.session.stop()

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        """Stop a running fit when the widget is closed."""
        self.session.stop()
        super().closeEvent(event)

    # ================================================================ events
    def _on_state(self, state: FitState) -> None:
        self.run_panel.show_status(self.session.status, self.session.images is not None)
        self.settings.setEnabled(not state.busy)

    def _on_ready(self, ready: Ready) -> None:
        trainer = self.session.trainer
        self.run_panel.backend_label.setToolTip("\n".join(ready.notes))
        self.run_panel.loss_plot.reset(trainer.config.iterations, ready.history)
        self.run_panel.progress.setValue(len(ready.history))
        self._on_state(self.session.state)
        source = self._source
        note = self.live.calibrate(source, self.target_panel.voxel_size()) if source is not None else None
        if note:
            self.run_panel.backend_label.setToolTip(self.run_panel.backend_label.toolTip() + "\n" + note)
        residuals = self.run_panel.residual_check.isChecked()
        beside = [source.layer] if source is not None else self.target_panel.mip_layers()
        self.live.show(self.session.views, self.session.targets, residuals, self.session.release, beside)

    def _refresh(self) -> None:
        """Apply the latest render, progress and loss curve to the viewer (main thread; through
        ``self._refreshes``, which keeps the rate)."""
        session, run = self.session, self.run_panel
        if session.images is not None and session.images_iteration != self._shown_iteration:
            self._shown_iteration = session.images_iteration
            self.live.update(session.images, session.images_iteration)
        step: StepEvent | None = session.last_step
        if step is not None:
            status = session.status
            gaussians = f"{status.num_gaussians:,} Gaussians"
            trainer = session.trainer
            if trainer is not None and trainer.config.densify:
                gaussians += f" (max {trainer.budget:,})"
            busy = session.state in (FitState.PAUSED, FitState.STOPPING)
            line = progress_line(step, gaussians, session.state.value if busy else "")
            run.status_label.setText(line + (f"\n{status.density}" if status.density else ""))
            run.progress.setValue(step.iteration)
            history = trainer.loss_history if trainer is not None else []
            run.loss_plot.reset(step.total, list(history[: step.iteration]))
        run.export_button.setEnabled(session.images is not None)

    def _on_finished(self, event: FinishedEvent) -> None:
        from napari.utils.notifications import show_info

        self._refreshes.now()
        self.live.flush(event.images, event.iteration)
        self._shown_iteration = event.iteration
        self.run_panel.summary_label.setText(summary_html(event))
        # The same numbers as the command line prints, with the share of foreground pixels.
        self.run_panel.summary_label.setToolTip(f"<pre>{format_table(event.metrics, event.held_out)}</pre>")
        show_info(finished_message(event))
        self.fit_finished.emit(event)

    def _on_fitted(self, model: Any) -> None:
        result = self.session.result
        self.live.add_model(model, result.iteration if result else 0, self._source)

    def _on_failed(self, message: str) -> None:
        from napari.utils.notifications import show_error

        show_error(message)
        self.fit_failed.emit(message)

    def _on_ended(self) -> None:
        self._refreshes.cancel()
        self._on_state(self.session.state)
        self.run_ended.emit()

    # ================================================================ output
    def save_checkpoint(self, path: str | Path | None = None) -> None:
        """Write the current model with its optimiser state in a background thread (also while running or
        paused); without ``path`` a file dialog asks for one."""
        from napari.qt.threading import create_worker
        from napari.utils.notifications import show_error

        if self.session.trainer is None:
            show_error("Fit MIP: nothing to save yet\nstart a fit first")
            return
        if path is None:
            path, _ = QFileDialog.getSaveFileName(self, "Save checkpoint", "neurogs_fit.pt", "Checkpoints (*.pt *.pth)")
            if not path:
                return
        # Errors are ours to report (napari would re-raise them as well, a second notification).
        worker = create_worker(self.session.save, Path(path), _ignore_errors=True)
        worker.returned.connect(self._on_saved)
        worker.errored.connect(lambda error: show_error(f"Fit MIP: the checkpoint was not saved\n{error}"))
        start_worker(worker)

    def _on_saved(self, path: Path) -> None:
        from napari.utils.notifications import show_info

        show_info(f"Fit MIP: saved {Path(path).name}\n{path}")
        self.checkpoint_saved.emit(str(path))

    def export_mips(self, path: str | Path | None = None) -> list[Path]:
        """Write the latest rendered MIPs, one ImageJ TIFF per view calibrated in um (``<stem>_<view>.tif``);
        returns the files (empty if nothing was written)."""
        from napari.utils.notifications import show_error, show_info

        session = self.session
        if session.images is None:
            show_error("Fit MIP: no rendered MIPs yet\nstart a fit first")
            return []
        if path is None:
            caption = "Export rendered MIPs (one TIFF per view: <name>_<view>.tif)"
            path, _ = QFileDialog.getSaveFileName(self, caption, "rendered_mips.tif", "TIFF (*.tif *.tiff)")
            if not path:
                return []
        images = {view.name: image for view, image in zip(session.views, session.images)}
        pixel_sizes = {view.name: (view.dv, view.du) for view in session.views}
        try:
            written = write_mips(Path(path), images, pixel_sizes)
        except (OSError, ValueError) as error:  # disk full, no permission, ...: tell the user
            show_error(f"Fit MIP: the MIPs were not exported\n{type(error).__name__}: {error}")
            return []
        show_info(exported_message(written, session.images_iteration))
        return written
