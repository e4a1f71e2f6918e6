"""The block plan: the volume cut into cores, each widened by a halo, and which cores hold structure.

A **core** is a box of voxels fitted by one task; cores tile the volume without
overlap, as evenly as ``block`` allows (``ceil(N / block)`` cores along an axis
of ``N`` voxels, each at most ``block`` long).  A task fits its core widened by
the **halo** (clipped to the volume): structure that crosses the core's faces is
seen whole, so the Gaussians near a face are fitted as in a single-volume fit,
and only those whose centres fall in the core are kept (:meth:`Block.owns`).
Every point of the volume belongs to exactly one core (a voxel's half-width
beyond the outer voxel centres included), so the kept Gaussians of all blocks
are each Gaussian once.

The halo is given in finest voxel spacings and converted per axis, so it covers
the same physical distance along a coarse z: a few times the largest Gaussian a
fit is expected to make (a neurite's radius plus the PSF; a soma is larger).

Blocks whose cores hold no foreground are skipped.  The foreground is decided on
a coarse grid of *cells* (:mod:`.survey`): the rule of
:func:`napari_neurogs_mip.initial_model.find_foreground` (background + the larger of
``FOREGROUND_SIGMAS`` noise sigmas and ``FOREGROUND_FLOOR`` of the range, on the
volume blurred by one voxel), with the sigmas raised for the volume's size
(:class:`ForegroundRule`), applied to each cell's few brightest blurred voxels
(:data:`.survey.CELL_RANK` of them must exceed the level).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..frames import VolumeGeometry
from ..initial_model import FOREGROUND_FLOOR, FOREGROUND_SIGMAS

Range = tuple[int, int]
"""Voxel indices ``[start, stop)`` along one axis."""
DEFAULT_BLOCK = 256
"""Core edge (voxels) when no memory limit says otherwise."""
BLOCK_CHOICES = (512, 448, 384, 320, 256, 224, 192, 160, 128, 96, 64)
"""Core edges :func:`default_block` chooses from, largest first."""
FALSE_VOXELS = 0.01
"""Noise voxels the whole volume is expected to put over the foreground level (see :class:`ForegroundRule`)."""
DEFAULT_HALO = 16
"""Halo in finest voxel spacings: a few times a neurite's radius blurred by the PSF."""


@dataclass(frozen=True)
class Block:
    """One task: a core of the volume and the region (core + halo) it reads and fits.

    Attributes
    ----------
    index
        Position in the grid of cores, (iz, iy, ix).
    core
        Voxel ranges ``[start, stop)`` along (z, y, x) that this block owns.
    region
        The core widened by the halo and clipped to the volume, (z, y, x).
    """

    index: tuple[int, int, int]
    core: tuple[Range, Range, Range]
    region: tuple[Range, Range, Range]

    @property
    def name(self) -> str:
        """File stem of the block's results, ``block_z000_y001_x002``."""
        iz, iy, ix = self.index
        return f"block_z{iz:03d}_y{iy:03d}_x{ix:03d}"

    @property
    def region_slices(self) -> tuple[slice, slice, slice]:
        """The region as (z, y, x) slices of the volume."""
        return tuple(slice(a, b) for a, b in self.region)  # type: ignore[return-value]

    @property
    def region_shape(self) -> tuple[int, int, int]:
        """Voxels of the region along (z, y, x)."""
        return tuple(b - a for a, b in self.region)  # type: ignore[return-value]

    def offset_xyz(self, spacing_zyx: Sequence[float]) -> np.ndarray:
        """Physical position (x, y, z) of the region's first voxel in the volume: add it to a block-local
        physical position to get the volume's."""
        return np.array([self.region[2][0], self.region[1][0], self.region[0][0]], dtype=np.float64) * np.asarray(
            spacing_zyx[::-1], dtype=np.float64
        )

    def owns(self, voxel_xyz: np.ndarray, shape_zyx: Sequence[int]) -> np.ndarray:
        """Which of the positions ``voxel_xyz`` ([K, 3] (x, y, z), voxel units of the volume) lie in the core.

        A voxel ``i`` spans ``[i - 1/2, i + 1/2)``; the outer faces of the volume extend to infinity, so a
        Gaussian clamped half a voxel outside still has an owner.
        """
        inside = np.ones(len(voxel_xyz), dtype=bool)
        for column, (start, stop), size in zip((2, 1, 0), self.core, shape_zyx):
            low = -np.inf if start == 0 else start - 0.5
            high = np.inf if stop == size else stop - 0.5
            inside &= (voxel_xyz[:, column] >= low) & (voxel_xyz[:, column] < high)
        return inside


