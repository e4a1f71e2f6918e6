"""Command line: ``neurogs-mip fit | render | eval | info | fit-blocks``.

``fit`` keeps the seed trainer's flags (``--checkpoint``, ``--num_gaussians``,
``--iterations``, ``--lr``, ``--lambda_mse``, ``--lambda_ssim``, ``--num_views``,
``--resolution H W``, ``--device``) and adds targets from TIFF, views, voxel
size, render settings, checkpoints and a YAML config whose keys are the flag
names (command-line flags win).  Exit status: 0 success, 2 bad input, 1 a
failure while fitting.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .blocks import command as blocks_command

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


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _voxel_size(text: str) -> float:
    value = _positive_float(text)
    # Micrometres: below a picometre or above a metre is a unit mistake, and squares of such values under- or
    # overflow float32 in the renderers.
    if not 1e-6 <= value <= 1e6:
        raise argparse.ArgumentTypeError(f"must be a voxel size in micrometres within [1e-6, 1e6], got {text}")
    return value


def _spellings(*flags: str) -> list[str]:
    """Each flag with hyphens and with underscores: the seed's ``--num_gaussians`` and ``--num-gaussians`` both work
    (the first spelling is the one help shows)."""
    names = []
    for flag in flags:
        for name in (flag, "--" + flag[2:].replace("_", "-"), "--" + flag[2:].replace("-", "_")):
            if name not in names:
                names.append(name)
    return names


class _HelpFormatter(argparse.HelpFormatter):
    """Help with ``(default: ...)`` for settings that have one, without repeating the other spelling."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default is not None and default is not False and default != argparse.SUPPRESS and "default" not in text:
            shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            text += f" (default: {shown})"
        return text

    def _format_action_invocation(self, action: argparse.Action) -> str:
        # Both spellings of a flag: help shows the first; the other is accepted too.
        seen, shown = set(), []
        for name in action.option_strings:
            if name.replace("_", "-") not in seen:
                seen.add(name.replace("_", "-"))
                shown.append(name)
        return super()._format_action_invocation(_with_options(action, shown))


def _with_options(action: argparse.Action, options: list[str]) -> argparse.Action:
    shown = copy.copy(action)
    shown.option_strings = options
    return shown


CONFIG_GROUPS = {
    "optimisation": "optimisation",
    "targets": "targets (what the MIPs are made of)",
    "loss": "loss (averaged over views)",
    "render": "rendering",
    "density": "density control (spawn, clone, split, prune)",
    "run": "device and run",
}
"""Help sections of the :class:`.train.FitConfig` flags, by :attr:`.settings.Setting.group`."""
CONFIG_FLAGS_LEFT_OUT = ("preview_every",)
"""FitConfig settings that only the GUI uses."""


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`.train.FitConfig` setting, built from its description (help, range, choices,
    default).  Every flag defaults to ``None`` (not given), so a config file and FitConfig's own defaults apply."""
    from .settings import settings_of
    from .train import FitConfig

    groups = {key: parser.add_argument_group(title) for key, title in CONFIG_GROUPS.items()}
    for item in settings_of(FitConfig):
        if item.name in CONFIG_FLAGS_LEFT_OUT:
            continue
        described = item.setting
        text = described.help + (f" [{described.unit}]" if described.unit else "")
        if item.default is not None and "default" not in text:
            shown = ("on" if item.default else "off") if item.kind is bool else f"{item.default:g}" if isinstance(
                item.default, float) else item.default  # fmt: skip
            text += f" (default: {shown})"
        options: dict[str, Any] = {"dest": item.name, "default": None, "help": text}
        if item.kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = _setting_type(item)
            options["choices"] = described.choices
        groups[described.group].add_argument(*_spellings(described.flag_name(item.name)), **options)


