"""``fit_blocks``: fit a volume larger than memory block by block on a dask cluster, then merge the blocks.

The stages, each restartable (run the same call or command again after a crash
or preemption: what is finished is read back, not redone):

1. **survey** (:mod:`.survey`): one streaming pass over the volume for its axis
   MIPs (the shared normalisation, the targets of the merged model) and a coarse
   map of the structure.
2. **plan** (:mod:`.plan`): cores and halos; cores without structure are
   skipped; the plan is printed with the memory and time of a block.  A later
   run in the same folder must fit the same thing (:mod:`.folder`).
3. **blocks** (:mod:`.fit`): one task per block still to fit, on the cluster
   (:mod:`.engine`).  A failed block does not stop the others; the run then ends
   with :class:`BlockFitError` naming it, and the next run fits only what is left.
4. **merge** (:mod:`.merge`, :mod:`.mips`): the whole volume's model, its MIPs
   and the volume's own axis MIPs.

The run folder is locked while a run uses it (:func:`.io.run_folder.claim_run_folder`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..frames import VolumeGeometry
from ..initial_model import FOREGROUND_FLOOR
from ..io.lazy import LazyVolume, open_volume
from ..io.run_folder import FINAL_NAME, claim_run_folder, stale_temp_files
from ..targets import Normalization
from ..train import FitConfig
from ..views import View
from . import folder as run_folder
from .engine import ClusterSpec, open_client, run_tasks, worker_memory_limits
from .fit import (
    GAUSSIANS_PER_CELL,
    BlockSettings,
    BlockTask,
    block_seconds,
    estimate_block,
    fit_block,
    read_record,
)
from .plan import (
    DEFAULT_BLOCK,
    DEFAULT_HALO,
    Block,
    ForegroundRule,
    as_zyx,
    cell_slices,
    default_block,
    describe_grid,
    foreground_blocks,
    halo_voxels,
    plan_blocks,
)
from .survey import DEFAULT_CELL, Survey, cell_voxels, global_normalization


class BlockFitError(RuntimeError):
    """Some blocks failed; the finished ones are kept, and running the same command again fits the rest."""


@dataclass
class BlockFitResult:
    """What a run did.

    Attributes
    ----------
    out
        The run folder.
    checkpoint
        The merged model.
    mips, target_mips
        The merged model's MIP files and the volume's own axis MIPs.
    blocks
        Every block of the plan.
    fitted, done_before, empty
        Block names fitted by this run, finished by an earlier one, and skipped for want of structure.
    records
        Every finished block's record, by name.
    views
        The views of the merged model, made on the whole volume (what ``mips/`` holds).
    low, high
        The shared normalisation (raw intensities mapped to 0 and 1).
    seconds
        Wall time of the run.
    """

    out: Path
    checkpoint: Path
    mips: list[Path] = field(default_factory=list)
    target_mips: list[Path] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    fitted: list[str] = field(default_factory=list)
    done_before: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    views: list[View] = field(default_factory=list)
    low: float = 0.0
    high: float = 1.0
    seconds: float = 0.0

    def summary(self) -> str:
        """One line: blocks fitted now, before and skipped, the time and the merged model."""
        return (
            f"{len(self.fitted)} blocks fitted now, {len(self.done_before)} before, {len(self.empty)} skipped "
            f"(no structure) in {self.seconds:.1f} s; merged model: {self.checkpoint}"
        )


@dataclass
class _Run:
    """One run's state between its stages."""

    source: LazyVolume
    folder: Path
    settings: BlockSettings
    survey: Survey
    block_zyx: tuple[int, int, int]
    halo_zyx: tuple[int, int, int]
    cell_zyx: tuple[int, int, int]
    pending: list[Block]
    result: BlockFitResult
    cells: np.ndarray
    """The survey's foreground cells (bool, the whole grid)."""
    structure: dict[str, int]
    """Foreground cells per block's core, by name."""


