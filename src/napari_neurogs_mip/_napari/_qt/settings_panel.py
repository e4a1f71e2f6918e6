"""The *Fit* panel: every described :class:`~napari_neurogs_mip.train.FitConfig` setting as a magicgui control.

The controls are built from :func:`~napari_neurogs_mip.settings.settings_of`
(name, type, default, help, range, choices, unit, group), so a setting added to
``FitConfig`` appears here with nothing re-typed.  :data:`COMMON` settings are
shown; the others sit under a collapsed *Advanced* section, by group.  An
optional number (``None`` = the core decides) reads ``auto`` at its lowest value
(:class:`AutoSpinBox`: magicgui's integer box cannot show that text).
"""

from __future__ import annotations

import math
from typing import Any

from magicgui.widgets import CheckBox, ComboBox, FloatSpinBox, SpinBox
from magicgui.widgets.bases import ValueWidget
from psygnal import Signal
from qtpy.QtWidgets import QLabel, QSpinBox, QVBoxLayout, QWidget
from superqt import QCollapsible

from ...device import available_devices
from ...settings import SettingField, settings_of
from ...train import DEFAULT_BUDGET, FitConfig
from .rows import FileRow, Row, bare, group

COMMON = ("iterations", "lr", "lambda_ssim", "device", "densify", "max_gaussians")
"""Settings shown without opening *Advanced* (the ones a first fit may want to change)."""
GROUPS = ("optimisation", "targets", "loss", "render", "density", "run")
ENABLED_WHEN = {"beta": ("mode", "soft"), "densify_every": ("densify", True), "densify_until": ("densify", True)}
"""Settings that only act when another one has a value (shown disabled otherwise)."""
AUTO_TEXT = {"max_gaussians": f"auto ({DEFAULT_BUDGET['cpu']:,} on CPU)"}
"""What ``auto`` stands for, where it fits in the box (the tooltip has the rest)."""
_INT_LIMIT = 2**31 - 1
"""Qt spin boxes hold 32-bit integers."""


def label_of(name: str) -> str:
    """The caption of a setting: its name in words (``lambda_ssim`` -> ``λ SSIM``)."""
    if name.startswith("lambda_"):
        return "λ " + name.removeprefix("lambda_").upper()
    return name.replace("_", " ")


def _decimals(default: float) -> int:
    """Decimals that show ``default`` and a hundredth of it (``1e-3`` -> 5)."""
    return max(2, 2 - math.floor(math.log10(abs(default)))) if default else 3


class AutoSpinBox:
    """An integer box whose lowest value reads ``auto`` (``None``), with the part of magicgui's
    ``ValueWidget`` interface the panel uses (``value``, ``min``, ``changed``, ``enabled``, ``native``)."""

    changed = Signal(object)

    def __init__(self, low: int, high: int, value: int | None, auto_text: str, tooltip: str) -> None:
        self.native = QSpinBox()
        self.native.setRange(low, high)
        self.native.setSpecialValueText(auto_text)
        self.native.setValue(low if value is None else value)
        self.native.setToolTip(tooltip)
        self.native.valueChanged.connect(self.changed.emit)

    @property
    def min(self) -> int:
        """The lowest value, which stands for ``auto``."""
        return self.native.minimum()

    @property
    def value(self) -> int:
        """The number shown (:attr:`min` for ``auto``)."""
        return self.native.value()

    @value.setter
    def value(self, value: int) -> None:
        self.native.setValue(int(value))

    @property
    def enabled(self) -> bool:
        """Whether the box takes input."""
        return self.native.isEnabled()

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.native.setEnabled(bool(value))


