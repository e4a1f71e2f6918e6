"""Reader contribution: NeuRoGS-family checkpoints (``*.pt``, ``*.pth``) as a Points layer.

Each Gaussian becomes a point at its mean in (z, y, x) voxel units with
``scale`` = voxel spacing, sized by its scale and coloured by its amplitude
(see :func:`._layers.model_to_points`).  The exact field volume is not made
here, since voxelising a large model takes a while; the *Model field volume*
widget adds it on request, or call :func:`read_checkpoint` with ``field=True``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from ..io.checkpoint import Checkpoint, load_checkpoint
from ._layers import LayerDataTuple, field_image, model_to_points

LOGGER = logging.getLogger(__name__)
SUFFIXES = (".pt", ".pth")

PathLike = str | os.PathLike
ReaderFunction = Callable[[PathLike | list[PathLike]], list[LayerDataTuple]]


def get_reader(path: PathLike | list[PathLike]) -> ReaderFunction | None:
    """The reader for ``path`` if every file is a checkpoint we can load, else ``None``.

    The files are loaded here (weights-only, so nothing but tensors is
    unpickled): napari then offers other readers for ``.pt`` files we do not
    understand instead of failing later.  Never raises.
    """
    try:
        paths = [Path(p) for p in (path if isinstance(path, (list, tuple)) else [path])]
        if not paths or any(p.suffix.lower() not in SUFFIXES or not p.is_file() for p in paths):
            return None
        loaded = [(p, load_checkpoint(p)) for p in paths]
        if any(checkpoint.model.geometry is None for _, checkpoint in loaded):
            return None
    except Exception as error:  # any unreadable file means "not ours"; napari must never see a raise here
        LOGGER.debug("napari-neurogs-mip does not read %s: %s", path, error)
        return None

    def reader(_: PathLike | list[PathLike]) -> list[LayerDataTuple]:
        return [layer for p, checkpoint in loaded for layer in checkpoint_layers(p, checkpoint)]

    return reader


def read_checkpoint(path: PathLike, field: bool = False) -> list[LayerDataTuple]:
    """Layers of one checkpoint file: the Gaussians, and the exact field volume when ``field``."""
    return checkpoint_layers(Path(path), load_checkpoint(path), field)


def checkpoint_layers(path: Path, checkpoint: Checkpoint, field: bool = False) -> list[LayerDataTuple]:
    """Layers of a loaded checkpoint (see :func:`read_checkpoint`)."""
    extra = {
        "family": checkpoint.family,
        "iteration": checkpoint.iteration,
        "geometry_source": checkpoint.geometry_source,
    }
    layers = [model_to_points(checkpoint.model, name=path.stem, source=path, extra=extra)]
    if field:
        layers.append(field_image(checkpoint.model, name=f"{path.stem} field"))
    return layers
