"""Turn a user's choices (target, views, initial model) into targets and a model to fit.

Shared by the CLI and the napari widget, so both accept the same inputs and say
the same things about them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np

from .frames import Frame, VolumeGeometry
from .io.checkpoint import Checkpoint, load_checkpoint
from .io.swc import Skeleton
from .model import GaussianModel
from .targets import DEFAULT_DENOISE, Normalization, Targets, shown_axes, targets_for_views, targets_from_mips
from .views import AXIS_VIEWS, View, make_views

Resolution = None | float | tuple[int, int]
INITS = ("foreground", "intensity")
VOLUME_VIEWS = ("xy", "xz", "yz", "45:35", "135:-35")
"""Default views of a volume target.  Three axis MIPs under-determine where a neurite lies in depth: trained on
them alone, views between them scored 32-33 dB on the sample against 36-37 dB with these two oblique views
added, and 26-29 dB against 36-37 dB on the rasterised SWC neuron (docs/quality.md)."""
LEGACY_COUNT = 2000
"""Gaussians of the seed design's start (``init="intensity"``) when no count is given."""


@dataclass
class FitInputs:
    """What to fit: a target (sample, volume TIFF, MIP TIFF, an array, or a checkpoint's own field) and a start.

    Exactly one target source is used, in this order: ``volume`` (an array
    already in memory), ``sample``, ``target``, ``target_mips``, ``mips``; with
    none of them the checkpoint's own field MIPs are the targets.

    MIP targets need the volume's shape: ``volume_shape`` when given (the axis
    MIPs must agree with it); else the axis MIPs give it when they show every
    axis; else it is the shape the ``checkpoint`` was made for (so a single
    ``xy`` MIP can be fitted).

    ``view_specs=None`` trains on :data:`VOLUME_VIEWS` for a volume target and on
    the axis views for a checkpoint's own field.

    From scratch, ``init`` chooses the start: ``foreground`` (Gaussians spread
    over the structure; from MIP targets, over points bright in all three axis
    views) or ``intensity`` (the seed design's draw by brightness, for
    comparison).  ``num_gaussians=None`` lets the foreground set the count,
    within half of ``max_gaussians`` (default: the CPU budget of
    :data:`.train.DEFAULT_BUDGET`).  ``eval_specs`` are held-out views: built
    from the same volume with the same normalisation, scored and never trained.

    ``model`` is an initial model already in memory (e.g. a napari Points
    layer of Gaussians): used as a checkpoint's model would be, without resume
    state.  ``self_reconstruct`` asks for the checkpoint's own field MIPs as the
    targets (a check of the renderer and trainer); without a target and without
    it, a checkpoint alone is an error rather than a silent change of task.

    ``denoise`` (:attr:`.train.FitConfig.denoise`, voxels; 0: off) averages a
    volume target along its structures before its MIPs, held-out views and
    start are made (:func:`.denoise.denoise_along_structures`); MIP targets
    cannot be denoised (the note says so).

    ``normalization``, when given, replaces the rule named by ``normalize``
    (e.g. a block's: fixed to the whole volume's range).

    ``device`` is where the fit will train (``auto``: as the trainer resolves
    it): :func:`prepare_fit` checks the fit's memory against it (see
    :mod:`.preflight`) before it builds targets or a model.
    """

    view_specs: list[str] | None = None
    resolution: Resolution = None
    normalize: str = "background"
    denoise: float = DEFAULT_DENOISE
    normalization: Normalization | None = None
    sample: bool = False
    target: str | None = None
    target_mips: str | None = None
    volume: np.ndarray | None = None
    mips: dict[str, np.ndarray] | None = None
    channel: int | None = None
    time: int | None = None
    voxel_size: tuple[float, float, float] | None = None
    volume_shape: tuple[int, int, int] | None = None
    checkpoint: str | None = None
    swc: str | None = None
    num_gaussians: int | None = None
    max_gaussians: int | None = None
    init: str = "foreground"
    eval_specs: list[str] = field(default_factory=list)
    seed: int = 0
    device: str = "auto"
    model: GaussianModel | None = None
    self_reconstruct: bool = False


@dataclass
class PreparedFit:
    """Targets and the initial model, with notes for the user."""

    targets: Targets
    model: GaussianModel
    checkpoint: Checkpoint | None
    notes: list[str]
    volume: np.ndarray | None = None
    eval_targets: Targets | None = None


