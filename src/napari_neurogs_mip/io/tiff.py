"""TIFF input and output: volumes (plain, ImageJ hyperstacks, OME-TIFF) and MIP images.

Voxel spacing is read, in order of preference, from OME physical sizes, the
ImageJ ``spacing`` entry plus the X/Y resolution tags, or plain resolution
tags; whatever is missing is 1.0.  The caller may override it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import threading
from collections.abc import Iterator
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


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
"""First bytes of a classic or BigTIFF file, either byte order."""
_DAMAGE_WORDS = ("offset", "corrupt", "incomplete", "truncat")
"""Words of tifffile's log reports that mean a file is cut short or damaged (it logs them and reads on, returning
fewer pages or falling back to a plainer layout, so a truncated stack could come back as one 2D page)."""


class _Reports(logging.Handler):
    """Collects what tifffile logs from this thread, instead of printing it."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def _open(path: Path) -> Iterator[Any]:
    """The open TIFF at ``path``.

    The body must only read (it raises nothing of its own): any error in it, any damage tifffile reports, or pixel
    data that run past the end of the file become a ``ValueError`` that names the file.
    """
    import tifffile

    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    logger = logging.getLogger("tifffile")
    reports = _Reports()
    logger.addHandler(reports)
    try:
        try:
            tif = tifffile.TiffFile(path)
        except Exception as error:  # tifffile raises several types for non-TIFF or damaged input
            raise _unreadable(path, error, reports.messages) from error
        with tif:
            try:
                yield tif
                problem = _damage(path, tif, reports.messages)
            except MemoryError:
                raise
            except Exception as error:
                raise _unreadable(path, error, reports.messages) from error
        if problem:
            raise ValueError(f"{path} is truncated or damaged: {problem}; copy or export the file again")
    finally:
        logger.removeHandler(reports)


def _unreadable(path: Path, error: Exception, reports: list[str]) -> ValueError:
    """The error for a file tifffile could not read: damaged when it starts like a TIFF, else not a TIFF."""
    with path.open("rb") as file:
        head = file.read(4)
    if not head or not any(magic.startswith(head) for magic in _TIFF_MAGIC):
        return ValueError(f"{path} is not a readable TIFF file ({error})")
    found = [m for m in reports if any(w in m.lower() for w in _DAMAGE_WORDS)]
    detail = f"{found[0]}; " if found else ""
    return ValueError(
        f"{path} is truncated or damaged: it starts as a TIFF but cannot be read ({detail}{type(error).__name__}: "
        f"{error}); copy or export the file again"
    )


def _damage(path: Path, tif: Any, reports: list[str]) -> str | None:
    """Why an opened TIFF looks cut short or damaged, or ``None``."""
    size = path.stat().st_size
    ends = [o + n for page in tif.pages for o, n in zip(page.dataoffsets, page.databytecounts)]
    if ends and max(ends) > size:
        return f"its pixel data run to byte {max(ends)}, but the file has {size} bytes"
    found = [m for m in reports if any(w in m.lower() for w in _DAMAGE_WORDS)]
    return f"tifffile reports {found[0]!r}" if found else None


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
        No such file, not a readable TIFF, or a truncated or damaged one.
    """
    path = Path(path)
    with _open(path) as tif:
        series, axes, spacing, source = _header(tif)
        shape = tuple(int(n) for n in series.shape)
    _check_spacing(path, spacing, source)
    return TiffMetadata(spacing, source, axes, shape)


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
        that axis has more than one entry, refused when the file has no such axis.
    spacing_zyx
        Overrides the spacing found in the file.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Not a TIFF, truncated or damaged, not 3D, an unchosen channel/time axis, a channel or time for a file
        without that axis, an index out of range, or NaN/Inf voxels (the message names the file).
    """
    path = Path(path)
    data, axes, spacing, source = _read_series(path)
    data = _as_volume(path, *_select(path, data, axes, channel, time))
    if spacing_zyx is not None:
        spacing, source = tuple(float(s) for s in spacing_zyx), "user"
    _check_spacing(path, spacing, source)
    return VolumeFile(data, spacing, source, axes)


