"""A small live loss curve drawn with QPainter (no plotting library needed).

The loss is drawn on a log axis against the iteration; the x axis spans the
planned iterations so the curve's progress is visible at a glance.  Appending
is cheap and repainting is left to the caller (the fit widget throttles it).
"""

from __future__ import annotations

import math

import numpy as np
from qtpy.QtCore import QPointF, QRectF, QSize, Qt
from qtpy.QtGui import QColor, QFont, QPainter, QPainterPath, QPaintEvent, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

_MAX_POINTS = 1500
"""Points drawn at most; longer histories are thinned (keeping each bucket's min and max)."""


class LossPlot(QWidget):
    """Loss (log scale) against iteration.

    Parameters
    ----------
    parent
        Parent widget.
    """

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._losses: list[float] = []
        self._total = 1
        self.text_color = QColor("#d0d4dc")
        self.line_color = QColor("#f5a623")
        self.grid_color = QColor(128, 128, 128, 90)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setMinimumHeight(100)
        self.setToolTip("Loss (log scale) against iteration")

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt API)
        """Preferred size."""
        return QSize(300, 110)

    # ------------------------------------------------------------------- data
    @property
    def losses(self) -> list[float]:
        """The losses drawn, one per iteration."""
        return list(self._losses)

    def reset(self, total: int, history: list[float] | None = None) -> None:
        """Start a new curve for a fit of ``total`` iterations, from ``history`` (resumed fits)."""
        self._losses = [float(v) for v in (history or [])]
        self._total = max(int(total), 1)
        self.update()

    def append(self, loss: float) -> None:
        """Add one iteration's loss (call :meth:`update` to repaint)."""
        self._losses.append(float(loss))

    def set_colors(self, text: str, line: str) -> None:
        """Colours of axis text and of the curve (e.g. from the napari theme)."""
        self.text_color = QColor(text)
        self.line_color = QColor(line)
        self.update()

    # ---------------------------------------------------------------- drawing
    def paintEvent(self, event: QPaintEvent) -> None:  # noqa: N802 (Qt API)
        """Draw axes, ticks and the curve."""
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        font = QFont(painter.font())
        font.setPointSizeF(max(font.pointSizeF() * 0.85, 6.0))
        painter.setFont(font)
        metrics = painter.fontMetrics()
        left = metrics.horizontalAdvance("1e-10") + 8
        plot = QRectF(left, 6, self.width() - left - 8, self.height() - metrics.height() - 14)
        if plot.width() < 10 or plot.height() < 10:
            return
        painter.setPen(QPen(self.grid_color, 1))
        painter.drawRect(plot)
        painter.setPen(self.text_color)
        values = np.asarray(self._losses, dtype=np.float64)
        finite = values[np.isfinite(values) & (values > 0)]
        total = max(self._total, len(values))
        painter.drawText(QPointF(plot.left(), self.height() - 4), "0")
        label = f"{total} it"
        painter.drawText(QPointF(plot.right() - metrics.horizontalAdvance(label), self.height() - 4), label)
        if finite.size == 0:
            painter.drawText(plot, Qt.AlignmentFlag.AlignCenter, "loss curve: waiting for the fit")
            return
        low = math.floor(math.log10(finite.min()) * 2) / 2
        high = math.ceil(math.log10(finite.max()) * 2) / 2
        if high - low < 0.5:
            low, high = low - 0.25, high + 0.25

        def y_of(log_value: float) -> float:
            return plot.bottom() - (log_value - low) / (high - low) * plot.height()

        for tick in np.arange(math.ceil(low), math.floor(high) + 1):
            y = y_of(float(tick))
            painter.setPen(QPen(self.grid_color, 1, Qt.PenStyle.DashLine))
            painter.drawLine(QPointF(plot.left(), y), QPointF(plot.right(), y))
            painter.setPen(self.text_color)
            painter.drawText(QPointF(2, y + metrics.ascent() / 2 - 1), f"1e{int(tick)}")
        # The axis ends are half decades: label them too when they are not decades,
        # so a curve within one decade still has a scale.
        for end, y in ((low, plot.bottom()), (high, plot.top() + metrics.ascent())):
            if abs(end - round(end)) > 1e-9:
                painter.drawText(QPointF(2, y), f"{10**end:.0e}".replace("e-0", "e-"))
        index, shown = _thin(values)
        path = QPainterPath()
        started = False
        for i, value in zip(index, shown):
            if not (math.isfinite(value) and value > 0):
                started = False
                continue
            point = QPointF(plot.left() + (i + 1) / total * plot.width(), y_of(math.log10(value)))
            if started:
                path.lineTo(point)
            else:
                path.moveTo(point)
                started = True
        painter.setPen(QPen(self.line_color, 1.5))
        painter.drawPath(path)
        painter.setPen(self.text_color)
        latest = f"loss {values[-1]:.4g}"
        painter.drawText(
            QPointF(plot.right() - metrics.horizontalAdvance(latest) - 4, plot.top() + metrics.ascent() + 2), latest
        )


def _thin(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At most about ``_MAX_POINTS`` (index, value) pairs: each bucket's min and max, in order."""
    if len(values) <= _MAX_POINTS:
        return np.arange(len(values)), values
    buckets = np.array_split(np.arange(len(values)), _MAX_POINTS // 2)
    index = []
    for bucket in buckets:
        chunk = values[bucket]
        picks = sorted({int(bucket[np.argmin(chunk)]), int(bucket[np.argmax(chunk)])})
        index.extend(picks)
    index_array = np.asarray(index)
    return index_array, values[index_array]
