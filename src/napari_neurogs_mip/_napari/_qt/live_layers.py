"""The layers a fit shows: targets, renders and residuals per view, their labels, and the fitted Gaussians.

All layer changes happen here, on the main thread, a layer per event-loop
turn: adding or updating a layer costs the viewer tens of milliseconds, so
doing them all at once would stall it.  One timer, a child of the widget, paces
them, so nothing is left to run once the widget (or its viewer) is gone.
Placement and camera are :mod:`.._layout`'s, layer contents :mod:`.._layers`'.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from qtpy.QtCore import QObject, QTimer, Signal

from ...model import GaussianModel
from ...views import View
from .._layers import (
    LABELS_ROLE,
    ROLE_KEY,
    ROLES,
    LayerDataTuple,
    labels_layer,
    mip_layer,
    model_to_points,
    points_in_axes,
    residual,
)
from .._layout import Box, best_columns, camera_for_box, free_x, layout_box, layout_labels, union, view_layout
from .target_panel import SourceVolume

LAYER_GAP_MS = 20
"""Pause between two layer changes, so that the viewer handles its other events in between."""
FITTED_NAME = "fitted gaussians"


class LiveLayers(QObject):
    """Adds and refreshes the live layers of one viewer.

    Signals
    -------
    updated(int)
        Every live layer shows the render of this iteration.
    """

    updated = Signal(int)

    def __init__(self, viewer: Any, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.views: list[View] = []
        self.targets: list[np.ndarray] = []
        self.live: dict[str, Any] = {}
        self._build: list[Callable[[], None]] = []
        """Steps that add the live layers, one per turn (then the zoom and the caller's callback)."""
        self._then: Callable[[], None] = lambda: None
        self._queue: list[tuple[Any, Callable[[], np.ndarray]]] = []
        """Live layers still to receive the render of ``_iteration``."""
        self._iteration = 0
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self._next)

    # ------------------------------------------------------------ the source
    def calibrate(self, source: SourceVolume, voxel_size: Sequence[float]) -> str | None:
        """Give the source layer the voxel size on its z, y, x axes, and axis names, so that it lines up with the
        MIPs in physical units, and show the channel (time...) being fitted; what changed, for the user."""
        layer, axes = source.layer, source.axes
        scale = [float(s) for s in layer.scale]
        for letter, size in zip("ZYX", voxel_size):
            scale[axes.index(letter)] = float(size)
        labels = tuple(a.lower() for a in axes)
        changed = not (np.allclose(scale, layer.scale) and tuple(layer.axis_labels) == labels)
        if changed:
            layer.scale = scale
            layer.axis_labels = labels
        offset = self.viewer.dims.ndim - len(axes)  # napari lines layers up by their last axes
        for position, index in source.picks.items():
            if index >= 0 and offset >= 0:
                self.viewer.dims.set_point(offset + position, layer.translate[position] + index * scale[position])
        if not changed:
            return None
        return f"{layer.name!r} now has scale {tuple(round(v, 6) for v in scale)} (axes {axes}), in line with the MIPs"

    # ----------------------------------------------------------- live layers
    def show(
        self,
        views: list[View],
        targets: list[np.ndarray],
        residuals: bool,
        then: Callable[[], None],
        beside: Sequence[Any] = (),
    ) -> None:
        """Add (or update) the target, rendered (blank) and residual layers, then the labels; zoom to them and to
        the ``beside`` layers (the fit's source); then call ``then`` (also if building failed, so that a held fit
        never waits for ever)."""
        self._queue, self._build = [], []
        self.views, self.targets, self.live = list(views), list(targets), {}
        roles = ["target", "rendered"] + (["residual"] if residuals else [])
        x_start, shown = free_x(self.right_edges(), views), self._box_of(beside)
        columns = best_columns(views, len(roles), self.viewer.canvas.size, x_start, shown)
        layout = view_layout(views, len(roles), x_start, columns)
        pending: list[LayerDataTuple] = []
        for role, row in zip(roles, layout):
            for view, target, placement in zip(views, targets, row):
                image = {"target": target, "rendered": np.zeros_like(target)}.get(role, -target)
                pending.append(mip_layer(image, view, role, placement))
        pending.append(labels_layer(layout_labels(views, roles, layout)))
        self._build = [lambda layer=layer: self.add_or_update(*layer) for layer in pending]
        self._build.append(lambda: self._zoom(*union(layout_box(views, layout), shown)))
        self._then = then
        self._next()

    def _next(self) -> None:
        """Run one pending step: a build step (then wait :data:`LAYER_GAP_MS`), else one layer update."""
        if self._build:
            step = self._build.pop(0)
            try:
                step()
            except Exception:
                self._build = []
                self._then()
                raise
            if not self._build:
                self._then()
        elif self._queue:
            self._update_next()
        # Not 0 ms after an add: Qt would run the next one before due timers and input (two adds in one stall).
        if self._build:
            self._timer.start(LAYER_GAP_MS)
        elif self._queue:
            self._timer.start(0)

    def right_edges(self) -> list[float]:
        """World x of the right edge of every layer that is not a live layer."""
        edges = []
        for layer in self.viewer.layers:
            if layer.metadata.get(ROLE_KEY) in (*ROLES, LABELS_ROLE):
                continue
            try:
                edges.append(float(np.asarray(layer.extent.world)[1][-1]))
            except (AttributeError, IndexError, TypeError, ValueError):  # a layer without a usable extent
                continue
        return edges

    @staticmethod
    def _box_of(layers: Sequence[Any]) -> Box | None:
        """The world box (y, x) of ``layers`` (their last two axes), ``None`` without layers."""
        boxes = [np.asarray(layer.extent.world, dtype=float)[:, -2:] for layer in layers]
        if not boxes:
            return None
        return np.min([b[0] for b in boxes], axis=0), np.max([b[1] for b in boxes], axis=0)

    def _zoom(self, low: np.ndarray, high: np.ndarray) -> None:
        """Centre the 2D camera on the live layers and fit them to the canvas (a 3D view is left alone)."""
        if self.viewer.dims.ndisplay != 2:
            return
        centre, zoom = camera_for_box(low, high, self.viewer.canvas.size)
        self.viewer.camera.center = centre
        self.viewer.camera.zoom = zoom

    def add_or_update(self, data: Any, kwargs: dict[str, Any], layer_type: str) -> Any:
        """Update the layer of that name in place (keeping the user's display settings), else add it.

        A Points layer of Gaussians may come back with another number of points (density control adds and removes
        Gaussians): its data are set first, then the per-point properties of the new length.
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
            self.live[name] = existing
            return existing
        if existing is not None:
            self.viewer.layers.remove(existing)
        layer = Layer.create(data, kwargs, layer_type)
        self.viewer.add_layer(layer)
        self.live[name] = layer
        return layer

    # --------------------------------------------------------------- updates
    def update(self, images: list[np.ndarray], iteration: int) -> None:
        """Show the render of ``iteration``, one layer per event-loop turn (a newer render replaces a queued one)."""
        self._queue = []
        self._iteration = iteration
        if self._build:
            return  # the layers are still being added (the fit is held meanwhile)
        for view, image, target in zip(self.views, images, self.targets):
            for role, data in (
                ("rendered", lambda image=image: image),
                ("residual", lambda image=image, target=target: residual(image, target)),
            ):
                layer = self.live.get(f"{role} {view.name}")
                if layer is not None:
                    self._queue.append((layer, data))
        if not self._timer.isActive():
            self._timer.start(0)

    def flush(self, images: list[np.ndarray], iteration: int) -> None:
        """Show the render of ``iteration`` in every layer now (the last one of a fit)."""
        self.update(images, iteration)
        while self._queue:
            self._update_next()

    def _update_next(self) -> None:
        if not self._queue:
            return
        layer, data = self._queue.pop(0)
        if layer in self.viewer.layers:  # else removed by the user: respect that until the next run
            layer.data = data()
        if not self._queue:
            self.updated.emit(self._iteration)

    # ----------------------------------------------------------- the model
    def add_model(self, model: GaussianModel, iteration: int, source: SourceVolume | None) -> Any:
        """Add (or update) the ``fitted gaussians`` Points layer, with the source volume's axes if it has more."""
        layer = model_to_points(model, name=FITTED_NAME, extra={"iteration": iteration})
        if source is not None:
            picks = {p: max(int(i), 0) for p, i in source.picks.items()}
            layer = points_in_axes(layer, source.axes, picks, source.layer.scale, source.layer.translate)
        return self.add_or_update(*layer)