def read_channels(path: str | os.PathLike, count: int, time: int | None = None) -> list[np.ndarray]:
    """Every one of the ``count`` channels of a TIFF hyperstack at ``time`` as [Z, Y, X] arrays, read once.

    Raises ``ValueError`` as :func:`read_volume` does (the file is read once, each channel selected from it).
    """
    path = Path(path)
    data, axes, _, _ = _read_series(path)
    return [_as_volume(path, *_select(path, data, axes, channel, time)) for channel in range(count)]


def _as_volume(path: Path, data: np.ndarray, axes_left: str) -> np.ndarray:
    """``data`` checked to be a 3D volume of finite values, as float32 (``ValueError`` names ``path``)."""
    if data.ndim != 3:
        raise ValueError(
            f"{path} holds a {data.ndim}D image (axes {axes_left}, shape {data.shape}); a 3D Z, Y, X volume is needed"
        )
    with np.errstate(over="ignore"):  # values beyond float32 become Inf, which the next line reports
        data = data.astype(np.float32, copy=False)
    _check_finite(path, data, "the volume", "voxels")
    return data


def _read_series(path: Path) -> tuple[np.ndarray, str, tuple[float, float, float], str]:
    """The first series of a TIFF, whole, with its axis letters, spacing (z, y, x) and the spacing's source."""
    with _open(path) as tif:
        series, axes, spacing, source = _header(tif)
        return np.asarray(series.asarray()), axes, spacing, source


_AXIS_FLAGS = {"--channel": ("CS", "channel"), "--time": ("T", "time")}
"""Command-line flag -> (axis letters it indexes, what it names)."""


def _select(path: Path, data: np.ndarray, axes: str, channel: int | None, time: int | None) -> tuple[np.ndarray, str]:
    """Index away every non-spatial axis; single-entry axes go silently, absent ones must not be chosen."""
    if len(axes) != data.ndim:
        axes = "".join(_SPATIAL[-data.ndim :]) if data.ndim <= 3 else axes
    sizes = ", ".join(f"{a}={n}" for a, n in zip(axes, data.shape))
    for (flag, (letters, what)), value in zip(_AXIS_FLAGS.items(), (channel, time)):
        if value is not None and not set(letters) & set(axes):
            raise ValueError(
                f"{path} has no {what} axis (axes {axes}: {sizes}), so {flag} {value} cannot apply; leave {flag} out"
            )
    choices = {"C": channel, "S": channel, "T": time}
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
            what = {"C": "a channel", "S": "a channel", "T": "a time point"}.get(axis, f"an index along axis {axis}")
            raise ValueError(f"{path} has axes {axes} ({sizes}); choose {what} (e.g. --channel / --time)")
        choice = 0 if choice is None else int(choice)
        if not 0 <= choice < size:
            raise ValueError(f"{path}: index {choice} is out of range for axis {axis} of size {size}")
        index.append(choice)
    return data[tuple(index)], kept


def _check_spacing(path: Path, spacing: tuple[float, float, float], source: str) -> None:
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(
            f"{path}: the voxel spacing (z, y, x) {spacing} from {source} is not 3 positive finite numbers; "
            "give it with --voxel-size Z Y X"
        )


def _check_finite(path: Path, data: np.ndarray, what: str, unit: str) -> None:
    """Refuse NaN/Inf (after the float32 conversion, so values beyond its range count too)."""
    bad = data.size - int(np.count_nonzero(np.isfinite(data)))
    if bad:
        raise ValueError(
            f"{path}: {what} holds {bad} non-finite {unit} (NaN, Inf, or beyond the float32 range) of {data.size}; "
            "expected finite intensities"
        )


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