def _setting_type(item: Any) -> Any:
    """The argparse ``type`` of a described setting: parse, then check its range (argparse names the flag)."""
    from .settings import check_value

    def convert(text: str) -> Any:
        value = item.kind(text)
        try:
            check_value(item, value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error).removeprefix(f"{item.name} ")) from None
        return value

    convert.__name__ = item.kind.__name__  # argparse says "invalid int value" for text that does not parse
    return convert


def _add_selection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        *_spellings("--channel"), type=_non_negative_int, help="channel index (0-based) of a hyperstack"
    )
    parser.add_argument(*_spellings("--time"), type=_non_negative_int, help="time point (0-based) of a time-lapse")


def _add_geometry_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        *_spellings("--views"), help="comma list of views: xy, xz, yz, or AZ:EL in degrees (e.g. xy,xz,yz,30:15)"
    )
    parser.add_argument(
        *_spellings("--num_views"), type=_positive_int,
        help="1-3: xy, xz, yz; more adds orbit views (default: fit xy,xz,yz,45:35,135:-35 of a volume; "
        "render, eval: xy,xz,yz)",
    )  # fmt: skip
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        *_spellings("--resolution"),
        type=_positive_int,
        nargs=2,
        metavar=("H", "W"),
        help="resample every view to H x W",
    )
    group.add_argument(
        *_spellings("--downsample"), type=_positive_float, help="downsampling factor (area averaging); keeps aspect"
    )
    parser.add_argument(
        *_spellings("--voxel-size"), type=_voxel_size, nargs=3, metavar=("Z", "Y", "X"),
        help="voxel spacing in micrometres (overrides the file's)",
    )  # fmt: skip


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The argument parser of ``neurogs-mip`` and its sub-command parsers by name."""
    from .device import DEVICES
    from .render import BACKENDS, MODES

    parser = argparse.ArgumentParser(
        prog="neurogs-mip", description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    kinds = {"formatter_class": _HelpFormatter}

    fit = commands.add_parser("fit", help="fit Gaussians to MIPs of a volume", **kinds)
    fit.add_argument(*_spellings("--config"), help="YAML file of settings (keys = flag names with underscores)")
    source = fit.add_argument_group("target (one of)")
    source.add_argument(*_spellings("--sample"), action="store_true", help="the built-in procedural neuron volume")
    source.add_argument(
        *_spellings("--target"), help="TIFF volume (Z, Y, X; ImageJ/OME hyperstacks with --channel/--time)"
    )
    source.add_argument(
        *_spellings("--target-mips"), help="TIFF of precomputed MIP images (2D per view, or a named stack)"
    )
    fit.add_argument(
        *_spellings("--volume-shape"), type=_positive_int, nargs=3, metavar=("Z", "Y", "X"),
        help="volume shape for --target-mips whose axis views do not show every axis (default: the checkpoint's)",
    )  # fmt: skip
    _add_selection_flags(fit)
    fit.add_argument(
        *_spellings("--normalize"), default="background", choices=["background", "minmax", "percentile"],
        help="how target intensities map to [0, 1]",
    )  # fmt: skip
    model = fit.add_argument_group("initial model")
    model.add_argument(*_spellings("--checkpoint"), help="NeuRoGS-family .pt file to start from (or resume, if ours)")
    model.add_argument(*_spellings("--swc"), help="SWC skeleton to place Gaussians along")
    source.add_argument(
        *_spellings("--self-reconstruct"), action="store_true",
        help="fit --checkpoint to its own field MIPs (a check of the renderer and trainer)",
    )  # fmt: skip
    model.add_argument(
        *_spellings("--num_gaussians"), type=_positive_int,
        help="initial Gaussians from scratch (default: one per foreground cell, see docs/quality.md)",
    )  # fmt: skip
    model.add_argument(
        *_spellings("--init"), default="foreground", choices=["foreground", "intensity"],
        help="start from scratch: spread over the foreground, or drawn by brightness (the seed design)",
    )  # fmt: skip
    _add_geometry_flags(fit)
    fit.add_argument(
        *_spellings("--eval-views"), help="comma list of held-out views (e.g. 30:20,120:-15): scored, never trained on"
    )
    _add_config_flags(fit)
    fit.add_argument(
        *_spellings("--extra-iterations"), type=_positive_int,
        help="steps to run beyond a resumed checkpoint's iteration (instead of --iterations)",
    )  # fmt: skip
    fit.add_argument(*_spellings("--out"), default="neurogs_mip_out", help="output folder")
    fit.add_argument(
        *_spellings("--overwrite"), action="store_true",
        help="replace the model files of an earlier run in --out (otherwise refused)",
    )  # fmt: skip

    render = commands.add_parser("render", help="render a checkpoint's MIPs to TIFF (one per view)", **kinds)
    render.add_argument("checkpoint")
    render.add_argument(
        *_spellings("--out"), required=True,
        help="folder for one ImageJ TIFF per view (<view>.tif), or a .tif path (files <stem>_<view>.tif)",
    )  # fmt: skip
    render.add_argument(*_spellings("--overwrite"), action="store_true", help="replace existing MIP files")
    render.add_argument(*_spellings("--target"), help="TIFF volume whose geometry to use")
    _add_selection_flags(render)
    render.add_argument(
        *_spellings("--shape"), type=_positive_int, nargs=3, metavar=("Z", "Y", "X"), help="volume shape"
    )
    render.add_argument(
        *_spellings("--mode"), choices=MODES, help="render mode (default: the one the checkpoint was fitted with)"
    )
    render.add_argument(
        *_spellings("--beta"), type=_positive_float, help="soft-MIP sharpness (default: the checkpoint's)"
    )
    render.add_argument(*_spellings("--device"), default="auto", choices=DEVICES, help="where to compute")
    render.add_argument(*_spellings("--backend"), default="auto", choices=BACKENDS, help="renderer")
    _add_geometry_flags(render)

    evaluate = commands.add_parser("eval", help="score a checkpoint against the MIPs of a volume", **kinds)
    evaluate.add_argument("checkpoint")
    evaluate.add_argument(
        *_spellings("--target"), required=True, help="TIFF volume (Z, Y, X) the checkpoint was fitted to"
    )
    _add_selection_flags(evaluate)
    evaluate.add_argument(
        *_spellings("--eval-views"),
        help="comma list of views to mark held-out (default: the checkpoint's own held-out views)",
    )
    evaluate.add_argument(
        *_spellings("--denoise"), type=_non_negative_float,
        help="voxels over which the volume is averaged along its structures before its MIPs are made, 0: raw "
        "(default: as the checkpoint was fitted)",
    )  # fmt: skip
    evaluate.add_argument(*_spellings("--mode"), choices=MODES, help="render mode (default: the checkpoint's)")
    evaluate.add_argument(
        *_spellings("--beta"), type=_positive_float, help="soft-MIP sharpness (default: the checkpoint's)"
    )
    evaluate.add_argument(*_spellings("--device"), default="auto", choices=DEVICES, help="where to compute")
    evaluate.add_argument(*_spellings("--backend"), default="auto", choices=BACKENDS, help="renderer")
    _add_geometry_flags(evaluate)

    info = commands.add_parser("info", help="describe a checkpoint or TIFF file", **kinds)
    info.add_argument("path")
    _add_selection_flags(info)
    fit_blocks = blocks_command.add_fit_blocks_parser(commands, _HelpFormatter)
    return parser, {"fit": fit, "render": render, "eval": evaluate, "info": info, "fit-blocks": fit_blocks}


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("fit", "fit-blocks") and args.config:
        command = commands[args.command]
        settings = _read_config(Path(args.config), command)
        # Settings from the file become defaults, so flags given on the command line win.
        first, default_views = args, command.get_default("num_views")
        command.set_defaults(**settings)
        args = parser.parse_args(argv)
        # Flags that exclude or override each other: the command line's choice replaces the file's.
        if first.resolution is not None or first.downsample is not None:
            args.resolution, args.downsample = first.resolution, first.downsample
        if first.views is None and first.num_views != default_views:
            args.views = None
    if args.command == "fit":
        _check_fit_flags(args)
    return args


def _read_config(path: Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The settings of a YAML config file, each checked and converted exactly as its flag would be.

    YAML's own types are kept where a user would write them (``resolution: 16``
    for 16 x 16, ``views: [xy, xz]``), but a string is never a bool.
    """
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"no such config file: {path}")
    try:
        settings = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ValueError(f"--config {path} is not a text (YAML) file") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"--config {path} is not valid YAML{line}: {problem}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"--config {path} must hold a mapping of settings, got {type(settings).__name__}")
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    converted = {}
    for key, value in settings.items():
        name = str(key).replace("-", "_")
        if name not in actions:
            raise ValueError(f"--config {path}: unknown setting {key!r}; known: {sorted(actions)}")
        converted[name] = _config_value(actions[name], value, f"--config {path}: {key}")
    return converted


