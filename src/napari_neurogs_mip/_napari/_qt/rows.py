"""Small building blocks of the Fit MIP panels: captioned rows, a path row, a titled group."""

from __future__ import annotations

from typing import TypeVar

from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

BoxLayout = TypeVar("BoxLayout", QHBoxLayout, QVBoxLayout)

LABEL_WIDTH = 110
"""Width of the captions, so that fields line up across panels and fit the default dock width."""


def bare(layout: BoxLayout, spacing: int | None = None) -> BoxLayout:
    """``layout`` without margins (it sits inside a row or panel that has them), with ``spacing`` pixels if given."""
    layout.setContentsMargins(0, 0, 0, 0)
    if spacing is not None:
        layout.setSpacing(spacing)
    return layout


class Row(QWidget):
    """A caption and a field on one line; hide the row to hide both (and free its space)."""

    def __init__(self, label: str, field: QWidget, tip: str = "") -> None:
        super().__init__()
        self.caption = QLabel(label)
        # One width for all captions lines the fields up; a longer caption (napari's font) keeps its text whole.
        self.caption.setMinimumWidth(LABEL_WIDTH)
        self.caption.setSizePolicy(QSizePolicy.Policy.Fixed, QSizePolicy.Policy.Preferred)
        self.caption.setToolTip(tip or field.toolTip())
        self.field = field
        layout = bare(QHBoxLayout(self))
        layout.addWidget(self.caption)
        layout.addWidget(field, 1)


class FileRow(QWidget):
    """A path line edit with a browse button."""

    def __init__(self, caption: str, file_filter: str, save: bool = False, folder: bool = False) -> None:
        super().__init__()
        self.edit = QLineEdit()
        self.edit.setMinimumWidth(60)
        self.button = QPushButton("…")
        self.button.setFixedWidth(28)
        self.button.setToolTip(f"Choose: {caption}")
        layout = bare(QHBoxLayout(self))
        layout.addWidget(self.edit, 1)
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
            self.edit.editingFinished.emit()

    def text(self) -> str:
        """The path as typed."""
        return self.edit.text().strip()


def group(title: str) -> tuple[QGroupBox, QVBoxLayout]:
    """A titled group box and its (tight) column of rows."""
    box = QGroupBox(title)
    rows = QVBoxLayout(box)
    rows.setSpacing(2)
    rows.setContentsMargins(6, 2, 6, 4)
    return box, rows


def combo(items: list[str], current: str | None = None, tip: str = "") -> QComboBox:
    """A combo box that may shrink below its longest item (the dock is narrow)."""
    box = QComboBox()
    box.addItems(items)
    if current is not None:
        box.setCurrentText(current)
    box.setToolTip(tip)
    box.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    box.setMinimumContentsLength(8)
    box.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
    return box


def info_label() -> QLabel:
    """A wrapping, selectable line of information under a group's rows."""
    label = QLabel("")
    label.setWordWrap(True)
    label.setMinimumWidth(10)
    return label
