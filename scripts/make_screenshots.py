"""Regenerate the screenshots of ``docs/user-guide.md`` (and the README) from real fits.

Run under a display, e.g. ``xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/make_screenshots.py``.
It opens napari with the sample neuron, docks *Fit MIP*, fits 2,000 Gaussians
on the CPU and grabs the window mid-fit and at the end, the loss curve, and
a fitted checkpoint opened with the plugin's reader; then it writes the sample
as channel 1 of a two-channel ImageJ hyperstack, opens it as napari's own
reader does (one 4D layer, scale 1), picks channel 1 and fits it.  ``--only``
writes some of the pictures.  Takes a couple of minutes on two CPU cores.
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
import tifffile
from qtpy.QtGui import QImage
from qtpy.QtWidgets import QApplication

PLUGIN = "napari-neurogs-mip"
IMAGES = Path(__file__).resolve().parents[1] / "docs" / "images"
NAMES = ("fit-widget-settings", "fit-running", "fit-widget", "loss-curve", "checkpoint-points", "fit-hyperstack")
ONLY: set[str] = set(NAMES)


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


def save(image: np.ndarray, name: str) -> Path | None:
    """Write an RGBA screenshot array as a PNG in ``docs/images`` (unless ``--only`` leaves it out)."""
    if Path(name).stem not in ONLY:
        return None
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


def dock(viewer: napari.Viewer, gaussians: int, iterations: int):
    """Dock *Fit MIP* and set a CPU fit of ``gaussians`` Gaussians for ``iterations`` steps."""
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Fit MIP")
    widget.model_panel.num_gaussians.setValue(gaussians)
    widget.settings_panel.set_value("iterations", iterations)
    widget.settings_panel.set_value("device", "cpu")
    return widget


def main(iterations: int, gaussians: int) -> None:
    """Fit the sample and take the screenshots."""
    IMAGES.mkdir(parents=True, exist_ok=True)
    viewer = napari.Viewer(title="napari-neurogs-mip")
    viewer.window.resize(1600, 1000)
    viewer.open_sample(PLUGIN, "neuron")
    widget = dock(viewer, gaussians, iterations)
    settle(1.0)
    save(_grab(widget), "fit-widget-settings.png")

    finished: list[object] = []
    widget.fit_finished.connect(finished.append)
    widget.start()
    wait(lambda: widget.trainer is not None and widget.trainer.iteration >= iterations // 3)
    settle(0.5)
    clear_toasts(viewer)
    save(viewer.screenshot(canvas_only=False, flash=False), "fit-running.png")

    wait(lambda: bool(finished) and not widget.session.state.busy)
    if "fitted gaussians" in viewer.layers:
        viewer.layers["fitted gaussians"].visible = False  # keep the MIPs in view
    settle(1.0)
    clear_toasts(viewer)
    save(viewer.screenshot(canvas_only=False, flash=False), "fit-widget.png")
    save(_grab(widget.run_panel.loss_plot), "loss-curve.png")

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fitted.pt"
        widget.save_checkpoint(path)
        wait(path.is_file)
        settle(0.5)
        second = napari.Viewer(title="fitted checkpoint")
        second.window.resize(1200, 900)
        second.open_sample(PLUGIN, "neuron")
        second.layers["sample neuron"].opacity = 0.6
        second.open(path, plugin=None)  # napari 0.9's Viewer.open reads with its own reader unless told
        second.layers["fitted (xy projection)"].visible = False  # a 2D view of the model, not for the 3D one
        second.dims.ndisplay = 3
        second.reset_view()  # before the angles: napari 0.9's reset_view also resets them
        second.camera.angles = (-20, 30, 150)
        settle(1.5)
        save(second.screenshot(canvas_only=True, flash=False), "checkpoint-points.png")
        second.close()
    viewer.close()
    if "fit-hyperstack" in ONLY:
        hyperstack(iterations // 2, gaussians)


def hyperstack(iterations: int, gaussians: int) -> None:
    """A two-channel ImageJ hyperstack opened as a user would (napari's reader), channel 1 fitted."""
    from napari_neurogs_mip.sample import sample_volume

    volume, geometry = sample_volume()
    other = np.random.default_rng(1).random(volume.shape).astype(np.float32) * float(np.percentile(volume, 50))
    data = np.stack([other, volume.astype(np.float32)], axis=1)  # Z, C, Y, X
    sz, sy, sx = geometry.spacing_zyx
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "two_channels.tif"
        metadata = {"axes": "ZCYX", "spacing": sz, "unit": "um"}
        tifffile.imwrite(path, data, imagej=True, resolution=(1 / sx, 1 / sy), metadata=metadata)
        viewer = napari.Viewer(title="napari-neurogs-mip: a hyperstack")
        viewer.window.resize(1600, 1000)
        viewer.open(path)
        widget = dock(viewer, gaussians, iterations)
        [channel] = widget.target_panel.picker.rows.values()
        channel.field.setValue(1)
        widget.run_panel.residual_check.setChecked(True)
        finished: list[object] = []
        widget.fit_finished.connect(finished.append)
        widget.start()
        wait(lambda: bool(finished) and not widget.session.state.busy)
        viewer.layers["fitted gaussians"].visible = False
        settle(1.0)
        clear_toasts(viewer)
        save(viewer.screenshot(canvas_only=False, flash=False), "fit-hyperstack.png")
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
    parser.add_argument("--only", nargs="+", choices=NAMES, help="write only these pictures (default: all)")
    arguments = parser.parse_args()
    ONLY.intersection_update(arguments.only or NAMES)
    main(arguments.iterations, arguments.gaussians)
