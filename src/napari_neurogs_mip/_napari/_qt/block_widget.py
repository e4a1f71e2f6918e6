"""The *Fit blocks* dock widget: a volume larger than memory fitted block by block, the merged MIPs as blocks finish.

It composes a form (volume, blocks, cluster, the fit settings of
:class:`.settings_panel.SettingsPanel`, output folder) around a
:class:`.._block_session.BlockSession` and shows it: a progress bar over the
survey's chunks, then over the blocks, and one ``merged <view>`` image layer per
view, in micrometres beside the other layers, refreshed as blocks finish (at
most every :data:`REFRESH_S`).  The session's events arrive on the main thread
(:func:`.._threads.qt_runner`); the block fits, their rendering and the dask
cluster run off it, and only this widget touches layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QHBoxLayout,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ...blocks.engine import ClusterSpec
from ...blocks.plan import DEFAULT_HALO
from ...prepare import VOLUME_VIEWS
from ...views import parse_view_specs
from .._block_session import BlockDone, BlockSession, BlockState, Planned
from .._layers import mip_layer
from .._layout import free_x, view_layout
from .._threads import forget_at_close, qt_runner, stop_at_exit
from .._triton_guard import guard_triton_import
from .live_layers import LiveLayers
from .rows import FileRow, Row, bare, group, info_label
from .settings_panel import SettingsPanel
from .throttled import ThrottledCall

if TYPE_CHECKING:
    import napari

REFRESH_S = 1.0
"""Shortest interval between two refreshes of the merged MIP layers (a large view costs the viewer a re-upload)."""
MERGED = "merged"
"""Name prefix of the merged MIP layers: ``merged xy``."""


def _spin(low: int, high: int, value: int, auto: str | None = None, tip: str = "") -> QSpinBox:
    """An integer box; its lowest value reads ``auto`` when given."""
    box = QSpinBox()
    box.setRange(low, high)
    box.setValue(value)
    if auto is not None:
        box.setSpecialValueText(auto)
    box.setToolTip(tip)
    return box


class BlockWidget(QWidget):
    """Dock widget that runs :func:`napari_neurogs_mip.blocks.fit_blocks` and shows its progress and merged MIPs.

    Signals
    -------
    layers_updated(int)
        The merged MIP layers show this many finished blocks.
    run_ended()
        The run is over, however it went (buttons are reset).
    """

    layers_updated = Signal(int)
    run_ended = Signal()

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        guard_triton_import()  # blocks may fit in this process (worker threads): see _triton_guard
        self.viewer = napari_viewer
        self.session = BlockSession(runner=qt_runner)
        stop_at_exit(self.session)
        self.live = LiveLayers(napari_viewer, parent=self)
        self.layers: list[Any] = []
        """The merged MIP layers of the current run, one per view."""
        self._refreshes = ThrottledCall(self._refresh, REFRESH_S, self)
        self._build()
        self._connect()
        self._refresh_sources()

    # ================================================================== form
    def _build(self) -> None:
        self.layer_paths: dict[str, str] = {}
        """Image layers read from a file or folder: name -> path."""
        self.target_row = FileRow("volume (TIFF)", "Volumes (*.tif *.tiff);;All files (*)")
        self.target_row.edit.setToolTip("OME-Zarr folder or TIFF file, read block by block (never whole)")
        self.zarr_button = QPushButton("zarr…")
        self.zarr_button.setToolTip("Choose an OME-Zarr folder")
        target = QWidget()
        line = bare(QHBoxLayout(target))
        line.addWidget(self.target_row, 1)
        line.addWidget(self.zarr_button)
        self.from_layer = QPushButton("from layer")
        self.from_layer.setToolTip("The file of the selected image layer (one opened from a file)")
        self.level_spin = _spin(0, 64, 0, tip="Multiscale level (0 = full resolution)")
        self.channel_spin = _spin(-1, 4096, -1, "auto", "Channel of a hyperstack (0-based); auto: a single channel")
        self.block_spin = _spin(0, 8192, 0, "auto", "Largest core edge in voxels; auto: 256, smaller if a worker's "
                                "memory needs")  # fmt: skip
        self.halo_spin = _spin(0, 1024, DEFAULT_HALO, tip="Voxels (finest spacings) read around each core")
        self.views_edit = QLineEdit(", ".join(VOLUME_VIEWS))
        self.views_edit.setToolTip("Views of every block: xy, xz, yz or azimuth:elevation, comma separated")
        self.scheduler_edit = QLineEdit()
        self.scheduler_edit.setPlaceholderText("local cluster")
        self.scheduler_edit.setToolTip("Address of a running dask scheduler (tcp://host:8786); empty: a local one")
        self.workers_spin = _spin(0, 1024, 0, "auto", "Local workers (auto: one per CPU)")
        self.memory_edit = QLineEdit()
        self.memory_edit.setPlaceholderText("auto, e.g. 4GB")
        self.memory_edit.setToolTip("Memory limit of each local worker process")
        self.processes_check = QCheckBox("worker processes")
        self.processes_check.setChecked(True)
        self.processes_check.setToolTip("Untick: workers as threads of napari's process (quick to start, no memory "
                                        "limit; for small volumes)")  # fmt: skip
        self.settings_panel = SettingsPanel()
        self.out_row = FileRow("run folder", "", folder=True)
        self.out_row.edit.setToolTip("Blocks, merged model and MIPs; a folder of an earlier run is taken up again")
        self.overwrite_check = QCheckBox("start again")
        self.overwrite_check.setToolTip("Delete the earlier run in the run folder and start again (otherwise it is "
                                        "taken up where it stopped)")  # fmt: skip
        self.start_button, self.stop_button = QPushButton("Start"), QPushButton("Stop")
        self.stop_button.setToolTip("Stop when the next block finishes; finished blocks are kept, Start resumes")
        self.progress = QProgressBar()
        self.progress.setTextVisible(True)
        self.status_label = info_label()
        self.status_label.setText("ready")
        form = QWidget()
        column = bare(QVBoxLayout(form), spacing=4)
        sections = {
            "Volume": [Row("volume", target), Row("", self.from_layer), Row("level", self.level_spin),
                       Row("channel", self.channel_spin)],
            "Blocks": [Row("block", self.block_spin), Row("halo", self.halo_spin), Row("views", self.views_edit)],
            "Cluster": [Row("scheduler", self.scheduler_edit), Row("workers", self.workers_spin),
                        Row("memory limit", self.memory_edit), Row("", self.processes_check)],
            "Output": [Row("run folder", self.out_row), Row("", self.overwrite_check)],
        }  # fmt: skip
        for title, rows in sections.items():
            box, inner = group(title)
            for row in rows:
                inner.addWidget(row)
            column.addWidget(box)
            if title == "Cluster":
                column.addWidget(self.settings_panel)
        column.addStretch(1)
        self.form = form
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(form)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)  # the dock is narrow: rows shrink
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.stop_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(scroll, 1)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status_label)
        self._on_state(BlockState.IDLE)

    def _connect(self) -> None:
        session = self.session
        self.start_button.clicked.connect(self.start)
        self.stop_button.clicked.connect(lambda: session.stop())
        self.zarr_button.clicked.connect(self._choose_zarr)
        self.from_layer.clicked.connect(self._use_selected_layer)
        session.status.events.state.connect(self._on_state)
        session.status.events.message.connect(lambda text: self.status_label.setText(text))
        session.events.log.connect(lambda _: self.status_label.setToolTip("\n".join(session.lines[-40:])))
        session.events.survey.connect(self._on_survey)
        session.events.planned.connect(self._on_planned)
        session.events.block_done.connect(self._on_block)
        session.events.finished.connect(self._on_finished)
        session.events.failed.connect(self._on_failed)
        session.events.ended.connect(self._on_ended)
        for name in ("inserted", "removed"):
            getattr(self.viewer.layers.events, name).connect(self._refresh_sources)
        forget_at_close(self, session)

    def _refresh_sources(self, *_: Any) -> None:
        """Remember the image layers read from a file; prefill an empty target with the selected (or only) one."""
        from napari.layers import Image

        self.layer_paths = {
            layer.name: str(layer.source.path) for layer in self.viewer.layers
            if isinstance(layer, Image) and layer.source.path and Path(layer.source.path).exists()
        }  # fmt: skip
        self.from_layer.setEnabled(bool(self.layer_paths))
        if not self.target_row.text():
            self._use_selected_layer()

    def _use_selected_layer(self) -> None:
        """Take the file of the selected image layer (else of the only one read from a file) as the target."""
        active = self.viewer.layers.selection.active
        name = active.name if active is not None and active.name in self.layer_paths else None
        if name is None and len(self.layer_paths) == 1:
            name = next(iter(self.layer_paths))
        if name is not None:
            self.target_row.edit.setText(self.layer_paths[name])

    def _choose_zarr(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "OME-Zarr folder", self.target_row.text())
        if path:
            self.target_row.edit.setText(path)

    def request(self) -> tuple[str, str, dict[str, Any]]:
        """The target, run folder and :func:`~napari_neurogs_mip.blocks.fit_blocks` options of the form
        (``ValueError`` names a missing or bad choice)."""
        target, out = self.target_row.text(), self.out_row.text()
        if not target:
            raise ValueError("choose a volume: an OME-Zarr folder or a TIFF file (or an image layer read from one)")
        if not out:
            raise ValueError("choose a run folder (blocks, merged model, MIPs)")
        specs = parse_view_specs(self.views_edit.text())
        cluster = ClusterSpec(
            scheduler=self.scheduler_edit.text().strip() or None, workers=self.workers_spin.value() or None,
            memory_limit=self.memory_edit.text().strip() or None, processes=self.processes_check.isChecked(),
        )  # fmt: skip
        channel = self.channel_spin.value()
        options = {
            "level": self.level_spin.value(), "channel": channel if channel >= 0 else None,
            "block": self.block_spin.value() or None, "halo": self.halo_spin.value(), "view_specs": specs or None,
            "config": self.settings_panel.config(), "cluster": cluster,
            "overwrite": self.overwrite_check.isChecked(),
        }  # fmt: skip
        return target, out, options

    # =============================================================== control
    def start(self) -> None:
        """Start a run with the form's settings (a setting that cannot work is a notification)."""
        from napari.utils.notifications import show_error

        if self.session.state.busy:
            return
        try:
            target, out, options = self.request()
        except (ValueError, OSError) as error:
            show_error(f"Fit blocks cannot start\n{error}")
            return
        self.progress.setRange(0, 0)  # busy until the survey says how many chunks it reads
        self.progress.setFormat("starting…")
        self._refreshes.reset()
        self.session.start(target, out, **options)

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        """Stop a running run when the widget is closed."""
        self.session.stop()
        super().closeEvent(event)

    # ================================================================ events
    def _on_state(self, state: BlockState) -> None:
        self.start_button.setEnabled(not state.busy)
        self.stop_button.setEnabled(state.stoppable)
        self.form.setEnabled(not state.busy)

    def _on_survey(self, done: int, total: int) -> None:
        self.progress.setFormat("survey: %v / %m chunks")
        self.progress.setRange(0, total)
        self.progress.setValue(done)

    def _on_planned(self, planned: Planned) -> None:
        """Blank merged MIP layers, one per view, right of the other layers (physical pixel sizes, um)."""
        self.progress.setFormat("blocks: %v / %m")
        self.progress.setRange(0, planned.total)
        self.progress.setValue(0)
        views = self.session.views
        placements = view_layout(views, 1, free_x(self.live.right_edges(), views))[0]
        self.layers = []
        for view, image, placement in zip(views, self.session.images, placements):
            data, kwargs, kind = mip_layer(image, view, "rendered", placement)
            self.layers.append(self.live.add_or_update(data, {**kwargs, "name": f"{MERGED} {view.name}"}, kind))
        self.viewer.reset_view()

    def _on_block(self, block: BlockDone) -> None:
        self.progress.setValue(block.done)
        self._refreshes.request()

    def _refresh(self) -> None:
        """Show the session's merged MIPs (changed in place by the session, on this thread) in their layers."""
        for layer, image in zip(self.layers, self.session.images):
            if layer in self.viewer.layers:  # else removed by the user: respect that until the next run
                layer.data = image
        self.layers_updated.emit(self.session.status.done)

    def _on_finished(self, result: Any) -> None:
        from napari.utils.notifications import show_info

        show_info(f"Fit blocks: {result.summary()}")

    def _on_failed(self, message: str) -> None:
        from napari.utils.notifications import show_error

        show_error(message)

    def _on_ended(self) -> None:
        if self.layers:
            self._refreshes.now()  # the last refresh, in place of a pending one
        else:
            self._refreshes.cancel()
        if self.progress.maximum() == 0:  # ended before the survey reported: no busy bar left behind
            self.progress.setRange(0, 1)
        self._on_state(self.session.state)
        self.run_ended.emit()
