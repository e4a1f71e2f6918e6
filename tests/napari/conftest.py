"""Fixtures of the napari front-end tests (need napari, Qt and a display: run under Xvfb).

``xvfb-run -a python -m pytest -p no:xvfb tests/napari``.  The fits here are tiny
(200 Gaussians, views at half resolution) so the whole GUI suite stays within a
few minutes on two CPU cores.  Tests of the session and of the layer rules
(``test_session.py``, ``test_rules.py``) need no viewer.
"""

from __future__ import annotations

import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_helpers import PLUGIN, dock_fit_widget


@pytest.fixture(scope="session", autouse=True)
def _kernels_loaded() -> None:
    """Load the CPU renderer's kernels (and Triton, via torch) before any viewer exists.

    Compiling them on a fresh checkout holds the GIL for seconds, a one-off cost of
    the machine that no GUI test is about; loading Triton before Mesa's OpenGL also
    keeps it usable (see ``_triton_guard``).
    """
    from napari_helpers import tiny_trainer

    tiny_trainer().warm_up()


@pytest.fixture
def sample_viewer(make_napari_viewer):
    """A viewer with the sample neuron and the docked, fast-configured Fit MIP widget."""
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "neuron")
    widget = dock_fit_widget(viewer)
    return viewer, widget
