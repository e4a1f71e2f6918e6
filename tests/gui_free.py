"""The check that a set of modules imports no GUI toolkit, run in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys

GUI_PACKAGES = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "vispy", "superqt")
"""Top-level packages that the core, training, CLI and the napari models must not load."""


def gui_modules_loaded(code: str) -> list[str]:
    """The GUI modules (of :data:`GUI_PACKAGES`) in ``sys.modules`` after running ``code`` in a new interpreter.

    A new interpreter, because this test process has napari and Qt loaded already.
    """
    check = f"{code}\nimport sys\nprint(sorted(m for m in sys.modules if m.split('.')[0] in {GUI_PACKAGES!r}))\n"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300, check=True)
    return ast.literal_eval(result.stdout.strip().splitlines()[-1])
