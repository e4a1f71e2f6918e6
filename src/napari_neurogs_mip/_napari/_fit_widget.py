"""The *Fit MIP* dock widget: pick a target and a start, fit, and watch it converge.

The widget only gathers settings and shows results.  All computation is done
by the core in one napari generator worker per run (see :mod:`._fit_worker`):
the worker yields numpy arrays, and this widget applies them to layers on the
main thread, at most every :data:`REFRESH_MS` milliseconds, so the viewer stays
responsive however fast the fit steps.

Live layers are ``target <view>`` and ``rendered <view>`` (and optionally
``residual <view>``), each with its view's physical pixel size as ``scale``
and laid side by side through ``translate`` (see :func:`._layers.view_layout`).

Density control changes the number of Gaussians while the fit runs: the status
line shows the count after the latest step and what density control last did;
the fitted Points layer takes whatever count the fit ends with.  Held-out views
are never shown or trained on; the finish summary scores them beside the
trained views (``metrics.score``), marked ``held-out``.
"""

from __future__ import annotations

import html
import logging
import math
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QApplication,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)
from superqt import QCollapsible

from ..device import available_devices
from ..frames import VolumeGeometry
from ..io.checkpoint import save_checkpoint as write_checkpoint_file
from ..io.tiff import read_metadata, write_mips
from ..metrics import format_table
from ..render import BACKENDS, MODES
from ..setup import INITS, LEGACY_COUNT, VOLUME_VIEWS, FitInputs
from ..train import DEFAULT_BUDGET, CheckpointEvent, FinishedEvent, FitConfig, StepEvent, Trainer
from ..views import AXIS_VIEWS, View, make_views, parse_view_specs
from ._fit_worker import Failed, FitControl, FitUpdate, ModelSnapshot, Ready, fit_events, warm_up_renderer
from ._layers import (
    ROLE_KEY,
    ROLES,
    full_resolution,
    leading_volume,
    mip_layer,
    mip_pixel_sizes,
    mip_view_name,
    points_to_model,
    residual,
    spacing_from_mips,
    spacing_from_scale,
    view_layout,
)
from ._loss_plot import LossPlot
from ._threads import start_worker
from ._triton_guard import guard_triton_import

if TYPE_CHECKING:
    import napari

LOGGER = logging.getLogger(__name__)

LABEL_WIDTH = 116
REFRESH_MS = 500
"""Shortest interval between layer updates (the worker may step much faster)."""
LAYER_GAP_MS = 20
"""Pause between adding two live layers, so that the viewer handles its other events in between."""

SOURCE_LAYER = "Image layer"
SOURCE_TIFF = "TIFF file"
TIFF_VOLUME = "volume (Z, Y, X)"
TIFF_MIPS = "MIP images"
START_SCRATCH = "from scratch"
START_CHECKPOINT = "checkpoint file"
START_SWC = "SWC skeleton"
START_POINTS = "Points layer"
RES_NATIVE = "native"
RES_FACTOR = "downsample factor"
RES_SHAPE = "H x W"

IDLE, PREPARING, RUNNING, PAUSED, STOPPING = "idle", "preparing", "running", "paused", "stopping"
_BUSY = (PREPARING, RUNNING, PAUSED, STOPPING)

AUTO = "auto"
"""Shown by a number box at its minimum, which stands for ``None`` (the core decides)."""
_NAME_GEOMETRY = VolumeGeometry((2, 2, 2), (1.0, 1.0, 1.0))
"""Any volume: view names do not depend on it (used to name views before a target is read)."""


def _spin(low: int, high: int, value: int, tip: str = "") -> QSpinBox:
    box = QSpinBox()
    box.setRange(low, high)
    box.setValue(value)
    box.setToolTip(tip)
    return box


def _float_spin(low: float, high: float, value: float, decimals: int, step: float, tip: str = "") -> QDoubleSpinBox:
    box = QDoubleSpinBox()
    box.setDecimals(decimals)
    box.setRange(low, high)
    box.setSingleStep(step)
    box.setValue(value)
    box.setToolTip(tip)
    return box


def _auto_spin(auto: int, high: int, value: int | None, tip: str = "", auto_text: str = AUTO) -> QSpinBox:
    """A number box whose minimum ``auto`` reads ``auto_text`` and stands for ``None``."""
    box = _spin(auto, high, auto if value is None else value, tip)
    box.setSpecialValueText(auto_text)
    return box


def _auto_value(box: QSpinBox) -> int | None:
    """The number in an :func:`_auto_spin`, ``None`` at its minimum (auto)."""
    return None if box.value() == box.minimum() else box.value()


def _view_names(specs: list[str]) -> list[str]:
    """The names the core gives the views ``specs`` (``30:15`` -> ``az30_el15``); raises on bad or repeated specs."""
    return [view.name for view in make_views(specs, _NAME_GEOMETRY)]


def _mean(values: list[float]) -> float:
    """Mean of the non-NaN values; NaN if there are none."""
    kept = [v for v in values if not math.isnan(v)]
    return math.fsum(kept) / len(kept) if kept else math.nan


def _number(value: float, fmt: str, unit: str = "") -> str:
    return "–" if math.isnan(value) else f"{value:{fmt}}{unit}"


def _combo(items: list[str], current: str | None = None, tip: str = "") -> QComboBox:
    box = QComboBox()
    box.addItems(items)
    if current is not None:
        box.setCurrentText(current)
    box.setToolTip(tip)
    return box