def make_control(item: SettingField) -> ValueWidget | AutoSpinBox:
    """A magicgui control for one setting, with its default, range, unit and help."""
    s = item.setting
    unit = f", in {s.unit}" if s.unit else ""
    tip = f"{s.help} ({s.describe_range()}{unit}; default {'auto' if item.default is None else item.default})"
    if item.kind is bool:
        return CheckBox(value=item.default, text="", tooltip=tip)
    if item.kind is str:
        choices = list(s.choices or [item.default])
        if item.name == "device":
            choices = [c for c in available_devices() if c in choices]  # only what this machine has
        return ComboBox(choices=choices, value=item.default, tooltip=tip)
    suffix = f" {s.unit}" if s.unit else ""
    if item.kind is int:
        low = int(s.minimum if s.minimum is not None else -_INT_LIMIT) + (1 if s.positive else 0)
        low -= 1 if item.optional else 0  # the value below the range stands for None (auto)
        high = int(min(s.maximum if s.maximum is not None else _INT_LIMIT, _INT_LIMIT))
        if item.optional:
            return AutoSpinBox(low, high, item.default, AUTO_TEXT.get(item.name, "auto"), tip)
        return SpinBox(value=item.default, min=low, max=high, tooltip=tip)
    else:
        decimals = _decimals(item.default or 0.0)
        low = 10.0**-decimals if s.positive else (s.minimum if s.minimum is not None else -1e9)
        control = FloatSpinBox(min=low, max=s.maximum if s.maximum is not None else 1e9, tooltip=tip)
        control.native.setDecimals(decimals)
        control.native.setSingleStep(10.0 ** math.floor(math.log10(item.default)) / 10 if item.default else 0.01)
        control.value = item.default
        control.native.setSuffix(suffix)  # magicgui's integer box (superqt's large-int box) has no suffix
    return control


class SettingsPanel(QWidget):
    """The fit settings; :meth:`config` gives the :class:`~napari_neurogs_mip.train.FitConfig`."""

    def __init__(self) -> None:
        super().__init__()
        self.fields = {item.name: item for item in settings_of(FitConfig)}
        self.controls: dict[str, ValueWidget | AutoSpinBox] = {
            name: make_control(item) for name, item in self.fields.items()
        }
        self.rows = {name: Row(label_of(name), control.native) for name, control in self.controls.items()}
        box, form = group("Fit")
        for name in COMMON:
            form.addWidget(self.rows[name])
        self.advanced = QCollapsible("Advanced")
        self.advanced.setToolTip("Every other fit setting, by group")
        inner = QWidget()
        column = bare(QVBoxLayout(inner), spacing=2)
        self.out_folder = FileRow("output folder", "", folder=True)
        self.out_folder.edit.setPlaceholderText("optional: checkpoints")
        self.out_folder.edit.setToolTip("Write checkpoint_iter{N}.pt every 'save every' steps and the final model here")
        for name in GROUPS:
            title = QLabel(f"<b>{name}</b>")
            column.addWidget(title)
            for item in self.fields.values():
                if item.setting.group == name and item.name not in COMMON:
                    column.addWidget(self.rows[item.name])
            if name == "run":
                column.addWidget(Row("output", self.out_folder))
        self.advanced.addWidget(inner)
        form.addWidget(self.advanced)
        layout = bare(QVBoxLayout(self))
        layout.addWidget(box)
        for other, _ in ENABLED_WHEN.values():
            self.controls[other].changed.connect(self._show_state)
        self.controls["iterations"].changed.connect(self._show_state)
        self._show_state()

    def value(self, name: str) -> Any:
        """The value of setting ``name`` (``None`` for an optional one at ``auto``)."""
        item, control = self.fields[name], self.controls[name]
        if item.optional and control.value == control.min:
            return None
        return control.value

    def set_value(self, name: str, value: Any) -> None:
        """Set setting ``name`` (``None``: auto)."""
        control = self.controls[name]
        control.value = control.min if value is None else value

    def values(self) -> dict[str, Any]:
        """Every described setting by name."""
        return {name: self.value(name) for name in self.controls}

    def config(self) -> FitConfig:
        """The settings as the core takes them (``FitConfig`` validates them)."""
        return FitConfig(**self.values(), out=self.out_folder.text() or None)

    def _show_state(self, *_: Any) -> None:
        for name, (other, wanted) in ENABLED_WHEN.items():
            self.controls[name].enabled = self.controls[other].value == wanted
        # "auto" of the last density step names the step it stands for with the current iterations.
        last = FitConfig(iterations=self.controls["iterations"].value).last_densify
        self.controls["densify_until"].native.setSpecialValueText(f"auto (step {last})")
