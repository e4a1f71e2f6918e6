"""Resource preflight: estimate the memory a fit or a render will take, and refuse what cannot fit.

Without it, a fit asked for 20000 x 20000 pixel views, a billion Gaussians or
the field of a 4000^3 checkpoint allocates for minutes and dies with a
``MemoryError`` traceback.  The estimate here costs microseconds: it needs only
the views (:func:`.views.make_views` computes their shapes without rendering
anything), the Gaussian counts and the volume's shape, so it runs before
anything large is allocated.

Memory model
------------
A fit goes through stages; the buffers of a stage are freed before the next
one starts, so the peak is what stays allocated (``held``) plus the largest
stage:

* ``targets`` -- building the target MIPs: per voxel of a volume target its
  NaN check (1 byte) and a float32 copy when it is not float32; the orbit MIP's
  chunked scratch (``ORBIT_VOXEL_BYTES`` per voxel of a chunk of
  :data:`.targets._VOXELS_PER_CHUNK`); and, for the view being built, its native
  MIP (``NATIVE_PIXEL_BYTES`` per native pixel) and its resampled arg-max and
  peak positions (``BUILD_PIXEL_BYTES`` per output pixel).
* ``field`` (reconstructing a checkpoint's own field): :func:`.render.field.voxelize`
  fills a float32 grid of the volume (kept as the target volume) in chunks of
  :data:`.render.field._ENTRIES_PER_CHUNK` (Gaussian, voxel) entries.
* ``init`` -- the initial model: per voxel for a volume start, per Gaussian for
  the others (an SWC start builds Python lists, about 800 bytes a Gaussian).
* ``training`` -- per Gaussian at the peak count (``GAUSSIAN_BYTES``: the four
  parameters, their gradients and two Adam moments, 14 floats x 4 copies, plus
  density statistics and the copies a checkpoint or a resize makes); per
  (view, Gaussian) pair (projected centre, conic, amplitude, rectangle and their
  gradients; the torch reference also saves every (pair, pixel) entry of a
  footprint for autograd); per pixel of every view (render, kernel-layout
  buffers for the backward pass, loss and SSIM maps, residuals); and density
  control's chunk of :data:`.densify._PAIR_CHUNK` (pair, pixel) entries.
* ``held`` -- the target images and their peak positions (16 bytes a pixel)
  and a reconstructed field (4 bytes a voxel).

With density control (on by default) the count grows to the budget
(``max_gaussians``, else :data:`.train.DEFAULT_BUDGET` of the device), so the
training stage is sized for ``max(initial count, budget)`` Gaussians.  On CUDA
the training stage lives in GPU memory and the rest in host memory; each is
checked against its own pool.  On the CPU and MPS (unified memory) everything
shares one pool.

How the constants were checked: peak RSS (``VmHWM`` of ``/proc/self/status``,
reset through ``/proc/self/clear_refs`` after imports and a warm-up fit; one
fresh process per case) of ``prepare_fit`` plus two training steps with a
density check on the 2-core CPU backend:

=====================================================  ============  ===========
case                                                   measured MiB  model MiB
=====================================================  ============  ===========
sample, 3 views of 2048 x 2048, 2,931 Gaussians        1,626         1,795
sample, 200 views of 64 x 64, 21,851 Gaussians         1,065         1,259
sample, 200 views of 64 x 64, 60,000 Gaussians         1,983         2,209
sample, 3 views of 64 x 64, 420,198 Gaussians          938           1,000
100 x 647 x 813, 5 default views, 60,000 Gaussians     627 (build)   894
self-reconstruction of a 10,037-Gaussian checkpoint    1,215         1,353
  on 100 x 647 x 813 (downsample 8)
=====================================================  ============  ===========

(model column: :func:`estimate_fit_memory` for the counts reached).  Small
fits are overestimated (the density chunk is charged in full, and the
training stage assumes the full budget); a fit whose Gaussians grow much
larger than a voxel on the torch backend is underestimated.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .frames import VolumeGeometry
from .io.swc import Skeleton
from .views import AXIS_VIEWS, View, native_view

USABLE_SHARE = 0.8
"""Share of the available memory a fit may plan to use: the estimate is rough, and the OS, the viewer and
allocator fragmentation need the rest."""
GIB = float(1 << 30)

TARGET_PIXEL_BYTES = 16
"""Held per target pixel: the float32 image and its float32 (x, y, z) peak positions."""
BUILD_PIXEL_BYTES = 64
"""Transient per output pixel of the view being built: int64 arg-max keys and voxel index, int64/float64
voxel positions before their float32 copy."""
NATIVE_PIXEL_BYTES = 128
"""Transient per native pixel of the view being built: the MIP and its int64 arg-max index, the orbit MIP's int64
keys, its 3 x 3 hole-filling stack and its float64 ray-box test."""
ORBIT_VOXEL_BYTES = 48
"""Per voxel of an orbit MIP's chunk: float64 column and row, int64 pixel, voxel index and key."""
STEP_PIXEL_BYTES = 80
"""Per pixel of every view in a training step: the render, the cpu backend's three kernel-layout buffers and
the incoming gradient, loss and SSIM maps with their gradients, density control's residuals.  Measured:
62 bytes at 3 views of 2048 x 2048."""
GAUSSIAN_BYTES = 512
"""Per Gaussian in training: 14 float32 parameters x 4 (values, gradients, two Adam moments), 48 bytes of
density statistics, rotations and covariances, and the copies of a checkpoint or a resize."""
RENDER_GAUSSIAN_BYTES = 128
"""Per Gaussian in a render without gradients: parameters, rotations and covariances."""
PAIR_BYTES = {"cpu": 128, "triton": 256, "torch": 256}
"""Per (view, Gaussian) pair in training, by backend: centre, conic, amplitude, rectangle and their gradients
(67 bytes measured for the cpu backend); the reference projection of ``triton`` and ``torch`` also keeps its
autograd intermediates."""
RENDER_PAIR_BYTES = 64
"""Per (view, Gaussian) pair in a render without gradients."""
ENTRY_BYTES = 160
"""Per (pair, pixel) entry of the torch reference rasteriser (int64 indices and float values, kept for
autograd) and of density control's chunk (measured: about 600 MiB for its 2^22 entries)."""
FIELD_ENTRY_BYTES = 288
"""Per (Gaussian, voxel) entry of a voxelize chunk (int64 offsets and voxel indices, float deltas)."""
INIT_VOXEL_BYTES = {"foreground": 8, "intensity": 48}
"""Per voxel of a volume start: the smoothed copy and masks (foreground; 5.2 measured), or the float64
probabilities of the seed's draw (intensity; 48 measured)."""
INIT_GAUSSIAN_BYTES = {"swc": 800}
"""Per initial Gaussian of an SWC start (Python lists of arrays; 776 measured at 10^6 Gaussians); other
starts take ``GAUSSIAN_BYTES / 2``."""
TYPICAL_SIGMA_VOXELS = 1.0
"""Standard deviation of a typical fitted Gaussian in finest voxel spacings (a neurite's radius), for the
footprints of the torch reference rasteriser."""