def fit_blocks(
    target: str | Path | LazyVolume,
    out: str | Path,
    *,
    level: int = 0,
    channel: int | None = None,
    time_point: int | None = None,
    voxel_size: tuple[float, float, float] | None = None,
    block: int | Sequence[int] | None = None,
    halo: float = DEFAULT_HALO,
    cell: float = DEFAULT_CELL,
    view_specs: Sequence[str] | None = None,
    downsample: float | None = None,
    normalize: str = "background",
    num_gaussians: int | None = None,
    config: FitConfig | None = None,
    cluster: ClusterSpec | Any | None = None,
    overwrite: bool = False,
    on_survey: Callable[[int, int], None] | None = None,
    on_plan: Callable[[BlockFitResult, list[Block]], None] | None = None,
    on_block: Callable[[dict[str, Any], int, int], None] | None = None,
    log: Callable[[str], None] = print,
) -> BlockFitResult:
    """Fit ``target`` block by block and merge the blocks into one model of the whole volume.

    Parameters
    ----------
    target
        OME-Zarr folder or TIFF file (read lazily, :func:`.io.lazy.open_volume`), or a :class:`LazyVolume`.
    out
        The run folder (created; a folder of an earlier run with the same settings is taken up again).
    level, channel, time_point, voxel_size
        Which data: multiscale level, channel and time indices, and a (z, y, x) spacing in micrometres that
        replaces the file's.
    block
        Largest core edge in voxels, one value or (z, y, x); default: :data:`.plan.DEFAULT_BLOCK`, smaller when a
        block's estimated memory does not fit a worker's limit (a later run keeps the first run's).
    halo
        Voxels (finest spacings) read around each core.
    cell
        Edge of the survey's cells, finest spacings: the resolution of the skip decision.
    view_specs, downsample, normalize, num_gaussians
        As for ``neurogs-mip fit`` (``--views``, ``--downsample``, ``--normalize``, ``--num_gaussians``), per block;
        default views: :data:`.prepare.VOLUME_VIEWS`.
    config
        The fit's settings for every block (iterations, rates, device, ...).
    cluster
        A :class:`ClusterSpec` (default: a LocalCluster of this machine), or a running dask ``Client`` or cluster
        (e.g. :func:`.engine.slurm_cluster`'s), used as it is.
    overwrite
        Delete an earlier run's results in ``out`` instead of taking it up again or refusing it.
    on_survey, on_plan, on_block
        Progress callbacks: ``on_survey(done, total)`` per chunk of the survey; ``on_plan(result, pending)`` once
        the plan is made (``result`` holds the blocks, those finished before with their records, those skipped and
        the views; ``pending`` the blocks this run fits); ``on_block(record, done, total)`` per block finished in
        this run.  An exception raised there stops the run (finished blocks are kept).
    log
        Where messages go.

    Raises
    ------
    ValueError, FileNotFoundError
        Bad input or settings (the message names the file or the option); :class:`.io.run_folder.RunFolderError`
        when ``out`` holds another run.
    BlockFitError
        Blocks failed; the others are saved.
    """
    from ..prepare import VOLUME_VIEWS
    from ..views import make_views

    started = time.perf_counter()
    if downsample is not None and not isinstance(downsample, (int, float)):
        raise ValueError(
            "--resolution H W gives every view one size, but blocks differ in size: use --downsample FACTOR"
        )
    source = target if isinstance(target, LazyVolume) else open_volume(target, level, channel, time_point, voxel_size)
    config = config or FitConfig()
    config.validate()
    specs = tuple(view_specs or VOLUME_VIEWS)
    views = make_views(list(specs), source.geometry, downsample)  # checks the views before anything is read
    # The normalisation is the whole volume's, known after the survey (_plan sets it).
    settings = BlockSettings(specs, downsample, Normalization(), normalize, num_gaussians, replace(config, out=None))
    spacing = source.spacing_zyx
    out = Path(out)
    log(f"volume: {source.describe()}")
    with _torch_threads_kept(), _claim(out, overwrite, log):
        with _client(cluster, log) as client:
            run = _plan(out, source, client, block, halo_voxels(halo, spacing), cell_voxels(cell, spacing), settings,
                        on_survey, log)  # fmt: skip
            run.result.views = views
            if on_plan is not None:
                on_plan(run.result, list(run.pending))
            _fit_pending(client, run, on_block)
        _merge_and_write(run, views, log)
    run.result.seconds = time.perf_counter() - started
    return run.result


