"""Command line: ``neurogs-mip fit | render | info``.

``fit`` keeps the seed trainer's flags (``--checkpoint``, ``--num_gaussians``,
``--iterations``, ``--lr``, ``--lambda_mse``, ``--lambda_ssim``, ``--num_views``,
``--resolution H W``, ``--device``) and adds targets from TIFF, views, voxel
size, render settings, checkpoints and a YAML config whose keys are the flag
names (command-line flags win).  Exit status: 0 success, 2 bad input, 1 a
failure while fitting.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the commands import these lazily, to start fast
    import torch

    from .frames import VolumeGeometry
    from .io.checkpoint import Checkpoint
    from .views import View

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _add_geometry_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--views", help="comma list of views: xy, xz, yz, or AZ:EL in degrees (e.g. xy,xz,yz,30:15)")
    parser.add_argument(
        "--num_views", type=_positive_int,
        help="1-3: xy, xz, yz; more adds orbit views (default: fit xy,xz,yz,45:35,135:-35 of a volume; "
        "render, eval: xy,xz,yz)",
    )  # fmt: skip
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--resolution", type=_positive_int, nargs=2, metavar=("H", "W"), help="resample every view to H x W"
    )
    group.add_argument("--downsample", type=_positive_float, help="downsampling factor (area averaging); keeps aspect")
    parser.add_argument("--voxel-size", type=_positive_float, nargs=3, metavar=("Z", "Y", "X"), help="override spacing")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The argument parser of ``neurogs-mip`` and its sub-command parsers by name."""
    from .device import DEVICES
    from .render import BACKENDS, DEFAULT_BETA, MODES
    from .train import SCHEDULES

    parser = argparse.ArgumentParser(prog="neurogs-mip", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    fit = commands.add_parser("fit", help="fit Gaussians to MIPs of a volume")
    fit.add_argument("--config", help="YAML file of settings (keys = flag names with underscores)")
    source = fit.add_argument_group("target (one of)")
    source.add_argument("--sample", action="store_true", help="the built-in procedural neuron volume")
    source.add_argument("--target", help="TIFF volume (Z, Y, X; ImageJ/OME hyperstacks with --channel/--time)")
    source.add_argument("--target-mips", help="TIFF of precomputed MIP images (2D per view, or a named stack)")
    fit.add_argument(
        "--volume-shape", type=_positive_int, nargs=3, metavar=("Z", "Y", "X"),
        help="volume shape for --target-mips whose axis views do not show every axis (default: the checkpoint's)",
    )  # fmt: skip
    fit.add_argument("--channel", type=int, help="channel index of a multi-channel TIFF")
    fit.add_argument("--time", type=int, help="time point of a time-lapse TIFF")
    fit.add_argument("--normalize", default="background", choices=["background", "minmax", "percentile"])
    model = fit.add_argument_group("initial model")
    model.add_argument("--checkpoint", help="NeuRoGS-family .pt file to start from (or resume, if ours)")
    model.add_argument("--swc", help="SWC skeleton to place Gaussians along")
    model.add_argument(
        "--num_gaussians", type=_positive_int,
        help="initial Gaussians from scratch (default: one per foreground cell, see docs/quality.md)",
    )  # fmt: skip
    model.add_argument(
        "--init", default="foreground", choices=["foreground", "intensity"],
        help="start from scratch: spread over the foreground, or drawn by brightness (the seed design)",
    )  # fmt: skip
    _add_geometry_flags(fit)
    fit.add_argument("--eval-views", help="comma list of held-out views (e.g. 30:20,120:-15): scored, never trained on")
    fit.add_argument("--iterations", type=int, default=1000)
    fit.add_argument("--lr", type=float, default=1e-3, help="learning rate of the means (fraction of the longest side)")
    fit.add_argument("--lr-scales", type=_positive_float, default=1e-2, help="learning rate of the log-scales")
    fit.add_argument("--lr-rotations", type=_positive_float, default=1e-2, help="learning rate of the quaternions")
    fit.add_argument("--lr-amplitudes", type=_positive_float, default=1e-2, help="learning rate of the log-amplitudes")
    density = fit.add_argument_group("density control (spawn, clone, split, prune)")
    density.add_argument(
        "--densify", default=True, action=argparse.BooleanOptionalAction,
        help="add Gaussians where the render misses the target and remove idle ones (default: on)",
    )  # fmt: skip
    density.add_argument("--densify-every", type=_positive_int, default=100, help="steps between density checks")
    density.add_argument(
        "--densify-until", type=_non_negative_int, help="last step of density control (default: 3/4 of --iterations)"
    )
    density.add_argument(
        "--max-gaussians", type=_positive_int,
        help="budget of Gaussians (default: 60000 on the CPU, 1000000 on CUDA)",
    )  # fmt: skip
    fit.add_argument("--lambda_mse", type=float, default=1.0)
    fit.add_argument("--lambda_ssim", type=float, default=0.1)
    fit.add_argument("--lambda_l1", type=float, default=0.0)
    fit.add_argument("--mode", default="soft", choices=MODES)
    fit.add_argument("--beta", type=_positive_float, default=DEFAULT_BETA, help="soft-MIP sharpness, 1/intensity")
    fit.add_argument("--eps", type=float, default=0.3, help="pixel filter, px^2")
    fit.add_argument("--schedule", default="cosine", choices=SCHEDULES, help="learning-rate decay to 0.1x over the fit")
    fit.add_argument("--device", default="auto", choices=DEVICES)
    fit.add_argument("--backend", default="auto", choices=BACKENDS)
    fit.add_argument("--save-every", type=_positive_int, default=500)
    fit.add_argument("--out", default="neurogs_mip_out", help="output folder")
    fit.add_argument("--seed", type=int, default=0)

    render = commands.add_parser("render", help="render a checkpoint's MIPs to a TIFF")
    render.add_argument("checkpoint")
    render.add_argument("--out", required=True, help="output TIFF")
    render.add_argument("--target", help="TIFF volume whose geometry to use")
    render.add_argument("--channel", type=int, help="channel index of a multi-channel TIFF target")
    render.add_argument("--time", type=int, help="time point of a time-lapse TIFF target")
    render.add_argument("--shape", type=_positive_int, nargs=3, metavar=("Z", "Y", "X"), help="volume shape")
    render.add_argument("--mode", choices=MODES, help="render mode (default: the one the checkpoint was fitted with)")
    render.add_argument("--beta", type=_positive_float, help="soft-MIP sharpness (default: the checkpoint's)")
    render.add_argument("--device", default="auto", choices=DEVICES)
    render.add_argument("--backend", default="auto", choices=BACKENDS)
    _add_geometry_flags(render)

    evaluate = commands.add_parser("eval", help="score a checkpoint against the MIPs of a volume")
    evaluate.add_argument("checkpoint")
    evaluate.add_argument("--target", required=True, help="TIFF volume (Z, Y, X) the checkpoint was fitted to")
    evaluate.add_argument("--channel", type=int, help="channel index of a multi-channel TIFF target")
    evaluate.add_argument("--time", type=int, help="time point of a time-lapse TIFF target")
    evaluate.add_argument(
        "--eval-views", help="comma list of views to mark held-out (default: the checkpoint's own held-out views)"
    )
    evaluate.add_argument("--mode", choices=MODES, help="render mode (default: the checkpoint's)")
    evaluate.add_argument("--beta", type=_positive_float, help="soft-MIP sharpness (default: the checkpoint's)")
    evaluate.add_argument("--device", default="auto", choices=DEVICES)
    evaluate.add_argument("--backend", default="auto", choices=BACKENDS)
    _add_geometry_flags(evaluate)

    info = commands.add_parser("info", help="describe a checkpoint or TIFF file")
    info.add_argument("path")
    info.add_argument("--channel", type=int, help="channel index of a multi-channel TIFF")
    info.add_argument("--time", type=int, help="time point of a time-lapse TIFF")
    return parser, {"fit": fit, "render": render, "eval": evaluate, "info": info}


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    if args.command == "fit" and args.config:
        import yaml

        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"no such config file: {path}")
        settings = yaml.safe_load(path.read_text()) or {}
        if not isinstance(settings, dict):
            raise ValueError(f"{path} must hold a mapping of settings, got {type(settings).__name__}")
        settings = {str(k).replace("-", "_"): v for k, v in settings.items()}
        known = set(vars(commands["fit"].parse_args([])))
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"{path}: unknown settings {unknown}; known: {sorted(known)}")
        # Settings from the file become defaults, so flags given on the command line win.
        first, default_views = args, commands["fit"].get_default("num_views")
        commands["fit"].set_defaults(**settings)
        args = parser.parse_args(argv)
        # Flags that exclude or override each other: the command line's choice replaces the file's.
        if first.resolution is not None or first.downsample is not None:
            args.resolution, args.downsample = first.resolution, first.downsample
        if first.views is None and first.num_views != default_views:
            args.views = None
    return args