class ResourceError(ValueError):
    """A fit or render would need more memory than this machine has; the message says what to change."""


@dataclass(frozen=True)
class MemoryPart:
    """One allocation of the model.

    Attributes
    ----------
    name
        What it is, for messages.
    nbytes
        Its size, bytes.
    stage
        ``held`` (kept to the end), or the stage whose buffers it belongs to
        (``targets``, ``field``, ``init``, ``training``, ``render``).
    scales
        What it grows with: ``pixels`` (pixels per view), ``views``, ``gaussians``, ``voxels``.
    on_device
        In the accelerator's memory (CUDA); else in host memory.
    """

    name: str
    nbytes: int
    stage: str
    scales: frozenset[str] = frozenset()
    on_device: bool = False


@dataclass(frozen=True)
class MemoryEstimate:
    """The parts of a run's memory and their peak per memory pool.

    Attributes
    ----------
    parts
        Every allocation modelled.
    device
        Device type the run uses (``cpu``, ``cuda``, ``mps``).
    """

    parts: tuple[MemoryPart, ...]
    device: str

    @property
    def split(self) -> bool:
        """Whether host and device memory are separate pools (CUDA)."""
        return self.device == "cuda"

    def pool(self, on_device: bool) -> list[MemoryPart]:
        """The parts in one pool (host or device); without a separate device pool, all of them."""
        return [p for p in self.parts if not self.split or p.on_device == on_device]

    def peak(self, on_device: bool = False) -> int:
        """Peak bytes of a pool: what is held plus the largest stage."""
        parts = self.pool(on_device)
        held = sum(p.nbytes for p in parts if p.stage == "held")
        stages: dict[str, int] = {}
        for part in parts:
            if part.stage != "held":
                stages[part.stage] = stages.get(part.stage, 0) + part.nbytes
        return held + max(stages.values(), default=0)

    @property
    def total(self) -> int:
        """Peak bytes of the run, both pools together."""
        return self.peak(False) + (self.peak(True) if self.split else 0)

    def biggest(self, on_device: bool = False) -> MemoryPart:
        """The largest part of a pool."""
        return max(self.pool(on_device), key=lambda p: p.nbytes)

    def describe(self) -> str:
        """One line: the peak and its largest parts."""
        top = sorted(self.parts, key=lambda p: -p.nbytes)[:3]
        return (
            f"about {_gib(self.total)} at peak on {self.device} (largest: "
            + ", ".join(f"{p.name} {_gib(p.nbytes)}" for p in top)
            + ")"
        )