@contextlib.contextmanager
def _torch_threads_kept() -> Iterator[None]:
    """Restore torch's thread count at the end: block tasks run as threads of this process set it to 1."""
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _claim(out: Path, overwrite: bool, log: Callable[[str], None]) -> Iterator[None]:
    """Lock ``out`` for this run: an earlier block run's merged model is this run's to replace, another fit's is
    refused unless ``overwrite`` (which also clears the earlier blocks)."""
    final = out / FINAL_NAME
    ours = run_folder.read_plan(out) is not None and final.is_file() and not overwrite
    with claim_run_folder(out, overwrite=overwrite, resume_from=str(final) if ours else None) as notes:
        for note in notes:
            log(note)
        if overwrite:
            run_folder.clear(out)
        blocks = out / run_folder.BLOCKS_DIR
        blocks.mkdir(exist_ok=True)
        for stale in stale_temp_files(blocks):  # from a killed run: only the lock holder writes here
            stale.unlink(missing_ok=True)
        yield


def _plan(
    out: Path, source: LazyVolume, client: Any, block: int | Sequence[int] | None, halo_zyx: tuple[int, int, int],
    cell_zyx: tuple[int, int, int], settings: BlockSettings, on_survey: Callable[[int, int], None] | None,
    log: Callable[[str], None],
) -> _Run:  # fmt: skip
    """The survey, the shared normalisation, the blocks and which of them are left to fit (and print it)."""
    geometry = source.geometry
    previous = run_folder.read_plan(out)
    if block is not None:
        block_zyx = as_zyx(block, "--block")
    elif previous is not None:
        block_zyx = tuple(previous["block"])  # a later run without --block keeps the run's
    else:
        block_zyx = _block_from_memory(client, settings, halo_zyx, geometry)
    key = run_folder.run_key(source, block_zyx, halo_zyx, cell_zyx, settings.view_specs, settings.downsample,
                             settings.rule, settings.num_gaussians, settings.config)  # fmt: skip
    run_folder.check_same_run(out, previous, key)
    if previous is None:
        run_folder.write_plan(out, key)
    survey = run_folder.survey_of(out, source, cell_zyx, client, on_survey or (lambda done, total: None), log,
                                  settings.config.denoise)  # fmt: skip
    normalization, low, high = global_normalization(survey, settings.rule)
    fixed = Normalization("fixed", low=low, high=high, view_background=normalization.per_view)
    settings = replace(settings, normalization=fixed)
    rule = ForegroundRule.from_cells(survey.cell_sample, high, math.prod(geometry.shape_zyx))
    cells = survey.cell_top > rule.level
    blocks = plan_blocks(geometry.shape_zyx, block_zyx, halo_zyx)
    structured = foreground_blocks(blocks, cells, cell_zyx)  # foreground cells per core
    folder = (out / run_folder.BLOCKS_DIR).resolve()  # absolute: workers may run elsewhere
    records = {b.name: r for b, s in zip(blocks, structured) if s and (r := read_record(folder, b)) is not None}
    result = BlockFitResult(
        out, out / FINAL_NAME, blocks=blocks, done_before=sorted(records), records=records, low=low, high=high,
        empty=[b.name for b, s in zip(blocks, structured) if not s],
    )  # fmt: skip
    pending = [b for b, s in zip(blocks, structured) if s and b.name not in records]
    run = _Run(source, folder, settings, survey, block_zyx, halo_zyx, cell_zyx, pending, result, cells,
               dict(zip([b.name for b in blocks], structured)))  # type: ignore[arg-type]  # fmt: skip
    _log_plan(run, rule, cells, client, log)
    return run