def _format_seconds(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    seconds = round(float(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _call_safely(function: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
    """``(True, result)`` or ``(False, error)``: thread workers then never see a raise."""
    try:
        return True, function(*args)
    except Exception as error:  # reported to the user by the caller
        LOGGER.exception("Fit MIP background task failed")
        return False, error


class _FileRow(QWidget):
    """A path line edit with a browse button."""

    def __init__(self, caption: str, file_filter: str, save: bool = False, folder: bool = False) -> None:
        super().__init__()
        self.edit = QLineEdit()
        self.button = QPushButton("…")
        self.button.setFixedWidth(28)
        self.button.setToolTip(f"Choose: {caption}")
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.edit)
        layout.addWidget(self.button)
        self._caption, self._filter, self._save, self._folder = caption, file_filter, save, folder
        self.button.clicked.connect(self._browse)

    def _browse(self) -> None:
        if self._folder:
            path = QFileDialog.getExistingDirectory(self, self._caption, self.edit.text())
        elif self._save:
            path, _ = QFileDialog.getSaveFileName(self, self._caption, self.edit.text(), self._filter)
        else:
            path, _ = QFileDialog.getOpenFileName(self, self._caption, self.edit.text(), self._filter)
        if path:
            self.edit.setText(path)

    def text(self) -> str:
        """The path as typed."""
        return self.edit.text().strip()


class _Row(QWidget):
    """A caption and a field on one line; hide the row to hide both."""

    def __init__(self, label: str, field: QWidget) -> None:
        super().__init__()
        self.caption = QLabel(label)
        self.caption.setFixedWidth(LABEL_WIDTH)
        self.field = field
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.caption)
        layout.addWidget(field, 1)


class _Shutdown:
    """Stops a running fit when the widget or the viewer goes away.

    Held by closures connected to ``destroyed``/``aboutToQuit`` signals, so it
    must not reference the widget (that would keep it, and the viewer, alive).
    """

    def __init__(self) -> None:
        self.control: FitControl | None = None
        self.progress: Any = None

    def __call__(self, *_: Any) -> None:
        if self.control is not None:
            # Releases a paused trainer too: the worker thread then ends after one step.
            self.control.stop()
        if self.progress is not None:
            try:
                self.progress.close()
            except Exception:  # the progress bar's viewer may already be gone
                LOGGER.debug("progress bar already closed", exc_info=True)
            self.progress = None


class FitWidget(QWidget):
    """Dock widget that fits Gaussians to the MIPs of a target and shows the fit live.

    Parameters
    ----------
    napari_viewer
        The viewer (napari passes it).
    parent
        Parent widget.

    Signals
    -------
    layers_updated(int)
        Live layers were refreshed with the render of this iteration.
    fit_finished(object)
        The run ended with this :class:`~napari_neurogs_mip.train.FinishedEvent`.
    fit_failed(str)
        The run failed with this message (also shown as a notification).
    run_ended()
        The worker ended, however the run went (buttons are reset).
    checkpoint_saved(str)
        ``Save checkpoint`` wrote this file.
    """

    layers_updated = Signal(int)
    fit_finished = Signal(object)
    fit_failed = Signal(str)
    run_ended = Signal()
    checkpoint_saved = Signal(str)

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        # Before anything can import torch's compiler stack (see _triton_guard).
        guard_triton_import()
        self.viewer = napari_viewer
        self._state = IDLE
        self._trainer: Trainer | None = None
        self._worker: Any = None
        self._control: FitControl | None = None
        self._views: list[View] = []
        self._targets: list[np.ndarray] = []
        self._images: list[np.ndarray] | None = None
        self._images_iteration = 0
        self._images_dirty = False
        self._live: dict[str, Any] = {}
        self._last_step: StepEvent | None = None
        self._gaussians = 0
        """Gaussians in the model after the latest step (density control changes it)."""
        self._budget = 0
        self._density_note = ""
        """The latest density change, for the status line."""
        self._progress: Any = None
        self._progress_n = 0
        self._last_refresh = 0.0
        self._prefilled_for: str | None = None
        self._handling = False
        self._deferred: list[FitUpdate | None] = []
        self._tempdir = tempfile.TemporaryDirectory(prefix="neurogs-mip-")
        self._shutdown = _Shutdown()
        self._build()
        self._refresh_timer = QTimer(self)
        self._refresh_timer.setSingleShot(True)
        self._refresh_timer.timeout.connect(self._timed_refresh)
        self._layer_queue: list[tuple[Any, Callable[[], np.ndarray]]] = []
        """Live layers still to receive the render of ``_queued_iteration`` (one per event-loop turn)."""
        self._queued_iteration = 0
        self._layer_timer = QTimer(self)
        self._layer_timer.setSingleShot(True)
        self._layer_timer.timeout.connect(self._next_layer_update)
        self._connect_viewer()
        self._refresh_layer_choices()
        self._update_visibility()
        self._set_state(IDLE)
        self._warm_up()

    def _warm_up(self) -> None:
        """Load the renderer's kernels in the background now, so that Start does not freeze the viewer."""
        from napari.qt.threading import create_worker

        start_worker(create_worker(_call_safely, warm_up_renderer))

    # ================================================================== layout
    def _build(self) -> None:
        settings = QWidget()
        column = QVBoxLayout(settings)
        column.setContentsMargins(0, 0, 0, 0)
        column.addWidget(self._build_target())
        column.addWidget(self._build_views())
        column.addWidget(self._build_model())
        column.addWidget(self._build_density())
        column.addWidget(self._build_fit())
        column.addStretch(1)
        self.iterations.valueChanged.connect(lambda _: self._update_densify_hint())
        self._update_densify_hint()
        self.settings = settings
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(settings)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setMinimumWidth(380)
        scroll.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Expanding)
        layout = QVBoxLayout(self)
        layout.addWidget(scroll, 1)
        layout.addWidget(self._build_run())

    def _form_group(self, title: str) -> tuple[QGroupBox, QVBoxLayout]:
        group = QGroupBox(title)
        rows = QVBoxLayout(group)
        rows.setSpacing(3)
        rows.setContentsMargins(6, 4, 6, 4)
        return group, rows

    def _row(self, form: QVBoxLayout, label: str, field: QWidget) -> _Row:
        # One widget per row (not QFormLayout rows): hiding a row then frees its space too in Qt 5.
        row = _Row(label, field)
        form.addWidget(row)
        return row

    def _build_target(self) -> QGroupBox:
        group, form = self._form_group("Target")
        self.source_combo = _combo([SOURCE_LAYER, SOURCE_TIFF], tip="Fit the MIPs of an Image layer or a TIFF file")
        self._row(form, "source", self.source_combo)
        self.layer_combo = _combo([], tip="A 3D (or 4D/5D) volume layer, or a 2D MIP layer")
        self._layer_row = self._row(form, "layer", self.layer_combo)
        self.tiff_file = _FileRow("target TIFF", "TIFF (*.tif *.tiff);;All files (*)")
        self._tiff_row = self._row(form, "file", self.tiff_file)
        self.tiff_kind = _combo([TIFF_VOLUME, TIFF_MIPS], tip="What the TIFF holds")
        self._tiff_kind_row = self._row(form, "holds", self.tiff_kind)
        self.index_spins = [_spin(-1, 1_000_000, 0), _spin(-1, 1_000_000, 0)]
        self._index_rows = [self._row(form, f"axis {i}", spin) for i, spin in enumerate(self.index_spins)]
        self.mip_view_edit = QLineEdit("xy")
        self.mip_view_edit.setToolTip("The view this 2D layer shows: xy, xz, yz or AZ:EL")
        self._mip_view_row = self._row(form, "MIP view", self.mip_view_edit)
        voxel = QWidget()
        voxel_layout = QHBoxLayout(voxel)
        voxel_layout.setContentsMargins(0, 0, 0, 0)
        self.voxel_spins = []
        for axis in "zyx":
            spin = _float_spin(1e-4, 1e6, 1.0, 4, 0.1, f"voxel size along {axis} (physical units, e.g. um)")
            spin.setPrefix(f"{axis} ")
            self.voxel_spins.append(spin)
            voxel_layout.addWidget(spin)
        self._row(form, "voxel size", voxel)
        self.normalize_combo = _combo(
            ["background", "minmax", "percentile"], tip="How target intensities map to [0, 1] (see the user guide)"
        )
        self._row(form, "normalise", self.normalize_combo)
        self.target_info = QLabel("")
        self.target_info.setWordWrap(True)
        form.addWidget(self.target_info)
        self.source_combo.currentTextChanged.connect(self._on_target_changed)
        self.layer_combo.currentTextChanged.connect(self._on_target_changed)
        self.tiff_file.edit.editingFinished.connect(self._on_target_changed)
        self.tiff_file.edit.textChanged.connect(lambda _: self._update_visibility())
        self.tiff_kind.currentTextChanged.connect(lambda _: self._update_visibility())
        return group

    def _build_views(self) -> QGroupBox:
        group, form = self._form_group("Views")
        self.default_views_check = QCheckBox(", ".join(VOLUME_VIEWS))
        self.default_views_check.setChecked(FitInputs().view_specs is None)
        self.default_views_check.setToolTip(
            "The core's default views of a volume target: the axis MIPs and two oblique views, which fix depth "
            "far better than the axis MIPs alone. Untick to choose the views."
        )
        self._row(form, "default views", self.default_views_check)
        axes = QWidget()
        axes_layout = QHBoxLayout(axes)
        axes_layout.setContentsMargins(0, 0, 0, 0)
        self.axis_checks = {}
        for name in AXIS_VIEWS:
            check = QCheckBox(name)
            check.setChecked(True)
            self.axis_checks[name] = check
            axes_layout.addWidget(check)
        self._axes_row = self._row(form, "axis views", axes)
        self.orbit_edit = QLineEdit()
        self.orbit_edit.setPlaceholderText("e.g. 30:15, 120:0")
        self.orbit_edit.setToolTip("Rotated views, azimuth:elevation in degrees, comma separated")
        self._orbit_row = self._row(form, "orbit views", self.orbit_edit)
        self.eval_edit = QLineEdit(", ".join(FitInputs().eval_specs))
        self.eval_edit.setPlaceholderText("none; e.g. 30:20, 120:-15")
        self.eval_edit.setToolTip(
            "Held-out views (xy, xz, yz or azimuth:elevation, comma separated): rendered from the same volume and "
            "scored when the fit ends, never trained on. They show how well the model fits views it was not "
            "fitted to (volume targets only)."
        )
        self._row(form, "held-out views", self.eval_edit)
        self.views_info = QLabel("")
        self.views_info.setWordWrap(True)
        form.addWidget(self.views_info)
        self.resolution_combo = _combo([RES_NATIVE, RES_FACTOR, RES_SHAPE], tip="Resolution of every view")
        self._row(form, "resolution", self.resolution_combo)
        self.factor_spin = _float_spin(1.0, 64.0, 2.0, 2, 0.5, "Downsampling factor (area averaging)")
        self._factor_row = self._row(form, "factor", self.factor_spin)
        shape = QWidget()
        shape_layout = QHBoxLayout(shape)
        shape_layout.setContentsMargins(0, 0, 0, 0)
        self.height_spin = _spin(1, 100_000, 256, "Height of every view, pixels")
        self.width_spin = _spin(1, 100_000, 256, "Width of every view, pixels")
        shape_layout.addWidget(self.height_spin)
        shape_layout.addWidget(QLabel("x"))
        shape_layout.addWidget(self.width_spin)
        self._shape_row = self._row(form, "H x W", shape)
        self.views_group = group
        self.resolution_combo.currentTextChanged.connect(lambda _: self._update_visibility())
        self.default_views_check.toggled.connect(lambda _: self._update_visibility())
        for check in self.axis_checks.values():
            check.toggled.connect(lambda _: self._update_views_info())
        self.orbit_edit.textChanged.connect(lambda _: self._update_views_info())
        self.eval_edit.textChanged.connect(lambda _: self._update_views_info())
        return group

    def _build_model(self) -> QGroupBox:
        group, form = self._form_group("Model")
        self.start_combo = _combo(
            [START_SCRATCH, START_CHECKPOINT, START_SWC, START_POINTS], tip="What the fit starts from"
        )
        self._row(form, "start", self.start_combo)
        inputs = FitInputs()
        self.init_combo = _combo(
            list(INITS),
            inputs.init,
            "foreground: Gaussians spread over the structure (from MIP targets: over points bright in all three "
            "axis views); intensity: the seed design's draw by brightness, for comparison",
        )
        self._init_row = self._row(form, "placement", self.init_combo)
        self.num_gaussians = _auto_spin(
            0,
            50_000_000,
            inputs.num_gaussians,
            "Gaussians to start with. auto: one per foreground cell, at most half the max Gaussians "
            f"(placement 'intensity': {LEGACY_COUNT}). Density control changes the count during the fit.",
            f"{AUTO} (from the foreground)",
        )
        self._gaussians_row = self._row(form, "Gaussians", self.num_gaussians)
        self.checkpoint_file = _FileRow("checkpoint", "Checkpoints (*.pt *.pth);;All files (*)")
        self._checkpoint_row = self._row(form, "checkpoint", self.checkpoint_file)
        self.swc_file = _FileRow("SWC skeleton", "SWC (*.swc);;All files (*)")
        self._swc_row = self._row(form, "SWC", self.swc_file)
        self.points_combo = _combo([], tip="A Gaussian Points layer (from a checkpoint or the sample)")
        self._points_row = self._row(form, "layer", self.points_combo)
        self.seed_spin = _spin(0, 2**31 - 1, 0, "Random seed of the initial placement")
        self._row(form, "seed", self.seed_spin)
        self.start_combo.currentTextChanged.connect(lambda _: self._update_visibility())
        return group

    def _build_density(self) -> QGroupBox:
        defaults = FitConfig()
        group, form = self._form_group("Density control")
        self.densify_check = QCheckBox("add and remove Gaussians during the fit")
        self.densify_check.setChecked(defaults.densify)
        self.densify_check.setToolTip(
            "Every few steps, spawn Gaussians where the target shows structure the render misses, clone or split "
            "Gaussians that the fit pulls hard, and prune faint ones (within the max Gaussians)"
        )
        form.addWidget(self.densify_check)
        self.densify_every = _spin(1, 10_000_000, defaults.densify_every, "Steps between density checks")
        self._densify_every_row = self._row(form, "every", self.densify_every)
        self.densify_until = _auto_spin(
            -1, 10_000_000, defaults.densify_until, "Last step at which density control acts (auto: 3/4 of the fit)"
        )
        self._densify_until_row = self._row(form, "until step", self.densify_until)
        budgets = ", ".join(f"{device} {count:,}" for device, count in DEFAULT_BUDGET.items())
        self.max_gaussians = _auto_spin(
            0,
            50_000_000,
            defaults.max_gaussians,
            f"Most Gaussians the model may have (also bounds an automatic initial count). auto: {budgets} (the "
            "CPU budget bounds the initial count)",
            f"{AUTO} (device default)",
        )
        self._row(form, "max Gaussians", self.max_gaussians)
        self.densify_check.toggled.connect(lambda _: self._update_visibility())
        self.density_group = group
        return group

    def _update_densify_hint(self) -> None:
        """Name the step that ``auto`` stands for with the current number of iterations."""
        last = FitConfig(iterations=self.iterations.value()).last_densify
        self.densify_until.setSpecialValueText(f"{AUTO} (step {last})")

    def _build_fit(self) -> QGroupBox:
        defaults = FitConfig()
        group, form = self._form_group("Fit")
        self.iterations = _spin(1, 10_000_000, defaults.iterations, "Optimisation steps")
        self._row(form, "iterations", self.iterations)
        self.lr_spin = _float_spin(1e-7, 1.0, defaults.lr, 6, 1e-4, "Adam learning rate (means: fraction of the box)")
        self._row(form, "learning rate", self.lr_spin)
        self.lambda_mse = _float_spin(0.0, 1e6, defaults.lambda_mse, 3, 0.1, "Weight of the MSE term")
        self._row(form, "λ MSE", self.lambda_mse)
        self.lambda_ssim = _float_spin(0.0, 1e6, defaults.lambda_ssim, 3, 0.05, "Weight of the 1 - SSIM term")
        self._row(form, "λ SSIM", self.lambda_ssim)
        self.mode_combo = _combo(list(MODES), defaults.mode, "soft: softmax MIP; max: hard MIP; field: exact field")
        self._row(form, "render mode", self.mode_combo)
        self.beta_spin = _float_spin(0.01, 1e5, defaults.beta, 2, 5.0, "Soft-MIP sharpness (1/intensity)")
        self._row(form, "beta", self.beta_spin)
        self.device_combo = _combo(available_devices(), defaults.device, "Devices this machine has")
        self._row(form, "device", self.device_combo)
        self.backend_combo = _combo(list(BACKENDS), defaults.backend, "Renderer backend (auto: best for the device)")
        self._row(form, "backend", self.backend_combo)
        self.preview_spin = _spin(1, 100_000, defaults.preview_every, "Send renders to the viewer every N steps")
        self._row(form, "preview every", self.preview_spin)
        self.out_folder = _FileRow("output folder", "", folder=True)
        self.out_folder.edit.setPlaceholderText("optional: periodic checkpoints")
        self._row(form, "output", self.out_folder)
        self.save_every = _spin(1, 10_000_000, defaults.save_every, "Checkpoint interval when an output folder is set")
        self._row(form, "save every", self.save_every)
        advanced = QCollapsible("Advanced")
        advanced.setToolTip("Learning rates of the Gaussians' shapes and brightness")
        advanced_form = QVBoxLayout()
        advanced_form.setSpacing(3)
        advanced_form.setContentsMargins(0, 0, 0, 0)
        self.lr_scales = _float_spin(1e-7, 1.0, defaults.lr_scales, 6, 1e-3, "Adam learning rate of the log-scales")
        self._row(advanced_form, "lr scales", self.lr_scales)
        self.lr_rotations = _float_spin(
            1e-7, 1.0, defaults.lr_rotations, 6, 1e-3, "Adam learning rate of the rotations (quaternions)"
        )
        self._row(advanced_form, "lr rotations", self.lr_rotations)
        self.lr_amplitudes = _float_spin(
            1e-7, 1.0, defaults.lr_amplitudes, 6, 1e-3, "Adam learning rate of the log-amplitudes"
        )
        self._row(advanced_form, "lr amplitudes", self.lr_amplitudes)
        rates = QWidget()
        rates.setLayout(advanced_form)
        advanced.addWidget(rates)
        self.advanced = advanced
        form.addWidget(advanced)
        self.residual_check = QCheckBox("residual layers")
        self.residual_check.setToolTip("Also show rendered - target for each view")
        self.snapshot_check = QCheckBox("Gaussians layer when done")
        self.snapshot_check.setChecked(True)
        self.snapshot_check.setToolTip("Add the fitted model as a Points layer when the fit ends")
        checks = QWidget()
        checks_layout = QHBoxLayout(checks)
        checks_layout.setContentsMargins(0, 0, 0, 0)
        checks_layout.addWidget(self.residual_check)
        checks_layout.addWidget(self.snapshot_check)
        form.addWidget(checks)
        self.mode_combo.currentTextChanged.connect(lambda _: self._update_visibility())
        return group

    def _build_run(self) -> QWidget:
        box = QWidget()
        grid = QGridLayout(box)
        grid.setContentsMargins(0, 0, 0, 0)
        self.start_button = QPushButton("Start")
        self.pause_button = QPushButton("Pause")
        self.stop_button = QPushButton("Stop")
        self.save_button = QPushButton("Save checkpoint…")
        self.export_button = QPushButton("Export MIPs…")
        self.start_button.setToolTip("Prepare the targets and the initial model, then fit")
        self.pause_button.setToolTip("Hold the fit between steps (the model can be saved meanwhile)")
        self.stop_button.setToolTip("End the fit after the current step; the model stays consistent")
        self.save_button.setToolTip("Write the current model with its optimiser state (works while running or paused)")
        self.export_button.setToolTip("Write the latest rendered MIPs as a TIFF with their pixel sizes")
        grid.addWidget(self.start_button, 0, 0)
        grid.addWidget(self.pause_button, 0, 1)
        grid.addWidget(self.stop_button, 0, 2)
        grid.addWidget(self.save_button, 1, 0, 1, 2)
        grid.addWidget(self.export_button, 1, 2)
        self.backend_label = QLabel("backend: chosen when the fit starts")
        self.backend_label.setWordWrap(True)
        self.status_label = QLabel("ready")
        self.status_label.setWordWrap(True)
        self.loss_plot = LossPlot()
        self.summary_label = QLabel("")
        self.summary_label.setWordWrap(True)
        grid.addWidget(self.backend_label, 2, 0, 1, 3)
        grid.addWidget(self.status_label, 3, 0, 1, 3)
        grid.addWidget(self.loss_plot, 4, 0, 1, 3)
        grid.addWidget(self.summary_label, 5, 0, 1, 3)
        self.start_button.clicked.connect(self.start)
        self.pause_button.clicked.connect(self.toggle_pause)
        self.stop_button.clicked.connect(self.stop)
        self.save_button.clicked.connect(lambda: self.save_checkpoint())
        self.export_button.clicked.connect(lambda: self.export_mips())
        self._apply_theme()
        return box

    def _apply_theme(self) -> None:
        try:
            from napari.utils.theme import get_theme

            theme = get_theme(self.viewer.theme)
            self.loss_plot.set_colors(theme.text.as_hex(), "#f5a623")
        except Exception:  # a custom or missing theme: keep the plot's defaults
            LOGGER.debug("no napari theme colours for the loss plot", exc_info=True)

    # ============================================================ viewer links
    def _connect_viewer(self) -> None:
        events = self.viewer.layers.events
        for name in ("inserted", "removed", "moved", "reordered"):
            emitter = getattr(events, name, None)
            if emitter is not None:
                emitter.connect(self._on_layers_changed)
        for layer in self.viewer.layers:
            layer.events.name.connect(self._on_layers_changed)
        # Stop the worker when the widget goes away (closing the viewer deletes its dock
        # widgets too) or the application quits first (then nothing is deleted).
        shutdown = self._shutdown
        self.destroyed.connect(lambda *_: shutdown())
        app = QApplication.instance()
        if app is not None:
            reference = weakref.ref(shutdown)

            def on_quit() -> None:
                guard = reference()
                if guard is not None:
                    guard()

            app.aboutToQuit.connect(on_quit)

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        """Stop a running fit when the widget is closed."""
        self._shutdown()
        super().closeEvent(event)

    def _on_layers_changed(self, event: Any = None) -> None:
        value = getattr(event, "value", None)
        if getattr(event, "type", None) == "inserted" and value is not None:
            value.events.name.connect(self._on_layers_changed)
        self._refresh_layer_choices()

    def _refresh_layer_choices(self) -> None:
        from napari.layers import Image, Points

        images = [
            layer.name
            for layer in self.viewer.layers
            if isinstance(layer, Image)
            and not layer.rgb
            and layer.metadata.get(ROLE_KEY) not in ("rendered", "residual")
            and _data_ndim(layer.data) >= 2
        ]
        points = [layer.name for layer in self.viewer.layers if isinstance(layer, Points) and layer.ndim >= 3]
        for combo, names in ((self.layer_combo, images), (self.points_combo, points)):
            current = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(names)
            if current in names:
                combo.setCurrentText(current)
            combo.blockSignals(False)
        self._on_target_changed()

    # ============================================================ target input
    def _target_layer(self) -> Any:
        name = self.layer_combo.currentText()
        if not name or name not in self.viewer.layers:
            raise ValueError("choose an Image layer as the target (or switch the source to a TIFF file)")
        return self.viewer.layers[name]

    def _on_target_changed(self, *_: Any) -> None:
        """Prefill voxel size and axis choices when another target is picked (not on every refresh)."""
        key = None
        if self.source_combo.currentText() == SOURCE_LAYER and self.layer_combo.currentText():
            key = f"layer:{self.layer_combo.currentText()}"
            if key != self._prefilled_for:
                self._prefill_from_layer()
        elif self.source_combo.currentText() == SOURCE_TIFF and self.tiff_file.text():
            key = f"tiff:{self.tiff_file.text()}"
            if key != self._prefilled_for:
                self._prefill_from_tiff()
        self._prefilled_for = key
        self._update_visibility()

    def _set_voxel_size(self, spacing_zyx: tuple[float, float, float]) -> None:
        for spin, value in zip(self.voxel_spins, spacing_zyx):
            spin.setValue(float(value))

    def voxel_size(self) -> tuple[float, float, float]:
        """The voxel size (z, y, x) as entered."""
        values = [spin.value() for spin in self.voxel_spins]
        return (values[0], values[1], values[2])

    def _prefill_from_layer(self) -> None:
        try:
            layer = self._target_layer()
        except ValueError:
            return
        ndim = _data_ndim(layer.data)
        if ndim == 2:
            own = mip_view_name(layer.name, layer.metadata)
            if own:
                self.mip_view_edit.setText(own)
            mips = self._mip_layers()
            self._set_voxel_size(spacing_from_mips({view: mip_pixel_sizes(lay.scale) for view, lay in mips.items()}))
            return
        self._set_voxel_size(spacing_from_scale(layer.scale))
        labels = list(self.viewer.dims.axis_labels)
        # Default to the frame the viewer shows now, so the fit targets what the user sees.
        point = list(self.viewer.dims.point)
        for i, spin in enumerate(self.index_spins[: max(0, ndim - 3)]):
            size = int(_data_shape(layer.data)[i])
            spin.setSpecialValueText("")  # a TIFF source may have set "auto", which would now label index 0
            spin.setRange(0, max(size - 1, 0))
            world = point[len(point) - ndim + i] if len(point) >= ndim else 0.0
            index = round(float((world - layer.translate[i]) / layer.scale[i]))
            spin.setValue(min(max(index, 0), size - 1))
            label = labels[len(labels) - ndim + i] if len(labels) >= ndim else str(i)
            self._index_rows[i].caption.setText(f"index along {label}")

    def _prefill_from_tiff(self) -> None:
        path = Path(self.tiff_file.text())
        if not path.is_file():
            return
        try:
            # The core's spacing rules (OME, ImageJ, resolution tags), so the prefill matches a fit's reading.
            metadata = read_metadata(path)
        except (OSError, ValueError, IndexError) as error:  # not a TIFF: say so; a fit reports it too
            self.target_info.setText(f"cannot read {path.name}: {error}")
            return
        self._set_voxel_size(metadata.spacing_zyx)
        self.target_info.setText(
            f"{path.name}: axes {metadata.axes}, shape {metadata.shape}; spacing from {metadata.spacing_source}"
        )
        for spin, row, name in zip(self.index_spins, self._index_rows, ("channel", "time")):
            spin.setRange(-1, 1_000_000)
            spin.setSpecialValueText("auto")
            spin.setValue(-1)
            row.caption.setText(name)

    def _mip_layers(self) -> dict[str, Any]:
        """The 2D target layer plus every other 2D Image layer that names a distinct view."""
        from napari.layers import Image

        chosen = self._target_layer()
        own = self.mip_view_edit.text().strip() or "xy"
        mips = {own: chosen}
        for layer in self.viewer.layers:
            if layer is chosen or not isinstance(layer, Image) or layer.rgb or _data_ndim(layer.data) != 2:
                continue
            if layer.metadata.get(ROLE_KEY) in ("rendered", "residual"):
                continue
            view = mip_view_name(layer.name, layer.metadata)
            if view and view not in mips:
                mips[view] = layer
        return mips

    # ================================================================ settings
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
        """Held-out views as entered (empty: none), validated and checked against the views to fit.

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
            names = _view_names(specs)
        except ValueError as error:
            raise ValueError(f"held-out views: {error}") from None
        trained = self.view_specs()
        both = sorted(set(names) & set(_view_names(list(VOLUME_VIEWS) if trained is None else trained)))
        if both:
            raise ValueError(f"held-out views {both} are also fitted; a held-out view must not be trained on")
        return specs

    def _update_views_info(self) -> None:
        """Say which views will be fitted and held out, or what is wrong with them."""
        try:
            trained = self.view_specs()
            fitted = _view_names(list(VOLUME_VIEWS) if trained is None else trained)
            held = _view_names(self.eval_specs()) if self.eval_edit.text().strip() else []
        except ValueError as error:
            self.views_info.setText(f"<span style='color:#e05050'>{html.escape(str(error))}</span>")
            return
        text = f"fits {', '.join(fitted)}"
        self.views_info.setText(text + (f"; holds out {', '.join(held)}" if held else ""))

    def resolution(self) -> float | tuple[int, int] | None:
        """The view resolution: ``None`` (native), a factor, or ``(H, W)``."""
        choice = self.resolution_combo.currentText()
        if choice == RES_FACTOR:
            return float(self.factor_spin.value())
        if choice == RES_SHAPE:
            return (self.height_spin.value(), self.width_spin.value())
        return None

    def fit_inputs(self) -> FitInputs:
        """The target and start as the core takes them.

        Raises
        ------
        ValueError
            A missing or inconsistent choice (the message says which).
        """
        inputs = FitInputs(
            view_specs=self.view_specs(),
            resolution=self.resolution(),
            normalize=self.normalize_combo.currentText(),
            voxel_size=self.voxel_size(),
            num_gaussians=_auto_value(self.num_gaussians),
            max_gaussians=_auto_value(self.max_gaussians),
            init=self.init_combo.currentText(),
            seed=self.seed_spin.value(),
        )
        # MIP targets fix their own views (the Views group is disabled): only a volume has views to hold out.
        if self.source_combo.currentText() == SOURCE_LAYER:
            layer = self._target_layer()
            if _data_ndim(layer.data) == 2:
                inputs.mips = {
                    view: np.asarray(full_resolution(lay.data)) for view, lay in self._mips_checked().items()
                }
            else:
                extra = _data_ndim(layer.data) - 3
                indices = [spin.value() for spin in self.index_spins[:extra]]
                inputs.volume = leading_volume(layer.data, indices)
                inputs.eval_specs = self.eval_specs()
        else:
            path = self.tiff_file.text()
            if not path:
                raise ValueError("choose a target TIFF file")
            if self.tiff_kind.currentText() == TIFF_MIPS:
                inputs.target_mips = path
            else:
                inputs.target = path
                inputs.eval_specs = self.eval_specs()
                channel, time_point = (spin.value() for spin in self.index_spins)
                inputs.channel = channel if channel >= 0 else None
                inputs.time = time_point if time_point >= 0 else None
        start = self.start_combo.currentText()
        if start == START_CHECKPOINT:
            inputs.checkpoint = self._existing(self.checkpoint_file.text(), "checkpoint file")
        elif start == START_SWC:
            inputs.swc = self._existing(self.swc_file.text(), "SWC file")
        elif start == START_POINTS:
            inputs.checkpoint = str(self._points_checkpoint())
        return inputs

    def _mips_checked(self) -> dict[str, Any]:
        mips = self._mip_layers()
        for view in mips:
            if view not in AXIS_VIEWS:
                parse_view_specs(view)
        return mips

    @staticmethod
    def _existing(path: str, what: str) -> str:
        if not path:
            raise ValueError(f"choose a {what}")
        if not Path(path).is_file():
            raise ValueError(f"no such {what}: {path}")
        return path

    def _points_checkpoint(self) -> Path:
        """The chosen Points layer written as a checkpoint the core can start from."""
        name = self.points_combo.currentText()
        if not name or name not in self.viewer.layers:
            raise ValueError("choose a Points layer of Gaussians to start from")
        layer = self.viewer.layers[name]
        model = points_to_model(layer.data, layer.features, layer.metadata, layer.scale, layer.size)
        path = Path(self._tempdir.name) / f"start-{abs(hash(name))}.pt"
        return write_checkpoint_file(path, model, extra={"source": f"napari points layer {name!r}"})

    def fit_config(self) -> FitConfig:
        """The fit settings as the core takes them (validated)."""
        return FitConfig(
            iterations=self.iterations.value(),
            lr=self.lr_spin.value(),
            lr_scales=self.lr_scales.value(),
            lr_rotations=self.lr_rotations.value(),
            lr_amplitudes=self.lr_amplitudes.value(),
            lambda_mse=self.lambda_mse.value(),
            lambda_ssim=self.lambda_ssim.value(),
            mode=self.mode_combo.currentText(),
            beta=self.beta_spin.value(),
            device=self.device_combo.currentText(),
            backend=self.backend_combo.currentText(),
            preview_every=self.preview_spin.value(),
            save_every=self.save_every.value(),
            seed=self.seed_spin.value(),
            out=self.out_folder.text() or None,
            densify=self.densify_check.isChecked(),
            densify_every=self.densify_every.value(),
            densify_until=_auto_value(self.densify_until),
            max_gaussians=_auto_value(self.max_gaussians),
        )

    def _update_visibility(self) -> None:
        layer_source = self.source_combo.currentText() == SOURCE_LAYER
        mips = False
        extra = 0
        if layer_source:
            name = self.layer_combo.currentText()
            layer = self.viewer.layers[name] if name in self.viewer.layers else None
            ndim = _data_ndim(layer.data) if layer is not None else 3
            mips = ndim == 2
            extra = max(0, min(ndim - 3, 2))
            if mips and layer is not None:
                try:
                    found = ", ".join(f"{view} ← {lay.name!r}" for view, lay in self._mip_layers().items())
                except ValueError:
                    found = ""
                self.target_info.setText(f"MIP targets: {found}")
            elif layer is not None:
                shape = tuple(_data_shape(layer.data))
                self.target_info.setText(
                    f"volume {shape}" + (f" (choose the {extra} leading indices)" if extra else "")
                )
            else:
                self.target_info.setText("no Image layer yet: open a volume or File > Open Sample > NeuRoGS MIP")
        else:
            mips = self.tiff_kind.currentText() == TIFF_MIPS
            extra = 0 if mips else 2
        self._layer_row.setVisible(layer_source)
        self._tiff_row.setVisible(not layer_source)
        self._tiff_kind_row.setVisible(not layer_source)
        for i, row in enumerate(self._index_rows):
            row.setVisible(i < extra)
        self._mip_view_row.setVisible(layer_source and mips)
        # MIP targets fix their own views and resolution.
        self.views_group.setEnabled(not mips)
        custom_views = not self.default_views_check.isChecked()
        self._axes_row.setVisible(custom_views)
        self._orbit_row.setVisible(custom_views)
        self._update_views_info()
        resolution = self.resolution_combo.currentText()
        self._factor_row.setVisible(resolution == RES_FACTOR)
        self._shape_row.setVisible(resolution == RES_SHAPE)
        start = self.start_combo.currentText()
        self._gaussians_row.setVisible(start == START_SCRATCH)
        self._init_row.setVisible(start == START_SCRATCH)
        densify = self.densify_check.isChecked()
        self._densify_every_row.setEnabled(densify)
        self._densify_until_row.setEnabled(densify)
        self._checkpoint_row.setVisible(start == START_CHECKPOINT)
        self._swc_row.setVisible(start == START_SWC)
        self._points_row.setVisible(start == START_POINTS)
        self.beta_spin.setEnabled(self.mode_combo.currentText() == "soft")

    # ================================================================= control
    @property
    def trainer(self) -> Trainer | None:
        """The trainer of the current or last run (``None`` before the first run)."""
        return self._trainer

    @property
    def state(self) -> str:
        """``idle``, ``preparing``, ``running``, ``paused`` or ``stopping``."""
        return self._state

    def start(self) -> None:
        """Start a fit with the current settings (errors in them are notifications)."""
        from napari.qt.threading import create_worker
        from napari.utils.notifications import show_error

        if self._state in _BUSY:
            return
        try:
            inputs = self.fit_inputs()
            config = self.fit_config()
        except Exception as error:  # bad settings: tell the user, start nothing
            show_error(f"Fit MIP: {error}")
            return
        self._control = FitControl()
        self._shutdown.control = self._control
        self._trainer = None
        self._images = None
        self._layer_queue = []
        self._layer_timer.stop()
        self._last_step = None
        self._gaussians = self._budget = 0
        self._density_note = ""
        self.summary_label.setText("")
        self.summary_label.setToolTip("")
        self.backend_label.setText("backend: preparing…")
        self.status_label.setText("preparing the targets and the initial model…")
        self.loss_plot.reset(config.iterations)
        worker = create_worker(fit_events, inputs, config, self._control, self.snapshot_check.isChecked())
        worker.yielded.connect(self._on_update)
        worker.finished.connect(self._on_worker_finished)
        self._worker = worker
        self._set_state(PREPARING)
        start_worker(worker)

    def toggle_pause(self) -> None:
        """Pause a running fit, or resume a paused one (the trainer holds between steps)."""
        if self._control is None:
            return
        if self._state == PAUSED:
            self._control.resume()
            self._set_state(RUNNING if self._trainer is not None else PREPARING)
        elif self._state in (RUNNING, PREPARING):
            self._control.pause()
            self._set_state(PAUSED)
            self._schedule_refresh()

    def stop(self) -> None:
        """End the fit after the current step (a paused fit ends at once)."""
        if self._control is None or self._state not in _BUSY:
            return
        self._control.stop()
        self._set_state(STOPPING)
        self.status_label.setText("stopping after the current step…")

    def _set_state(self, state: str) -> None:
        self._state = state
        busy = state in _BUSY
        self.start_button.setEnabled(not busy)
        self.pause_button.setEnabled(state in (PREPARING, RUNNING, PAUSED))
        self.pause_button.setText("Resume" if state == PAUSED else "Pause")
        self.stop_button.setEnabled(state in (PREPARING, RUNNING, PAUSED))
        self.save_button.setEnabled(self._trainer is not None and state != PREPARING)
        self.export_button.setEnabled(self._images is not None)
        self.settings.setEnabled(not busy)

    # ============================================================ fit updates
    def _on_update(self, update: FitUpdate | None) -> None:
        """Queue one worker event (``None``: the worker ended) and handle the queue in order.

        napari's progress bar processes Qt events when it changes, so a handler
        could otherwise run inside another one (out of order, and their stalls
        adding up); a backlog is then handled one event per event-loop turn.
        """
        self._deferred.append(update)
        self._drain()

    def _drain(self) -> None:
        if self._handling or not self._deferred:
            return
        self._handling = True
        try:
            self._handle(self._deferred.pop(0))
        finally:
            self._handling = False
        if self._deferred:
            QTimer.singleShot(0, self._drain)

    def _timed_refresh(self) -> None:
        if self._handling:
            self._refresh_timer.start(0)  # try again once the running handler is done
            return
        self._handling = True
        try:
            self._refresh()
        finally:
            self._handling = False
        self._drain()

    def _handle(self, update: FitUpdate | None) -> None:
        if update is None:
            self._run_ended()
        elif isinstance(update, StepEvent):
            if update.density is not None:
                self._density_note = (
                    f"density control at step {update.iteration}: {update.density} "
                    f"({self._gaussians:,} → {update.num_gaussians:,} Gaussians)"
                )
            self._last_step = update
            self._gaussians = update.num_gaussians
            self.loss_plot.append(update.terms["loss"])
            if update.images is not None:
                self._set_images(update.images, update.iteration)
            self._schedule_refresh()
        elif isinstance(update, Ready):
            self._on_ready(update)
        elif isinstance(update, FinishedEvent):
            self._on_finished(update)
        elif isinstance(update, CheckpointEvent):
            self.backend_label.setToolTip(f"last periodic checkpoint: {update.path}")
        elif isinstance(update, ModelSnapshot):
            self._add_or_update(*update.layer)
        elif isinstance(update, Failed):
            self._on_failed(update)

    def _on_ready(self, ready: Ready) -> None:
        from napari.utils import progress

        self._trainer = ready.trainer
        self._views = list(ready.trainer.targets.views)
        self._targets = ready.trainer.targets.images
        # The worker waits for the viewer now, so the model is not changing under us.
        self._gaussians = ready.trainer.model.num_gaussians
        self._budget = ready.trainer.budget
        self.backend_label.setText(ready.description)
        self.backend_label.setToolTip("\n".join(ready.notes))
        total = ready.trainer.config.iterations
        self.loss_plot.reset(total, ready.history)
        start = len(ready.history)
        self._progress = progress(total=total, desc="Fit MIP")
        self._progress.update(start)
        self._progress_n = start
        self._shutdown.progress = self._progress
        if self._state == PREPARING:
            self._set_state(RUNNING)
        else:
            self._set_state(self._state)
        self.status_label.setText(
            f"showing the targets of {', '.join(v.name for v in self._views)} ({self._gaussians:,} Gaussians)…"
        )
        self._show_live_layers([np.zeros_like(t) for t in self._targets])

    def _set_images(self, images: list[np.ndarray], iteration: int) -> None:
        self._images = images
        self._images_iteration = iteration
        self._images_dirty = True

    def _schedule_refresh(self) -> None:
        """Refresh now if the last refresh is old enough, else once when it is (never more often)."""
        if self._refresh_timer.isActive():
            return
        wait = REFRESH_MS - (time.perf_counter() - self._last_refresh) * 1000.0
        self._refresh_timer.start(int(max(0.0, wait)))

    def _refresh(self, wait: bool = False) -> None:
        """Apply the latest render, progress and loss curve to the viewer (main thread).

        The live layers take the render one per event-loop turn (each update costs the viewer
        tens of ms; all views at once would stall it), or all before returning with ``wait``.
        """
        self._last_refresh = time.perf_counter()
        if self._images_dirty and self._images is not None:
            self._images_dirty = False
            self._queue_rendered(self._images, self._images_iteration)
            if wait:
                self._layer_timer.stop()
                while self._layer_queue:
                    self._update_next_layer()
            else:
                self._layer_timer.start(0)
        step = self._last_step
        if step is not None:
            remaining = (step.total - step.iteration) / step.its_per_second if step.its_per_second > 0 else np.inf
            paused = " (paused)" if self._state == PAUSED else ""
            self.status_label.setText(
                f"iteration {step.iteration}/{step.total}{paused} · {self._gaussians_text()} · "
                f"{step.its_per_second:.1f} it/s · loss {step.terms['loss']:.4g} · "
                f"elapsed {_format_seconds(step.elapsed)} · remaining {_format_seconds(remaining)}"
                + (f"\n{self._density_note}" if self._density_note else "")
            )
            bar = self._progress
            if bar is not None and step.iteration > self._progress_n:
                # napari's progress may process events (re-entering this widget), so update it last.
                delta, self._progress_n = step.iteration - self._progress_n, step.iteration
                bar.set_description(f"Fit MIP {step.its_per_second:.1f} it/s, {step.num_gaussians:,} Gaussians")
                bar.update(delta)
        self.loss_plot.update()
        self.export_button.setEnabled(self._images is not None)

    def _gaussians_text(self) -> str:
        """``"1,234 Gaussians"``, with the most density control may add where it is on."""
        trainer = self._trainer
        limit = f" (max {self._budget:,})" if trainer is not None and trainer.config.densify and self._budget else ""
        return f"{self._gaussians:,} Gaussians{limit}"

    def _on_finished(self, event: FinishedEvent) -> None:
        from napari.utils.notifications import show_info

        self._set_images(event.images, event.iteration)
        self._gaussians = event.num_gaussians
        self._refresh_timer.stop()
        self._refresh(wait=True)
        how = "stopped" if event.stopped else "finished"
        self.summary_label.setText(_summary_html(event, how))
        # The same numbers as the command line prints, with the share of foreground pixels.
        self.summary_label.setToolTip(f"<pre>{html.escape(format_table(event.metrics, event.held_out))}</pre>")
        show_info(_summary_line(event, how))
        if event.path is not None:
            self.backend_label.setToolTip(f"final model: {event.path}")
        self.fit_finished.emit(event)

    def _on_failed(self, failed: Failed) -> None:
        from napari.utils.notifications import show_error

        show_error(failed.message)
        self.status_label.setText(failed.message)
        self.fit_failed.emit(failed.message)

    def _on_worker_finished(self) -> None:
        # Queued behind the worker's last events, and never inside another handler.
        self._on_update(None)

    def _run_ended(self) -> None:
        self._refresh_timer.stop()
        if self._images_dirty or self._layer_queue:
            self._images_dirty = self._images is not None
            self._refresh(wait=True)
        if self._progress is not None:
            self._progress.close()
            self._progress = None
            self._shutdown.progress = None
        self._worker = None
        self._set_state(IDLE)
        self.run_ended.emit()

    # ================================================================= layers
    def _show_live_layers(self, rendered: list[np.ndarray]) -> None:
        """Add or update the live layers, one at a time with a pause in between, then let the fit step.

        One layer at a time keeps each main-thread stall short (adding a layer
        builds its vispy node); the worker waits meanwhile (see ``FitControl``).
        """
        roles = ["target", "rendered"] + (["residual"] if self.residual_check.isChecked() else [])
        layout = view_layout(self._views, len(roles), self._free_x())
        self._live = {}
        queue: list[tuple[Any, dict[str, Any], str]] = []
        for row, role in enumerate(roles):
            for i, view in enumerate(self._views):
                image = {"target": self._targets[i], "rendered": rendered[i]}.get(role)
                if image is None:
                    image = residual(rendered[i], self._targets[i])
                queue.append(mip_layer(image, view, role, layout[row][i]))
        control = self._control
        added = [False]

        def next_layer() -> None:
            if self._control is not control:
                return  # a newer run took over
            if queue:
                added[0] |= self._add_or_update(*queue.pop(0))
                # Not 0 ms: Qt would run the next one before due timers and input (two adds in one stall).
                QTimer.singleShot(LAYER_GAP_MS, next_layer)
                return
            if added[0]:
                self.viewer.reset_view()
            held = self._trainer.held_out if self._trainer is not None else []
            self.status_label.setText(
                f"fitting {', '.join(v.name for v in self._views)} with {self._gaussians_text()}"
                + (f"; holding out {', '.join(held)}" if held else "")
                + "…"
            )
            if control is not None:
                control.viewer_ready()

        next_layer()

    def _free_x(self) -> float:
        """World x where the live layers start: right of every other layer, so nothing overlaps."""
        right = None
        for layer in self.viewer.layers:
            if layer.metadata.get(ROLE_KEY) in ROLES or layer.name in self._live:
                continue
            try:
                edge = float(np.asarray(layer.extent.world)[1][-1])
            except Exception:  # a layer without a usable extent
                continue
            right = edge if right is None else max(right, edge)
        if right is None:
            return 0.0
        widest = max((v.width * v.du for v in self._views), default=1.0)
        return right + 0.1 * widest

    def _add_or_update(self, data: Any, kwargs: dict[str, Any], layer_type: str) -> bool:
        """Update the layer of that name in place (keeping the user's display settings), else add it.

        A Points layer of Gaussians may come back with another number of points (density control adds
        and removes Gaussians): its data are set first, then the per-point properties of the new length.
        """
        from napari.layers import Image, Layer, Points

        name = kwargs["name"]
        existing = self.viewer.layers[name] if name in self.viewer.layers else None
        ndim = np.shape(data)[1] if layer_type == "points" else np.ndim(data)
        kind = {"image": Image, "points": Points}[layer_type]
        # isinstance, not the layer's class: napari hands plugins its layers behind a proxy.
        if existing is not None and isinstance(existing, kind) and existing.ndim == ndim:
            existing.data = data
            for key in ("scale", "translate", "metadata", "features", "size", "face_contrast_limits", "face_color"):
                if key in kwargs:
                    setattr(existing, key, kwargs[key])
            self._live[name] = existing
            return False
        if existing is not None:
            self.viewer.layers.remove(existing)
        layer = Layer.create(data, kwargs, layer_type)
        self.viewer.add_layer(layer)
        self._live[name] = layer
        return True

    def _queue_rendered(self, images: list[np.ndarray], iteration: int) -> None:
        """Queue the render of ``iteration`` for the live rendered (and residual) layers, replacing an older one."""
        self._layer_queue = []
        self._queued_iteration = iteration
        for i, view in enumerate(self._views):
            image, target = images[i], self._targets[i]
            for role, data in (
                ("rendered", lambda image=image: image),
                ("residual", lambda image=image, target=target: residual(image, target)),
            ):
                layer = self._live.get(f"{role} {view.name}")
                if layer is not None:
                    self._layer_queue.append((layer, data))

    def _next_layer_update(self) -> None:
        if self._handling:  # inside another handler (napari's progress bar processes events): not now
            self._layer_timer.start(LAYER_GAP_MS)
            return
        self._update_next_layer()
        if self._layer_queue:
            self._layer_timer.start(0)

    def _update_next_layer(self) -> None:
        """Give the next queued layer its image; once all have it, say so (``layers_updated``)."""
        if not self._layer_queue:
            return
        layer, data = self._layer_queue.pop(0)
        if layer in self.viewer.layers:  # else removed by the user: respect that until the next run
            layer.data = data()
        if not self._layer_queue:
            self.layers_updated.emit(self._queued_iteration)

    # ================================================================== output
    def save_checkpoint(self, path: str | Path | None = None) -> None:
        """Write the current model with its optimiser state, in a background thread.

        Works while running (between steps), paused, stopped or finished.  Without
        ``path`` a file dialog asks for one.
        """
        from napari.qt.threading import create_worker
        from napari.utils.notifications import show_error

        trainer = self._trainer
        if trainer is None:
            show_error("Fit MIP: nothing to save yet; start a fit first")
            return
        if path is None:
            chosen, _ = QFileDialog.getSaveFileName(
                self, "Save checkpoint", "neurogs_fit.pt", "Checkpoints (*.pt *.pth)"
            )
            if not chosen:
                return
            path = chosen
        worker = create_worker(_call_safely, trainer.save, Path(path))
        worker.returned.connect(self._on_saved)
        start_worker(worker)

    def _on_saved(self, outcome: tuple[bool, Any]) -> None:
        from napari.utils.notifications import show_error, show_info

        ok, value = outcome
        if ok:
            show_info(f"Fit MIP: saved {value}")
            self.checkpoint_saved.emit(str(value))
        else:
            show_error(f"Fit MIP: could not save the checkpoint: {type(value).__name__}: {value}")

    def export_mips(self, path: str | Path | None = None) -> Path | None:
        """Write the latest rendered MIPs as one calibrated ImageJ TIFF per view (``<stem>_<view>.tif``); returns
        the first file."""
        from napari.utils.notifications import show_error, show_info

        if self._images is None:
            show_error("Fit MIP: no rendered MIPs yet; start a fit first")
            return None
        if path is None:
            chosen, _ = QFileDialog.getSaveFileName(
                self, "Export rendered MIPs", "rendered_mips.tif", "TIFF (*.tif *.tiff)"
            )
            if not chosen:
                return None
            path = chosen
        images = {view.name: image for view, image in zip(self._views, self._images)}
        pixel_sizes = {view.name: (view.dv, view.du) for view in self._views}
        try:
            written = write_mips(Path(path), images, pixel_sizes)
        except Exception as error:  # disk full, no permission, ...: tell the user
            show_error(f"Fit MIP: could not export the MIPs: {type(error).__name__}: {error}")
            return None
        folder = written[0].parent
        show_info(
            f"Fit MIP: exported {len(images)} MIPs (iteration {self._images_iteration}) to {folder}: "
            + ", ".join(p.name for p in written)
        )
        return written[0]


# ====================================================================== helpers
_SUMMARY_COLUMNS = (
    # (header, metrics key, format)
    ("PSNR", "psnr", ".2f"),
    ("fg PSNR", "fg_psnr", ".2f"),
    ("recall", "recall", ".3f"),
    ("SSIM", "ssim", ".4f"),
)


def _groups(event: FinishedEvent) -> list[tuple[str, list[str]]]:
    """``[("trained", names), ("held-out", names)]``, leaving out an empty group."""
    held = set(event.held_out)
    groups = [
        ("trained", [v for v in event.metrics if v not in held]),
        ("held-out", [v for v in event.metrics if v in held]),
    ]
    return [(group, names) for group, names in groups if names]


def _summary_html(event: FinishedEvent, how: str) -> str:
    """The finish summary: a row of scores per view (held-out views marked), then the mean of each group."""
    groups = _groups(event)
    marked = len(groups) > 1 or bool(event.held_out)

    def row(name: str, group: str, values: list[float], bold: bool = False) -> str:
        cell = "<td style='font-weight:bold'" if bold else "<td"
        texts = [f"{cell}>{c}</td>" for c in [name, *([group] if marked else [])]]
        texts += [f"{cell} align='right'>{_number(v, fmt)}</td>" for v, (_, _, fmt) in zip(values, _SUMMARY_COLUMNS)]
        return f"<tr>{''.join(texts)}</tr>"

    header = "".join(
        [
            "<th align='left'>view</th>",
            *(["<th align='left'>set</th>"] if marked else []),
            *(f"<th align='right'>{title}</th>" for title, _, _ in _SUMMARY_COLUMNS),
        ]
    )
    rows = [
        row(name, group, [float(event.metrics[name].get(key, math.nan)) for _, key, _ in _SUMMARY_COLUMNS])
        for group, names in groups
        for name in names
    ]
    if sum(len(names) for _, names in groups) > 1:
        for group, names in groups:
            means = [
                _mean([float(event.metrics[n].get(key, math.nan)) for n in names]) for _, key, _ in _SUMMARY_COLUMNS
            ]
            rows.append(row("mean", group, means, bold=True))
    return (
        f"<b>{how} at iteration {event.iteration}</b> · {event.num_gaussians:,} Gaussians"
        f"<table cellspacing='0' cellpadding='4'><tr>{header}</tr>{''.join(rows)}</table>"
        "PSNRs in dB; fg: over the target's foreground; recall: share of the foreground rendered at half its "
        "brightness or more"
    )


def _summary_line(event: FinishedEvent, how: str) -> str:
    """One line for the notification, the mean PSNR first: a toast shows only its first forty characters or so.

    ``Fit MIP: PSNR 36.0 dB, held-out 33.3 dB; fg PSNR 30.8 dB, held-out 27.6 dB; recall 0.96, held-out 0.87
    (means over the views; finished at iteration 40, 600 Gaussians)``
    """
    groups = _groups(event)
    parts = []
    for title, key, fmt, unit in (
        ("PSNR", "psnr", ".1f", " dB"),
        ("fg PSNR", "fg_psnr", ".1f", " dB"),
        ("recall", "recall", ".2f", ""),
    ):
        values = [
            (group, _number(_mean([float(event.metrics[n].get(key, math.nan)) for n in names]), fmt, unit))
            for group, names in groups
        ]
        parts.append(
            f"{title} " + ", ".join(value if group == "trained" else f"{group} {value}" for group, value in values)
        )
    means = "means over the views; " if len(event.metrics) > 1 else ""
    return (
        f"Fit MIP: {'; '.join(parts)} ({means}{how} at iteration {event.iteration}, {event.num_gaussians:,} Gaussians)"
    )


def _data_shape(data: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in full_resolution(data).shape)


def _data_ndim(data: Any) -> int:
    return len(_data_shape(data))