def _load_volume(inputs: FitInputs, notes: list[str]) -> tuple[np.ndarray, VolumeGeometry] | None:
    from .io.tiff import read_volume
    from .sample import sample_volume

    if inputs.volume is not None:
        volume = np.asarray(inputs.volume, dtype=np.float32)
        if volume.ndim != 3:
            raise ValueError(f"the target volume must be 3D (Z, Y, X), got shape {volume.shape}")
        return volume, VolumeGeometry(volume.shape, inputs.voxel_size or (1.0, 1.0, 1.0))
    if inputs.sample:
        volume, geometry = sample_volume(inputs.seed)
        notes.append(f"target: built-in sample neuron {geometry.shape_zyx}, spacing {geometry.spacing_zyx} um")
        return volume, geometry
    if inputs.target:
        read = read_volume(inputs.target, inputs.channel, inputs.time, inputs.voxel_size)
        notes.append(
            f"target: {inputs.target} {read.data.shape} (axes {read.axes}), "
            f"spacing {read.spacing_zyx} from {read.spacing_source}"
        )
        return read.data, VolumeGeometry(read.data.shape, read.spacing_zyx)
    return None


def prepare_fit(inputs: FitInputs) -> PreparedFit:
    """Build targets and the initial model.

    The fit's memory is estimated before the large allocations (targets, a
    reconstructed field, the initial model) and refused when it cannot fit on
    ``inputs.device`` (:func:`.preflight.check_fit_resources`).

    Raises
    ------
    ValueError, FileNotFoundError
        Unreadable or inconsistent inputs (the message names the file or value).
    .preflight.ResourceError
        A ``ValueError``: the fit would need more memory than is available (the message names the option
        to change).
    """
    from .initial_model import init_from_bright_voxels, init_from_mips, init_from_swc, init_from_volume
    from .io.tiff import read_mips
    from .render.field import voxelize
    from .train import DEFAULT_BUDGET

    notes: list[str] = []
    field_peak = 1.0
    normalization = inputs.normalization or Normalization(inputs.normalize)
    if inputs.init not in INITS:
        raise ValueError(f"unknown init {inputs.init!r}; expected one of {INITS}")
    budget = inputs.max_gaussians or DEFAULT_BUDGET["cpu"]
    _check_start(inputs)
    loaded = _load_volume(inputs, notes)
    skeleton = None
    checkpoint = None
    volume = None
    if loaded is not None:
        volume, geometry = loaded
        views = make_views(inputs.view_specs or list(VOLUME_VIEWS), geometry, inputs.resolution)
        checkpoint = _checkpoint_on(inputs, checkpoint, geometry)
        skeleton = _skeleton(inputs)
        _check_memory(inputs, views, geometry, _start(inputs, True, checkpoint, skeleton, geometry, budget), volume)
        raw = volume
        if inputs.denoise > 0:
            volume, note = denoised_target(volume, inputs.denoise)
            notes.append(f"{note}; --denoise 0 fits the raw volume")
        # The raw stack's range: a denoised stack's background (the maxima of less noise) is lower, and
        # taken as the low it makes the model paint the dim blur and noise between the two as structure
        # (the rasterised neuron: yz 38.2 dB against its noise-free volume instead of 39.0).
        targets = targets_for_views(volume, geometry, views, normalization, range_of=raw)
    elif inputs.target_mips or inputs.mips is not None:
        images = inputs.mips if inputs.mips is not None else read_mips(inputs.target_mips, None)
        spacing = inputs.voxel_size or (1.0, 1.0, 1.0)
        geometry, where = None, ""
        if inputs.volume_shape is not None:
            geometry = VolumeGeometry(inputs.volume_shape, spacing)
            where = f"; volume shape {geometry.shape_zyx} given"
        elif inputs.checkpoint and shown_axes(images) != set("zyx"):
            # The axis MIPs leave a size unknown: the volume the checkpoint was made for supplies it.
            checkpoint = load_checkpoint(inputs.checkpoint)
            if checkpoint.model.geometry is not None:
                known = checkpoint.model.geometry
                geometry = VolumeGeometry(known.shape_zyx, inputs.voxel_size or known.spacing_zyx)
                where = f"; volume shape {geometry.shape_zyx} from {inputs.checkpoint}"
        # The images are in memory already and the targets are their size; the model is what can explode.
        targets = targets_from_mips(images, spacing, geometry, normalization)
        notes.append(f"target: precomputed MIPs {list(images)}{where}")
        if inputs.denoise > 0:
            notes.append("the MIPs are fitted as they are: denoising (--denoise) needs the volume they were made of")
        checkpoint = _checkpoint_on(inputs, checkpoint, targets.geometry)
        skeleton = _skeleton(inputs)
        start = _start(inputs, False, checkpoint, skeleton, targets.geometry, budget)
        _check_memory(inputs, targets.views, targets.geometry, start, None)
    elif inputs.checkpoint and inputs.self_reconstruct:
        checkpoint = load_checkpoint(inputs.checkpoint)
        if checkpoint.model.geometry is None:
            raise ValueError(f"{inputs.checkpoint}: the volume is unknown; give a target")
        geometry = checkpoint.model.geometry
        if inputs.voxel_size:
            geometry = VolumeGeometry(geometry.shape_zyx, inputs.voxel_size)
        views = make_views(inputs.view_specs or list(AXIS_VIEWS), geometry, inputs.resolution)
        start = _start(inputs, False, checkpoint, None, geometry, budget)
        _check_memory(inputs, views, geometry, start, None, self_reconstruction=True)
        physical = checkpoint.model.with_geometry(geometry).to_frame(Frame.PHYSICAL)
        volume = voxelize(physical).detach().numpy()
        field_peak = max(1.0, float(volume.max()))
        targets = targets_for_views(volume, geometry, views, Normalization("fixed", low=0.0, high=field_peak))
        notes.append(
            f"target: exact field MIPs of {inputs.checkpoint} itself (self-reconstruction) on {geometry.shape_zyx} "
            f"({checkpoint.geometry_source}), divided by the field's peak {field_peak:.4g}"
        )
    elif inputs.checkpoint:
        raise ValueError(
            f"--checkpoint {inputs.checkpoint} is a start, not a target: give --target, --sample or --target-mips "
            "to fit, or --self-reconstruct to fit the checkpoint's own field MIPs"
        )
    else:
        raise ValueError(
            "no target: give --sample, --target or --target-mips (or --checkpoint with --self-reconstruct)"
        )

    geometry = targets.geometry
    eval_targets = None
    if inputs.eval_specs:
        if volume is None:
            raise ValueError("held-out views (--eval-views) need a volume target to render them from")
        per_view = targets.normalization.per_view
        fixed = Normalization("fixed", low=targets.low, high=targets.high, view_background=per_view)
        eval_views = make_views(inputs.eval_specs, geometry, inputs.resolution)
        eval_targets = targets_for_views(volume, geometry, eval_views, fixed)
        notes.append(f"held-out views: {', '.join(v.name for v in eval_targets.views)} (scored, never trained)")
    if inputs.checkpoint:
        checkpoint = _checkpoint_on(inputs, checkpoint, geometry)
        model = checkpoint.model
        if field_peak != 1.0:
            # Self-reconstruction: the targets were divided by the field's peak; so are the amplitudes.
            model = replace(model, log_amplitudes=model.log_amplitudes - math.log(field_peak))
        notes.append(
            f"model: {inputs.checkpoint} ({checkpoint.family} layout, {model.num_gaussians} Gaussians, "
            f"{model.frame.value} frame, mapped onto {geometry.shape_zyx})"
        )
        if checkpoint.fit_model is not None and checkpoint.optimizer_state is not None:
            notes.append(f"resuming at iteration {checkpoint.iteration} with the saved optimiser state")
    elif inputs.model is not None:
        model = inputs.model
        notes.append(f"model: {model.num_gaussians} Gaussians given ({model.frame.value} frame)")
    elif skeleton is not None:
        model = init_from_swc(skeleton, geometry)
        notes.append(f"model: {model.num_gaussians} Gaussians along the edges of {inputs.swc}")
    elif volume is not None and inputs.init == "intensity":
        count = inputs.num_gaussians or LEGACY_COUNT
        model = init_from_bright_voxels(volume, geometry, count, targets.low, targets.high, inputs.seed)
        notes.append(f"model: {count} Gaussians drawn by brightness (seed {inputs.seed})")
    elif volume is not None:
        model = init_from_volume(volume, geometry, inputs.num_gaussians, targets.low, targets.high, budget)
        how = "as asked" if inputs.num_gaussians else "one per foreground cell"
        notes.append(f"model: {model.num_gaussians} Gaussians spread over the foreground ({how})")
    elif {"xy", "xz", "yz"} <= {v.name for v in targets.views}:
        model = init_from_mips(targets, inputs.num_gaussians, budget)
        notes.append(f"model: {model.num_gaussians} Gaussians on points bright in all three axis MIPs")
    else:
        raise ValueError(
            "starting from scratch needs a volume target or the three axis MIPs (xy, xz, yz); "
            "give --checkpoint or --swc otherwise"
        )
    resume = checkpoint if checkpoint is not None and checkpoint.fit_model is not None else None
    if model.frame is Frame.PHYSICAL and inputs.checkpoint is None:
        # Models made here are stored in the NeuRoGS frame, which the NeuRoGS tools read.
        model = model.to_frame(Frame.NEUROGS, geometry)
    return PreparedFit(targets, model, resume, notes, volume, eval_targets)