@dataclass(frozen=True)
class FitPlan:
    """What a fit will allocate, known before it allocates it.

    Attributes
    ----------
    views
        Training views (shapes from :func:`.views.make_views`).
    geometry
        The target volume's grid.
    num_gaussians
        Initial Gaussians.
    max_gaussians
        Density control's budget; ``None``: the device's default (:data:`.train.DEFAULT_BUDGET`).
    densify
        Whether density control runs (the count grows to the budget).
    eval_views
        Held-out views (targets built and rendered like training views).
    volume_dtype
        dtype of a target volume already in memory (its MIPs are built from it); ``None``: MIP targets.
    denoise
        The target volume is denoised first (:func:`.denoise.denoise_along_structures`).
    init
        How the model starts: ``foreground``, ``intensity`` (from the volume), ``swc``, ``mips`` or
        ``checkpoint``.
    self_reconstruction
        The targets are MIPs of the checkpoint's own field, voxelised on ``geometry``.
    resolution
        The resolution asked for (``(H, W)``, a downsampling factor or ``None``), to phrase the advice.
    count_flag
        The option that sets the initial count, for the advice.
    """

    views: Sequence[View]
    geometry: VolumeGeometry
    num_gaussians: int
    max_gaussians: int | None = None
    densify: bool = True
    eval_views: Sequence[View] = ()
    volume_dtype: np.dtype | None = None
    denoise: bool = False
    init: str = "foreground"
    self_reconstruction: bool = False
    resolution: float | tuple[int, int] | None = None
    count_flag: str = "--num_gaussians"


@dataclass(frozen=True)
class _Load:
    """The numbers the memory model reads (plans scale these to find limits)."""

    pixels: float  # output pixels of all views
    views: float
    largest_pixels: int  # output pixels of the largest view
    largest_native: int  # native pixels of the largest view
    pair_bytes: float  # bytes per Gaussian of its pairs in all views (training)
    voxels: int
    gaussians: int  # initial count
    peak_gaussians: int  # count during training


# --------------------------------------------------------------------------- memory available


def available_memory(device: str | torch.device = "cpu") -> int:
    """Bytes a run on ``device`` can allocate now.

    Parameters
    ----------
    device
        ``cpu``, ``cuda`` (or ``cuda:N``), ``mps`` or ``auto`` (resolved as the fit resolves it).

    Returns
    -------
    int
        CPU: ``MemAvailable`` of ``/proc/meminfo``, or the cgroup's limit minus its usage when that is lower
        (a container's limit is what kills a process, not the host's memory); elsewhere psutil or
        ``os.sysconf``.  CUDA: free device memory (``torch.cuda.mem_get_info``) plus what torch's caching
        allocator holds unused.  MPS: the system's (unified memory).
    """
    kind = _device(device)
    if kind.type == "cuda":
        free, _ = torch.cuda.mem_get_info(kind)
        cached = torch.cuda.memory_reserved(kind) - torch.cuda.memory_allocated(kind)
        return int(free + max(cached, 0))
    return _host_available()


