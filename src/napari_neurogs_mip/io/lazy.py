"""Volumes larger than memory: OME-Zarr and TIFF read region by region (or as dask arrays), and OME-Zarr written.

:func:`open_volume` reads only metadata and returns a :class:`LazyVolume`: a small,
picklable description (file, level, the channel and time chosen, shape, spacing)
whose :meth:`LazyVolume.read` opens the file, reads one (Z, Y, X) region as
float32 and closes it again, so a task on any dask worker can read its own
block; :meth:`LazyVolume.to_dask` wraps the same reads as a dask array.

* **OME-Zarr** (NGFF 0.4 on zarr v2 and 0.5 on zarr v3; a local folder): the
  first ``multiscales`` entry; ``level`` picks a dataset (0 = finest).  The voxel
  spacing is the ``scale`` of the level's ``coordinateTransformations`` times the
  multiscale's own, converted to micrometres from the axes' ``unit`` (taken as
  micrometres when absent).  Axes of type ``channel`` and ``time`` are chosen with
  ``channel`` / ``time`` as for TIFF (:func:`.tiff.read_volume`'s rules and
  messages).  A bioformats2raw folder (image in ``0/``) and a bare zarr array
  (last three axes Z, Y, X; spacing 1 unless given) are accepted too.
* **TIFF**: memory-mapped when the pixels are stored uncompressed and contiguous,
  else read page by page through tifffile's zarr store; ``level`` picks a level
  of a pyramidal (OME-)TIFF.  Spacing, axes and the channel/time rules are those
  of :mod:`.tiff`.

:func:`write_ome_zarr` creates an OME-Zarr (NGFF 0.5) image of any shape to fill
region by region (a volume, or a MIP too large for one TIFF), under a temporary
name renamed into place when it is complete, so a reader never sees half of one.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..frames import VolumeGeometry
from .tiff import TIFF_SUFFIXES, _check_finite, _check_spacing, _select, read_metadata

Region = tuple[slice, slice, slice]
"""A (Z, Y, X) box of voxels: three slices with steps of 1."""

UNIT_MICROMETRES = {
    "angstrom": 1e-4,
    "nanometer": 1e-3,
    "micrometer": 1.0,
    "micron": 1.0,
    "millimeter": 1e3,
    "centimeter": 1e4,
    "meter": 1e6,
}
"""Micrometres per NGFF spatial unit (the UDUNITS names the specification lists)."""
_AXIS_LETTERS = {"channel": "C", "time": "T"}
"""NGFF axis types as the axis letters of :func:`.tiff._select`."""
CHUNK_VOXELS = 1 << 23
"""Voxels a dask chunk of a TIFF aims at (32 MiB as float32): pages are grouped, or huge planes tiled."""
NGFF_VERSION = "0.5"


@dataclass(frozen=True)
class LazyVolume:
    """A 3D (Z, Y, X) volume in a file, read region by region; plain values only, so it pickles to dask workers.

    Attributes
    ----------
    path
        The OME-Zarr folder or TIFF file, absolute (workers may run elsewhere).
    kind
        ``zarr`` or ``tiff``.
    array
        The zarr array inside ``path`` (``s0``, ``0``, ``""`` for a bare array); the TIFF level as text.
    key
        Per stored axis: the index chosen (channel, time) or ``None`` for a spatial axis.
    order
        Positions of Z, Y, X among the spatial axes as stored (``(0, 1, 2)`` when stored Z, Y, X).
    shape_zyx
        Voxels along (z, y, x).
    spacing_zyx
        Voxel spacing (z, y, x), micrometres (or the file's units when it gives none).
    spacing_source
        Where the spacing came from (for messages).
    dtype
        The stored data type (reads return float32).
    chunks_zyx
        A chunk shape that suits the storage (zarr chunks; pages or tiles of a TIFF).
    memmap
        TIFF only: whether the pixels can be memory-mapped.
    level
        The multiscale level read.
    """

    path: str
    kind: str
    array: str
    key: tuple[int | None, ...]
    order: tuple[int, int, int]
    shape_zyx: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float]
    spacing_source: str
    dtype: str
    chunks_zyx: tuple[int, int, int]
    memmap: bool = False
    level: int = 0

    @property
    def geometry(self) -> VolumeGeometry:
        """Shape and spacing of the whole volume."""
        return VolumeGeometry(self.shape_zyx, self.spacing_zyx)

    @property
    def nbytes(self) -> int:
        """Bytes of the whole volume as stored."""
        return math.prod(self.shape_zyx) * np.dtype(self.dtype).itemsize

    def describe(self) -> str:
        """One line: file, level, shape, spacing and its source."""
        level = f" level {self.level}" if self.level else ""
        gib = self.nbytes / (1 << 30)
        return (
            f"{self.path}{level}: {self.kind} volume (Z, Y, X) {self.shape_zyx} {self.dtype} ({gib:.2f} GiB stored), "
            f"spacing {self.spacing_zyx} from {self.spacing_source}"
        )

    def read(self, region: Region | None = None) -> np.ndarray:
        """The voxels of ``region`` (default: all) as a float32 [Z, Y, X] array, read from the file now.

        Raises
        ------
        ValueError
            A region outside the volume, or NaN/Inf voxels (the message names the file).
        """
        region = check_region(region, self.shape_zyx)
        stored = [region[self.order.index(i)] for i in range(3)]  # the slices in the file's spatial order
        spatial = iter(stored)
        key = tuple(next(spatial) if k is None else k for k in self.key)
        if self.kind == "zarr":
            import zarr

            data = np.asarray(zarr.open_array(store=_zarr_store(self.path, self.array), mode="r")[key])
        elif self.memmap:
            import tifffile

            mapped = tifffile.memmap(self.path, mode="r")
            data = np.array(mapped[key])
            del mapped  # closes the mapping
        else:
            import tifffile
            import zarr

            store = tifffile.imread(self.path, aszarr=True, series=0, level=int(self.level))
            try:
                data = np.asarray(zarr.open_array(store=store, mode="r")[key])
            finally:
                store.close()
        data = np.transpose(data, self.order) if self.order != (0, 1, 2) else data
        with np.errstate(over="ignore"):  # values beyond float32 become Inf, which the next line reports
            data = np.ascontiguousarray(data, dtype=np.float32)
        where = ", ".join(f"{s.start}:{s.stop}" for s in region)
        _check_finite(Path(self.path), data, f"the region [{where}] (Z, Y, X)", "voxels")
        return data

    def to_dask(self, chunks: tuple[int, int, int] | None = None) -> Any:
        """The volume as a lazy float32 dask array [Z, Y, X]; each chunk is one :meth:`read` when computed."""
        import dask.array as da
        from dask.base import tokenize

        chunks = chunks or self.chunks_zyx
        return da.from_array(
            _Reader(self), chunks=chunks, name=f"lazy-volume-{tokenize(self)}", asarray=False, lock=False,
            meta=np.empty((0, 0, 0), dtype=np.float32),
        )  # fmt: skip


class _Reader:
    """``array[key]`` for dask: a :class:`LazyVolume` read of the region ``key``."""

    def __init__(self, volume: LazyVolume) -> None:
        self.volume = volume
        self.shape = volume.shape_zyx
        self.dtype = np.dtype(np.float32)
        self.ndim = 3

    def __getitem__(self, key: Any) -> np.ndarray:
        # dask fuses slicing into the read: steps and integers may come here; read their bounding box, then index.
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (3 - len(key))
        box, local = [], []
        for item, size in zip(key, self.shape):
            if isinstance(item, slice):
                picked = range(*item.indices(size))
                if not picked:
                    return np.zeros([len(range(*k.indices(n))) for k, n in zip(key, self.shape)
                                     if isinstance(k, slice)], np.float32)  # fmt: skip
                low = min(picked)
                box.append(slice(low, max(picked) + 1))
                stop = picked.stop - low
                local.append(slice(picked.start - low, stop if stop >= 0 else None, picked.step))
            else:
                index = int(item) % size
                box.append(slice(index, index + 1))
                local.append(0)
        return self.volume.read(tuple(box))[tuple(local)]  # type: ignore[arg-type]


def check_region(region: Sequence[slice] | None, shape_zyx: Sequence[int]) -> Region:
    """``region`` with its bounds filled in, checked to lie inside ``shape_zyx`` (``None``: the whole volume)."""
    if region is None:
        return tuple(slice(0, int(n)) for n in shape_zyx)  # type: ignore[return-value]
    if len(region) != 3:
        raise ValueError(f"a region is 3 slices (Z, Y, X), got {region}")
    checked = []
    for axis, item, size in zip("ZYX", region, shape_zyx):
        start = 0 if item.start is None else int(item.start)
        stop = int(size) if item.stop is None else int(item.stop)
        if item.step not in (None, 1) or not 0 <= start < stop <= size:
            raise ValueError(f"region {tuple(region)} is outside the volume (Z, Y, X) {tuple(shape_zyx)} along {axis}")
        checked.append(slice(start, stop))
    return tuple(checked)  # type: ignore[return-value]


def open_volume(
    path: str | os.PathLike,
    level: int = 0,
    channel: int | None = None,
    time: int | None = None,
    voxel_size: tuple[float, float, float] | None = None,
) -> LazyVolume:
    """Describe a 3D volume in an OME-Zarr folder or a TIFF file without reading its voxels.

    Parameters
    ----------
    path
        An OME-Zarr folder (``.zarr``, or any folder holding zarr metadata) or a TIFF file.
    level
        Multiscale level (0 = full resolution).
    channel, time
        Indices along a channel or time axis (required when it has more than one entry).
    voxel_size
        (z, y, x) spacing in micrometres that replaces the file's.

    Raises
    ------
    FileNotFoundError
        No such file or folder.
    ValueError
        Not an OME-Zarr or TIFF volume, a level that does not exist, not 3D, or a channel/time problem (the
        message names the file and the option).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if level < 0:
        raise ValueError(f"--level must be >= 0, got {level}")
    if path.is_dir():
        volume = _open_zarr(path, level, channel, time)
    elif path.suffix.lower() in TIFF_SUFFIXES or path.is_file():
        volume = _open_tiff(path, level, channel, time)
    if voxel_size is not None:
        spacing = tuple(float(s) for s in voxel_size)
        _check_spacing(path, spacing, "--voxel-size")  # type: ignore[arg-type]
        volume = _replace(volume, spacing_zyx=spacing, spacing_source="user")
    return volume


def _replace(volume: LazyVolume, **changes: Any) -> LazyVolume:
    from dataclasses import replace

    return replace(volume, **changes)


class _KeyProbe:
    """Stands for a stored array in :func:`.tiff._select`: indexing it returns the key, so the selection rules
    (and their messages) of TIFF hyperstacks apply to any file without reading it."""

    def __init__(self, shape: Sequence[int]) -> None:
        self.shape = tuple(int(n) for n in shape)
        self.ndim = len(self.shape)

    def __getitem__(self, key: tuple) -> tuple:
        return key


def _choose(path: Path, shape: Sequence[int], axes: str, channel: int | None, time: int | None) -> tuple:
    """The per-axis key (index or ``None`` for a spatial axis) and the spatial axis letters left, in stored order."""
    key, kept = _select(path, _KeyProbe(shape), axes, channel, time)  # type: ignore[arg-type]
    if len(kept) != 3:
        sizes = ", ".join(f"{a}={n}" for a, n in zip(axes, shape))
        raise ValueError(f"{path} holds a {len(kept)}D image (axes {axes}: {sizes}); a 3D Z, Y, X volume is needed")
    return tuple(None if isinstance(k, slice) else int(k) for k in key), kept


# --------------------------------------------------------------------------- OME-Zarr


def _zarr_store(path: str, array: str) -> str:
    return str(Path(path) / array) if array else str(path)


def _multiscales(attrs: dict[str, Any]) -> list | None:
    """The ``multiscales`` list of NGFF 0.5 (under ``ome``) or 0.4 (top level) attributes."""
    ome = attrs.get("ome")
    found = ome.get("multiscales") if isinstance(ome, dict) else attrs.get("multiscales")
    return found if isinstance(found, list) and found else None


def _open_zarr(path: Path, level: int, channel: int | None, time: int | None) -> LazyVolume:
    import zarr

    try:
        node = zarr.open(store=str(path), mode="r")
    except Exception as error:  # zarr raises several types for folders that are not zarr
        raise ValueError(
            f"{path} is a folder but not a zarr store (OME-Zarr) ({type(error).__name__}: {error})"
        ) from None
    if isinstance(node, zarr.Array):
        if level:
            raise ValueError(f"{path} is a single zarr array; --level {level} needs an OME-Zarr multiscale image")
        letters = "".join("TCZYX"[-node.ndim :]) if node.ndim <= 5 else "?" * node.ndim
        key, kept = _choose(path, node.shape, letters, channel, time)
        return _zarr_volume(path, "", node, key, kept, (1.0, 1.0, 1.0), "default (a bare zarr array has none)", 0)
    group, prefix = node, ""
    scales = _multiscales(group.attrs.asdict())
    if scales is None and "0" in group and isinstance(group["0"], zarr.Group):
        # bioformats2raw layout: the image is the group "0" beside an OME metadata folder.
        group, prefix = group["0"], "0"
        scales = _multiscales(group.attrs.asdict())
    if scales is None:
        raise ValueError(f"{path} is a zarr group without OME-Zarr 'multiscales' metadata; expected an OME-Zarr image")
    multiscale = scales[0]
    datasets = multiscale.get("datasets") or []
    if not 0 <= level < len(datasets):
        shapes = ", ".join(
            f"{i}: {tuple(group[d['path']].shape)}" for i, d in enumerate(datasets) if d.get("path") in group
        )
        raise ValueError(f"{path} has {len(datasets)} multiscale level(s) ({shapes}); --level {level} does not exist")
    dataset = datasets[level]
    array = group[dataset["path"]]
    axes = _ngff_axes(path, multiscale.get("axes"), array.ndim)
    letters = "".join(_AXIS_LETTERS.get(kind, name.upper()) for name, kind, _ in axes)
    key, kept = _choose(path, array.shape, letters, channel, time)
    scale = _scale(dataset.get("coordinateTransformations"), array.ndim)
    scale *= _scale(multiscale.get("coordinateTransformations"), array.ndim)
    by_letter = {}
    sources = set()
    for (name, _, unit), value in zip(axes, scale):
        factor = UNIT_MICROMETRES.get(unit, 1.0) if unit else 1.0
        sources.add(f"unit {unit}" if unit else "no unit: taken as micrometres")
        by_letter[name.upper()] = float(value) * factor
    spacing = tuple(by_letter[a] for a in "ZYX")
    source = f"OME-Zarr scale of level {level} ({'; '.join(sorted(sources))})"
    _check_spacing(path, spacing, source)  # type: ignore[arg-type]
    inner = f"{prefix}/{dataset['path']}" if prefix else dataset["path"]
    return _zarr_volume(path, inner, array, key, kept, spacing, source, level)  # type: ignore[arg-type]


def _zarr_volume(
    path: Path, inner: str, array: Any, key: tuple, kept: str, spacing: tuple[float, float, float], source: str,
    level: int,
) -> LazyVolume:  # fmt: skip
    if set(kept) != set("ZYX"):
        raise ValueError(f"{path}: the spatial axes are {kept}; expected z, y and x")
    order = tuple(kept.index(a) for a in "ZYX")
    spatial = [n for n, k in zip(array.shape, key) if k is None]
    chunks = [c for c, k in zip(array.chunks, key) if k is None]
    return LazyVolume(
        str(path.resolve()), "zarr", inner, key, order, tuple(int(spatial[i]) for i in order),  # type: ignore[arg-type]
        spacing, source, str(array.dtype), tuple(int(chunks[i]) for i in order), level=level,  # type: ignore[arg-type]
    )  # fmt: skip


def _ngff_axes(path: Path, axes: Any, ndim: int) -> list[tuple[str, str, str | None]]:
    """(name, type, unit) per axis; NGFF 0.3 lists names only, older versions none (then T, C, Z, Y, X)."""
    if axes is None:
        return [(n, "space" if n in "zyx" else {"t": "time", "c": "channel"}[n], None) for n in "tczyx"[-ndim:]]
    if not isinstance(axes, list) or len(axes) != ndim:
        raise ValueError(f"{path}: the multiscales axes {axes!r} do not match the {ndim}D array")
    found = []
    for axis in axes:
        if isinstance(axis, str):
            found.append((axis, "space" if axis in "zyx" else {"t": "time", "c": "channel"}.get(axis, "?"), None))
        else:
            name = str(axis.get("name", "?"))
            kind = axis.get("type") or ("space" if name.lower() in "zyx" else "?")
            found.append((name.lower() if kind == "space" else name, str(kind), axis.get("unit")))
    names = [n for n, kind, _ in found if kind == "space"]
    if sorted(names) != ["x", "y", "z"]:
        raise ValueError(f"{path}: the spatial axes are {names}; a 3D volume with axes z, y, x is needed")
    return found


def _scale(transformations: Any, ndim: int) -> np.ndarray:
    """The product of the ``scale`` transformations in a list (ones when there are none)."""
    scale = np.ones(ndim)
    for item in transformations or []:
        if isinstance(item, dict) and item.get("type") == "scale" and len(item.get("scale", [])) == ndim:
            scale = scale * np.asarray(item["scale"], dtype=np.float64)
    return scale


# --------------------------------------------------------------------------- TIFF


def _open_tiff(path: Path, level: int, channel: int | None, time: int | None) -> LazyVolume:
    import tifffile

    meta = read_metadata(path)  # spacing, axes and shape, and a clear error for files that are not TIFF
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        if level >= len(series.levels):
            raise ValueError(f"{path} has {len(series.levels)} level(s); --level {level} does not exist")
        full = tuple(int(n) for n in series.shape)
        shape = tuple(int(n) for n in series.levels[level].shape)
        memmap = level == 0 and series.dataoffset is not None
        dtype = str(series.dtype)
    key, kept = _choose(path, shape, meta.axes, channel, time)
    kept = kept.replace("Q", "Z").replace("I", "Z")
    order = tuple(kept.index(a) for a in "ZYX")
    spatial = [n for n, k in zip(shape, key) if k is None]
    spatial_full = [n for n, k in zip(full, key) if k is None]
    shape_zyx = tuple(int(spatial[i]) for i in order)
    # A pyramid level's voxels are larger by the level's downsampling along each axis.
    spacing = tuple(s * spatial_full[i] / spatial[i] for s, i in zip(meta.spacing_zyx, order))
    source = meta.spacing_source + (f" (scaled to level {level})" if level else "")
    return LazyVolume(
        str(path.resolve()), "tiff", str(level), key, order, shape_zyx, spacing, source, dtype,  # type: ignore[arg-type]
        _tiff_chunks(shape_zyx), memmap, level,  # type: ignore[arg-type]
    )  # fmt: skip


def _tiff_chunks(shape_zyx: tuple[int, int, int]) -> tuple[int, int, int]:
    """Whole pages grouped to about :data:`CHUNK_VOXELS`, or tiles of huge pages."""
    z, y, x = shape_zyx
    if y * x <= CHUNK_VOXELS:
        return (max(1, min(z, CHUNK_VOXELS // (y * x))), y, x)
    side = int(math.sqrt(CHUNK_VOXELS))
    return (1, min(y, side), min(x, side))


# --------------------------------------------------------------------------- writing


@contextlib.contextmanager
def write_ome_zarr(
    path: str | os.PathLike,
    shape: Sequence[int],
    dtype: Any,
    chunks: Sequence[int],
    spacing: Sequence[float],
    axes: Sequence[str] = ("z", "y", "x"),
    name: str | None = None,
    overwrite: bool = False,
) -> Iterator[Any]:
    """An empty single-level OME-Zarr (NGFF 0.5, zarr v3) image to fill region by region; it appears at ``path``
    only when the block ends without an error.

    Parameters
    ----------
    path
        The ``.ome.zarr`` folder to create.
    shape, dtype, chunks
        Of the image array (one entry per axis).
    spacing
        Pixel size per axis, micrometres (the ``scale`` transformation).
    axes
        Axis names, all of type ``space`` in micrometres (e.g. ``("z", "x")`` for an ``xz`` MIP).
    name
        The image's name in the metadata (default: the folder's stem).
    overwrite
        Replace an existing ``path`` (else ``FileExistsError``).

    Yields
    ------
    zarr.Array
        The array, in a temporary folder beside ``path`` (it pickles to dask workers).
    """
    import zarr

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite (--overwrite) to replace it")
    if not (len(shape) == len(chunks) == len(spacing) == len(axes)):
        raise ValueError(
            f"shape {shape}, chunks {chunks}, spacing {spacing} and axes {axes} must have one entry per axis"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        group = zarr.open_group(store=str(tmp), mode="w", zarr_format=3)
        group.attrs["ome"] = {
            "version": NGFF_VERSION,
            "multiscales": [{
                "name": name or path.name.split(".")[0],
                "axes": [{"name": a, "type": "space", "unit": "micrometer"} for a in axes],
                "datasets": [{"path": "0", "coordinateTransformations": [
                    {"type": "scale", "scale": [float(s) for s in spacing]}]}],
            }],
        }  # fmt: skip
        chunks = tuple(max(1, min(int(c), int(n))) for c, n in zip(chunks, shape))
        array = group.create_array("0", shape=tuple(int(n) for n in shape), chunks=chunks, dtype=dtype, fill_value=0)
        yield array
        if path.exists():
            old = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.old"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
