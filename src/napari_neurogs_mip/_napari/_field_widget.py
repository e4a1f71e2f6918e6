"""*Model field volume* widget: voxelise a Gaussian Points layer into an Image layer on request.

The reader leaves this out (voxelising a large model can take a while); here it
runs in a thread worker, and the volume lines up with the points in world
(physical) coordinates.
"""

# No ``from __future__ import annotations``: magicgui reads the annotations as objects.
import napari
from magicgui import magic_factory
from napari.qt.threading import FunctionWorker
from napari.types import LayerDataTuple
from qtpy.QtCore import QTimer

from ._layers import field_image, is_model_layer, points_to_model
from ._threads import start_worker


@magic_factory(call_button="Voxelise", points={"label": "Gaussians"})
def model_field_widget(points: napari.layers.Points) -> FunctionWorker[LayerDataTuple]:
    """Add the exact summed field of the Gaussians in ``points`` as an Image layer.

    The model is read from the layer on the main thread (cheap); the field is
    evaluated in a worker thread, and errors become napari notifications.
    """
    from napari.qt.threading import thread_worker

    if points is None:
        raise ValueError("choose a Points layer of Gaussians")
    if not is_model_layer(points.metadata):
        raise ValueError(f"{points.name!r} is not a Gaussian layer (open a checkpoint or the sample model)")
    model = points_to_model(points.data, points.features, points.metadata, points.scale, points.size)
    name = f"{points.name} field"

    @thread_worker
    def voxelise() -> LayerDataTuple:
        return field_image(model, name=name)

    worker = voxelise()
    # napari connects ``returned`` (to add the layer) after this function returns,
    # and does not start the worker: start it on the next event-loop turn.
    QTimer.singleShot(0, lambda: start_worker(worker))
    return worker
