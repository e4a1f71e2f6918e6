"""One streaming pass over the whole volume: its axis MIPs and a coarse map of where the structure is.

The volume is read in chunks (one task each, on the dask workers); each task
returns its chunk's three axis MIPs (``xy``, ``xz``, ``yz``, raw intensities),
the same of the chunk denoised along its structures (the fit's ``denoise``;
exact across chunks, read with :func:`napari_neurogs_mip.denoise.denoise_margin`) and,
per *cell* of ``cell`` voxels, the :data:`CELL_RANK`-th brightest voxel and the
centre voxel of the volume blurred by one voxel (:func:`scipy.ndimage.gaussian_filter`,
``sigma=1``, ``mode="nearest"``: the smoothing of :func:`napari_neurogs_mip.initial_model.find_foreground`,
exact across chunks because each chunk is read with a margin of the filter's
radius).  The caller folds the parts together as they arrive, so the memory held
is the MIPs (2D) and the cells, never the volume.

The brightest voxels leave out the :data:`FACE_LAYERS` outermost voxels of the
volume: there ``mode="nearest"`` repeats the face voxel, so the blur averages
fewer voxels and its noise is 1.4 times the interior's (1.05 one voxel in); on the
benchmark's 64-voxel-deep stack the two z faces alone are 35 million such
voxels, and they marked most empty blocks as structure.  Structure that reaches
no further than two voxels into the stack is not seen (its block is skipped).

The raw global MIPs give the normalisation every block shares (:func:`global_normalization`:
the rule of :func:`napari_neurogs_mip.targets.targets_for_views` on the whole
volume, whose range is the raw stack's), the denoised ones the targets the merged
model is scored and written against.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..io.atomic import atomic_path
from ..io.lazy import LazyVolume
from ..targets import Normalization
from ..views import AXIS_VIEWS

BLUR_MARGIN = 4
"""Voxels read beyond a chunk: the radius of ``gaussian_filter(sigma=1)`` (``truncate=4``)."""
SURVEY_VOXELS = 1 << 22
"""Voxels a survey chunk aims at: with its margin, the blur and the MIPs, about 60 MB of a worker's memory."""
NORMALIZATION_PIXELS = 1 << 26
"""Above this many MIP pixels the normalisation's percentiles are taken on a regular subsample of them."""
DEFAULT_CELL = 8
"""Cell edge in finest voxel spacings."""
FACE_LAYERS = 2
"""Voxels at each face of the volume left out of the cells' brightest voxels (see the module docstring); axes of
fewer than ``4 * FACE_LAYERS`` voxels keep them."""
CELL_RANK = 4
"""A cell is foreground when this many of its blurred voxels exceed the level, not one: at the volume's faces the
blur (``mode="nearest"``) averages fewer voxels, and single noise voxels there passed a level of 8 interior noise
sigmas (tests); a neurite crossing a cell puts tens of voxels above it."""


@dataclass(frozen=True)
class SurveyPart:
    """What one chunk contributes: its region, its raw and its denoised axis MIPs and its cells."""

    region: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    mips: dict[str, np.ndarray]
    targets: dict[str, np.ndarray]
    cell_top: np.ndarray
    cell_sample: np.ndarray


@dataclass
class Survey:
    """The whole volume seen once.

    Attributes
    ----------
    mips
        Raw float32 axis MIPs at native resolution: ``xy`` [Y, X], ``xz`` [Z, X], ``yz`` [Z, Y].
    targets
        The axis MIPs of the volume denoised along its structures over ``denoise`` voxels (``mips`` when 0):
        what the merged model is compared with, as a fit of the whole volume would be.
    cell_top
        float32 [cz, cy, cx]: per cell, the :data:`CELL_RANK`-th brightest voxel of the volume blurred by one voxel
        (``-inf`` for a cell of fewer voxels).
    cell_sample
        float32 [cz, cy, cx]: per cell, the blurred value of its centre voxel (a regular sample of the volume; NaN
        for a partial cell without one).
    cell
        Cell edges (z, y, x), voxels.
    denoise
        The denoising length, voxels.
    """

    mips: dict[str, np.ndarray]
    targets: dict[str, np.ndarray]
    cell_top: np.ndarray
    cell_sample: np.ndarray
    cell: tuple[int, int, int]
    denoise: float = 0.0

    def save(self, path: Path, key: dict[str, Any]) -> Path:
        """Write to ``path`` (``.npz``, atomic) with ``key``, which :meth:`load` must find again."""
        with atomic_path(path) as tmp, open(tmp, "wb") as file:
            np.savez(file, key=json.dumps(key, sort_keys=True), cell=np.asarray(self.cell), cell_top=self.cell_top,
                     cell_sample=self.cell_sample, denoise=self.denoise,
                     **{f"mip_{n}": m for n, m in self.mips.items()},
                     **{f"target_{n}": m for n, m in self.targets.items() if self.denoise > 0})  # fmt: skip
        return path

    @classmethod
    def load(cls, path: Path, key: dict[str, Any]) -> Survey | None:
        """The survey saved at ``path`` for ``key``; ``None`` when there is none, it is unreadable, or another
        volume's."""
        try:
            with np.load(path) as data:
                if str(data["key"]) != json.dumps(key, sort_keys=True):
                    return None
                mips = {n: data[f"mip_{n}"] for n in AXIS_VIEWS}
                denoise = float(data["denoise"])
                targets = {n: data[f"target_{n}"] for n in AXIS_VIEWS} if denoise > 0 else mips
                cell = tuple(int(c) for c in data["cell"])
                return cls(mips, targets, data["cell_top"], data["cell_sample"], cell, denoise)  # type: ignore[arg-type]
        except (OSError, KeyError, ValueError):
            return None