def _view_specs(args: argparse.Namespace) -> list[str] | None:
    """The views asked for, or ``None`` for the default of the command (``--num_views`` unset)."""
    from .views import default_view_specs, parse_view_specs

    if args.views:
        return parse_view_specs(args.views)
    return default_view_specs(args.num_views) if args.num_views is not None else None


def _resolution(args: argparse.Namespace) -> Any:
    if args.resolution:
        return tuple(args.resolution)
    return args.downsample


def _check_writable_folder(path: Path) -> None:
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise PermissionError(f"cannot write to output folder {path}: {existing} is not a writable folder")


def _fit(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .metrics import format_table
    from .setup import FitInputs, prepare_fit
    from .train import CheckpointEvent, FinishedEvent, FitConfig, StepEvent, Trainer
    from .views import parse_view_specs

    out = Path(args.out)
    _check_writable_folder(out)
    config = FitConfig(
        iterations=args.iterations, lr=args.lr, lr_scales=args.lr_scales, lr_rotations=args.lr_rotations,
        lr_amplitudes=args.lr_amplitudes, lambda_mse=args.lambda_mse, lambda_ssim=args.lambda_ssim,
        lambda_l1=args.lambda_l1, mode=args.mode, beta=args.beta, eps=args.eps, device=args.device,
        backend=args.backend, schedule=args.schedule, save_every=args.save_every, seed=args.seed, out=str(out),
        densify=args.densify, densify_every=args.densify_every, densify_until=args.densify_until,
        max_gaussians=args.max_gaussians,
    )  # fmt: skip
    inputs = FitInputs(
        sample=args.sample, target=args.target, target_mips=args.target_mips, channel=args.channel, time=args.time,
        voxel_size=tuple(args.voxel_size) if args.voxel_size else None, view_specs=_view_specs(args),
        volume_shape=tuple(args.volume_shape) if args.volume_shape else None, resolution=_resolution(args),
        normalize=args.normalize, checkpoint=args.checkpoint, swc=args.swc, num_gaussians=args.num_gaussians,
        max_gaussians=args.max_gaussians, init=args.init, seed=args.seed,
        eval_specs=parse_view_specs(args.eval_views) if args.eval_views else [],
    )  # fmt: skip
    prepared = prepare_fit(inputs)
    for line in prepared.notes:
        print(line)
    trainer = Trainer(
        prepared.model, prepared.targets, config, checkpoint=prepared.checkpoint, eval_targets=prepared.eval_targets
    )
    print(trainer.describe())
    print(f"targets: {prepared.targets.describe()}")
    print(f"model: {prepared.model.num_gaussians} Gaussians ({prepared.model.frame.value} frame)")
    if config.densify:
        print(
            f"density control: every {config.densify_every} steps until step {config.last_densify}, "
            f"at most {trainer.budget} Gaussians"
        )
    with tqdm(total=config.iterations, initial=trainer.iteration, unit="it", dynamic_ncols=True) as bar:
        for event in trainer.run():
            if isinstance(event, StepEvent):
                bar.update(1)
                bar.set_postfix(loss=f"{event.terms['loss']:.5f}", ssim=f"{event.terms['ssim']:.4f}",
                                K=event.num_gaussians)  # fmt: skip
            elif isinstance(event, CheckpointEvent):
                bar.write(f"saved {event.path}")
            elif isinstance(event, FinishedEvent):
                final = event
    print(format_table(final.metrics, final.held_out))
    print(f"{final.num_gaussians} Gaussians; saved {final.path}")
    return 0


def _render(args: argparse.Namespace) -> int:
    from .frames import VolumeGeometry
    from .io.checkpoint import load_checkpoint
    from .io.tiff import read_volume, write_mips
    from .views import AXIS_VIEWS, make_views

    geometry = None
    if args.target:
        spacing = tuple(args.voxel_size) if args.voxel_size else None
        volume = read_volume(args.target, args.channel, args.time, spacing)
        geometry = VolumeGeometry(volume.data.shape, volume.spacing_zyx)
    elif args.shape:
        geometry = VolumeGeometry(tuple(args.shape), tuple(args.voxel_size) if args.voxel_size else (1.0, 1.0, 1.0))
    checkpoint = load_checkpoint(args.checkpoint, geometry)
    model = checkpoint.model
    geometry = model.geometry
    if geometry is None:
        raise ValueError(f"{args.checkpoint}: the volume is unknown; pass --target or --shape")
    if args.voxel_size and not args.target:
        geometry = VolumeGeometry(geometry.shape_zyx, tuple(args.voxel_size))
    print(f"volume {geometry.shape_zyx} spacing {geometry.spacing_zyx} ({checkpoint.geometry_source})")
    views = make_views(_view_specs(args) or list(AXIS_VIEWS), geometry, _resolution(args))
    images = _render_views(args, checkpoint, geometry, views)
    write_mips(
        args.out,
        {v.name: i.cpu().numpy() for v, i in zip(views, images)},
        {v.name: (v.dv, v.du) for v in views},
    )
    print(f"wrote {len(views)} MIPs to {args.out}")
    return 0


def _render_views(
    args: argparse.Namespace, checkpoint: Checkpoint, geometry: VolumeGeometry, views: list[View]
) -> list[torch.Tensor]:
    """Render ``checkpoint``'s model on ``geometry`` into ``views`` with the device, backend, mode and beta of
    ``args`` (mode and beta default to the fit's); says what it uses."""
    import torch

    from .device import resolve_device
    from .frames import Frame
    from .render import Renderer

    device, note = resolve_device(args.device)
    mode, beta = _render_settings(args, checkpoint.metadata)
    renderer = Renderer.create(device, args.backend, mode, beta)
    print(f"{note}; {renderer.describe()}")
    physical = checkpoint.model.with_geometry(geometry).to_frame(Frame.PHYSICAL).to(device)
    with torch.no_grad():
        return [image.cpu() for image in renderer.render(physical, views)]


def _render_settings(args: argparse.Namespace, metadata: dict[str, Any]) -> tuple[str, float]:
    """Mode and beta: the flags, else what the checkpoint was fitted with, else the exact field MIP."""
    from .render import DEFAULT_BETA

    fitted = metadata.get("renderer") if isinstance(metadata.get("renderer"), dict) else {}
    mode = args.mode or fitted.get("mode") or "field"
    beta = args.beta or float(fitted.get("beta", DEFAULT_BETA))
    source = "flags" if args.mode else ("the checkpoint" if fitted.get("mode") else "default: field")
    print(f"render mode {mode}" + (f", beta {beta:g}" if mode == "soft" else "") + f" ({source})")
    return mode, beta


def _eval(args: argparse.Namespace) -> int:
    from .frames import VolumeGeometry
    from .io.checkpoint import load_checkpoint
    from .io.tiff import read_volume
    from .metrics import format_table, score
    from .targets import Normalization, targets_for_views
    from .views import AXIS_VIEWS, View, make_views, parse_view_specs

    read = read_volume(args.target, args.channel, args.time, tuple(args.voxel_size) if args.voxel_size else None)
    geometry = VolumeGeometry(read.data.shape, read.spacing_zyx)
    checkpoint = load_checkpoint(args.checkpoint, geometry)
    metadata = checkpoint.metadata
    fitted_on = metadata.get("volume")
    # The fit's own views (sizes included) unless the flags ask for others, so the scores match its final table.
    same_volume = isinstance(fitted_on, dict) and VolumeGeometry.from_dict(fitted_on) == geometry
    custom = args.views or args.num_views or args.resolution or args.downsample
    if same_volume and metadata.get("views") and not custom:
        trained = [View.from_dict(v) for v in metadata["views"]]
    else:
        trained = make_views(_view_specs(args) or list(AXIS_VIEWS), geometry, _resolution(args))
    if args.eval_views:
        held = make_views(parse_view_specs(args.eval_views), geometry, _resolution(args))
    else:
        held = [View.from_dict(v) for v in metadata.get("eval_views", [])] if same_volume else []
    stored = metadata.get("normalization") if isinstance(metadata.get("normalization"), dict) else {}
    if "low" in stored and "high" in stored:
        normalization = Normalization(
            "fixed", low=float(stored["low"]), high=float(stored["high"]),
            view_background=bool(stored.get("view_background", False)),
        )  # fmt: skip
        print(f"normalisation of the fit: [{float(stored['low']):.6g}, {float(stored['high']):.6g}]")
    else:
        normalization = Normalization()
    trained = [v for v in trained if v.name not in {h.name for h in held}]
    views = [*trained, *held]
    # The fit's own per-view background levels where it recorded them (same views, same volume).
    known = stored.get("view_lows") if isinstance(stored.get("view_lows"), dict) else {}
    lows = [float(known[v.name]) for v in views] if same_volume and all(v.name in known for v in views) else None
    targets = targets_for_views(read.data, geometry, views, normalization, lows)
    images = _render_views(args, checkpoint, geometry, targets.views)
    scores = {v.name: score(i, t) for v, i, t in zip(targets.views, images, targets.tensors("cpu"))}
    print(format_table(scores, [v.name for v in held]))
    return 0


def _info(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.suffix.lower() in (".pt", ".pth"):
        from .io.checkpoint import load_checkpoint

        checkpoint = load_checkpoint(path)
        model = checkpoint.model
        print(f"{path}: {checkpoint.family} checkpoint, {model.num_gaussians} Gaussians, {model.frame.value} frame")
        if model.geometry is not None:
            g = model.geometry
            print(f"volume: shape (Z, Y, X) {g.shape_zyx}, spacing {g.spacing_zyx} ({checkpoint.geometry_source})")
        print(f"iteration: {checkpoint.iteration}")
        amplitudes = model.amplitudes()
        print(f"amplitudes: min {float(amplitudes.min()):.4g}, max {float(amplitudes.max()):.4g}")
        for key in ("package_version", "torch_version", "seed", "views"):
            if key in checkpoint.metadata:
                value = checkpoint.metadata[key]
                print(f"{key}: {[v['name'] for v in value] if key == 'views' else value}")
        return 0
    from .io.tiff import read_mips, read_volume

    try:
        volume = read_volume(path, args.channel, args.time)
    except ValueError as error:
        try:
            images = read_mips(path)
        except ValueError:
            raise error from None
        print(f"{path}: MIP images " + ", ".join(f"{name} {image.shape}" for name, image in images.items()))
        return 0
    data = volume.data
    print(f"{path}: axes {volume.axes}, volume (Z, Y, X) {data.shape}, range [{data.min():.4g}, {data.max():.4g}]")
    print(f"spacing (z, y, x): {volume.spacing_zyx} ({volume.spacing_source})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    try:
        args = _parse(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from .io.checkpoint import CheckpointError
    from .train import TrainingError

    handlers = {"fit": _fit, "render": _render, "eval": _eval, "info": _info}
    try:
        return handlers[args.command](args)
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except (ValueError, FileNotFoundError, PermissionError, CheckpointError, IsADirectoryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
