"""The *Views* panel: which views to fit and hold out, and at what resolution.

It returns its part of :class:`~napari_neurogs_mip.prepare.FitInputs`
(:meth:`ViewsPanel.inputs`); view names and defaults are the core's.
"""

from __future__ import annotations

import html
from typing import Any

from qtpy.QtWidgets import QCheckBox, QDoubleSpinBox, QHBoxLayout, QLabel, QLineEdit, QSpinBox, QVBoxLayout, QWidget

from ...frames import VolumeGeometry
from ...prepare import VOLUME_VIEWS, FitInputs
from ...views import AXIS_VIEWS, make_views, parse_view_specs
from .rows import Row, bare, combo, group, info_label

RES_NATIVE, RES_FACTOR, RES_SHAPE = "native", "downsample factor", "H x W"
_NAME_GEOMETRY = VolumeGeometry((2, 2, 2), (1.0, 1.0, 1.0))
"""Any volume: view names do not depend on it (used to name views before a target is read)."""


def view_names(specs: list[str]) -> list[str]:
    """The names the core gives the views ``specs`` (``30:15`` -> ``az30_el15``); raises on bad or repeated specs."""
    return [view.name for view in make_views(specs, _NAME_GEOMETRY)]


class ViewsPanel(QWidget):
    """View choice; disabled for MIP targets, which fix their own views."""

    def __init__(self) -> None:
        super().__init__()
        box, form = group("Views")
        self.default_views_check = QCheckBox(", ".join(VOLUME_VIEWS))
        self.default_views_check.setChecked(FitInputs().view_specs is None)
        self.default_views_check.setToolTip(
            "The core's default views of a volume: the axis MIPs and two oblique views, which fix depth far better "
            "than the axis MIPs alone. Untick to choose the views."
        )
        axes = QWidget()
        axes_row = bare(QHBoxLayout(axes))
        self.axis_checks = {}
        for name in AXIS_VIEWS:
            check = QCheckBox(name)
            check.setChecked(True)
            self.axis_checks[name] = check
            axes_row.addWidget(check)
        self.orbit_edit = QLineEdit()
        self.orbit_edit.setPlaceholderText("e.g. 30:15, 120:0")
        self.orbit_edit.setToolTip("Rotated views, azimuth:elevation in degrees, comma separated")
        self.eval_edit = QLineEdit(", ".join(FitInputs().eval_specs))
        self.eval_edit.setPlaceholderText("none; e.g. 30:20, 120:-15")
        self.eval_edit.setToolTip(
            "Held-out views (xy, xz, yz or azimuth:elevation, comma separated): scored when the fit ends, never "
            "trained on (volume targets only)"
        )
        self.resolution_combo = combo([RES_NATIVE, RES_FACTOR, RES_SHAPE], tip="Resolution of every view")
        self.factor_spin = QDoubleSpinBox()
        self.factor_spin.setRange(1.0, 64.0)
        self.factor_spin.setSingleStep(0.5)
        self.factor_spin.setValue(2.0)
        self.factor_spin.setToolTip("Downsampling factor (area averaging)")
        shape = QWidget()
        shape_row = bare(QHBoxLayout(shape))
        self.height_spin, self.width_spin = QSpinBox(), QSpinBox()
        for spin, what in ((self.height_spin, "Height"), (self.width_spin, "Width")):
            spin.setRange(1, 100_000)
            spin.setValue(256)
            spin.setToolTip(f"{what} of every view, pixels")
        shape_row.addWidget(self.height_spin)
        shape_row.addWidget(QLabel("x"))
        shape_row.addWidget(self.width_spin)
        self.info = info_label()
        self._axes_row = Row("axis views", axes)
        self._orbit_row = Row("orbit views", self.orbit_edit)
        self._factor_row = Row("factor", self.factor_spin)
        self._shape_row = Row("H x W", shape)
        for row in (
            Row("views", self.default_views_check), self._axes_row, self._orbit_row, Row("held out", self.eval_edit),
            self.info, Row("resolution", self.resolution_combo), self._factor_row, self._shape_row,
        ):  # fmt: skip
            form.addWidget(row)
        column = bare(QVBoxLayout(self))
        column.addWidget(box)
        self.default_views_check.toggled.connect(self._show_state)
        self.resolution_combo.currentTextChanged.connect(self._show_state)
        for edit in (self.orbit_edit, self.eval_edit):
            edit.textChanged.connect(self._show_state)
        for check in self.axis_checks.values():
            check.toggled.connect(self._show_state)
        self._show_state()

    def view_specs(self) -> list[str] | None:
        """Views to fit: ``None`` for the core's default views, else the ticked axis views, then the orbit views."""
        if self.default_views_check.isChecked():
            return None
        specs = [name for name, check in self.axis_checks.items() if check.isChecked()]
        text = self.orbit_edit.text().strip()
        if text:
            specs += parse_view_specs(text)
        if not specs:
            raise ValueError("tick at least one axis view or give an orbit view (AZ:EL)")
        return specs

    def eval_specs(self) -> list[str]:
        """Held-out views as entered (empty: none), checked against the views to fit.

        Raises
        ------
        ValueError
            An unknown or repeated held-out view, or one that is also trained on.
        """
        text = self.eval_edit.text().strip()
        if not text:
            return []
        try:
            specs = parse_view_specs(text)
            names = view_names(specs)
        except ValueError as error:
            raise ValueError(f"held-out views: {error}") from None
        trained = self.view_specs()
        both = sorted(set(names) & set(view_names(list(VOLUME_VIEWS) if trained is None else trained)))
        if both:
            raise ValueError(f"held-out views {both} are also fitted; a held-out view must not be trained on")
        return specs

    def resolution(self) -> float | tuple[int, int] | None:
        """The view resolution: ``None`` (native), a factor, or ``(H, W)``."""
        choice = self.resolution_combo.currentText()
        if choice == RES_FACTOR:
            return float(self.factor_spin.value())
        if choice == RES_SHAPE:
            return (self.height_spin.value(), self.width_spin.value())
        return None

    def inputs(self, volume: bool = True) -> dict[str, Any]:
        """This panel's part of :class:`~napari_neurogs_mip.prepare.FitInputs`; MIP targets (``volume=False``)
        hold out nothing (they have no volume to render held-out views from)."""
        return {
            "view_specs": self.view_specs(),
            "resolution": self.resolution(),
            "eval_specs": self.eval_specs() if volume else [],
        }

    def _show_state(self, *_: Any) -> None:
        custom = not self.default_views_check.isChecked()
        self._axes_row.setVisible(custom)
        self._orbit_row.setVisible(custom)
        resolution = self.resolution_combo.currentText()
        self._factor_row.setVisible(resolution == RES_FACTOR)
        self._shape_row.setVisible(resolution == RES_SHAPE)
        try:
            trained = self.view_specs()
            fitted = view_names(list(VOLUME_VIEWS) if trained is None else trained)
            held = view_names(self.eval_specs()) if self.eval_edit.text().strip() else []
        except ValueError as error:
            self.info.setText(f"<span style='color:#e05050'>{html.escape(str(error))}</span>")
            self.info.setVisible(True)
            return
        self.info.setText(f"fits {', '.join(fitted)}" + (f"; holds out {', '.join(held)}" if held else ""))
        # The default views are named by their tick box already: say it again only when it adds something.
        self.info.setVisible(custom or bool(held))
