"""Writer contributions: a Gaussian Points layer as a checkpoint, MIP image layers as calibrated TIFFs.

napari calls these with layer data and the layer's state (``meta``); see the
npe2 writer specification.  They raise ``ValueError`` with a reason for layers
they cannot write, which napari shows to the user.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..io.checkpoint import save_checkpoint
from ..io.tiff import write_mips, write_volume
from ._layers import mip_pixel_sizes, mip_view_name, points_to_model, spacing_from_scale

FullLayerData = tuple[Any, dict[str, Any], str]


def write_checkpoint(path: str | os.PathLike, data: Any, meta: Mapping[str, Any]) -> list[str]:
    """Write a Points layer of Gaussians (from our reader, sample or fit) as a NeuRoGS-family checkpoint.

    The model is stored in the frame it was loaded in, with the point
    positions as they are now (moved, added or deleted points included); points
    without Gaussian features (drawn by hand) become isotropic Gaussians of the
    point size.
    """
    model = points_to_model(
        data, meta.get("features"), meta.get("metadata"), meta.get("scale"), _sizes(meta.get("size"))
    )
    written = save_checkpoint(path, model, extra={"source": "napari points layer", "layer": str(meta.get("name"))})
    return [str(written)]


def _sizes(size: Any) -> np.ndarray | float | None:
    if size is None:
        return None
    values = np.asarray(size, dtype=np.float64)
    return values if values.ndim else float(values)


def write_mip_layers(path: str | os.PathLike, layer_data: list[FullLayerData]) -> list[str]:
    """Write image layers as ImageJ TIFFs calibrated in micrometres.

    2D layers are MIPs: one TIFF per view, ``<stem>_<view>.tif`` beside the
    path given (see :func:`.io.tiff.write_mips`), named by the layer's ``view``
    metadata or a view name ending the layer name (``rendered xy``), with the
    layer scale as the pixel size (rows, columns).  Fiji and this plugin's reader
    open them with that pixel size.  A single 3D layer is written as an ImageJ
    volume with its voxel spacing.

    Returns
    -------
    list of str
        The files written (napari lists them).
    """
    if not layer_data:
        raise ValueError("no layers to write")
    shapes = [np.ndim(data) for data, _, _ in layer_data]
    if len(layer_data) == 1 and shapes[0] == 3:
        data, meta, _ = layer_data[0]
        return [str(write_volume(path, np.asarray(data), spacing_from_scale(meta.get("scale"))))]
    if any(n != 2 for n in shapes):
        raise ValueError(
            f"MIP TIFFs take 2D image layers, one per view (or one 3D volume); got layers of {shapes} dimensions "
            f"({[meta.get('name') for _, meta, _ in layer_data]})"
        )
    images: dict[str, np.ndarray] = {}
    pixel_sizes: dict[str, tuple[float, float]] = {}
    for data, meta, _ in layer_data:
        name = str(meta.get("name", "mip"))
        view = mip_view_name(name, meta.get("metadata")) or name
        if view in images:
            raise ValueError(f"two layers show view {view!r}; write them to separate files")
        images[view] = np.asarray(data, dtype=np.float32)
        pixel_sizes[view] = mip_pixel_sizes(meta.get("scale"))
    return [str(written) for written in write_mips(Path(path), images, pixel_sizes)]
