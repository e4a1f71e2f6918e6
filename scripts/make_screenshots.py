"""Regenerate the screenshots of ``docs/user-guide.md`` (and the README) from a real fit.

Run under a display, e.g. ``xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/make_screenshots.py``.
It opens napari with the sample neuron, docks *Fit MIP*, fits 2,000 Gaussians
on the CPU and grabs the window mid-fit and at the end, the loss curve, and
a fitted checkpoint opened with the plugin's reader.  Takes about a minute on
two CPU cores.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# Triton (pulled in by torch's optimiser) must load before Mesa's OpenGL, or napari
# would have to run without it (see napari_neurogs_mip/_napari/_triton_guard.py).
try:
    import triton  # noqa: F401
except ImportError:
    pass

import napari
import numpy as np
from qtpy.QtGui import QImage
from qtpy.QtWidgets import QApplication

PLUGIN = "napari-neurogs-mip"
IMAGES = Path(__file__).resolve().parents[1] / "docs" / "images"


def wait(condition: Callable[[], bool], timeout: float = 600.0) -> None:
    """Process Qt events until ``condition()`` holds."""
    app = QApplication.instance()
    start = time.perf_counter()
    while not condition():
        if time.perf_counter() - start > timeout:
            raise TimeoutError("the fit took too long")
        app.processEvents()
        time.sleep(0.01)


def settle(seconds: float = 0.5) -> None:
    """Let napari repaint."""
    end = time.perf_counter() + seconds
    app = QApplication.instance()
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.01)


def save(image: np.ndarray, name: str) -> Path:
    """Write an RGBA screenshot array as a PNG in ``docs/images``."""
    rgba = np.ascontiguousarray(
        image[..., :4] if image.shape[-1] >= 4 else np.dstack([image, np.full(image.shape[:2], 255, np.uint8)]),
        dtype=np.uint8,
    )
    height, width = rgba.shape[:2]
    qimage = QImage(rgba.data, width, height, 4 * width, QImage.Format.Format_RGBA8888)
    path = IMAGES / name
    if not qimage.save(str(path)):
        raise OSError(f"could not write {path}")
    print(f"wrote {path} ({width} x {height})")
    return path


def clear_toasts(viewer: napari.Viewer) -> None:
    """Close notification pop-ups so they do not cover the canvas in the pictures."""
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()
    settle(0.3)


def main(iterations: int, gaussians: int) -> None:
    """Fit the sample and take the screenshots."""
    IMAGES.mkdir(parents=True, exist_ok=True)
    viewer = napari.Viewer(title="napari-neurogs-mip")
    viewer.window.resize(1600, 1000)
    viewer.open_sample(PLUGIN, "neuron")
    dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Fit MIP")
    dock.setMinimumWidth(470)
    widget.num_gaussians.setValue(gaussians)
    widget.iterations.setValue(iterations)
    widget.device_combo.setCurrentText("cpu")
    settle(1.0)
    save(_grab(widget), "fit-widget-settings.png")

    finished: list[object] = []
    widget.fit_finished.connect(finished.append)
    widget.start()
    wait(lambda: widget.trainer is not None and widget.trainer.iteration >= iterations // 3)
    settle(0.5)
    clear_toasts(viewer)
    save(viewer.screenshot(canvas_only=False, flash=False), "fit-running.png")

    wait(lambda: bool(finished) and widget.state == "idle")
    if "fitted gaussians" in viewer.layers:
        viewer.layers["fitted gaussians"].visible = False  # keep the MIPs in view
    settle(1.0)
    clear_toasts(viewer)
    save(viewer.screenshot(canvas_only=False, flash=False), "fit-widget.png")
    save(_grab(widget.loss_plot), "loss-curve.png")

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fitted.pt"
        widget.save_checkpoint(path)
        wait(path.is_file)
        settle(0.5)
        second = napari.Viewer(title="fitted checkpoint")
        second.window.resize(1200, 900)
        second.open_sample(PLUGIN, "neuron")
        second.layers["sample neuron"].opacity = 0.6
        second.open(path, plugin=PLUGIN)
        second.dims.ndisplay = 3
        second.camera.angles = (-20, 30, 150)
        second.reset_view()
        settle(1.5)
        save(second.screenshot(canvas_only=True, flash=False), "checkpoint-points.png")
        second.close()
    viewer.close()


def _grab(widget) -> np.ndarray:
    """A widget's pixels as an RGBA array."""
    image = widget.grab().toImage().convertToFormat(QImage.Format.Format_RGBA8888)
    pointer = image.constBits()
    pointer.setsize(image.height() * image.bytesPerLine())
    rows = np.frombuffer(pointer, np.uint8).reshape(image.height(), image.bytesPerLine())
    return rows[:, : image.width() * 4].reshape(image.height(), image.width(), 4).copy()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--gaussians", type=int, default=2000)
    arguments = parser.parse_args()
    main(arguments.iterations, arguments.gaussians)