def denoised_target(volume: np.ndarray, length: float) -> tuple[np.ndarray, str]:
    """``volume`` averaged along its structures over ``length`` voxels (a float32 copy; the input is kept) and a
    line saying so; a length too short to average names ``--denoise``."""
    from .denoise import denoise_along_structures

    start = time.perf_counter()
    try:
        denoised = denoise_along_structures(volume, length)
    except ValueError as error:
        raise ValueError(f"--denoise {length:g}: {error}") from None
    return denoised, (
        f"target volume denoised along its structures over {length:g} voxel{'' if length == 1 else 's'} "
        f"({time.perf_counter() - start:.1f} s)"
    )


def _check_start(inputs: FitInputs) -> None:
    """Refuse choices that exclude each other, naming them, instead of silently using one."""
    starts = [name for name, given in (("--checkpoint", inputs.checkpoint), ("--swc", inputs.swc),
                                       ("an initial model", inputs.model is not None)) if given]  # fmt: skip
    if len(starts) > 1:
        raise ValueError(f"{' and '.join(starts)} both give the initial model; use one of them")
    targets = inputs.sample or inputs.target or inputs.target_mips or inputs.volume is not None or inputs.mips
    if inputs.self_reconstruct and (targets or not inputs.checkpoint):
        raise ValueError(
            "--self-reconstruct fits a --checkpoint to its own field MIPs: give a --checkpoint and no target"
        )


