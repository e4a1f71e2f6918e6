"""``neurogs-mip fit-blocks``: the command line of :func:`.run.fit_blocks`.

``cli.py`` adds the command with :func:`add_fit_blocks_parser` and runs it with
:func:`run_fit_blocks`.  The fit's settings are the flags of ``neurogs-mip fit``
(built from :class:`.train.FitConfig` by ``cli._add_config_flags``), applied to
every block; the views, ``--downsample``, ``--voxel-size``, ``--channel`` and
``--time`` are ``fit``'s too.  Exit status: 0 done, 2 bad input (the message
names the flag or file), 1 blocks failed (the finished ones are kept: run the
same command again).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_fit_blocks_parser(subparsers: Any, formatter_class: type[argparse.HelpFormatter]) -> argparse.ArgumentParser:
    """Add the ``fit-blocks`` command to ``subparsers`` (of ``neurogs-mip``'s parser) and return its parser."""
    from .. import cli
    from .plan import DEFAULT_HALO
    from .survey import DEFAULT_CELL

    spell = cli._spellings
    parser = subparsers.add_parser(
        "fit-blocks", formatter_class=formatter_class,
        help="fit a volume larger than memory block by block (dask), merged into one model",
        description="Fit an OME-Zarr or TIFF volume block by block on a dask cluster and merge the blocks into one "
        "model of the whole volume. Running the same command again takes an interrupted run up where it stopped.",
    )  # fmt: skip
    parser.add_argument(*spell("--config"), help="YAML file of settings (keys = flag names with underscores), "
                        "checked like the flags; flags on the command line win")  # fmt: skip
    source = parser.add_argument_group("volume")
    source.add_argument(*spell("--target"), help="OME-Zarr folder or TIFF file (read lazily); required")
    source.add_argument(*spell("--level"), type=cli._non_negative_int, default=0,
                        help="multiscale level of an OME-Zarr or pyramidal TIFF (0 = full resolution)")  # fmt: skip
    cli._add_selection_flags(source)
    blocks = parser.add_argument_group("blocks")
    blocks.add_argument(
        *spell("--block"), type=cli._positive_int, nargs="+", metavar="N",
        help="largest core edge in voxels: one value, or Z Y X (default: 256, smaller if a worker's memory needs; "
        "a re-run keeps the run's)",
    )  # fmt: skip
    blocks.add_argument(*spell("--halo"), type=cli._non_negative_int, default=DEFAULT_HALO,
                        help="voxels (finest spacings) read around each core: a few times the largest Gaussian")  # fmt: skip
    blocks.add_argument(*spell("--foreground-cell"), type=cli._positive_int, default=DEFAULT_CELL,
                        help="cell edge (finest spacings) of the survey that skips blocks without structure")  # fmt: skip
    blocks.add_argument(*spell("--num_gaussians"), type=cli._positive_int,
                        help="initial Gaussians per block (default: one per foreground cell of the block)")  # fmt: skip
    blocks.add_argument(*spell("--normalize"), default="background", choices=["background", "minmax", "percentile"],
                        help="how intensities map to [0, 1] (one rule for the whole volume)")  # fmt: skip
    cli._add_geometry_flags(parser.add_argument_group("views (made on each block)"))
    engine = parser.add_argument_group("dask cluster")
    engine.add_argument(*spell("--scheduler"), help="address of a running dask scheduler (e.g. tcp://host:8786); "
                        "default: a local cluster")  # fmt: skip
    engine.add_argument(*spell("--workers"), type=cli._positive_int,
                        help="local worker processes (default: one per CPU)")  # fmt: skip
    engine.add_argument(*spell("--threads-per-worker"), type=cli._positive_int, default=1,
                        help="blocks a worker fits at once")  # fmt: skip
    engine.add_argument(*spell("--memory-limit"), type=_memory,
                        help="memory of each local worker process, e.g. 2GB (default: the machine's, shared out)")  # fmt: skip
    engine.add_argument(*spell("--processes"), action=argparse.BooleanOptionalAction, default=True,
                        help="local workers as processes (--no-processes: threads of this process, no memory "
                        "limit)")  # fmt: skip
    cli._add_config_flags(parser)
    parser.add_argument(*spell("--out"), help="run folder (blocks, merged model, MIPs); required")
    parser.add_argument(*spell("--overwrite"), action="store_true",
                        help="delete an earlier run in --out and start again (otherwise it is taken up again)")  # fmt: skip
    return parser


def _memory(text: str) -> str:
    from .engine import parse_memory

    try:
        parse_memory(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("--memory-limit ")) from None
    return text


def run_fit_blocks(args: argparse.Namespace) -> int:
    """Run ``fit-blocks`` with parsed ``args``; returns the exit status (errors are printed)."""
    from ..io.checkpoint import CheckpointError
    from .engine import EngineError
    from .run import BlockFitError

    try:
        return _run(args)
    except BlockFitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, PermissionError, CheckpointError, EngineError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .. import cli
    from ..train import FitConfig
    from .engine import ClusterSpec
    from .run import fit_blocks

    for flag in ("target", "out"):  # not argparse's required: a --config file may give them
        if getattr(args, flag) is None:
            raise ValueError(f"--{flag} is required (on the command line, or as {flag}: in --config)")
    if args.resolution:
        raise ValueError(
            "--resolution H W gives every view one size, but blocks differ in size: use --downsample FACTOR"
        )
    if args.block is not None and len(args.block) not in (1, 3):
        raise ValueError(f"--block takes one value or three (Z Y X), got {len(args.block)}")
    config = FitConfig(**cli._given_settings(args))
    cluster = ClusterSpec(
        scheduler=args.scheduler, workers=args.workers, threads_per_worker=args.threads_per_worker,
        memory_limit=args.memory_limit, processes=args.processes,
    )  # fmt: skip
    bars: dict[str, Any] = {}

    def bar(name: str, total: int, unit: str) -> Any:
        if name not in bars:
            bars[name] = tqdm(total=total, unit=unit, desc=name, dynamic_ncols=True)
        return bars[name]

    def on_survey(done: int, total: int) -> None:
        bar("survey", total, "chunk").update(1)

    def on_block(record: dict[str, Any], done: int, total: int) -> None:
        progress = bar("blocks", total, "block")
        progress.update(1)
        psnr = [m["psnr"] for m in record.get("metrics", {}).values()]
        progress.set_postfix(K=record.get("gaussians", {}).get("kept", 0),
                             psnr=f"{min(psnr):.1f}" if psnr else "-")  # fmt: skip

    try:
        result = fit_blocks(
            args.target, args.out, level=args.level, channel=args.channel, time_point=args.time,
            voxel_size=tuple(args.voxel_size) if args.voxel_size else None,
            block=tuple(args.block) if args.block else None, halo=args.halo, cell=args.foreground_cell,
            view_specs=cli._view_specs(args), downsample=args.downsample, normalize=args.normalize,
            num_gaussians=args.num_gaussians, config=config, cluster=cluster, overwrite=args.overwrite,
            on_survey=on_survey, on_block=on_block, log=lambda line: tqdm.write(line),
        )  # fmt: skip
    finally:
        for progress in bars.values():
            progress.close()
    print(result.summary())
    return 0
