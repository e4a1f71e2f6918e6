"""Keep Triton out of a napari process whose OpenGL is Mesa's (it would crash it).

Mesa's OpenGL drivers (software ``llvmpipe``/``softpipe`` as under Xvfb, and
several GPU drivers) load their own ``libLLVM``.  Loading Triton's
``libtriton`` (which bundles another LLVM) into a process that already holds it
ends in a segmentation fault.  Torch imports Triton lazily, e.g. when the first
optimiser is built, so a fit started from napari on such a machine would take
napari down.  Where that would happen, :func:`guard_triton_import` makes
``import triton`` raise ``ImportError`` instead: torch then treats Triton as
absent and the renderer falls back as it does without Triton (the reason is
logged and shown by the widget).

Triton loaded *before* the viewer opened is fine; start napari with
``python -c "import triton, napari; napari.Viewer(); napari.run()"`` to keep the
``triton`` backend on a CUDA machine whose display uses Mesa.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

LOGGER = logging.getLogger(__name__)

REASON = (
    "triton is disabled in this napari session: OpenGL here is Mesa's, whose LLVM clashes with Triton's "
    "(loading it would crash napari); import triton before opening napari to use the triton backend"
)


def guard_triton_import() -> str | None:
    """Block ``import triton`` when loading it now would crash the process; the reason if blocked."""
    if "triton" in sys.modules:
        return REASON if sys.modules["triton"] is None else None
    if not sys.platform.startswith("linux"):
        return None
    try:
        maps = Path("/proc/self/maps").read_text(errors="replace")
    except OSError:
        return None
    if "libLLVM" not in maps:
        return None
    try:
        installed = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        installed = False
    if not installed:
        return None
    sys.modules["triton"] = None  # type: ignore[assignment]  # makes `import triton` raise ImportError
    LOGGER.warning(REASON)
    return REASON
