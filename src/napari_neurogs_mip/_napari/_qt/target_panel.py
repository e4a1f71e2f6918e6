"""The *Target* panel: what to fit (an image layer or a TIFF file), which axis is which, the voxel size.

It returns its part of :class:`~napari_neurogs_mip.prepare.FitInputs`
(:meth:`TargetPanel.inputs`); the axis rules are :mod:`.._axes`, the choice of
MIP layers :mod:`.._target_rules`.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QAbstractSpinBox, QDoubleSpinBox, QHBoxLayout, QLineEdit, QSpinBox, QVBoxLayout, QWidget

from ...io.tiff import read_metadata
from .._axes import (
    AXIS_NAMES,
    LayerAxes,
    file_axes,
    index_axes,
    layer_axes,
    parse_axes,
    select_volume,
    volume_problem,
    world_to_index,
)
from .._layers import full_resolution, mip_pixel_sizes, mip_view_name, spacing_from_mips
from .._target_rules import LayerInfo, mip_set, offered_targets
from .rows import FileRow, Row, bare, combo, group, info_label

SOURCE_LAYER, SOURCE_TIFF = "Image layer", "TIFF file"
TIFF_VOLUME, TIFF_MIPS = "volume", "MIP images"
NORMALIZATIONS = ("background", "minmax", "percentile")


@dataclass(frozen=True)
class SourceVolume:
    """The image layer a volume target comes from: its axes and the index picked along each other axis."""

    layer: Any
    axes: str
    picks: dict[int, int]


def layer_info(layer: Any) -> LayerInfo:
    """The plain description of a napari layer that :mod:`.._target_rules` works on."""
    from napari.layers import Image, Points

    kind = "image" if isinstance(layer, Image) else "points" if isinstance(layer, Points) else "other"
    ndim = len(full_resolution(layer.data).shape) if kind == "image" else int(layer.ndim)
    return LayerInfo(layer.name, kind, ndim, bool(getattr(layer, "rgb", False)), dict(layer.metadata))


class IndexPicker(QWidget):
    """One index box per non-spatial axis (channel, time, ...); ``auto`` marks an axis of one entry."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[int, Row] = {}
        self._column = bare(QVBoxLayout(self), spacing=2)

    def set_axes(self, axes: str, shape: tuple[int, ...], defaults: dict[int, int], auto: bool = False) -> None:
        """Rows for the non-spatial axes of ``axes``; with ``auto``, axes of one entry read ``auto`` (-1)."""
        for row in self.rows.values():
            row.setParent(None)
        self.rows = {}
        for position in index_axes(axes):
            letter, size = axes[position], int(shape[position])
            spin = QSpinBox()
            single = auto and size == 1
            spin.setRange(-1 if single else 0, max(size - 1, 0))
            spin.setSpecialValueText("auto" if single else "")
            spin.setValue(-1 if single else defaults.get(position, 0))
            spin.setToolTip(f"index along the {AXIS_NAMES.get(letter, letter)} axis (axis {position}, {size} entries)")
            row = Row(AXIS_NAMES.get(letter, f"axis {letter}"), spin)
            self.rows[position] = row
            self._column.addWidget(row)

    def picks(self) -> dict[int, int]:
        """The chosen index per axis position (-1: auto)."""
        return {position: row.field.value() for position, row in self.rows.items()}


