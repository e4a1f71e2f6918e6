"""The *Model* panel: what the fit starts from (from scratch, a checkpoint, an SWC skeleton, a Points layer).

It returns its part of :class:`~napari_neurogs_mip.prepare.FitInputs`
(:meth:`ModelPanel.inputs`); a Points layer becomes an in-memory model
(``FitInputs.model``) with the edits made to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtpy.QtWidgets import QSpinBox, QVBoxLayout, QWidget

from ...prepare import INITS, LEGACY_COUNT, FitInputs
from .._layers import points_to_model
from .._target_rules import offered_starts
from .rows import FileRow, Row, bare, combo, group
from .target_panel import layer_info

START_SCRATCH, START_CHECKPOINT, START_SWC, START_POINTS = (
    "from scratch",
    "checkpoint file",
    "SWC skeleton",
    "Points layer",
)
AUTO = "auto"


class ModelPanel(QWidget):
    """Start choice."""

    def __init__(self, viewer: Any) -> None:
        super().__init__()
        self.viewer = viewer
        defaults = FitInputs()
        box, form = group("Model")
        self.start_combo = combo(
            [START_SCRATCH, START_CHECKPOINT, START_SWC, START_POINTS], tip="What the fit starts from"
        )
        self.init_combo = combo(
            list(INITS), defaults.init,
            "foreground: Gaussians spread over the structure (from MIP targets: over points bright in all three axis "
            "views); intensity: the seed design's draw by brightness, for comparison",
        )  # fmt: skip
        self.num_gaussians = QSpinBox()
        self.num_gaussians.setRange(0, 50_000_000)
        self.num_gaussians.setSpecialValueText(f"{AUTO} (from the foreground)")
        self.num_gaussians.setValue(defaults.num_gaussians or 0)
        self.num_gaussians.setToolTip(
            "Gaussians to start with. auto: one per foreground cell, at most half the max Gaussians (placement "
            f"'intensity': {LEGACY_COUNT}). Density control changes the count during the fit."
        )
        self.checkpoint_file = FileRow("checkpoint", "Checkpoints (*.pt *.pth);;All files (*)")
        self.swc_file = FileRow("SWC skeleton", "SWC (*.swc);;All files (*)")
        self.points_combo = combo([], tip="A Gaussian Points layer (from a checkpoint, the sample, or a fit)")
        self._rows = {
            "start": Row("start", self.start_combo),
            "init": Row("placement", self.init_combo),
            "count": Row("Gaussians", self.num_gaussians),
            START_CHECKPOINT: Row("checkpoint", self.checkpoint_file),
            START_SWC: Row("SWC", self.swc_file),
            START_POINTS: Row("layer", self.points_combo),
        }
        for row in self._rows.values():
            form.addWidget(row)
        column = bare(QVBoxLayout(self))
        column.addWidget(box)
        self.start_combo.currentTextChanged.connect(self._show_state)
        self.refresh_layers()

    def refresh_layers(self) -> None:
        """Offer the viewer's Points layers again (keeping the choice when it still exists)."""
        names = offered_starts([layer_info(layer) for layer in self.viewer.layers])
        current = self.points_combo.currentText()
        self.points_combo.clear()
        self.points_combo.addItems(names)
        if current in names:
            self.points_combo.setCurrentText(current)
        self._show_state()

    def _show_state(self, *_: Any) -> None:
        start = self.start_combo.currentText()
        self._rows["init"].setVisible(start == START_SCRATCH)
        self._rows["count"].setVisible(start == START_SCRATCH)
        for choice in (START_CHECKPOINT, START_SWC, START_POINTS):
            self._rows[choice].setVisible(start == choice)

    def inputs(self) -> dict[str, Any]:
        """This panel's part of :class:`~napari_neurogs_mip.prepare.FitInputs`.

        Raises
        ------
        ValueError
            A missing file or layer (the message says which).
        """
        count = self.num_gaussians.value()
        found: dict[str, Any] = {"num_gaussians": count or None, "init": self.init_combo.currentText()}
        start = self.start_combo.currentText()
        if start == START_CHECKPOINT:
            found["checkpoint"] = _existing(self.checkpoint_file.text(), "checkpoint file")
        elif start == START_SWC:
            found["swc"] = _existing(self.swc_file.text(), "SWC file")
        elif start == START_POINTS:
            name = self.points_combo.currentText()
            if not name or name not in self.viewer.layers:
                raise ValueError("choose a Points layer of Gaussians to start from")
            layer = self.viewer.layers[name]
            found["model"] = points_to_model(layer.data, layer.features, layer.metadata, layer.scale, layer.size)
        return found


def _existing(path: str, what: str) -> str:
    if not path:
        raise ValueError(f"choose a {what}")
    if not Path(path).is_file():
        raise ValueError(f"no such {what}: {path}")
    return path
