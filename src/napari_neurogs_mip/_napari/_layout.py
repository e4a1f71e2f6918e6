"""Where the live MIP layers go on the canvas, where their labels go, and the camera that shows them.

All in world units (physical, e.g. um), (row, column) = (y, x) like napari's
last two axes.  Views keep their physical pixel size, so equal distances look
equal in every layer and in the source volume; the grid starts right of the
other layers, its top row level with the top of the volume (both start at
``y = 0``), so the ``xy`` MIPs line up with the volume's rows.  Views sit side
by side, a row per role (target, rendered, residual); when they are many they
wrap onto more lines (:func:`best_columns`), so that the grid fills the canvas.

Nothing here imports Qt or napari.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..views import View

COLUMN_GAP = 0.06
"""Gap between views, as a share of the largest view."""
LABEL_ROOM = 0.045
"""Room above each row for its labels, as a share of the grid's width (labels are about 14 screen pixels tall
when the grid fills the canvas)."""


@dataclass(frozen=True)
class Placement:
    """Where a 2D view layer goes: ``scale`` (dv, du) and ``translate`` (row, column), world units."""

    scale: tuple[float, float]
    translate: tuple[float, float]


@dataclass(frozen=True)
class Label:
    """A text label: ``text`` written above ``position`` (row, column), world units."""

    text: str
    position: tuple[float, float]


def view_layout(
    views: Sequence[View], rows: int, x_start: float = 0.0, columns: int | None = None
) -> list[list[Placement]]:
    """Placements of ``rows`` rows of view images (target, rendered, ...): ``columns`` views side by side (all by
    default), each line of views holding its ``rows`` rows, lines one below the other.

    Returns ``rows`` lists of one :class:`Placement` per view; the first line starts at ``y = 0``.
    """
    columns = max(1, min(columns or len(views), len(views)))
    widths = [max(v.width * v.du for v in views[j::columns]) for j in range(columns)]
    gap = COLUMN_GAP * max([*(v.width * v.du for v in views), *(v.height * v.dv for v in views), 1e-9])
    xs = np.concatenate([[0.0], np.cumsum([w + gap for w in widths])[:-1]]) + x_start
    row_gap = max(gap, LABEL_ROOM * float(sum(widths) + gap * (columns - 1)))
    placements: list[list[Placement]] = [[] for _ in range(rows)]
    y = 0.0
    for first in range(0, len(views), columns):
        line = views[first : first + columns]
        height = max(v.height * v.dv for v in line)
        for row in range(rows):
            placements[row] += [Placement((v.dv, v.du), (y, float(x))) for v, x in zip(line, xs)]
            y += height + row_gap
    return placements


Box = tuple[np.ndarray, np.ndarray]
"""A world box (row, column): its (low, high) corners."""


def union(box: Box, other: Box | None) -> Box:
    """The smallest box holding ``box`` and ``other`` (``box`` itself without ``other``)."""
    if other is None:
        return box
    return np.minimum(box[0], other[0]), np.maximum(box[1], other[1])


def best_columns(
    views: Sequence[View], rows: int, canvas_size: Sequence[int], x_start: float = 0.0, beside: Box | None = None
) -> int:
    """How many views per line show the grid largest on a canvas of ``canvas_size`` (height, width) pixels, the
    ``beside`` box (the volume left of the grid) shown too; a single line when that is as large."""

    def zoom(columns: int) -> float:
        low, high = union(layout_box(views, view_layout(views, rows, x_start, columns)), beside)
        size = np.maximum(high - low, 1e-9)
        return min(canvas_size[-2] / size[0], canvas_size[-1] / size[1])

    return max(range(len(views), 0, -1), key=zoom)


def layout_labels(views: Sequence[View], roles: Sequence[str], layout: Sequence[Sequence[Placement]]) -> list[Label]:
    """One label per image, just above its top-left corner: ``"<role> <view>"`` for the first image of each row of
    a line, the view name alone for the others (short labels do not run into the next image)."""
    labels = []
    for role, row in zip(roles, layout):
        for index, (view, placement) in enumerate(zip(views, row)):
            first = index == 0 or placement.translate[1] < row[index - 1].translate[1]
            corner = (placement.translate[0] - 0.5 * view.dv, placement.translate[1] - 0.5 * view.du)
            labels.append(Label(f"{role} {view.name}" if first else view.name, corner))
    return labels


def layout_box(views: Sequence[View], layout: Sequence[Sequence[Placement]]) -> tuple[np.ndarray, np.ndarray]:
    """The world box (row, column) that the images of ``layout`` and their labels cover: (low, high) corners."""
    lows, highs = [], []
    for row in layout:
        for view, placement in zip(views, row):
            low = np.asarray(placement.translate) - 0.5 * np.asarray(placement.scale)
            lows.append(low)
            highs.append(low + np.asarray([view.height * view.dv, view.width * view.du]))
    low, high = np.min(lows, axis=0), np.max(highs, axis=0)
    low[0] -= LABEL_ROOM * (high[1] - low[1])  # the top row's labels
    return low, high


def camera_for_box(
    low: Sequence[float], high: Sequence[float], canvas_size: Sequence[int], margin: float = 0.04
) -> tuple[tuple[float, float], float]:
    """Camera centre (row, column) and zoom (screen pixels per world unit) that fit the box on the canvas."""
    size = np.maximum(np.asarray(high, dtype=float) - np.asarray(low, dtype=float), 1e-9)
    centre = (np.asarray(low, dtype=float) + np.asarray(high, dtype=float)) / 2
    zoom = (1 - margin) * float(np.min(np.asarray(canvas_size[-2:], dtype=float) / size))
    return (float(centre[0]), float(centre[1])), zoom


def free_x(right_edges: Sequence[float], views: Sequence[View]) -> float:
    """World x where the live layers start: right of every other layer (their right edges), with a gap."""
    if not right_edges:
        return 0.0
    widest = max((v.width * v.du for v in views), default=1.0)
    return float(max(right_edges)) + 0.1 * widest
