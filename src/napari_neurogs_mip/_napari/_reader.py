"""Reader contribution: NeuRoGS-family checkpoints (``*.pt``, ``*.pth``) as Points layers.

Each Gaussian becomes a point at its mean in (z, y, x) voxel units with
``scale`` = voxel spacing, sized by its scale and coloured by its amplitude
(see :func:`._layers.model_to_points`), plus a 2D layer of the same Gaussians
seen from above (:func:`._layers.xy_projection`): napari 0.9 shows a 3D Points
layer one thin z slice at a time in a 2D view, which shows few of them.  The
exact field volume is not made here, since voxelising a large model takes a
while; the *Model field volume* widget adds it on request.

napari has no other reader for these files, so a file we cannot read gets a
reader that raises the specific reason (napari shows it as the plugin's
"original error") rather than ``None`` (napari's generic "refused the file").
napari 0.9's ``Viewer.open`` reads with its builtin reader unless told
otherwise: open checkpoints with ``viewer.open(path, plugin=None)`` or
``plugin="napari-neurogs-mip"``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from ..io.checkpoint import Checkpoint, load_checkpoint
from ._layers import LayerDataTuple, field_image, model_to_points, xy_projection

LOGGER = logging.getLogger(__name__)
SUFFIXES = (".pt", ".pth")

PathLike = str | os.PathLike
ReaderFunction = Callable[..., list[LayerDataTuple]]


class CheckpointReadError(ValueError):
    """A ``.pt``/``.pth`` file that is not a Gaussian model this plugin can place (the message says why)."""


def get_reader(path: PathLike | list[PathLike]) -> ReaderFunction | None:
    """The reader for ``path``: ``None`` for other suffixes, missing files and folders; never raises.

    The files are loaded here (weights-only, so nothing but tensors is
    unpickled); a file that does not load gets a reader that raises
    :class:`CheckpointReadError` with the reason.
    """
    paths = [Path(p) for p in (path if isinstance(path, (list, tuple)) else [path])]
    if not paths or any(p.suffix.lower() not in SUFFIXES or not p.is_file() for p in paths):
        return None
    loaded: list[tuple[Path, Checkpoint]] = []
    for p in paths:
        try:
            loaded.append((p, _load(p)))
        except Exception as error:  # the reason goes to the user when napari calls the reader
            LOGGER.debug("napari-neurogs-mip cannot read %s: %s", p, error)
            return _refusal(error if isinstance(error, CheckpointReadError) else _reason(p, error))

    def reader(*_: object, **__: object) -> list[LayerDataTuple]:
        return [layer for p, checkpoint in loaded for layer in checkpoint_layers(p, checkpoint)]

    return reader


def _load(path: Path) -> Checkpoint:
    checkpoint = load_checkpoint(path)
    if checkpoint.model.geometry is None:
        raise CheckpointReadError(
            f"{path.name}: a {checkpoint.family} checkpoint of {checkpoint.model.num_gaussians} Gaussians, but the "
            "volume they belong to is unknown (no shape or spacing stored), so they cannot be placed in napari; "
            "fit or render it with a target (neurogs-mip fit --checkpoint ... --target ...)"
        )
    return checkpoint


def _reason(path: Path, error: Exception) -> CheckpointReadError:
    return CheckpointReadError(f"{path.name} is not a NeuRoGS-family Gaussian checkpoint: {error}")


def _refusal(error: CheckpointReadError) -> ReaderFunction:
    def refuse(*_: object, **__: object) -> list[LayerDataTuple]:
        raise error

    return refuse


def read_checkpoint(path: PathLike, field: bool = False) -> list[LayerDataTuple]:
    """Layers of one checkpoint file: the Gaussians, their xy projection, and the field volume when ``field``."""
    return checkpoint_layers(Path(path), load_checkpoint(path), field)


def checkpoint_layers(path: Path, checkpoint: Checkpoint, field: bool = False) -> list[LayerDataTuple]:
    """Layers of a loaded checkpoint (see :func:`read_checkpoint`)."""
    extra = {
        "family": checkpoint.family,
        "iteration": checkpoint.iteration,
        "geometry_source": checkpoint.geometry_source,
    }
    points = model_to_points(checkpoint.model, name=path.stem, source=path, extra=extra)
    layers = [points, xy_projection(points)]
    if field:
        layers.append(field_image(checkpoint.model, name=f"{path.stem} field"))
    return layers