def _host_available() -> int:
    candidates = [n for n in (_meminfo_available(), cgroup_headroom()) if n is not None]
    if candidates:
        return min(candidates)
    try:
        import psutil  # napari installs it; not a dependency of the core package

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    for name in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):  # macOS has only the total
        try:
            return int(os.sysconf(name) * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            continue
    # Nothing tells: do not refuse a fit for want of a number.
    return 1 << 62


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cgroup_headroom(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this process's cgroup may still allocate: its memory limit minus its usage.

    Reads cgroup v2 (``memory.max``, ``memory.current``) under ``root``, then v1
    (``memory/memory.limit_in_bytes``, ``memory/memory.usage_in_bytes``); ``None`` without a limit or a cgroup.
    """
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    ):
        try:
            limit = (root / limit_file).read_text().strip()
            if limit == "max":
                return None
            usage = int((root / usage_file).read_text().strip())
            limit_bytes = int(limit)
        except (OSError, ValueError):
            continue
        # v1 writes "no limit" as a huge number (about 2^63).
        return None if limit_bytes >= 1 << 60 else max(limit_bytes - usage, 0)
    return None


def _device(device: str | torch.device) -> torch.device:
    """``device`` as the trainer resolves it (``auto``; ``ValueError`` for an unknown name or a device this
    machine lacks)."""
    if isinstance(device, torch.device):
        return device
    from .device import resolve_device

    kind, _ = resolve_device(str(device).split(":")[0])
    return torch.device(device) if ":" in str(device) else kind


def _backend(kind: torch.device) -> str:
    """The renderer backend ``auto`` picks on ``kind`` (see :meth:`.render.Renderer.create`)."""
    if kind.type == "cuda":
        return "triton"
    if kind.type == "cpu":
        from .numba_runtime import IMPORT_ERROR

        return "cpu" if IMPORT_ERROR is None else "torch"
    return "torch"


# --------------------------------------------------------------------------- counts


def swc_gaussian_count(skeleton: Skeleton, geometry: VolumeGeometry) -> int:
    """Gaussians :func:`.initial_model.init_from_swc` places along ``skeleton`` on ``geometry``, without placing them.

    The same rule, vectorised: each edge gets ``max(1, ceil(length / mean radius))`` Gaussians (radii at least
    half the finest spacing), a skeleton without edges one per node.
    """
    edges = skeleton.edges()
    if len(edges) == 0:
        return len(skeleton.positions)
    spacing = geometry.spacing_xyz
    finest = float(np.min(spacing))
    min_radius = 0.5 * finest
    radii = np.maximum(skeleton.radii * finest, min_radius)
    child, parent = edges[:, 0], edges[:, 1]
    length = np.linalg.norm((skeleton.positions[child] - skeleton.positions[parent]) * spacing, axis=1)
    step = np.maximum(0.5 * (radii[parent] + radii[child]), min_radius)
    return int(np.maximum(1.0, np.ceil(length / step)).sum())


def _native(view: View, geometry: VolumeGeometry) -> View:
    """The native-resolution view a (possibly resampled) view is built from."""
    return native_view(view.name if view.is_axis else f"{view.azimuth}:{view.elevation}", geometry)


def _pixels(views: Sequence[View]) -> int:
    return sum(v.height * v.width for v in views)


def _footprint(view: View, geometry: VolumeGeometry) -> float:
    """Pixels within the cut-off of a typical Gaussian (``TYPICAL_SIGMA_VOXELS``) in ``view``."""
    from .render.project import CUTOFF_SIGMA, DEFAULT_EPS

    sigma = TYPICAL_SIGMA_VOXELS * float(np.min(geometry.spacing_xyz)) / min(view.du, view.dv)
    return math.pi * CUTOFF_SIGMA**2 * (sigma**2 + DEFAULT_EPS)


def _budget(plan: FitPlan, kind: torch.device) -> int:
    from .train import DEFAULT_BUDGET

    return plan.max_gaussians or DEFAULT_BUDGET.get(kind.type, DEFAULT_BUDGET["cpu"])


# --------------------------------------------------------------------------- the model


def _fit_load(plan: FitPlan, kind: torch.device) -> _Load:
    views = [*plan.views, *plan.eval_views]
    backend = _backend(kind)
    pair = float(PAIR_BYTES[backend]) * len(views)
    if backend == "torch":
        pair += ENTRY_BYTES * sum(_footprint(v, plan.geometry) for v in views)
    peak = max(plan.num_gaussians, _budget(plan, kind)) if plan.densify else plan.num_gaussians
    return _Load(
        pixels=_pixels(views),
        views=len(views),
        largest_pixels=max(v.height * v.width for v in views),
        largest_native=max(_pixels([_native(v, plan.geometry)]) for v in views),
        pair_bytes=pair,
        voxels=math.prod(plan.geometry.shape_zyx),
        gaussians=plan.num_gaussians,
        peak_gaussians=peak,
    )


def _fit_parts(plan: FitPlan, load: _Load, kind: torch.device) -> list[MemoryPart]:
    from .densify import _PAIR_CHUNK
    from .render.field import _ENTRIES_PER_CHUNK

    gpu = kind.type == "cuda"
    views, pixels, voxels = round(load.views), round(load.pixels), load.voxels
    shape = " x ".join(str(n) for n in plan.geometry.shape_zyx)
    images = f"{_count(views, 'view')} with {pixels:,} pixels"
    all_views = [*plan.views, *plan.eval_views]
    # A reconstructed field is a float32 volume like any other once voxelised.
    volume_dtype = np.dtype(np.float32) if plan.self_reconstruction else plan.volume_dtype
    parts = _target_parts(load, all_views, volume_dtype, images, plan.denoise)
    if plan.self_reconstruction:
        parts += [
            MemoryPart(f"the checkpoint's field on {shape} voxels", 4 * voxels, "held", frozenset({"voxels"})),
            MemoryPart("voxelising the field", FIELD_ENTRY_BYTES * min(voxels, _ENTRIES_PER_CHUNK), "field"),
        ]
    if plan.init in INIT_VOXEL_BYTES:
        parts.append(MemoryPart(f"the {plan.init} start's copies of {shape} voxels",
                                INIT_VOXEL_BYTES[plan.init] * voxels, "init", frozenset({"voxels"})))  # fmt: skip
    if plan.init != "checkpoint":  # a checkpoint's model is already in memory
        start = INIT_GAUSSIAN_BYTES.get(plan.init, GAUSSIAN_BYTES // 2)
        parts.append(MemoryPart(f"placing {load.gaussians:,} initial Gaussians", start * load.gaussians, "init",
                                frozenset({"gaussians"})))  # fmt: skip
    trained = f"{load.peak_gaussians:,} Gaussians"
    parts += [
        MemoryPart(f"{trained} with their gradients and Adam state", GAUSSIAN_BYTES * load.peak_gaussians,
                   "training", frozenset({"gaussians"}), gpu),
        MemoryPart(f"projections of {trained} into {_count(views, 'view')}", round(load.pair_bytes * load.peak_gaussians),
                   "training", frozenset({"gaussians", "views"}), gpu),
        # On CUDA the targets are copied to the device too.
        MemoryPart(f"render and loss buffers of {images}", round((STEP_PIXEL_BYTES + 4 * gpu) * load.pixels),
                   "training", frozenset({"pixels", "views"}), gpu),
    ]  # fmt: skip
    if plan.densify:
        parts.append(MemoryPart("density control's scratch", ENTRY_BYTES * _PAIR_CHUNK, "training", frozenset(), gpu))
    return [p for p in parts if p.nbytes > 0]


def estimate_fit_memory(plan: FitPlan, device: str | torch.device = "cpu") -> MemoryEstimate:
    """The memory a fit of ``plan`` on ``device`` will take at its peak (see the module's memory model).

    Parameters
    ----------
    plan
        Views, counts and volume of the fit.
    device
        ``cpu``, ``cuda``, ``mps`` or ``auto``.
    """
    kind = _device(device)
    return MemoryEstimate(tuple(_fit_parts(plan, _fit_load(plan, kind), kind)), kind.type)


def check_fit_resources(
    plan: FitPlan, device: str | torch.device = "auto", available: int | None = None
) -> MemoryEstimate:
    """Estimate a fit and refuse it when it cannot fit in memory.

    Parameters
    ----------
    plan
        Views, counts and volume of the fit.
    device
        Where it trains (``auto`` resolves as the trainer resolves it).
    available
        Host bytes available (default: :func:`available_memory` now).

    Returns
    -------
    MemoryEstimate
        The estimate, when its peak fits in ``USABLE_SHARE`` of what is available.

    Raises
    ------
    ResourceError
        The peak exceeds what is usable: one line with the estimate, what is available, the largest part,
        the option that shrinks it and the largest setting of it that fits.
    """
    from .prepare import VOLUME_VIEWS
    from .train import DEFAULT_BUDGET

    kind = _device(device)
    load = _fit_load(plan, kind)
    # Pairs grow with both: blame whichever is further above a default fit.
    default_budget = DEFAULT_BUDGET.get(kind.type, DEFAULT_BUDGET["cpu"])
    views_many = load.views / len(VOLUME_VIEWS) >= load.peak_gaussians / default_budget
    levers = _Levers(
        resolution=plan.resolution,
        gaussians=_fewer(plan.count_flag if load.gaussians >= load.peak_gaussians else "--max-gaussians"),
        voxels=(
            "the targets would be MIPs of the checkpoint's own field on that grid; give a --target volume to fit"
            if plan.self_reconstruction
            else "crop or bin the --target stack"
        ),
        fixed="turn density control off (--no-densify)",
        pairs="views" if views_many else "gaussians",
        swc=plan.count_flag == "--swc" and load.gaussians >= load.peak_gaussians,
    )
    return _check(lambda scaled: _fit_parts(plan, scaled, kind), load, kind, available, "this fit", levers)


# --------------------------------------------------------------------------- render / eval


def estimate_render_memory(
    num_gaussians: int,
    views: Sequence[View],
    device: str | torch.device = "cpu",
    *,
    geometry: VolumeGeometry | None = None,
    mode: str = "soft",
    volume_dtype: np.dtype | None = None,
    denoise: bool = False,
) -> MemoryEstimate:
    """The memory of rendering ``num_gaussians`` Gaussians into ``views`` without gradients.

    Parameters
    ----------
    num_gaussians
        Gaussians of the model.
    views
        The views rendered (and, with ``volume_dtype``, built as targets).
    device
        ``cpu``, ``cuda``, ``mps`` or ``auto``.
    geometry
        The volume; needed for ``mode="field"`` (the model is voxelised on it first) and ``volume_dtype``.
    mode
        Render mode (``soft``, ``max`` or ``field``).
    volume_dtype
        ``eval``: the dtype of the volume whose MIPs are built as targets.
    denoise
        ``eval``: that volume is denoised first.
    """
    kind = _device(device)
    load = _render_load(num_gaussians, views, kind, geometry)
    parts = _render_parts(load, views, kind, geometry, mode, volume_dtype, denoise)
    return MemoryEstimate(tuple(parts), kind.type)


def check_render_resources(
    num_gaussians: int,
    views: Sequence[View],
    device: str | torch.device = "auto",
    *,
    geometry: VolumeGeometry | None = None,
    mode: str = "soft",
    volume_dtype: np.dtype | None = None,
    denoise: bool = False,
    resolution: float | tuple[int, int] | None = None,
    available: int | None = None,
) -> MemoryEstimate:
    """:func:`estimate_render_memory`, refused with a :class:`ResourceError` when it cannot fit.

    For the CLI's ``render`` and ``eval`` once the views are made and before anything is rendered;
    ``resolution`` is the one asked for (``--resolution`` or ``--downsample``), to phrase the advice.
    """
    kind = _device(device)
    load = _render_load(num_gaussians, views, kind, geometry)
    levers = _Levers(
        resolution=resolution,
        gaussians="render a checkpoint with fewer Gaussians",
        voxels="the field mode voxelises the whole volume; use --mode soft or --mode max",
        fixed="use --mode soft or --mode max",
        pairs="views" if load.views > len(AXIS_VIEWS) else "gaussians",
    )
    what = f"rendering {num_gaussians:,} Gaussians"
    return _check(
        lambda scaled: _render_parts(scaled, views, kind, geometry, mode, volume_dtype, denoise), load, kind,
        available, what, levers,
    )  # fmt: skip


def _render_load(
    num_gaussians: int, views: Sequence[View], kind: torch.device, geometry: VolumeGeometry | None
) -> _Load:
    if not views:
        raise ValueError("at least one view is needed")
    pair = float(RENDER_PAIR_BYTES) * len(views)
    if _backend(kind) == "torch" and geometry is not None:
        pair += ENTRY_BYTES * sum(_footprint(v, geometry) for v in views)
    return _Load(
        pixels=_pixels(views),
        views=len(views),
        largest_pixels=max(v.height * v.width for v in views),
        largest_native=max(_pixels([_native(v, geometry)]) for v in views) if geometry is not None else 0,
        pair_bytes=pair,
        voxels=math.prod(geometry.shape_zyx) if geometry is not None else 0,
        gaussians=num_gaussians,
        peak_gaussians=num_gaussians,
    )


def _render_parts(
    load: _Load,
    views: Sequence[View],
    kind: torch.device,
    geometry: VolumeGeometry | None,
    mode: str,
    volume_dtype: np.dtype | None,
    denoise: bool = False,
) -> list[MemoryPart]:
    from .render.field import _ENTRIES_PER_CHUNK

    gpu = kind.type == "cuda"
    count, pixels = round(load.views), round(load.pixels)
    images = f"{_count(count, 'view')} with {pixels:,} pixels"
    by_view = frozenset({"pixels", "views"})
    parts = [
        # The images on the device, their host copies and the TIFF writer's copy.
        MemoryPart(f"the images rendered in {images}", round(12 * load.pixels), "render", by_view),
        MemoryPart(f"{load.gaussians:,} Gaussians", RENDER_GAUSSIAN_BYTES * load.gaussians, "render",
                   frozenset({"gaussians"}), gpu),
        MemoryPart(f"projections of {load.gaussians:,} Gaussians into {_count(count, 'view')}",
                   round(load.pair_bytes * load.gaussians), "render", frozenset({"gaussians", "views"}), gpu),
        MemoryPart(f"render buffers of {images}", round(16 * load.pixels), "render", by_view, gpu),
    ]  # fmt: skip
    if geometry is not None and mode == "field":
        shape = " x ".join(str(n) for n in geometry.shape_zyx)
        parts += [
            MemoryPart(f"the field on {shape} voxels", 4 * load.voxels, "render", frozenset({"voxels"}), gpu),
            MemoryPart("voxelising the field", FIELD_ENTRY_BYTES * min(load.voxels, _ENTRIES_PER_CHUNK), "render",
                       frozenset(), gpu),
        ]  # fmt: skip
    if geometry is not None and volume_dtype is not None:
        parts += _target_parts(load, views, volume_dtype, images, denoise)
    return [p for p in parts if p.nbytes > 0]


def _target_parts(
    load: _Load, views: Sequence[View], volume_dtype: np.dtype | None, images: str, denoise: bool = False
) -> list[MemoryPart]:
    """Target images, held and being built: from a volume in memory of ``volume_dtype``, or (``None``)
    normalised copies of MIP images; ``denoise``: the volume is denoised first."""
    from .targets import _VOXELS_PER_CHUNK

    parts = [
        MemoryPart(f"the target images of {images}", round(TARGET_PIXEL_BYTES * load.pixels), "held",
                   frozenset({"pixels", "views"})),
        MemoryPart(f"building the target images of {images}", BUILD_PIXEL_BYTES * load.largest_pixels, "targets",
                   frozenset({"pixels"})),
    ]  # fmt: skip
    if volume_dtype is not None:
        # The NaN check's mask, a float32 copy unless it is float32, the orbit MIPs' chunked scratch and the
        # largest native MIP (these grow with the volume, not with the pixels asked for).
        copy = 0 if np.dtype(volume_dtype) == np.float32 else 4
        scratch = ORBIT_VOXEL_BYTES * min(load.voxels, _VOXELS_PER_CHUNK) if any(not v.is_axis for v in views) else 0
        native = NATIVE_PIXEL_BYTES * load.largest_native
        parts.append(MemoryPart("the target volume's copies and native MIPs", (1 + copy) * load.voxels + scratch
                                + native, "targets", frozenset({"voxels"})))  # fmt: skip
        if denoise:
            # The denoised volume (kept: the targets and the start are made of it), its smoothed guide and the
            # smoothing's scratch: float32 each.
            parts.append(MemoryPart("denoising the target volume", 12 * load.voxels, "targets",
                                    frozenset({"voxels"})))  # fmt: skip
    return parts


# --------------------------------------------------------------------------- the check


@dataclass(frozen=True)
class _Levers:
    """What to change about each kind of part, to phrase the advice.

    ``resolution`` is the one asked for (``--resolution`` or ``--downsample`` advice); ``gaussians``,
    ``voxels`` and ``fixed`` say what to do about parts that grow with the Gaussians, with the volume, or with
    neither; ``pairs`` blames the (view, Gaussian) pairs on ``views`` or ``gaussians``, whichever is further
    above a default run; ``swc`` says the initial count comes from an SWC skeleton.
    """

    resolution: float | tuple[int, int] | None
    gaussians: str
    voxels: str
    fixed: str
    pairs: str
    swc: bool = False


def _check(
    parts_of: Callable[[_Load], list[MemoryPart]],
    load: _Load,
    kind: torch.device,
    available: int | None,
    what: str,
    levers: _Levers,
) -> MemoryEstimate:
    """Raise :class:`ResourceError` unless the estimate of ``load`` fits in every memory pool."""

    def estimate(scaled: _Load) -> MemoryEstimate:
        return MemoryEstimate(tuple(parts_of(scaled)), kind.type)

    result = estimate(load)
    pools = [(False, available if available is not None else available_memory("cpu"))]
    if result.split:
        pools.insert(0, (True, available_memory(kind)))
    for on_device, free in pools:
        usable = int(USABLE_SHARE * free)
        peak = result.peak(on_device)
        if peak <= usable:
            continue
        where = f"{kind} memory" if on_device else ("host memory" if result.split else f"{kind.type} memory")
        part = result.biggest(on_device)

        def fits(scaled: _Load, on_device: bool = on_device, usable: int = usable) -> bool:
            return estimate(scaled).peak(on_device) <= usable

        raise ResourceError(
            f"{what} needs about {_gib(peak)} of {where} but {_gib(usable)} is usable "
            f"({USABLE_SHARE:.0%} of {_gib(free)} available); the largest part is {part.name} "
            f"({_gib(part.nbytes)}): {_advice(part, load, levers, fits)}"
        )
    return result


def _advice(part: MemoryPart, load: _Load, levers: _Levers, fits: Callable[[_Load], bool]) -> str:
    """What to change about ``part``, with the largest setting that fits (from the model, by bisection)."""
    scales = part.scales
    if {"gaussians", "views"} <= scales:
        scales = frozenset({levers.pairs})
    if "voxels" in scales:
        return levers.voxels
    if "gaussians" in scales:
        largest = _largest(lambda n: replace(load, gaussians=min(load.gaussians, n), peak_gaussians=n), fits,
                           load.peak_gaussians)  # fmt: skip
        if levers.swc:
            return (
                f"the skeleton places {load.gaussians:,} Gaussians along its edges (are its coordinates voxels of "
                f"this target?) and at most {largest:,} fit; give another --swc"
            )
        return (
            f"at most {largest:,} Gaussians fit; {levers.gaussians}"
            if largest
            else f"no Gaussians fit; {levers.gaussians}"
        )
    if "views" in scales and "pixels" not in scales:
        largest = _largest(lambda n: _scaled(load, n / load.views, views=True), fits, round(load.views))
        return f"at most {largest:,} views of this size fit; use fewer (--num_views/--views)"
    if "pixels" in scales:
        largest = _largest(lambda n: _scaled(load, n / load.pixels), fits, round(load.pixels))
        return _resolution_advice(levers.resolution, largest / load.pixels)
    return levers.fixed


def _resolution_advice(resolution: float | tuple[int, int] | None, share: float) -> str:
    """Advice to keep ``share`` of the pixels: ``--resolution`` when one was given, else ``--downsample``."""
    if share <= 0:
        return "even the smallest images do not fit; lower --resolution or raise --downsample"
    scale = math.sqrt(share)
    if isinstance(resolution, (tuple, list)):
        height, width = (max(1, math.floor(n * scale)) for n in resolution)
        return f"at most {share:.2%} of these pixels fit; lower --resolution to {height} {width} or less"
    factor = float(resolution) if resolution is not None else 1.0
    return f"at most {share:.2%} of these pixels fit; use --downsample {math.ceil(10 * factor / scale) / 10:g} or more"


def _scaled(load: _Load, factor: float, views: bool = False) -> _Load:
    """``load`` with the number of views (``views``) or every view's pixels times ``factor``."""
    if views:
        return replace(
            load, pixels=load.pixels * factor, views=load.views * factor, pair_bytes=load.pair_bytes * factor
        )
    return replace(load, pixels=load.pixels * factor, largest_pixels=round(load.largest_pixels * factor))


def _largest(scale: Callable[[int], _Load], fits: Callable[[_Load], bool], current: int) -> int:
    """The largest ``n <= current`` for which ``scale(n)`` fits (0 if none does); the model grows with ``n``."""
    if not fits(scale(0)):
        return 0
    low, high = 0, max(current, 1)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(scale(middle)) else (low, middle)
    return low


def _fewer(flag: str) -> str:
    """How to ask for fewer Gaussians through ``flag``."""
    return "give a --checkpoint with fewer Gaussians" if flag == "--checkpoint" else f"lower {flag}"


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}" + ("" if number == 1 else "s")


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:,.1f} GiB" if nbytes >= 0.1 * GIB else f"{nbytes / GIB:.2f} GiB"