def _config_value(action: argparse.Action, value: Any, where: str) -> Any:
    """``value`` from a config file, converted and checked like the command-line flag of ``action``."""
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if value is None:
        raise ValueError(f"{where} has no value")
    if isinstance(action.nargs, int):
        items = list(value) if isinstance(value, (list, tuple)) else [value] * action.nargs
        if len(items) != action.nargs:
            raise ValueError(f"{where} needs {action.nargs} values (or one for all), got {value!r}")
        return [_config_scalar(action, item, where) for item in items]
    if action.nargs == "+":  # fit-blocks' --block: one value or several
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        return [_config_scalar(action, item, where) for item in items]
    if action.dest in ("views", "eval_views"):
        from .views import parse_view_specs

        text = ",".join(str(item) for item in value) if isinstance(value, (list, tuple)) else str(value)
        try:
            parse_view_specs(text)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        return text
    return _config_scalar(action, value, where)


def _config_scalar(action: argparse.Action, value: Any, where: str) -> Any:
    if isinstance(value, (bool, list, tuple, dict)):
        raise ValueError(f"{where} must be a single value, got {value!r}")
    text = str(value)
    try:
        converted = action.type(text) if action.type is not None else text
    except (argparse.ArgumentTypeError, ValueError, TypeError) as error:
        raise ValueError(f"{where}: {error}" if str(error) else f"{where}: invalid value {value!r}") from None
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"{where} must be one of {list(action.choices)}, got {value!r}")
    return converted


