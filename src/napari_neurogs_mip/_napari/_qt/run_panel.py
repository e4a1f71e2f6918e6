"""The *Run* panel: start, pause, stop, save and export buttons, and what the fit says while it runs.

It shows a :class:`.._session.FitStatus` (buttons follow its state) and holds
the display options of the live layers; the widget wires the buttons.
"""

from __future__ import annotations

from qtpy.QtWidgets import QCheckBox, QHBoxLayout, QProgressBar, QPushButton, QVBoxLayout, QWidget

from .._loss_plot import LossPlot
from .._session import FitState, FitStatus
from .rows import bare, info_label


class RunPanel(QWidget):
    """Buttons, status lines, progress bar, loss curve and the finish summary."""

    def __init__(self) -> None:
        super().__init__()
        column = bare(QVBoxLayout(self), spacing=3)
        self.residual_check = QCheckBox("residual layers")
        self.residual_check.setToolTip("Also show rendered − target for each view (blue: too dark, orange: too bright)")
        self.snapshot_check = QCheckBox("Gaussians layer at the end")
        self.snapshot_check.setChecked(True)
        self.snapshot_check.setToolTip("Add the fitted model as a Points layer when the fit ends")
        self.start_button = QPushButton("Start")
        self.pause_button = QPushButton("Pause")
        self.stop_button = QPushButton("Stop")
        self.save_button = QPushButton("Save checkpoint…")
        self.export_button = QPushButton("Export MIPs…")
        self.start_button.setToolTip("Prepare the targets and the initial model, then fit")
        self.pause_button.setToolTip("Hold the fit between steps (the model can be saved meanwhile)")
        self.stop_button.setToolTip("End the fit after the current step; the model stays consistent")
        self.save_button.setToolTip("Write the current model with its optimiser state (also while running or paused)")
        self.export_button.setToolTip("Write the latest rendered MIPs, one ImageJ TIFF per view, calibrated in um")
        self.backend_label = info_label()
        self.backend_label.setText("backend: chosen when the fit starts")
        self.status_label = info_label()
        self.status_label.setText("ready")
        self.progress = QProgressBar()
        self.progress.setTextVisible(True)
        self.progress.setFormat("%v / %m")
        self.loss_plot = LossPlot()
        self.summary_label = info_label()
        for widgets in (
            (self.residual_check, self.snapshot_check),
            (self.start_button, self.pause_button, self.stop_button),
            (self.save_button, self.export_button),
        ):
            line = QHBoxLayout()
            for widget in widgets:
                line.addWidget(widget)
            column.addLayout(line)
        for widget in (self.progress, self.backend_label, self.status_label, self.loss_plot, self.summary_label):
            column.addWidget(widget)
        self.show_status(FitStatus(), has_images=False)

    def show_status(self, status: FitStatus, has_images: bool) -> None:
        """Enable the buttons that apply in ``status.state``."""
        state = status.state
        self.start_button.setEnabled(not state.busy)
        self.pause_button.setEnabled(state in (FitState.RUNNING, FitState.PAUSED))
        self.pause_button.setText("Resume" if state is FitState.PAUSED else "Pause")
        self.stop_button.setEnabled(state in (FitState.PREPARING, FitState.RUNNING, FitState.PAUSED))
        self.save_button.setEnabled(state not in (FitState.IDLE, FitState.PREPARING) and status.backend != "")
        self.export_button.setEnabled(has_images)
        self.residual_check.setEnabled(not state.busy)
        self.snapshot_check.setEnabled(not state.busy)