def as_zyx(value: int | Sequence[int], what: str) -> tuple[int, int, int]:
    """``value`` as (z, y, x): one number for all axes or three; ``ValueError`` naming ``what`` otherwise."""
    values = [value] * 3 if isinstance(value, (int, np.integer)) else list(value)
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or any(int(v) != v for v in values):
        raise ValueError(f"{what} must be one whole number or three (Z Y X), got {value!r}")
    return tuple(int(v) for v in values)  # type: ignore[return-value]


def halo_voxels(halo: float, spacing_zyx: Sequence[float]) -> tuple[int, int, int]:
    """The halo along (z, y, x) in voxels: ``halo`` finest spacings, as a physical distance, rounded up."""
    if not halo >= 0:
        raise ValueError(f"--halo must be >= 0 voxels, got {halo}")
    finest = min(spacing_zyx)
    return tuple(math.ceil(halo * finest / s - 1e-9) for s in spacing_zyx)  # type: ignore[return-value]


def _edges(size: int, block: int) -> list[int]:
    """Boundaries of ``ceil(size / block)`` near-equal cores along an axis of ``size`` voxels."""
    count = -(-size // block)
    return [round(i * size / count) for i in range(count + 1)]


def plan_blocks(shape_zyx: Sequence[int], block_zyx: Sequence[int], halo_zyx: Sequence[int]) -> list[Block]:
    """The blocks of a volume, in (z, y, x) order.

    Parameters
    ----------
    shape_zyx
        Voxels of the volume.
    block_zyx
        Largest core edge along each axis, voxels.
    halo_zyx
        Halo along each axis, voxels (:func:`halo_voxels`).
    """
    for axis, edge in zip("ZYX", block_zyx):
        if edge < 1:
            raise ValueError(f"--block must be >= 1 voxel along {axis}, got {edge}")
    grids = [_edges(int(n), int(b)) for n, b in zip(shape_zyx, block_zyx)]
    blocks = []
    for iz in range(len(grids[0]) - 1):
        for iy in range(len(grids[1]) - 1):
            for ix in range(len(grids[2]) - 1):
                index = (iz, iy, ix)
                core = tuple((grids[a][i], grids[a][i + 1]) for a, i in enumerate(index))
                region = tuple(
                    (max(0, start - h), min(int(n), stop + h)) for (start, stop), h, n in zip(core, halo_zyx, shape_zyx)
                )
                blocks.append(Block(index, core, region))  # type: ignore[arg-type]
    return blocks


@dataclass(frozen=True)
class ForegroundRule:
    """The foreground level of a volume, from cells of its one-voxel blur (see the module docstring).

    Attributes
    ----------
    background, noise, level
        Background (median of the cells' sample voxels), its robust noise (scaled MAD of the values below it)
        and the level a cell's brightest blurred voxels must exceed, raw intensity units.
    sigmas
        The noise sigmas of the level (before the floor).
    """

    background: float
    noise: float
    level: float
    sigmas: float = FOREGROUND_SIGMAS

    @classmethod
    def from_cells(cls, samples: np.ndarray, high: float, voxels: int = 0) -> ForegroundRule:
        """The rule of :func:`napari_neurogs_mip.initial_model.find_foreground` on ``samples`` (blurred voxels spread over
        the volume; NaN ignored) with ``high`` the intensity that maps to 1.

        ``voxels``: the volume's size.  ``FOREGROUND_SIGMAS`` puts a voxel of Gaussian noise over the level once in
        30,000: harmless when placing Gaussians, but a volume of a billion voxels would then mark most empty blocks
        as structure.  The sigmas are raised so that the whole volume's noise is expected to put
        :data:`FALSE_VOXELS` voxels over the level (6.7 sigmas for a billion voxels).
        """
        from scipy.special import ndtri

        values = np.asarray(samples, dtype=np.float64).ravel()
        values = values[np.isfinite(values)]
        background = float(np.median(values))
        lower = values[values <= background]
        noise = 1.4826 * float(np.median(background - lower)) if lower.size else 0.0
        sigmas = max(FOREGROUND_SIGMAS, float(-ndtri(FALSE_VOXELS / voxels))) if voxels > 0 else FOREGROUND_SIGMAS
        level = background + max(sigmas * noise, FOREGROUND_FLOOR * max(high - background, 0.0))
        return cls(background, noise, level, sigmas)


def cell_slices(ranges: Sequence[Range], cell_zyx: Sequence[int]) -> tuple[slice, slice, slice]:
    """The cells (of ``cell_zyx`` voxels) that voxel ranges (z, y, x) touch, as slices of the cell grid."""
    return tuple(slice(start // c, -(-stop // c)) for (start, stop), c in zip(ranges, cell_zyx))  # type: ignore[return-value]


def foreground_blocks(blocks: Sequence[Block], cells: np.ndarray, cell_zyx: Sequence[int]) -> list[int]:
    """Per block: how many foreground cells (``cells``: bool [cz, cy, cx] of ``cell_zyx`` voxels) touch its core
    (0: the block is skipped)."""
    return [int(np.count_nonzero(cells[cell_slices(block.core, cell_zyx)])) for block in blocks]


def in_cells(voxel_zyx: np.ndarray, cells: np.ndarray, first_zyx: Sequence[int], cell_zyx: Sequence[int]) -> np.ndarray:
    """Which positions ``voxel_zyx`` ([K, 3] (z, y, x) voxels of the volume) lie in a foreground cell of ``cells``,
    a part of the cell grid starting at cell ``first_zyx``; positions outside that part are not."""
    index = np.floor((voxel_zyx + 0.5) / np.asarray(cell_zyx)).astype(np.int64) - np.asarray(first_zyx)
    inside = np.all((index >= 0) & (index < np.asarray(cells.shape)), axis=1)
    found = np.zeros(len(voxel_zyx), dtype=bool)
    found[inside] = cells[tuple(index[inside].T)]
    return found


def default_block(
    memory_limit: int | None,
    estimate: Callable[[int], float],
    usable_share: float = 0.8,
) -> int:
    """The core edge from memory: the largest of :data:`BLOCK_CHOICES` (at most :data:`DEFAULT_BLOCK` * 2) whose
    fit ``estimate(edge)`` (bytes) stays within ``usable_share`` of a worker's ``memory_limit``;
    :data:`DEFAULT_BLOCK` when the limit is unknown, the smallest choice when none fits."""
    if not memory_limit:
        return DEFAULT_BLOCK
    for edge in BLOCK_CHOICES:
        if estimate(edge) <= usable_share * memory_limit:
            return edge
    return BLOCK_CHOICES[-1]


def describe_grid(geometry: VolumeGeometry, blocks: Sequence[Block]) -> str:
    """``Z x Y x X`` cores of the grid."""
    counts = [len({b.index[a] for b in blocks}) for a in range(3)]
    return f"{' x '.join(map(str, counts))} cores over {' x '.join(map(str, geometry.shape_zyx))} voxels"