def _check_fit_flags(args: argparse.Namespace) -> None:
    """Refuse flags that exclude each other or would be ignored, naming both."""
    sources = [flag for flag, given in (("--sample", args.sample), ("--target", args.target),
                                        ("--target-mips", args.target_mips)) if given]  # fmt: skip
    if len(sources) > 1:
        raise ValueError(f"{' and '.join(sources)} both give a target; use one of them")
    if (args.channel is not None or args.time is not None) and not args.target:
        flag = "--channel" if args.channel is not None else "--time"
        raise ValueError(f"{flag} selects from a --target hyperstack; there is no --target")
    if args.extra_iterations is not None and args.iterations is not None:
        raise ValueError(
            "--iterations (a total) and --extra-iterations (steps beyond the checkpoint) exclude each other"
        )
    if args.extra_iterations is not None and not args.checkpoint:
        raise ValueError("--extra-iterations counts from a resumed --checkpoint; without one, use --iterations")
    for flag in ("views", "eval_views"):
        text = getattr(args, flag)
        if text is not None and not text.strip(" ,"):
            raise ValueError(f"--{flag.replace('_', '-')} is empty; give a comma list such as xy,xz,yz")


def _view_specs(args: argparse.Namespace) -> list[str] | None:
    """The views asked for, or ``None`` for the default of the command (``--num_views`` unset)."""
    from .views import default_view_specs, parse_view_specs

    if args.views is not None:
        try:
            return parse_view_specs(args.views)
        except ValueError as error:
            raise ValueError(f"--views: {error}") from None
    return default_view_specs(args.num_views) if args.num_views is not None else None


