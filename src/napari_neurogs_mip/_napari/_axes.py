"""Which axis of an image layer is which (z, y, x, channel, time), and the 3D volume it holds.

napari gives a layer a shape and a scale, not axis names: its own reader opens an
ImageJ Z, C, Y, X hyperstack as one 4D layer with scale 1 everywhere.  The axes
and the voxel size are found here, in this order:

1. the layer's source file (``layer.source.path``) when :func:`..io.tiff.read_metadata`
   describes an array of the layer's shape (napari's reader, ours, most others);
2. the layer's axis labels when they name axes (``z``, ``c``, ``t``, ``channel``...),
   with the layer scale as the voxel size when it is not all ones;
3. a guess (the last three axes are z, y, x; channel and time before them) that
   the user corrects by typing the axes.

Nothing here imports Qt or napari.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SPATIAL = "ZYX"
LETTERS = "TCZYX"
"""Axis letters a layer may be described with: time, channel, z, y, x (ImageJ's names)."""
AXIS_NAMES = {"T": "time", "C": "channel", "Z": "z", "Y": "y", "X": "x"}
_LABELS = {
    "t": "T", "time": "T", "c": "C", "ch": "C", "channel": "C", "channels": "C",
    "z": "Z", "depth": "Z", "y": "Y", "x": "X",
}  # fmt: skip
_GUESSES = {2: "YX", 3: "ZYX", 4: "CZYX", 5: "TCZYX"}
"""Axes assumed when nothing names them: leading axes are channels, then time (the user corrects them)."""


@dataclass(frozen=True)
class LayerAxes:
    """What the axes of an image layer are, and where that was learnt.

    Attributes
    ----------
    axes
        One letter of :data:`LETTERS` per data axis, e.g. ``ZCYX``.
    spacing_zyx
        Voxel size (z, y, x) in physical units, ``None`` when nothing gives it.
    source
        Where the axes came from, for the user (``stack.tif (ImageJ)``, ``layer labels``, ``guessed``).
    guessed
        Whether the axes are a guess the user should check.
    """

    axes: str
    spacing_zyx: tuple[float, float, float] | None
    source: str
    guessed: bool = False


def parse_axes(text: str, ndim: int) -> str:
    """Axis letters typed by the user (``zcyx`` -> ``ZCYX``), checked against a layer of ``ndim`` dimensions.

    Raises
    ------
    ValueError
        Not one letter of T, C, Z, Y, X per axis, a letter twice, or z, y or x missing.
    """
    axes = "".join(text.split()).upper()
    if len(axes) != ndim:
        raise ValueError(f"axes {text!r}: the layer has {ndim} axes, so give {ndim} letters (e.g. {_guess(ndim)})")
    unknown = sorted(set(axes) - set(LETTERS))
    if unknown:
        raise ValueError(
            f"axes {text!r}: {''.join(unknown)} is not one of {', '.join(LETTERS)} (time, channel, z, y, x)"
        )
    if len(set(axes)) != len(axes):
        raise ValueError(f"axes {text!r}: each letter may appear once")
    missing = [a for a in SPATIAL if a not in axes]
    if missing:
        raise ValueError(f"axes {text!r}: a volume needs z, y and x; {', '.join(missing).lower()} is missing")
    return axes


def _guess(ndim: int) -> str:
    return _GUESSES.get(ndim, "?" * ndim)


def file_axes(path: str | os.PathLike | None, shape: Sequence[int]) -> LayerAxes | None:
    """The axes and voxel size of ``path`` when it holds an array of ``shape`` (else ``None``; never raises)."""
    from ..io.tiff import read_metadata

    if path is None or not str(path).lower().endswith((".tif", ".tiff")):
        return None
    try:
        metadata = read_metadata(path)
    except (OSError, ValueError):  # not a TIFF we can read: other rules apply
        return None
    if tuple(metadata.shape) != tuple(int(n) for n in shape):
        return None
    axes = _file_letters(metadata.axes)
    if axes is None:
        return None
    return LayerAxes(axes, metadata.spacing_zyx, f"{os.path.basename(path)} ({metadata.spacing_source})")


def _file_letters(axes: str) -> str | None:
    """tifffile's axis letters as ours: a plain stack's page axis (Q, I) is z, samples (S) a channel."""
    letters = axes.upper()
    if len(letters) <= 3:
        letters = letters.replace("Q", "Z").replace("I", "Z")
    letters = letters.replace("S", "C") if "C" not in letters else letters
    try:
        return parse_axes(letters, len(letters))
    except ValueError:
        return None


def label_axes(labels: Sequence[str]) -> str | None:
    """Axis letters from napari axis labels (``("z", "c", "y", "x")``); ``None`` unless every label names an axis."""
    letters = "".join(_LABELS.get(str(label).strip().lower(), "?") for label in labels)
    try:
        return parse_axes(letters, len(letters)) if "?" not in letters else None
    except ValueError:
        return None


def layer_axes(
    shape: Sequence[int],
    labels: Sequence[str],
    scale: Sequence[float],
    path: str | os.PathLike | None,
    units: Sequence[str] = (),
) -> LayerAxes:
    """The axes of an image layer by the rules of the module docstring.

    Parameters
    ----------
    shape, labels, scale
        The layer's data shape, ``axis_labels`` and ``scale``.
    path
        The layer's source file (``layer.source.path``), if any.
    units
        The layer's units as strings (``pixel`` when unscaled).
    """
    found = file_axes(path, shape)
    if found is not None:
        return found
    ndim = len(shape)
    axes = label_axes(labels)
    source = "layer axis labels"
    if axes is None and ndim == 3:
        axes, source = "ZYX", "a 3D layer"  # napari's order for a volume; nothing else to guess
    elif axes is None:
        axes, source = _guess(ndim), "guessed"
    spacing = None
    if "?" not in axes:
        spatial = [float(scale[axes.index(a)]) for a in SPATIAL]
        calibrated = any(str(units[axes.index(a)]) != "pixel" for a in SPATIAL) if len(units) == ndim else False
        if calibrated or any(not math.isclose(s, 1.0) for s in spatial):
            spacing = (spatial[0], spatial[1], spatial[2])
            source += ", voxel size from its scale"
    return LayerAxes(axes, spacing, source, guessed=source.startswith("guessed"))


def index_axes(axes: str) -> list[int]:
    """Positions of the non-spatial axes (those a volume is picked along)."""
    return [i for i, letter in enumerate(axes) if letter not in SPATIAL]


def select_volume(data: Any, axes: str, picks: Mapping[int, int]) -> Any:
    """The (z, y, x) volume of ``data`` at index ``picks[i]`` along each non-spatial axis ``i``.

    Slicing stays lazy for dask/zarr arrays; the result is transposed to (z, y, x)
    when the layer stores its spatial axes in another order.

    Raises
    ------
    ValueError
        A missing or out-of-range index.
    """
    shape = tuple(int(n) for n in data.shape)
    index: list[Any] = []
    kept = ""
    for position, letter in enumerate(axes):
        if letter in SPATIAL:
            index.append(slice(None))
            kept += letter
            continue
        if position not in picks:
            raise ValueError(f"choose an index along the {AXIS_NAMES.get(letter, letter)} axis (axis {position})")
        value = int(picks[position])
        if not 0 <= value < shape[position]:
            raise ValueError(
                f"index {value} is out of range for the {AXIS_NAMES[letter]} axis (axis {position}) of size "
                f"{shape[position]}"
            )
        index.append(value)
    volume = data[tuple(index)]
    order = [kept.index(a) for a in SPATIAL]
    return volume if order == [0, 1, 2] else volume.transpose(order)


def volume_problem(shape_zyx: Sequence[int], axes: LayerAxes, name: str, min_planes: int) -> str | None:
    """Why a picked (z, y, x) block cannot be fitted as a volume, naming the axes to check; ``None`` if it can.

    ``min_planes`` is the fewest entries along an axis that the side views need
    (the SSIM window when the SSIM term is on, else 2).
    """
    small = [(letter, int(n)) for letter, n in zip(SPATIAL, shape_zyx) if int(n) < min_planes]
    if not small:
        return None
    sizes = " x ".join(str(int(n)) for n in shape_zyx)
    which = ", ".join(f"{n} along {letter.lower()}" for letter, n in small)
    need = (
        f"the views across it need at least {min_planes} for the SSIM window at this resolution (set λ SSIM to 0 "
        "to fit it anyway)"
        if min_planes > 2
        else "a volume needs at least 2"
    )
    hint = (
        "The axes were guessed: type the layer's axes (an ImageJ hyperstack is usually ZCYX or TZCYX)."
        if axes.guessed
        else f"Check the axes ({axes.axes}, from {axes.source})."
    )
    return f"{name!r} as axes {axes.axes} gives a {sizes} (z, y, x) volume with only {which}; {need}. {hint}"


def planes_needed(resolution: Any, ssim: bool) -> int:
    """Fewest entries along an axis for the views across it to hold the SSIM window at ``resolution`` (see
    :func:`..views.output_shape`): 2 without the SSIM term, or when every view has a fixed H x W."""
    from ..losses import SSIM_WINDOW
    from ..views import output_shape

    if not ssim or isinstance(resolution, (tuple, list)):
        return 2
    planes = 2
    while output_shape((planes, 1), resolution)[0] < SSIM_WINDOW:
        planes += 1
    return planes


def world_to_index(world: float, scale: float, translate: float, size: int) -> int:
    """The data index nearest to world coordinate ``world`` along an axis of ``size`` entries (clipped)."""
    index = round((float(world) - float(translate)) / float(scale)) if scale else 0
    return int(min(max(index, 0), max(int(size) - 1, 0)))