def _fit_pending(client: Any, run: _Run, on_block: Callable[[dict[str, Any], int, int], None] | None) -> None:
    """Fit the blocks left, one task each; raise :class:`BlockFitError` naming those that failed."""
    result = run.result
    tasks = []
    for b in run.pending:
        where = cell_slices(b.region, run.cell_zyx)
        first = tuple(s.start for s in where)
        tasks.append((BlockTask(run.source, b, run.settings, str(run.folder), run.cells[where], first, run.cell_zyx),))

    def finished(record: dict[str, Any]) -> None:
        result.records[record["name"]] = record
        result.fitted.append(record["name"])
        if on_block is not None:
            on_block(record, len(result.fitted), len(tasks))

    failed = run_tasks(client, fit_block, tasks, finished, [b.name for b in run.pending], keep_going=True)
    if failed:
        lines = "; ".join(f"{run.pending[i].name}: {type(e).__name__}: {e}" for i, e in sorted(failed.items()))
        killed = any(type(e).__name__ == "KilledWorker" for e in failed.values())
        hint = " (workers died fitting them: lower --block or raise --memory-limit)" if killed else ""
        raise BlockFitError(
            f"{len(failed)} of {len(tasks)} blocks failed{hint} ({lines}); the {len(result.records)} finished blocks "
            f"are kept in {run.folder}: run the same command again to fit the rest"
        )


def _client(cluster: Any, log: Callable[[str], None]) -> Any:
    """A context manager yielding a client: started from a :class:`ClusterSpec`, or the given client/cluster."""
    if cluster is None or isinstance(cluster, ClusterSpec):
        return open_client(cluster or ClusterSpec(), log)
    if hasattr(cluster, "submit"):
        return contextlib.nullcontext(cluster)
    from dask.distributed import Client

    @contextlib.contextmanager
    def connected() -> Iterator[Any]:
        client = Client(cluster)
        log(f"dask: {type(cluster).__name__} at {cluster.scheduler_address}; dashboard {client.dashboard_link}")
        try:
            yield client
        finally:
            client.close()

    return connected()


def _block_from_memory(
    client: Any, settings: BlockSettings, halo_zyx: tuple[int, int, int], geometry: VolumeGeometry
) -> tuple[int, int, int]:
    """The core edge whose estimated fit fits the smallest worker memory limit (:func:`.plan.default_block`), at
    most :data:`.plan.DEFAULT_BLOCK`."""
    limits = [n for n in worker_memory_limits(client) if n]

    def estimate(edge: int) -> float:
        region = tuple(min(n, edge + 2 * h) for n, h in zip(geometry.shape_zyx, halo_zyx))
        return estimate_block(settings, region, geometry.spacing_zyx, settings.config.device)[0]  # type: ignore[arg-type]

    edge = default_block(min(limits) if limits else None, estimate)
    return (min(edge, DEFAULT_BLOCK),) * 3  # type: ignore[return-value]