def cell_voxels(cell: float, spacing_zyx: Sequence[float]) -> tuple[int, int, int]:
    """Cell edges (z, y, x) in voxels for ``cell`` finest spacings (at least one voxel)."""
    if not cell >= 1:
        raise ValueError(f"--foreground-cell must be >= 1 voxel, got {cell}")
    finest = min(spacing_zyx)
    return tuple(max(1, round(cell * finest / s)) for s in spacing_zyx)  # type: ignore[return-value]


def survey_regions(
    shape_zyx: Sequence[int], chunks_zyx: Sequence[int], cell_zyx: Sequence[int]
) -> list[tuple[slice, slice, slice]]:
    """Chunks of the volume for the survey: whole cells, the storage's chunks grown to about :data:`SURVEY_VOXELS`
    (so each stored chunk is decoded once)."""
    edges = [max(1, min(int(c), int(n))) for c, n in zip(chunks_zyx, shape_zyx)]
    while math.prod(edges) < SURVEY_VOXELS and any(e < n for e, n in zip(edges, shape_zyx)):
        # Grow the axis that is smallest relative to its storage chunk, by whole chunks.
        axis = min((a for a in range(3) if edges[a] < shape_zyx[a]), key=lambda a: edges[a])
        edges[axis] = min(int(shape_zyx[axis]), edges[axis] + max(1, int(chunks_zyx[axis])))
    edges = [min(int(n), -(-e // c) * c) for e, c, n in zip(edges, cell_zyx, shape_zyx)]
    grids = [list(range(0, int(n), e)) for n, e in zip(shape_zyx, edges)]
    return [
        (slice(z, min(z + edges[0], shape_zyx[0])), slice(y, min(y + edges[1], shape_zyx[1])),
         slice(x, min(x + edges[2], shape_zyx[2])))
        for z in grids[0] for y in grids[1] for x in grids[2]
    ]  # fmt: skip


def survey_region(
    source: LazyVolume, region: tuple[slice, slice, slice], cell_zyx: Sequence[int], denoise: float = 0.0
) -> SurveyPart:
    """The survey of one chunk (runs on a worker): raw and denoised axis MIPs and the cells of the one-voxel
    blur."""
    from scipy.ndimage import gaussian_filter

    from ..denoise import denoise_along_structures, denoise_margin

    shape = source.shape_zyx
    margin = max(BLUR_MARGIN, denoise_margin(denoise)) if denoise > 0 else BLUR_MARGIN
    wide = tuple(slice(max(0, r.start - margin), min(n, r.stop + margin)) for r, n in zip(region, shape))
    data = source.read(wide)
    inner = tuple(slice(r.start - w.start, r.stop - w.start) for r, w in zip(region, wide))
    mips = _axis_mips(data[inner])
    targets = _axis_mips(denoise_along_structures(data, denoise)[inner]) if denoise > 0 else mips
    blurred = gaussian_filter(data, sigma=1.0, mode="nearest")[inner]
    del data
    counts = [-(-n // c) for n, c in zip(blurred.shape, cell_zyx)]
    padded = np.full([n * c for n, c in zip(counts, cell_zyx)], np.nan, dtype=np.float32)
    padded[: blurred.shape[0], : blurred.shape[1], : blurred.shape[2]] = blurred
    cz, cy, cx = cell_zyx
    sample = padded[cz // 2 :: cz, cy // 2 :: cy, cx // 2 :: cx].copy()
    for axis, (r, n) in enumerate(zip(region, shape)):
        if n >= 4 * FACE_LAYERS:
            index = np.arange(r.start, r.start + padded.shape[axis])
            face = (index < FACE_LAYERS) | (index >= n - FACE_LAYERS)
            padded[(slice(None),) * axis + (face,)] = np.nan
    cells = padded.reshape(counts[0], cz, counts[1], cy, counts[2], cx).transpose(0, 2, 4, 1, 3, 5)
    cells = np.nan_to_num(cells.reshape(*counts, cz * cy * cx), nan=-np.inf)
    rank = min(CELL_RANK, cells.shape[-1])
    cell_top = np.partition(cells, -rank, axis=-1)[..., -rank]
    bounds = tuple((r.start, r.stop) for r in region)
    return SurveyPart(bounds, mips, targets, cell_top, sample)  # type: ignore[arg-type]


def _axis_mips(volume: np.ndarray) -> dict[str, np.ndarray]:
    return {"xy": volume.max(axis=0), "xz": volume.max(axis=1), "yz": volume.max(axis=2)}


class SurveyBuilder:
    """Folds :class:`SurveyPart` results, in any order, into a :class:`Survey`."""

    def __init__(self, shape_zyx: Sequence[int], cell_zyx: Sequence[int], denoise: float = 0.0) -> None:
        z, y, x = (int(n) for n in shape_zyx)
        self.cell = tuple(int(c) for c in cell_zyx)
        self.denoise = denoise
        counts = tuple(-(-n // c) for n, c in zip((z, y, x), self.cell))
        shapes = (("xy", (y, x)), ("xz", (z, x)), ("yz", (z, y)))
        self.mips = {n: np.full(s, -np.inf, np.float32) for n, s in shapes}
        self.targets = {n: np.full(s, -np.inf, np.float32) for n, s in shapes} if denoise > 0 else self.mips
        self.cell_top = np.full(counts, -np.inf, np.float32)
        self.cell_sample = np.full(counts, np.nan, np.float32)

    def add(self, part: SurveyPart) -> None:
        """Fold in one chunk's part."""
        (z0, z1), (y0, y1), (x0, x1) = part.region
        for name, where in (("xy", (slice(y0, y1), slice(x0, x1))), ("xz", (slice(z0, z1), slice(x0, x1))),
                            ("yz", (slice(z0, z1), slice(y0, y1)))):  # fmt: skip
            np.maximum(self.mips[name][where], part.mips[name], out=self.mips[name][where])
            if self.targets is not self.mips:
                np.maximum(self.targets[name][where], part.targets[name], out=self.targets[name][where])
        cells = tuple(slice(start // c, start // c + n) for start, c, n in zip((z0, y0, x0), self.cell,
                                                                               part.cell_top.shape))  # fmt: skip
        self.cell_top[cells] = part.cell_top
        self.cell_sample[cells] = part.cell_sample

    def result(self) -> Survey:
        """The survey (every chunk must have been added)."""
        return Survey(self.mips, self.targets, self.cell_top, self.cell_sample, self.cell, self.denoise)  # type: ignore[arg-type]


def run_survey(
    source: LazyVolume,
    cell_zyx: Sequence[int],
    run: Callable[..., Any],
    progress: Callable[[int, int], None],
    denoise: float = 0.0,
) -> Survey:
    """Survey ``source`` with ``run(function, items, on_result)`` (see :func:`.engine.run_tasks`), its targets
    denoised over ``denoise`` voxels (0: raw)."""
    regions = survey_regions(source.shape_zyx, source.chunks_zyx, cell_zyx)
    builder = SurveyBuilder(source.shape_zyx, cell_zyx, denoise)
    done = 0

    def fold(part: SurveyPart) -> None:
        nonlocal done
        builder.add(part)
        done += 1
        progress(done, len(regions))

    run(survey_region, [(source, region, tuple(cell_zyx), denoise) for region in regions], fold)
    return builder.result()


def global_normalization(survey: Survey, rule: str) -> tuple[Normalization, float, float]:
    """The normalisation rule ``rule`` fitted on the whole volume's axis MIPs, as :func:`.targets.targets_for_views`
    fits it; returns the rule and its ``(low, high)``.  Very large MIPs are subsampled regularly (the percentiles
    of a regular sample)."""
    normalization = Normalization(rule)
    images = [survey.mips[name] for name in AXIS_VIEWS]
    total = sum(image.size for image in images)
    if total > NORMALIZATION_PIXELS:
        step = math.ceil(math.sqrt(total / NORMALIZATION_PIXELS))
        images = [image[::step, ::step] for image in images]
    low, high = normalization.fit(images)
    return normalization, low, high