def _resolution(args: argparse.Namespace) -> Any:
    if args.resolution:
        return tuple(args.resolution)
    return args.downsample


def _check_writable_folder(path: Path) -> None:
    existing = path
    while not existing.exists():
        if existing.is_symlink():
            raise ValueError(f"cannot write to output folder {path}: {existing} is a broken symbolic link or a loop")
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise PermissionError(f"cannot write to output folder {path}: {existing} is not a writable folder")


def _fit(args: argparse.Namespace) -> int:
    from .io.run_folder import claim_run_folder

    out = Path(args.out)
    _check_writable_folder(out)
    with claim_run_folder(out, overwrite=args.overwrite, resume_from=args.checkpoint) as notes:
        for line in notes:
            print(line)
        return _run_fit(args, out)


def _given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`.train.FitConfig` settings given as flags or in the config file (the others keep FitConfig's
    defaults)."""
    from .settings import settings_of
    from .train import FitConfig

    return {f.name: getattr(args, f.name) for f in settings_of(FitConfig) if getattr(args, f.name, None) is not None}


def _run_fit(args: argparse.Namespace, out: Path) -> int:
    from tqdm import tqdm

    from .metrics import format_table
    from .prepare import FitInputs, prepare_fit
    from .train import CheckpointEvent, FinishedEvent, FitConfig, StepEvent, Trainer
    from .views import parse_view_specs

    config = FitConfig(**_given_settings(args), out=str(out))
    inputs = FitInputs(
        sample=args.sample, target=args.target, target_mips=args.target_mips, channel=args.channel, time=args.time,
        voxel_size=tuple(args.voxel_size) if args.voxel_size else None, view_specs=_view_specs(args),
        volume_shape=tuple(args.volume_shape) if args.volume_shape else None, resolution=_resolution(args),
        normalize=args.normalize, denoise=config.denoise, checkpoint=args.checkpoint, swc=args.swc,
        num_gaussians=args.num_gaussians, max_gaussians=config.max_gaussians, init=args.init, seed=config.seed,
        device=config.device,
        self_reconstruct=args.self_reconstruct,
        eval_specs=parse_view_specs(args.eval_views) if args.eval_views else [],
    )  # fmt: skip
    prepared = prepare_fit(inputs)
    for line in prepared.notes:
        print(line)
    if args.extra_iterations is not None:
        start = prepared.checkpoint.iteration if prepared.checkpoint is not None else 0
        config = dataclasses.replace(config, iterations=start + args.extra_iterations)
    iterations = config.iterations
    if prepared.checkpoint is not None and prepared.checkpoint.iteration >= iterations:
        raise ValueError(
            f"--checkpoint {args.checkpoint} is at iteration {prepared.checkpoint.iteration} and --iterations "
            f"{iterations} is the total to reach: nothing would run; raise --iterations or use --extra-iterations N"
        )
    trainer = Trainer(
        prepared.model, prepared.targets, config, checkpoint=prepared.checkpoint, eval_targets=prepared.eval_targets
    )
    print(trainer.describe())
    print(f"targets: {prepared.targets.describe()}")
    print(f"model: {prepared.model.num_gaussians} Gaussians ({prepared.model.frame.value} frame)")
    if trainer.resume_changes:
        print("resuming with changed settings (applied): " + "; ".join(trainer.resume_changes))
    if config.densify:
        print(
            f"density control: every {config.densify_every} steps until step {config.last_densify}, "
            f"at most {trainer.budget} Gaussians"
        )
    if trainer.compiles_kernels:
        # The first call compiles for 10-60 s on a new machine; the progress bar's clock starts after it.
        print(f"compiling the {trainer.renderer.backend} renderer's kernels (once per machine)...", flush=True)
        print(f"kernels ready in {trainer.warm_up():.1f} s", flush=True)
    with (
        _StopOnSignals(trainer) as signals,
        tqdm(total=config.iterations, initial=trainer.iteration, unit="it", dynamic_ncols=True) as bar,
    ):
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
    if signals.received is not None:
        print(
            f"interrupted by {signals.received.name} at iteration {final.iteration} of {config.iterations}: saved "
            f"{final.path} (a consistent checkpoint); go on with: neurogs-mip fit ... --checkpoint {final.path} "
            f"--out {out}",
            file=sys.stderr,
        )
        return 128 + int(signals.received)
    print(f"{final.num_gaussians} Gaussians; saved {final.path}")
    return 0


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or a second SIGINT) arrived: leave now, without a traceback."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


REDELIVERY_S = 0.05
"""A signal that arrives while a module is being imported is sent again after this many seconds."""


def _importing(frame: Any) -> bool:
    """Whether ``frame`` (a signal handler's) runs inside Python's import machinery."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


def _raise_interrupted(signum: int, frame: Any) -> None:
    """Leave at once with :class:`Interrupted`, but never from inside an import.

    An exception raised in the middle of a module's import can leave that module half built in
    ``sys.modules``: a SIGTERM during start-up's import of numpy made a later import fail with an
    ``AttributeError`` and a traceback.  There the signal is sent again shortly, until the import is over.
    """
    if _importing(frame):
        threading.Timer(REDELIVERY_S, os.kill, (os.getpid(), signum)).start()
        return
    raise Interrupted(signum)


class _StopOnSignals:
    """While a fit runs, SIGINT and SIGTERM ask the trainer to stop between steps (it then saves a consistent
    checkpoint); a second signal leaves at once (atomic writes leave no partial file)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.received: signal.Signals | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopOnSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            _raise_interrupted(signum, frame)
        self.received = signal.Signals(signum)
        print(f"\n{self.received.name}: stopping after this step and saving...", file=sys.stderr)
        self.trainer.stop()

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


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
    inputs = {"checkpoint": args.checkpoint, "--target": args.target}
    _check_mip_outputs(Path(args.out), [v.name for v in views], args.overwrite, inputs)
    images = _render_views(args, checkpoint, geometry, views)
    written = write_mips(
        args.out,
        {v.name: i.cpu().numpy() for v, i in zip(views, images)},
        {v.name: (v.dv, v.du) for v in views},
    )
    print(f"wrote {len(views)} MIPs (one ImageJ TIFF per view, in um): " + ", ".join(map(str, written)))
    return 0


def _check_mip_outputs(out: Path, names: list[str], overwrite: bool, inputs: dict[str, str | None]) -> None:
    """Refuse MIP files (:func:`.io.tiff.mip_paths`) that would replace one of the command's inputs (ever) or an
    existing file (unless ``--overwrite``)."""
    from .io.tiff import TIFF_SUFFIXES, mip_paths

    given = [(flag, Path(path)) for flag, path in inputs.items() if path and Path(path).exists()]
    targets = list(mip_paths(out, names).values())
    for target in [out, *targets]:
        for flag, path in given:
            if target.exists() and os.path.samefile(target, path):
                raise ValueError(f"--out {out} would replace the {flag} input {path}; write the MIPs elsewhere")
    if out.exists() and not out.is_dir() and out.suffix.lower() not in TIFF_SUFFIXES:
        raise ValueError(f"--out {out} is a file; give a folder (one TIFF per view) or a .tif path")
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        raise ValueError(f"--out: {', '.join(existing)} exist(s); pass --overwrite to replace, or choose another --out")
    folder = targets[0].parent
    _check_writable_folder(folder)


def _render_views(
    args: argparse.Namespace, checkpoint: Checkpoint, geometry: VolumeGeometry, views: list[View]
) -> list[torch.Tensor]:
    """Render ``checkpoint``'s model on ``geometry`` into ``views`` with the device, backend, mode and beta of
    ``args`` (mode and beta default to the fit's); says what it uses."""
    import torch

    from .device import resolve_device
    from .frames import Frame
    from .preflight import check_render_resources
    from .render import Renderer

    device, note = resolve_device(args.device)
    mode, beta = _render_settings(args, checkpoint.metadata)
    check_render_resources(checkpoint.model.num_gaussians, views, device, geometry=geometry, mode=mode,
                           resolution=_resolution(args))  # fmt: skip
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
    from .preflight import check_render_resources
    from .prepare import denoised_target
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
    length = _eval_denoise(args, metadata)
    check_render_resources(checkpoint.model.num_gaussians, views, args.device, geometry=geometry,
                           volume_dtype=read.data.dtype, denoise=length > 0, resolution=_resolution(args))  # fmt: skip
    volume = read.data
    if length > 0:
        volume, note = denoised_target(read.data, length)
        print(note)
    targets = targets_for_views(volume, geometry, views, normalization, lows, range_of=read.data)
    images = _render_views(args, checkpoint, geometry, targets.views)
    pairs = zip(targets.views, images, targets.tensors("cpu"), targets.foregrounds())
    scores = {v.name: score(i, t, f) for v, i, t, f in pairs}
    print(format_table(scores, [v.name for v in held]))
    return 0


def _eval_denoise(args: argparse.Namespace, metadata: dict[str, Any]) -> float:
    """The length ``eval`` denoises the volume over: ``--denoise``, else the checkpoint's fit's (so the scores
    match its final table), else 0 (raw); says which."""
    fitted = metadata.get("config") if isinstance(metadata.get("config"), dict) else {}
    length = args.denoise if args.denoise is not None else float(fitted.get("denoise", 0.0))
    if length == 0:
        print("target volume: raw")
    else:
        print(f"target volume denoised along its structures over {length:g} voxels "
              f"({'--denoise' if args.denoise is not None else 'as fitted'})")  # fmt: skip
    return length


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

    if path.is_file() and args.channel is None and _describe_channels(path, args.time):
        return 0
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


def _describe_channels(path: Path, time: int | None) -> bool:
    """Print every channel of a multi-channel TIFF (at ``time``, default the first); ``False`` when the file has
    at most one channel or is not a TIFF volume."""
    from .io.tiff import read_channels, read_metadata

    try:
        meta = read_metadata(path)
    except ValueError:
        return False
    sizes = dict(zip(meta.axes, meta.shape))
    channels = sizes.get("C", sizes.get("S", 1))
    if channels <= 1:
        return False
    times = sizes.get("T", 1)
    shown = time if time is not None else (0 if times > 1 else None)
    print(f"{path}: axes {meta.axes}, shape {meta.shape}: {channels} channels (0-based; fit one with --channel N)")
    if times > 1:
        print(f"time point {shown} of {times} (0-based; choose another with --time)")
    print(f"spacing (z, y, x): {meta.spacing_zyx} ({meta.spacing_source})")
    for channel, data in enumerate(read_channels(path, channels, shown)):
        print(f"  channel {channel}: volume (Z, Y, X) {data.shape}, range [{data.min():.4g}, {data.max():.4g}], "
              f"mean {data.mean():.4g}")  # fmt: skip
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status.

    SIGINT and SIGTERM exit with 130 and 143 and no traceback: during a fit
    after saving a checkpoint (see :class:`_StopOnSignals`), before it at once.
    """
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupted) if on_main_thread else None
    try:
        return _main(argv)
    except Interrupted as interrupt:
        print(f"interrupted by {signal.Signals(interrupt.signum).name}", file=sys.stderr)
        return 128 + interrupt.signum
    except KeyboardInterrupt:
        print("interrupted by SIGINT", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: Sequence[str] | None) -> int:
    try:
        args = _parse(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from .io.checkpoint import CheckpointError
    from .train import TrainingError

    handlers = {
        "fit": _fit,
        "render": _render,
        "eval": _eval,
        "info": _info,
        "fit-blocks": blocks_command.run_fit_blocks,
    }
    try:
        return handlers[args.command](args)
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except (ValueError, FileNotFoundError, PermissionError, CheckpointError, IsADirectoryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