TIFF_SUFFIXES = (".tif", ".tiff")
AXIS_ORDER = {"xy": 0, "xz": 1, "yz": 2}


def mip_paths(path: str | os.PathLike, names: list[str]) -> dict[str, Path]:
    """Where :func:`write_mips` puts each view: ``<stem>_<view>.tif`` beside a ``.tif`` path, else
    ``<folder>/<view>.tif``."""
    path = Path(path)
    # View names such as 30:15 hold characters some file systems refuse; the label inside keeps the name.
    safe = {name: re.sub(r"[^A-Za-z0-9_.-]", "_", name) for name in names}
    if path.suffix.lower() in TIFF_SUFFIXES:
        return {name: path.with_name(f"{path.stem}_{safe[name]}{path.suffix}") for name in names}
    return {name: path / f"{safe[name]}.tif" for name in names}


def write_mips(
    path: str | os.PathLike,
    images: dict[str, np.ndarray],
    pixel_sizes: dict[str, tuple[float, float]],
) -> list[Path]:
    """Write MIP images, one ImageJ TIFF per view (each atomic), calibrated in micrometres.

    Views differ in shape, and ImageJ files hold one shape, so each view gets its
    own file (see :func:`mip_paths`; a folder is created).  Fiji reads the pixel
    size (``unit=um`` and the resolution tags), ``tifffile.imread`` the whole
    image, and the slice label and ``Info`` name the view
    (``{"view": name, "pixel_size_rc": [dv, du]}``).

    Parameters
    ----------
    path
        A folder, or a ``.tif`` path whose stem prefixes the files.
    images
        View name -> 2D image.
    pixel_sizes
        View name -> (row, column) pixel size in micrometres.

    Returns
    -------
    The files written, in the order of ``images``.
    """
    import tifffile

    if not images:
        raise ValueError("no MIP images to write")
    targets = mip_paths(path, list(images))
    next(iter(targets.values())).parent.mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        dv, du = pixel_sizes[name]
        info = json.dumps({"view": name, "pixel_size_rc": [dv, du]})
        with atomic_path(targets[name]) as tmp:
            tifffile.imwrite(
                tmp, np.asarray(image, dtype=np.float32), imagej=True, resolution=(1.0 / du, 1.0 / dv),
                metadata={"unit": "um", "axes": "YX", "Labels": [name], "Info": info},
            )  # fmt: skip
    return list(targets.values())


def _mip_files(path: Path) -> list[Path]:
    """The files of a MIP set: ``path`` itself, the TIFFs of a folder, or the ``<stem>_<view>.tif`` files that
    :func:`write_mips` wrote for ``path``."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in TIFF_SUFFIXES and not p.name.startswith("."))
        if not files:
            raise ValueError(f"{path} is a folder without TIFF files; expected one MIP TIFF per view")
        return files
    if not path.exists() and path.suffix.lower() in TIFF_SUFFIXES:
        files = sorted(path.parent.glob(f"{glob.escape(path.stem)}_*{path.suffix}"))
        if files:
            return files
    return [path]


def read_mips(path: str | os.PathLike, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Read MIP images: the files :func:`write_mips` wrote (a folder, or the ``.tif`` path given to it), one 2D
    TIFF, a stack of equal-sized views, or a multi-page file with a view per page.

    View names come from the page descriptions written by :func:`write_mips`
    (``{"view": name, ...}``), ImageJ slice labels, or ``names`` (which
    overrides both).  Names found in the file must be view names (``xy``,
    ``xz``, ``yz`` or ``AZ:EL``); no view may appear twice.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Not a TIFF, truncated or damaged, not 2D images, unnamed views, a name that is no view name (e.g. ``42``), a
        view twice, or NaN/Inf pixels (the message names the file and the page).
    """
    files = _mip_files(Path(path))
    if len(files) == 1:
        return _read_mip_file(files[0], names)
    if names is not None and len(names) != len(files):
        raise ValueError(f"{path} holds {len(files)} MIP files but {len(names)} view names were given: {names}")
    mips: dict[str, np.ndarray] = {}
    for index, file in enumerate(files):
        one = _read_mip_file(file, [names[index]] if names is not None else None)
        if len(one) != 1:
            raise ValueError(f"{file} holds {len(one)} views; a MIP folder holds one view per file")
        mips.update(one)
    _check_view_names(Path(path), list(mips) if names is None else names, from_file=names is None)
    if len(mips) != len(files):
        raise ValueError(f"{path}: two files hold the same view; expected each view once")
    # Files come sorted by name; the axis views go first, as everywhere else.
    return dict(sorted(mips.items(), key=lambda item: (AXIS_ORDER.get(item[0], len(AXIS_ORDER)), item[0])))


