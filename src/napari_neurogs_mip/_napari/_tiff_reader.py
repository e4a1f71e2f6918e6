"""Reader contribution for ``*.tif``/``*.tiff``: multi-channel hyperstacks and our MIP files, calibrated.

napari's builtin reader opens an ImageJ Z, C, Y, X hyperstack as one 4D layer
with scale 1 everywhere, and a MIP written by *Export MIPs* without its pixel
size.  This reader accepts only

* ImageJ or OME hyperstacks with a channel axis of more than one entry: one
  layer per channel, the other axes kept (e.g. z, y, x), scale in micrometres
  from the file (the core's rules, :func:`..io.tiff.read_metadata`), axis labels
  and units set, colours and additive blending as napari gives channels;
* MIP files written by :func:`..io.tiff.write_mips` (an ImageJ 2D image that
  names its view): one 2D layer with the view's pixel size as scale and the
  view in its metadata, so the Fit MIP widget takes it as a MIP target,

and returns ``None`` for every other file, so napari's builtin reader handles
the rest.  Nothing here imports Qt or napari.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..io.tiff import read_metadata, read_mips
from ._layers import VIEW_KEY, LayerDataTuple

LOGGER = logging.getLogger(__name__)
SUFFIXES = (".tif", ".tiff")
CHANNEL_COLORMAPS = ("green", "magenta", "cyan", "yellow", "red", "blue")
"""Colours of channels 0, 1, ... (napari's order for ``channel_axis``)."""
_MICRONS = ("um", "micron", "microns", "µm", "μm", "\\u00b5m", "micrometer")
FILE_KEY = "neurogs_file"
"""Layer metadata key: the file a layer was read from, its axes as stored, and the channel."""

ReaderFunction = Callable[..., list[LayerDataTuple]]


def get_tiff_reader(path: str | os.PathLike | list[Any]) -> ReaderFunction | None:
    """A reader for a multi-channel ImageJ/OME hyperstack or a MIP file of ours, else ``None``; never raises."""
    if isinstance(path, (list, tuple)):
        return None  # stacks of files are napari's
    file = Path(path)
    if file.suffix.lower() not in SUFFIXES or not file.is_file():
        return None
    try:
        kind = _kind(file)
    except Exception as error:  # unreadable: napari's reader (or its error) is for that
        LOGGER.debug("napari-neurogs-mip does not read %s: %s", file, error)
        return None
    if kind == "hyperstack":
        return lambda *_, **__: read_hyperstack(file)
    if kind == "mip":
        return lambda *_, **__: read_mip_file(file)
    return None


def _kind(path: Path) -> str | None:
    """``hyperstack``, ``mip`` or ``None``, from the header only (no pixels are read)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if not (tif.is_imagej or tif.is_ome):
            return None
        series = tif.series[0]
        axes = series.axes.upper()
        if "C" in axes and series.shape[axes.index("C")] > 1:
            return "hyperstack"
        info = tif.imagej_metadata or {}
        if axes == "YX" and ('"view"' in str(info.get("Info", "")) or '"view"' in (tif.pages[0].description or "")):
            return "mip"
    return None


def _units(unit: Any, calibrated: bool) -> str:
    return "micrometer" if calibrated and str(unit).strip().lower() in _MICRONS else "pixel"


def read_hyperstack(path: str | os.PathLike) -> list[LayerDataTuple]:
    """One layer per channel of an ImageJ/OME hyperstack, scaled in the file's physical units."""
    import tifffile

    path = Path(path)
    metadata = read_metadata(path)
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        axes = series.axes.upper()
        data = series.asarray()
        unit = (tif.imagej_metadata or {}).get("unit", "um")  # OME sizes default to micrometres
    channel = axes.index("C")
    rest = axes.replace("C", "")
    spacing = dict(zip("ZYX", metadata.spacing_zyx))
    calibrated = metadata.spacing_source != "default"
    scale = tuple(float(spacing.get(a, 1.0)) for a in rest)
    units = tuple(_units(unit, calibrated) if a in "ZYX" else "pixel" for a in rest)
    layers = []
    for index in range(data.shape[channel]):
        kwargs = {
            "name": f"{path.stem} ch{index}",
            "scale": scale,
            "axis_labels": tuple(a.lower() for a in rest),
            "units": units,
            "colormap": CHANNEL_COLORMAPS[index % len(CHANNEL_COLORMAPS)],
            "blending": "additive",
            "metadata": {FILE_KEY: {"path": str(path), "axes": axes, "channel": index}},
        }
        # A view of the file's array, not a copy per channel.
        layers.append((data[(slice(None),) * channel + (index,)], kwargs, "image"))
    return layers


def read_mip_file(path: str | os.PathLike) -> list[LayerDataTuple]:
    """A MIP file of :func:`..io.tiff.write_mips` as a 2D layer with the view's pixel size as scale."""
    path = Path(path)
    [(view, image)] = read_mips(path).items()
    _, rows, columns = read_metadata(path).spacing_zyx
    kwargs = {
        "name": path.stem,
        "scale": (rows, columns),
        "units": ("micrometer", "micrometer"),
        "colormap": "gray",
        "metadata": {VIEW_KEY: view},
    }
    return [(image, kwargs, "image")]
