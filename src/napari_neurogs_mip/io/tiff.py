"""TIFF input and output: volumes (plain, ImageJ hyperstacks, OME-TIFF) and MIP images.

Voxel spacing is read, in order of preference, from OME physical sizes, the
ImageJ ``spacing`` entry plus the X/Y resolution tags, or plain resolution
tags; whatever is missing is 1.0.  The caller may override it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path

_SPATIAL = ("Z", "Y", "X")


@dataclass
class VolumeFile:
    """A volume read from a TIFF file.

    Attributes
    ----------
    data
        float32 [Z, Y, X] array.
    spacing_zyx
        Voxel spacing (z, y, x), physical units.
    spacing_source
        Where the spacing came from (``OME``, ``ImageJ``, ``resolution tags``, ``user``, ``default``).
    axes
        Axis letters of the file as stored (e.g. ``TZCYX``).
    """

    data: np.ndarray
    spacing_zyx: tuple[float, float, float]
    spacing_source: str
    axes: str


def _open(path: str | os.PathLike):
    import tifffile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return tifffile.TiffFile(path)
    except Exception as error:  # tifffile raises several types for non-TIFF input
        raise ValueError(f"{path} is not a readable TIFF file ({error})") from error


@dataclass(frozen=True)
class TiffMetadata:
    """What a TIFF holds, read without its pixels.

    Attributes
    ----------
    spacing_zyx
        Voxel spacing (z, y, x), physical units (the rules of :func:`read_volume`).
    spacing_source
        Where the spacing came from (``OME``, ``ImageJ``, ``resolution tags``, ``default``).
    axes
        Axis letters of the first series as stored (e.g. ``TZCYX``).
    shape
        Shape of the first series.
    """

    spacing_zyx: tuple[float, float, float]
    spacing_source: str
    axes: str
    shape: tuple[int, ...]


def read_metadata(path: str | os.PathLike) -> TiffMetadata:
    """Spacing, axes and shape of a TIFF's first series, without reading the pixels.

    Raises
    ------
    FileNotFoundError, ValueError
        No such file, or not a readable TIFF.
    """
    with _open(path) as tif:
        series, axes, spacing, source = _header(tif)
        return TiffMetadata(spacing, source, axes, tuple(int(n) for n in series.shape))


def read_volume(
    path: str | os.PathLike,
    channel: int | None = None,
    time: int | None = None,
    spacing_zyx: tuple[float, float, float] | None = None,
) -> VolumeFile:
    """Read a 3D (Z, Y, X) volume from a TIFF file.

    Parameters
    ----------
    path
        TIFF, ImageJ hyperstack or OME-TIFF file.
    channel, time
        Index along a channel (``C``/``S``) or time (``T``) axis; required when
        that axis has more than one entry.
    spacing_zyx
        Overrides the spacing found in the file.

    Raises
    ------
    ValueError
        Not a TIFF, not 3D, an unchosen channel/time axis, or an index out of range.
    """
    path = Path(path)
    with _open(path) as tif:
        series, axes, spacing, source = _header(tif)
        data = series.asarray()
    data, axes_left = _select(path, np.asarray(data), axes, {"C": channel, "S": channel, "T": time})
    if data.ndim != 3:
        raise ValueError(
            f"{path} holds a {data.ndim}D image (axes {axes_left}, shape {data.shape}); a 3D Z, Y, X volume is needed"
        )
    if spacing_zyx is not None:
        spacing, source = tuple(float(s) for s in spacing_zyx), "user"
    return VolumeFile(data.astype(np.float32, copy=False), spacing, source, axes)


def _select(path: Path, data: np.ndarray, axes: str, choices: dict[str, int | None]) -> tuple[np.ndarray, str]:
    """Index away every non-spatial axis; single-entry axes go silently."""
    if len(axes) != data.ndim:
        axes = "".join(_SPATIAL[-data.ndim :]) if data.ndim <= 3 else axes
    index: list[int | slice] = []
    kept = ""
    for axis, size in zip(axes, data.shape):
        # tifffile names the page axis of a plain stack Q (one series) or I (pages written one by one).
        if axis in _SPATIAL or (axis in "QI" and data.ndim <= 3):
            index.append(slice(None))
            kept += "Z" if axis in "QI" else axis
            continue
        choice = choices.get(axis)
        if choice is None and size > 1:
            sizes = ", ".join(f"{a}={n}" for a, n in zip(axes, data.shape))
            what = {"C": "a channel", "S": "a channel", "T": "a time point"}.get(axis, f"an index along axis {axis}")
            raise ValueError(f"{path} has axes {axes} ({sizes}); choose {what} (e.g. --channel / --time)")
        choice = 0 if choice is None else int(choice)
        if not 0 <= choice < size:
            raise ValueError(f"{path}: index {choice} is out of range for axis {axis} of size {size}")
        index.append(choice)
    return data[tuple(index)], kept


def _header(tif) -> tuple[Any, str, tuple[float, float, float], str]:
    """First series, its axis letters (upper case), spacing (z, y, x) and where the spacing came from."""
    series = tif.series[0]
    axes = series.axes.upper()
    spacing, source = _spacing(tif, axes)
    return series, axes, spacing, source


def _spacing(tif, axes: str) -> tuple[tuple[float, float, float], str]:
    """Voxel spacing (z, y, x) and where it came from."""
    ome = tif.ome_metadata
    if ome:
        found = _ome_spacing(ome)
        if found is not None:
            return found, "OME"
    page = tif.pages[0]
    sy, sx = _resolution_spacing(page)
    imagej = tif.imagej_metadata or {}
    if imagej:
        sz = float(imagej.get("spacing", 1.0))
        return (sz, sy, sx), "ImageJ"
    if (sy, sx) != (1.0, 1.0):
        return (1.0, sy, sx), "resolution tags"
    return (1.0, 1.0, 1.0), "default"


def _resolution_spacing(page) -> tuple[float, float]:
    spacing = []
    for tag in ("YResolution", "XResolution"):
        value = page.tags.get(tag)
        numerator, denominator = value.value if value is not None else (1, 1)
        pixels_per_unit = numerator / denominator if denominator else 0.0
        spacing.append(1.0 / pixels_per_unit if pixels_per_unit > 0 else 1.0)
    return spacing[0], spacing[1]


def _ome_spacing(xml: str) -> tuple[float, float, float] | None:
    from xml.etree import ElementTree

    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return None
    for element in root.iter():
        if element.tag.endswith("Pixels"):
            sizes = [element.attrib.get(f"PhysicalSize{a}") for a in _SPATIAL]
            if any(s is not None for s in sizes):
                return tuple(float(s) if s is not None else 1.0 for s in sizes)  # type: ignore[return-value]
    return None


def write_volume(path: str | os.PathLike, volume: np.ndarray, spacing_zyx: tuple[float, float, float]) -> Path:
    """Write a [Z, Y, X] volume as an ImageJ TIFF with its spacing (atomic)."""
    import tifffile

    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"write_volume takes a 3D array, got shape {volume.shape}")
    sz, sy, sx = spacing_zyx
    with atomic_path(path) as tmp:
        tifffile.imwrite(
            tmp,
            volume,
            imagej=True,
            resolution=(1.0 / sx, 1.0 / sy),
            metadata={"spacing": sz, "unit": "um", "axes": "ZYX"},
        )
    return Path(path)


def write_mips(
    path: str | os.PathLike,
    images: dict[str, np.ndarray],
    pixel_sizes: dict[str, tuple[float, float]],
) -> Path:
    """Write MIP images as one TIFF (atomic): a page per view with its name and pixel size.

    Views of different shapes are stored as separate series; each page carries
    ``{"view": name, "pixel_size_rc": [dv, du]}`` in its description and the
    resolution tags hold the pixel size.
    """
    import tifffile

    if not images:
        raise ValueError("no MIP images to write")
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp) as writer:
        for name, image in images.items():
            dv, du = pixel_sizes[name]
            description = json.dumps({"view": name, "pixel_size_rc": [dv, du]})
            writer.write(
                np.asarray(image, dtype=np.float32),
                resolution=(1.0 / du, 1.0 / dv),
                description=description,
                metadata=None,
            )
    return Path(path)


def read_mips(path: str | os.PathLike, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Read MIP images: one 2D TIFF, a stack of equal-sized views, or a file from :func:`write_mips`.

    View names come from the page descriptions written by :func:`write_mips`,
    ImageJ slice labels, or ``names`` (which overrides both).
    """
    path = Path(path)
    with _open(path) as tif:
        labelled = []
        for page in tif.pages:
            try:
                info = json.loads(page.description or "")
            except ValueError:
                info = None
            labelled.append(info.get("view") if isinstance(info, dict) else None)
        if all(labelled):
            images = [page.asarray() for page in tif.pages]
            found = labelled
        else:
            data = np.asarray(tif.series[0].asarray())
            images = [data] if data.ndim == 2 else list(data) if data.ndim == 3 else None
            if images is None:
                raise ValueError(f"{path} holds a {data.ndim}D array; MIPs must be one 2D image or a stack of 2D views")
            labels = (tif.imagej_metadata or {}).get("Labels")
            found = list(labels) if labels and len(labels) == len(images) else None
    names = names or found
    if names is None:
        raise ValueError(f"{path} does not name its views; pass the view names (e.g. --views xy,xz,yz)")
    if len(names) != len(images):
        raise ValueError(f"{path} holds {len(images)} MIP images but {len(names)} view names were given: {names}")
    return {name: np.asarray(image, dtype=np.float32) for name, image in zip(names, images)}