def _read_mip_file(path: Path, names: list[str] | None) -> dict[str, np.ndarray]:
    with _open(path) as tif:
        found = [_page_view(page.description) for page in tif.pages]
        labelled = bool(found) and all(name is not None for name in found)
        if labelled:
            images = [np.asarray(page.asarray()) for page in tif.pages]
        else:
            data = np.asarray(tif.series[0].asarray())
            labels = _imagej_labels(tif.imagej_metadata or {})
    if not labelled:
        if data.ndim not in (2, 3):
            raise ValueError(f"{path} holds a {data.ndim}D array; MIPs must be one 2D image or a stack of 2D views")
        images = [data] if data.ndim == 2 else list(data)
        found = list(labels) if labels and len(labels) == len(images) else None
    chosen = names if names is not None else found
    if chosen is None:
        raise ValueError(f"{path} does not name its views; pass the view names (e.g. --views xy,xz,yz)")
    if len(chosen) != len(images):
        raise ValueError(f"{path} holds {len(images)} MIP images but {len(chosen)} view names were given: {chosen}")
    _check_view_names(path, chosen, from_file=names is None)
    mips = {}
    for page, (name, image) in enumerate(zip(chosen, images), start=1):
        if image.ndim != 2:
            raise ValueError(f"{path}: page {page} (view {name!r}) holds a {image.ndim}D image; expected a 2D MIP")
        with np.errstate(over="ignore"):  # values beyond float32 become Inf, which the next line reports
            mips[name] = image.astype(np.float32, copy=False)
        _check_finite(path, mips[name], f"page {page} (view {name!r})", "pixels")
    return mips


def _imagej_labels(metadata: dict[str, Any]) -> list[Any] | None:
    """ImageJ slice labels (a single label comes back as a string), else the view in ``Info``."""
    labels = metadata.get("Labels")
    if isinstance(labels, str):
        return [labels]
    if labels:
        return list(labels)
    view = _page_view(metadata.get("Info"))
    return [view] if view is not None else None


def _page_view(description: str | None) -> Any:
    """The ``view`` entry of a page description written by :func:`write_mips` (any JSON type), else ``None``."""
    try:
        info = json.loads(description or "")
    except ValueError:
        return None
    return info.get("view") if isinstance(info, dict) else None


def _check_view_names(path: Path, names: list[Any], from_file: bool) -> None:
    """Refuse a name the file gives that is no view name, and any view named twice (``30:15`` is ``az30_el15``)."""
    from ..views import AXIS_VIEWS, parse_orbit

    pages: dict[Any, int] = {}
    for page, name in enumerate(names, start=1):
        key: Any = name
        if from_file:
            try:
                key = name if name in AXIS_VIEWS else parse_orbit(name)
            except (TypeError, ValueError):
                raise ValueError(
                    f"{path}: page {page} names its view {name!r}; expected a view name: xy, xz, yz or AZ:EL in "
                    "degrees (e.g. 30:15 or az30_el15)"
                ) from None
        if key in pages:
            raise ValueError(f"{path}: pages {pages[key]} and {page} both hold view {name!r}; expected each view once")
        pages[key] = page