def _skeleton(inputs: FitInputs) -> Skeleton | None:
    """The SWC skeleton the model starts from, or ``None`` (none given, or a checkpoint is the start).

    Read before the memory check, which counts the Gaussians it places before any is placed.
    """
    from .io.swc import read_swc

    return read_swc(inputs.swc) if inputs.swc and not inputs.checkpoint else None


def _checkpoint_on(inputs: FitInputs, checkpoint: Checkpoint | None, geometry: VolumeGeometry) -> Checkpoint | None:
    """``inputs.checkpoint`` mapped onto ``geometry`` (``checkpoint`` itself when it already is); ``None``
    without a checkpoint."""
    if not inputs.checkpoint:
        return None
    if checkpoint is None or checkpoint.model.geometry != geometry:
        checkpoint = load_checkpoint(inputs.checkpoint, geometry)
    return checkpoint


def _start(
    inputs: FitInputs,
    from_volume: bool,
    checkpoint: Checkpoint | None,
    skeleton: Skeleton | None,
    geometry: VolumeGeometry,
    budget: int,
) -> tuple[int, str, str]:
    """The initial Gaussian count (an upper bound when the foreground sets it), the kind of start as
    :class:`.preflight.FitPlan` names it, and the option that sets the count; as the branches of
    :func:`prepare_fit` will start."""
    from .preflight import swc_gaussian_count

    if checkpoint is not None:
        return checkpoint.model.num_gaussians, "checkpoint", "--checkpoint"
    if inputs.model is not None:
        return inputs.model.num_gaussians, "checkpoint", "the initial model"
    if skeleton is not None:
        return swc_gaussian_count(skeleton, geometry), "swc", "--swc"
    if from_volume and inputs.init == "intensity":
        return inputs.num_gaussians or LEGACY_COUNT, "intensity", "--num_gaussians"
    # Without a count the foreground (or the MIPs' bright points) sets it, within half the budget.
    return inputs.num_gaussians or max(1, budget // 2), "foreground" if from_volume else "mips", "--num_gaussians"


def _check_memory(
    inputs: FitInputs,
    views: list[View],
    geometry: VolumeGeometry,
    start: tuple[int, str, str],
    volume: np.ndarray | None,
    self_reconstruction: bool = False,
) -> None:
    """Refuse a fit that cannot fit in memory on ``inputs.device``, before its large allocations."""
    from .preflight import FitPlan, check_fit_resources

    count, init, count_flag = start
    eval_views = make_views(inputs.eval_specs, geometry, inputs.resolution) if inputs.eval_specs else []
    plan = FitPlan(
        views, geometry, count, max_gaussians=inputs.max_gaussians, eval_views=eval_views,
        volume_dtype=volume.dtype if volume is not None else None, denoise=volume is not None and inputs.denoise > 0,
        init=init, self_reconstruction=self_reconstruction, resolution=inputs.resolution, count_flag=count_flag,
    )  # fmt: skip
    check_fit_resources(plan, inputs.device)
