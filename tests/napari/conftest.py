"""Fixtures of the napari front-end tests (need napari, Qt and a display: run under Xvfb).

``xvfb-run -a python -m pytest tests/napari`` or plain ``pytest`` with pytest-xvfb.
The fits here are tiny (200 Gaussians, views at half resolution) so the whole
GUI suite stays well under a few minutes on two CPU cores.
"""

from __future__ import annotations

import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_helpers import PLUGIN, dock_fit_widget


@pytest.fixture(scope="session", autouse=True)
def _renderer_loaded() -> None:
    """Load the CPU renderer's kernels before any viewer exists.

    Compiling them (on a fresh checkout) holds the GIL for seconds, which is a
    one-off cost of the process and not what the GUI tests measure; loading
    Triton (via torch) before Mesa's OpenGL also keeps it usable (see ``_triton_guard``).
    """
    from napari_neurogs_mip._napari._fit_worker import warm_up_renderer

    warm_up_renderer()


@pytest.fixture
def sample_viewer(make_napari_viewer):
    """A viewer with the sample neuron and the docked, fast-configured Fit MIP widget."""
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "neuron")
    widget = dock_fit_widget(viewer)
    return viewer, widget