def _log_plan(run: _Run, rule: ForegroundRule, cells: np.ndarray, client: Any, log: Callable[[str], None]) -> None:
    """Print the plan: normalisation, foreground, grid, blocks to fit, and a block's memory and time."""
    result, settings, geometry = run.result, run.settings, run.source.geometry
    log(f"normalisation of the whole volume ({settings.rule}): [{result.low:.6g}, {result.high:.6g}] -> [0, 1]")
    log(f"foreground: cells above {rule.level:.6g} (background {rule.background:.6g} + the larger of {rule.sigmas:.1f} "
        f"x noise {rule.noise:.3g} and {FOREGROUND_FLOOR:.0%} of the range): {np.count_nonzero(cells)} of "
        f"{cells.size} cells")  # fmt: skip
    shape = " x ".join(map(str, run.block_zyx))
    log(f"plan: {describe_grid(geometry, result.blocks)}; cores of at most {shape} voxels, halo "
        f"{' x '.join(map(str, run.halo_zyx))}")  # fmt: skip
    log(f"blocks: {len(result.blocks)}; with structure {len(result.blocks) - len(result.empty)}, skipped empty "
        f"{len(result.empty)}; finished before {len(result.done_before)}; to fit now {len(run.pending)}")  # fmt: skip
    if not run.pending:
        return
    largest = max(run.pending, key=lambda b: (run.structure[b.name], math.prod(b.region_shape)))
    gaussians = max(1, round(GAUSSIANS_PER_CELL * run.structure[largest.name]))
    memory, seconds, pixels = estimate_block(settings, largest.region_shape, geometry.spacing_zyx,
                                             settings.config.device, gaussians)  # fmt: skip
    limits = [n for n in worker_memory_limits(client) if n]
    limit = f"; worker limit {min(limits) / (1 << 30):.2f} GiB" if limits else ""
    slots = max(1, sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values()))
    views = len(settings.view_specs)
    total = sum(
        block_seconds(settings.config.iterations, views, pixels, math.prod(b.region_shape),
                      max(1, round(GAUSSIANS_PER_CELL * run.structure[b.name])))
        for b in run.pending
    )  # fmt: skip
    log(f"per block (the most structure: {run.structure[largest.name]} cells, about {gaussians:,} Gaussians; "
        f"region {' x '.join(map(str, largest.region_shape))} voxels, {pixels:,} view pixels): "
        f"about {memory / (1 << 30):.2f} GiB at peak (preflight estimate{limit}), about {seconds:.0f} s "
        f"(rough); {len(run.pending)} blocks on {slots} task slots: about {total / slots / 60:.1f} min")  # fmt: skip
    if limits and memory > min(limits):
        log(f"warning: the estimate exceeds the worker memory limit; if workers are killed, lower --block "
            f"(now {shape}) or raise --memory-limit")  # fmt: skip


def _merge_and_write(run: _Run, views: list[View], log: Callable[[str], None]) -> None:
    """Merge the finished blocks, write the model, its MIPs and the volume's axis MIPs."""
    from .merge import merge_blocks, save_merged
    from .mips import axis_views, model_renderer, write_images, write_model_mips

    result, settings, source = run.result, run.settings, run.source
    geometry = source.geometry
    model = merge_blocks(run.folder, result.blocks, result.records, geometry)
    if model is None:
        raise ValueError(
            f"{source.path}: no block kept a Gaussian (every block is empty or was fitted to nothing); check the "
            "data, or lower --foreground-cell"
        )
    fixed = settings.normalization
    # Each axis view's own background, as a fit of the whole volume would subtract it (native views only: the
    # survey's MIPs are native).
    view_lows = (
        {n: fixed.view_low(m, fixed.low, fixed.high) for n, m in run.survey.targets.items()}
        if settings.downsample is None else {}
    )  # fmt: skip
    fitted = [r for r in result.records.values() if r.get("status") == "fitted"]
    summary = {
        "source": str(source.path), "level": source.level, "block": list(run.block_zyx), "halo": list(run.halo_zyx),
        "cell": list(run.cell_zyx), "blocks": len(result.blocks), "fitted": len(fitted), "empty": len(result.empty),
        "gaussians": model.num_gaussians,
    }  # fmt: skip
    save_merged(result.checkpoint, model, settings, views, view_lows, summary)
    log(f"merged {len(fitted)} blocks: {model.num_gaussians:,} Gaussians in {result.checkpoint}")
    result.mips = write_model_mips(model, views, result.out / run_folder.MIPS_DIR, model_renderer(settings.config))
    target_dir = result.out / run_folder.TARGET_MIPS_DIR
    result.target_mips = write_images(run.survey.targets, axis_views(geometry), target_dir)
    log(f"MIPs of the model: {', '.join(str(p) for p in result.mips)}")
    how = f"denoised along its structures over {run.survey.denoise:g} voxels" if run.survey.denoise > 0 else "raw"
    log(f"axis MIPs of the volume ({how}): {', '.join(str(p) for p in result.target_mips)}")
