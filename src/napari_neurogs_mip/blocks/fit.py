"""One block's fit, as a task on a dask worker: read core + halo, fit, keep the core's Gaussians, write them.

The fit is the single-volume pipeline: :func:`.prepare.prepare_fit` on the block's
voxels (its checks, views and memory preflight) and :class:`.train.Trainer`.  Two
things differ, both so that the blocks add up to one model of the volume:

* **one normalisation for all blocks**: the targets are normalised with the
  whole volume's ``(low, high)`` (:func:`.survey.global_normalization`), and each
  view's background is its own MIP's, as in a single fit; a block's own
  percentiles would give each block its own intensity scale.  The start is
  :func:`.initial_model.init_from_volume` with the same ``(low, high)``, handed to
  ``prepare_fit`` as the initial model.
* **the start is on structure**: the initial Gaussians outside the survey's
  foreground cells are dropped (see :func:`_on_structure`).
* **only the core is kept**: the fitted means are moved to the volume's physical
  frame (block offset x spacing) and the Gaussians centred outside the core
  (:meth:`.plan.Block.owns`) are dropped; the halo was there so that those near
  the core's faces see their structure whole.

The result is written atomically as ``<block>.pt`` (a checkpoint of the kept
Gaussians: physical frame, the whole volume's geometry, so every tool reads it)
and then ``<block>.json`` (what was done, metrics, time, peak memory).  The
record is written last: a block is finished exactly when its record exists, so
a run killed at any point is taken up again by running it again.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..frames import Frame, VolumeGeometry
from ..io.atomic import atomic_path
from ..io.lazy import LazyVolume
from ..targets import Normalization
from ..train import FitConfig
from .plan import Block, in_cells

RECORD_FORMAT = "napari-neurogs-mip block"
STEP_SECONDS_PER_PIXEL = 3.3e-7
"""Seconds a training step takes per view pixel: the 56 blocks of ``benchmarks/bench_blocks.py`` (cpu backend, two
worker processes on 2 CPU cores shared with other work; 100 steps of 3 views, 104,000 pixels) took
0.034 s + 4.1e-5 s per Gaussian a step."""
STEP_SECONDS_PER_PAIR = 1.4e-5
"""Seconds a training step takes per (view, Gaussian) pair (same measurement)."""
PREPARE_SECONDS_PER_VOXEL = 6.3e-7
"""Seconds to read the region, place the start and build the targets, per voxel (same measurement)."""
GAUSSIANS_PER_CELL = 7.0
"""Gaussians a fit ends with per foreground cell (of 8^3 voxels) of its core (same measurement: 984 on average
for 143 cells), for the time estimate."""


@dataclass(frozen=True)
class BlockSettings:
    """What every block's fit does.

    Attributes
    ----------
    view_specs
        Views, made on each block's region (``xy``, ``xz``, ``yz``, ``AZ:EL``).
    downsample
        Downsampling factor of every view (``None``: native; a size in pixels would differ between blocks).
    normalization
        The rule with the whole volume's ``low`` and ``high`` (``fixed``), and whether each view's background
        is subtracted.
    rule
        The rule's name as the user gave it (``background``, ...), recorded in the blocks' metadata.
    num_gaussians
        Initial Gaussians per block (``None``: one per foreground cell of the block).
    config
        The fit's settings (``out`` is ignored: a block writes only its result).
    """

    view_specs: tuple[str, ...]
    downsample: float | None
    normalization: Normalization
    rule: str
    num_gaussians: int | None
    config: FitConfig


@dataclass(frozen=True)
class BlockTask:
    """Everything a worker needs for one block (plain values: it pickles).

    ``cells`` are the survey's foreground cells (bool) over the block's region, from cell ``first_cell`` (z, y, x)
    of the grid of ``cell_zyx`` voxels; ``None`` keeps the whole start.
    """

    source: LazyVolume
    block: Block
    settings: BlockSettings
    folder: str
    cells: np.ndarray | None = None
    first_cell: tuple[int, int, int] = (0, 0, 0)
    cell_zyx: tuple[int, int, int] = (1, 1, 1)


def record_path(folder: str | Path, block: Block) -> Path:
    """The block's record (its completion marker)."""
    return Path(folder) / f"{block.name}.json"


def checkpoint_path(folder: str | Path, block: Block) -> Path:
    """The block's checkpoint of kept Gaussians."""
    return Path(folder) / f"{block.name}.pt"


