"""Merge: the blocks' kept Gaussians, concatenated into one checkpoint of the whole volume.

Each block kept only the Gaussians centred in its core, in the volume's
physical frame (:mod:`.fit`), so the merge is a concatenation in plan order.  The
merged file is an ordinary checkpoint of this package: the NeuRoGS frame of the
whole volume (as every fit here stores its model), the volume's geometry, the
views the blocks were fitted with (made on the whole volume), the shared
normalisation and the render settings; so ``neurogs-mip info``, ``render`` and
``eval``, the napari reader and a further fit (``--checkpoint``) all take it.  It
carries no optimiser state (Adam's moments of different blocks do not add up),
so a fit from it starts a new optimisation from the merged Gaussians.

Rendering: the hard MIP of a union of Gaussians is the pixel-wise maximum of the
MIPs of its parts, so disjoint cores merge exactly in ``max`` mode; near a
core's faces the merged model holds the neighbour's Gaussians instead of this
block's halo Gaussians (the seams), and the soft MIP mixes the Gaussians that
overlap a pixel from both sides.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..frames import Frame, VolumeGeometry
from ..io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..model import PARAMETER_NAMES, GaussianModel
from ..views import View
from .fit import BlockSettings
from .plan import Block


def merge_blocks(
    folder: Path, blocks: Sequence[Block], records: dict[str, dict[str, Any]], geometry: VolumeGeometry
) -> GaussianModel | None:
    """The kept Gaussians of every finished block, in plan order, as one model (physical frame of ``geometry``);
    ``None`` when no block kept any.

    Raises
    ------
    CheckpointError
        A block's checkpoint is unreadable or belongs to another volume (the message names the file).
    """
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in PARAMETER_NAMES}
    for block in blocks:
        record = records.get(block.name)
        if not record or not record.get("checkpoint"):
            continue
        path = folder / record["checkpoint"]
        model = load_checkpoint(path).model
        if model.frame is not Frame.PHYSICAL or model.geometry != geometry:
            raise CheckpointError(
                f"{path} holds Gaussians of {model.geometry} ({model.frame.value} frame), not of the volume "
                f"{geometry}; remove the run's blocks (--overwrite) to fit them again"
            )
        for name, tensor in model.tensors().items():
            parts[name].append(tensor)
    if not parts["means"]:
        return None
    return GaussianModel(**{n: torch.cat(t) for n, t in parts.items()}, frame=Frame.PHYSICAL, geometry=geometry)


def save_merged(
    path: Path,
    model: GaussianModel,
    settings: BlockSettings,
    views: Sequence[View],
    view_lows: dict[str, float],
    summary: dict[str, Any],
) -> Path:
    """Write the merged model (NeuRoGS frame of the volume) with the metadata the commands read (atomic).

    Parameters
    ----------
    views
        The blocks' views made on the whole volume (what ``eval`` scores by default).
    view_lows
        Per view name, the raw intensity the volume's own MIP maps to 0 (the axis views, from the survey).
    summary
        Plain-typed facts about the run (blocks, skipped, time), stored under ``blocks``.
    """
    config = settings.config
    normalization = settings.normalization
    extra = {
        "config": {**config.to_dict(), "out": None},
        "seed": config.seed,
        "views": [v.to_dict() for v in views],
        "eval_views": [],
        "normalization": {
            "rule": settings.rule,
            "low": normalization.low,
            "high": normalization.high,
            "view_background": normalization.per_view,
            "view_lows": view_lows,
        },
        "renderer": {"backend": config.backend, "mode": config.mode, "beta": config.beta},
        "blocks": summary,
    }
    stored = model.to_frame(Frame.NEUROGS)
    return save_checkpoint(path, stored, iteration=config.iterations, extra=extra)


def block_models(folder: Path, records: dict[str, dict[str, Any]]) -> dict[str, GaussianModel]:
    """Each finished block's kept Gaussians (physical frame of the volume), by block name."""
    return {
        name: load_checkpoint(folder / record["checkpoint"]).model
        for name, record in records.items()
        if record.get("checkpoint")
    }


def pooled_psnr(records: Sequence[dict[str, Any]], view: str) -> float | None:
    """The blocks' own PSNR on ``view`` (each against its own targets, halo included), pooled: the PSNR of their
    mean squared errors averaged, one image per block; ``None`` when no block scored the view."""
    errors = [10 ** (-r["metrics"][view]["psnr"] / 10) for r in records if view in r.get("metrics", {})]
    return float(-10 * np.log10(np.mean(errors))) if errors else None