class TargetPanel(QWidget):
    """Target choice; emits ``changed`` when the target (or whether it is a volume or MIPs) changes."""

    changed = Signal()

    def __init__(self, viewer: Any) -> None:
        super().__init__()
        self.viewer = viewer
        self._axes: LayerAxes | None = None
        self._prefilled_for: str | None = None
        box, form = group("Target")
        self.source_combo = combo([SOURCE_LAYER, SOURCE_TIFF], tip="Fit the MIPs of an image layer or a TIFF file")
        self.layer_combo = combo([], tip="A volume layer (3D, or more with channels or time), or a 2D MIP layer")
        self.tiff_file = FileRow("target TIFF", "TIFF (*.tif *.tiff);;All files (*)")
        self.tiff_kind = combo([TIFF_VOLUME, TIFF_MIPS], tip="What the TIFF holds")
        self.axes_edit = QLineEdit()
        self.axes_edit.setToolTip("The layer's axes, one letter each: T time, C channel, Z, Y, X (e.g. ZCYX)")
        self.picker = IndexPicker()
        self.mip_view_edit = QLineEdit("xy")
        self.mip_view_edit.setToolTip("The view this 2D layer shows: xy, xz, yz or AZ:EL")
        voxel = QWidget()
        voxel_row = bare(QHBoxLayout(voxel), spacing=2)
        self.voxel_spins = []
        for axis in "zyx":
            spin = QDoubleSpinBox()
            spin.setDecimals(4)
            spin.setRange(1e-4, 1e4)
            spin.setValue(1.0)
            spin.setMinimumWidth(40)
            spin.setButtonSymbols(QAbstractSpinBox.ButtonSymbols.NoButtons)  # room for 4 decimals in a narrow dock
            spin.setToolTip(f"voxel size along {axis}, physical units (um)")
            self.voxel_spins.append(spin)
            voxel_row.addWidget(spin)
        self.normalize_combo = combo(list(NORMALIZATIONS), tip="How intensities map to [0, 1] (see the user guide)")
        self.info = info_label()
        rows = [
            Row("source", self.source_combo),
            layer_row := Row("layer", self.layer_combo),
            tiff_row := Row("file", self.tiff_file),
            kind_row := Row("holds", self.tiff_kind),
            axes_row := Row("axes", self.axes_edit),
            self.picker,
            view_row := Row("MIP view", self.mip_view_edit),
            Row("voxel z y x", voxel, "voxel size (z, y, x), physical units (um)"),
            Row("normalise", self.normalize_combo),
            self.info,
        ]
        for row in rows:
            form.addWidget(row)
        self._layer_row, self._tiff_row, self._kind_row = layer_row, tiff_row, kind_row
        self._axes_row, self._view_row = axes_row, view_row
        column = bare(QVBoxLayout(self))
        column.addWidget(box)
        self.source_combo.currentTextChanged.connect(self._retarget)
        self.layer_combo.currentTextChanged.connect(self._retarget)
        self.tiff_file.edit.editingFinished.connect(self._retarget)
        self.tiff_kind.currentTextChanged.connect(self._retarget)
        self.axes_edit.editingFinished.connect(self._axes_typed)
        self.mip_view_edit.editingFinished.connect(self._show_state)
        self.refresh_layers()

    # ------------------------------------------------------------------ state
    def is_layer(self) -> bool:
        """Whether the target is an image layer (else a TIFF file)."""
        return self.source_combo.currentText() == SOURCE_LAYER

    def layer(self) -> Any:
        """The chosen target layer, ``None`` if there is none."""
        name = self.layer_combo.currentText()
        return self.viewer.layers[name] if name and name in self.viewer.layers else None

    def is_mips(self) -> bool:
        """Whether the target is a set of MIPs (which fix their own views and resolution)."""
        if not self.is_layer():
            return self.tiff_kind.currentText() == TIFF_MIPS
        layer = self.layer()
        return layer is not None and len(full_resolution(layer.data).shape) == 2

    def voxel_size(self) -> tuple[float, float, float]:
        """The voxel size (z, y, x) as entered."""
        z, y, x = (spin.value() for spin in self.voxel_spins)
        return (z, y, x)

    def set_voxel_size(self, spacing_zyx: tuple[float, float, float]) -> None:
        """Show a voxel size (z, y, x)."""
        for spin, value in zip(self.voxel_spins, spacing_zyx):
            spin.setValue(float(value))

    # ------------------------------------------------------------ viewer links
    def refresh_layers(self) -> None:
        """Offer the viewer's image layers again (keeping the choice when it still exists)."""
        names = offered_targets([layer_info(layer) for layer in self.viewer.layers])
        current = self.layer_combo.currentText()
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        self.layer_combo.addItems(names)
        if current in names:
            self.layer_combo.setCurrentText(current)
        self.layer_combo.blockSignals(False)
        self._retarget()

    def _retarget(self, *_: Any) -> None:
        """Prefill axes, indices and voxel size when another target is picked (not on every refresh)."""
        key = (
            f"layer:{self.layer_combo.currentText()}" if self.is_layer() else f"tiff:{self.tiff_file.text()}"
        ) + f":{self.tiff_kind.currentText()}"
        if key != self._prefilled_for:
            self._prefilled_for = key
            self._prefill()
        self._show_state()
        self.changed.emit()

    def _prefill(self) -> None:
        self._axes = None
        layer = self.layer() if self.is_layer() else None
        if layer is not None and len(full_resolution(layer.data).shape) == 2:
            own = mip_view_name(layer.name, layer.metadata)
            if own:
                self.mip_view_edit.setText(own)
            sizes = {view: mip_pixel_sizes(self.viewer.layers[name].scale) for view, name in self._mip_names().items()}
            self.set_voxel_size(spacing_from_mips(sizes))
        elif layer is not None:
            data = full_resolution(layer.data)
            units = [str(u) for u in getattr(layer, "units", ())]
            self._axes = layer_axes(data.shape, layer.axis_labels, layer.scale, layer.source.path, units)
            self._set_axes(self._axes, tuple(data.shape), self._viewer_indices(layer))
        elif not self.is_layer() and self.tiff_kind.currentText() == TIFF_VOLUME:
            self._prefill_tiff()

    def _prefill_tiff(self) -> None:
        path = Path(self.tiff_file.text())
        if not path.is_file():
            return
        try:
            metadata = read_metadata(path)  # the core's spacing rules, so the prefill matches a fit's reading
        except (OSError, ValueError) as error:
            self.info.setText(f"cannot read {path.name}: {error}")
            return
        self._axes = file_axes(path, metadata.shape)
        if self._axes is not None:
            self._set_axes(self._axes, metadata.shape, {}, auto=True)

    def _set_axes(self, axes: LayerAxes, shape: tuple[int, ...], defaults: dict[int, int], auto: bool = False) -> None:
        self.axes_edit.setText(axes.axes)
        self.picker.set_axes(axes.axes, shape, defaults, auto)
        # Unknown spacing shows as 1 (voxel units), not as the previous target's.
        self.set_voxel_size(axes.spacing_zyx or (1.0, 1.0, 1.0))

    def _viewer_indices(self, layer: Any) -> dict[int, int]:
        """The index the viewer shows now along each axis of ``layer``, so the fit targets what the user sees."""
        data, point = full_resolution(layer.data), list(self.viewer.dims.point)
        offset = len(point) - data.ndim
        if offset < 0:
            return {}
        return {
            i: world_to_index(point[offset + i], layer.scale[i], layer.translate[i], data.shape[i])
            for i in range(data.ndim)
        }

    def _axes_typed(self) -> None:
        layer = self.layer()
        if not self.is_layer() or layer is None or self._axes is None:
            return
        data = full_resolution(layer.data)
        try:
            axes = parse_axes(self.axes_edit.text(), data.ndim)
        except ValueError as error:
            self.info.setText(f"<span style='color:#e05050'>{html.escape(str(error))}</span>")
            return
        if axes != self._axes.axes:
            spacing = layer_axes(data.shape, [a.lower() for a in axes], layer.scale, None).spacing_zyx
            self._axes = LayerAxes(axes, self._axes.spacing_zyx or spacing, "typed")
            self._set_axes(self._axes, tuple(data.shape), self._viewer_indices(layer))
        self._show_state()

    def _mip_names(self) -> dict[str, str]:
        layer = self.layer()
        own = self.mip_view_edit.text().strip() or "xy"
        return mip_set(layer_info(layer), own, [layer_info(other) for other in self.viewer.layers])

    def _show_state(self) -> None:
        """Show the rows that apply and one line on what the target is."""
        layer_source, mips = self.is_layer(), self.is_mips()
        volume_layer = layer_source and not mips and self.layer() is not None
        self._layer_row.setVisible(layer_source)
        self._tiff_row.setVisible(not layer_source)
        self._kind_row.setVisible(not layer_source)
        self._axes_row.setVisible(volume_layer or (not layer_source and not mips and self._axes is not None))
        self.axes_edit.setReadOnly(not layer_source)
        self.picker.setVisible(not mips)
        self._view_row.setVisible(layer_source and mips)
        self.info.setText(self._describe())

    def _describe(self) -> str:
        layer = self.layer()
        if self.is_layer() and layer is None:
            return "no image layer yet: open a volume, or File > Open Sample > NeuRoGS MIP"
        if self.is_mips() and self.is_layer():
            try:
                return "MIP targets: " + ", ".join(f"{view} ← {name!r}" for view, name in self._mip_names().items())
            except ValueError as error:
                return f"<span style='color:#e05050'>{html.escape(str(error))}</span>"
        if self._axes is None:
            return ""
        guess = " (guessed: type the axes if they differ)" if self._axes.guessed else ""
        shape = full_resolution(layer.data).shape if self.is_layer() else read_metadata(self.tiff_file.text()).shape
        return f"{' x '.join(str(int(n)) for n in shape)} · axes from {self._axes.source}{guess}"

    # ----------------------------------------------------------------- output
    def source_volume(self) -> SourceVolume | None:
        """The layer a volume target is picked from, with its axes and picks (``None`` for other targets)."""
        layer = self.layer()
        if not self.is_layer() or layer is None or self.is_mips():
            return None
        axes = parse_axes(self.axes_edit.text(), len(full_resolution(layer.data).shape))
        return SourceVolume(layer, axes, self.picker.picks())

    def mip_layers(self) -> list[Any]:
        """The layers of a MIP target (empty for other targets)."""
        if not self.is_layer() or not self.is_mips():
            return []
        return [self.viewer.layers[name] for name in self._mip_names().values()]

    def inputs(self, min_planes: int = 2) -> dict[str, Any]:
        """This panel's part of :class:`~napari_neurogs_mip.prepare.FitInputs`.

        Parameters
        ----------
        min_planes
            Fewest entries along z, y and x that a volume needs (see :func:`.._axes.volume_problem`).

        Raises
        ------
        ValueError
            No target, bad axes, an index out of range, or a block that cannot be a volume (the message says which).
        """
        found: dict[str, Any] = {"normalize": self.normalize_combo.currentText(), "voxel_size": self.voxel_size()}
        if self.is_layer():
            layer = self.layer()
            if layer is None:
                raise ValueError("choose an image layer as the target (or switch the source to a TIFF file)")
            if self.is_mips():
                names = self._mip_names()
                found["mips"] = {
                    view: np.asarray(full_resolution(self.viewer.layers[n].data)) for view, n in names.items()
                }
                return found
            source = self.source_volume()
            volume = select_volume(full_resolution(layer.data), source.axes, source.picks)
            axes = self._axes if self._axes is not None and self._axes.axes == source.axes else None
            self._check(volume.shape, axes or LayerAxes(source.axes, None, "typed"), layer.name, min_planes)
            found["volume"] = volume
            return found
        path = self.tiff_file.text()
        if not path:
            raise ValueError("choose a target TIFF file")
        if self.is_mips():
            found["target_mips"] = path
            return found
        found["target"] = path
        picks = self.picker.picks()
        if self._axes is not None:
            letters = {self._axes.axes[p]: value for p, value in picks.items()}
            found["channel"] = letters.get("C") if letters.get("C", -1) >= 0 else None
            found["time"] = letters.get("T") if letters.get("T", -1) >= 0 else None
            shape = read_metadata(path).shape
            spatial = [int(shape[self._axes.axes.index(a)]) for a in "ZYX"]
            self._check(tuple(spatial), self._axes, Path(path).name, min_planes)
        return found

    @staticmethod
    def _check(shape: tuple[int, ...], axes: LayerAxes, name: str, min_planes: int) -> None:
        problem = volume_problem(shape, axes, name, min_planes)
        if problem:
            raise ValueError(problem)