def read_record(folder: str | Path, block: Block) -> dict[str, Any] | None:
    """The record of a finished block, or ``None`` (not finished, or a record that does not match the block or
    whose checkpoint is missing: the block is fitted again)."""
    try:
        record = json.loads(record_path(folder, block).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    fits = (
        isinstance(record, dict) and record.get("format") == RECORD_FORMAT and record.get("name") == block.name
        and [list(r) for r in block.core] == record.get("core") and [list(r) for r in block.region] == record.get("region")
    )  # fmt: skip
    if not fits:
        return None
    if record.get("checkpoint") and not (Path(folder) / record["checkpoint"]).is_file():
        return None
    return record


def fit_block(task: BlockTask) -> dict[str, Any]:
    """Fit one block and write its result (runs on a worker); returns the record.

    A block that is already finished (its record exists) is not fitted again: dask may run a task twice when
    a worker dies.

    Raises
    ------
    ValueError, .train.TrainingError
        The fit cannot be made (the message names the block and the file).
    """
    import torch

    from ..initial_model import init_from_volume
    from ..prepare import FitInputs, prepare_fit
    from ..train import DEFAULT_BUDGET, FinishedEvent, Trainer

    block, settings = task.block, task.settings
    done = read_record(task.folder, block)
    if done is not None:
        return done
    # The training steps run torch on one thread anyway (the cpu renderer brings its own pool); one thread for
    # the whole task keeps concurrent tasks of one process from resetting each other's setting mid-step, which
    # would change reductions' rounding, and keeps N single-threaded workers from oversubscribing N cores.
    torch.set_num_threads(1)
    started = time.perf_counter()
    volume = task.source.read(block.region_slices)
    spacing = task.source.spacing_zyx
    local = VolumeGeometry(block.region_shape, spacing)
    read_seconds = time.perf_counter() - started
    normalization = settings.normalization
    config = replace(settings.config, out=None)
    budget = config.max_gaussians or DEFAULT_BUDGET["cpu"]
    try:
        start = _on_structure(
            init_from_volume(volume, local, settings.num_gaussians, normalization.low, normalization.high, budget),
            task,
        )
    except ValueError:
        # The coarse survey saw structure here, the full resolution sees none above the volume's level.
        return _write_record(task, "empty", None, {"read": read_seconds}, {})
    try:
        prepared = prepare_fit(FitInputs(
            volume=volume, voxel_size=spacing, view_specs=list(settings.view_specs), resolution=settings.downsample,
            normalization=normalization, model=start, denoise=config.denoise, max_gaussians=config.max_gaussians,
            device=config.device, seed=config.seed,
        ))  # fmt: skip
        targets = prepared.targets  # normalised with the whole volume's range (see the module docstring)
        prepare_seconds = time.perf_counter() - started - read_seconds
        trainer = Trainer(prepared.model, targets, config)
        final = next(e for e in trainer.run() if isinstance(e, FinishedEvent))
    except ValueError as error:
        raise ValueError(f"{block.name} of {task.source.path}: {error}") from error
    fit_seconds = time.perf_counter() - started - read_seconds - prepare_seconds
    kept = _core_gaussians(trainer.current_model(Frame.PHYSICAL), block, task.source.geometry)
    seconds = {"read": read_seconds, "prepare": prepare_seconds, "fit": fit_seconds}
    counts = {"initial": prepared.model.num_gaussians, "final": final.num_gaussians,
              "kept": kept.num_gaussians if kept is not None else 0}  # fmt: skip
    extra = {"metrics": final.metrics, "iterations": final.iteration, "views": [v.name for v in targets.views],
             "gaussians": counts}  # fmt: skip
    checkpoint = None
    if kept is not None:
        checkpoint = _save_block(task, kept, targets, final.iteration, trainer.loss_history)
    return _write_record(task, "fitted", checkpoint, seconds, extra)


def _on_structure(start: Any, task: BlockTask) -> Any:
    """The initial Gaussians that lie in the survey's foreground cells (``ValueError`` when none do).

    ``init_from_volume`` finds its foreground at 4 noise sigmas: in a block of millions of voxels of noise that
    is hundreds of voxels, each given a Gaussian that 100 steps left as a faint dot all over the block (seen in
    the benchmark before this filter); the survey's level is set for the whole volume's size
    (:class:`.plan.ForegroundRule`).
    """
    import torch

    from ..model import GaussianModel

    if task.cells is None:
        return start
    offset = np.array([r[0] for r in task.block.region], dtype=np.float64)
    voxels = start.means.detach().double().numpy()[:, ::-1] / np.asarray(task.source.spacing_zyx) + offset
    keep = in_cells(voxels, task.cells, task.first_cell, task.cell_zyx)
    if not keep.any():
        raise ValueError("no initial Gaussian lies in a foreground cell")
    rows = torch.as_tensor(np.nonzero(keep)[0])
    kept = {n: t.detach()[rows] for n, t in start.tensors().items()}
    return GaussianModel(**kept, frame=start.frame, geometry=start.geometry)


def _core_gaussians(local: Any, block: Block, geometry: VolumeGeometry) -> Any:
    """The Gaussians of a block-local physical model whose centres lie in the core, in the volume's physical
    frame; ``None`` when there are none."""
    import torch

    from ..model import GaussianModel

    means = local.means.detach().double().numpy() + block.offset_xyz(geometry.spacing_zyx)
    owned = block.owns(means / geometry.spacing_xyz, geometry.shape_zyx)
    if not owned.any():
        return None
    rows = torch.as_tensor(np.nonzero(owned)[0])
    return GaussianModel(
        means=torch.as_tensor(means[owned], dtype=local.means.dtype),
        log_scales=local.log_scales.detach()[rows].clone(),
        quaternions=local.quaternions.detach()[rows].clone(),
        log_amplitudes=local.log_amplitudes.detach()[rows].clone(),
        frame=Frame.PHYSICAL,
        geometry=geometry,
    )


def _save_block(task: BlockTask, kept: Any, targets: Any, iteration: int, losses: list[float]) -> str:
    """Write the kept Gaussians as a checkpoint (atomic); returns its file name."""
    from ..io.checkpoint import save_checkpoint

    settings, block = task.settings, task.block
    config = settings.config
    extra = {
        "config": replace(config, out=None).to_dict(),
        "seed": config.seed,
        # The block's views are in its own frame: kept under "block", where no command takes them for the volume's.
        "block": {"name": block.name, "index": list(block.index), "core": [list(r) for r in block.core],
                  "region": [list(r) for r in block.region], "views": [v.to_dict() for v in targets.views]},
        "normalization": {"rule": settings.rule, "low": targets.low, "high": targets.high,
                          "view_background": settings.normalization.per_view},
        "renderer": {"backend": config.backend, "mode": config.mode, "beta": config.beta},
    }  # fmt: skip
    path = checkpoint_path(task.folder, block)
    save_checkpoint(path, kept, iteration=iteration, loss=losses[-1] if losses else None, extra=extra)
    return path.name


def _write_record(
    task: BlockTask, status: str, checkpoint: str | None, seconds: dict[str, float], extra: dict[str, Any]
) -> dict[str, Any]:
    """Write the block's record last (atomic): from now on the block counts as finished."""
    block = task.block
    record = {
        "format": RECORD_FORMAT,
        "name": block.name,
        "index": list(block.index),
        "core": [list(r) for r in block.core],
        "region": [list(r) for r in block.region],
        "status": status,
        "checkpoint": checkpoint,
        **extra,
        "seconds": {**seconds, "total": sum(seconds.values())},
        "peak_rss": peak_rss(),
        "worker": _worker_address(),
        "pid": os.getpid(),
    }
    path = record_path(task.folder, block)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    return record


def peak_rss() -> int | None:
    """The largest resident memory this process has had, bytes (``None`` where the OS does not tell)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _worker_address() -> str | None:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return None


def estimate_block(
    settings: BlockSettings,
    region_zyx: tuple[int, int, int],
    spacing_zyx: tuple[float, float, float],
    device: str,
    gaussians: int | None = None,
) -> tuple[int, float, int]:
    """Peak memory (bytes, :func:`.preflight.estimate_fit_memory`), rough seconds and pixels of one block's fit
    on a region of ``region_zyx`` voxels with about ``gaussians`` Gaussians.

    The count is ``settings.num_gaussians``, else ``gaussians``, else half the budget (an upper bound for sparse
    blocks); the seconds follow the constants above, measured on 2 shared CPU cores; the progress bar then shows
    the real rate.
    """
    from ..preflight import FitPlan, estimate_fit_memory
    from ..train import DEFAULT_BUDGET
    from ..views import make_views

    geometry = VolumeGeometry(region_zyx, spacing_zyx)
    config = settings.config
    views = make_views(list(settings.view_specs), geometry, settings.downsample)
    count = settings.num_gaussians or gaussians or max(1, (config.max_gaussians or DEFAULT_BUDGET["cpu"]) // 2)
    plan = FitPlan(views, geometry, count, max_gaussians=config.max_gaussians, densify=config.densify,
                   volume_dtype=np.dtype(np.float32), denoise=config.denoise > 0, init="foreground")  # fmt: skip
    memory = estimate_fit_memory(plan, device).total
    pixels = sum(v.height * v.width for v in views)
    return memory, block_seconds(config.iterations, len(views), pixels, math.prod(region_zyx), count), pixels


def block_seconds(iterations: int, views: int, pixels: int, voxels: int, gaussians: int) -> float:
    """Rough seconds of one block's fit (the constants above): preparing ``voxels``, then ``iterations`` steps of
    ``views`` views of ``pixels`` pixels in all with ``gaussians`` Gaussians."""
    step = STEP_SECONDS_PER_PIXEL * pixels + STEP_SECONDS_PER_PAIR * gaussians * views
    return PREPARE_SECONDS_PER_VOXEL * voxels + iterations * step
