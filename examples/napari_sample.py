"""Open napari with the sample neuron loaded and the Fit MIP widget docked.

Run: ``python examples/napari_sample.py`` and press *Start*: 2,000 Gaussians
(the default) for 300 iterations (set here; the widget's default is 1,000, but a
few hundred already look good).
"""

from __future__ import annotations

# On machines whose OpenGL is Mesa's (e.g. under Xvfb), Triton must load before the
# viewer opens or the triton backend is switched off for this session.
try:
    import triton  # noqa: F401
except ImportError:
    pass

import napari

PLUGIN = "napari-neurogs-mip"


def main() -> napari.Viewer:
    """Make the viewer: the sample volume and the docked widget, targeting it."""
    viewer = napari.Viewer(title="napari-neurogs-mip sample")
    viewer.open_sample(PLUGIN, "neuron")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Fit MIP")
    widget.settings_panel.set_value("iterations", 300)
    return viewer


if __name__ == "__main__":
    main()
    napari.run()
