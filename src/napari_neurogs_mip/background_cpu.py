"""The background-noise map of :class:`napari_neurogs_mip.losses.BackgroundMax` on CPU images, as one numba pass.

Why: the map is a table lookup with linear interpolation.  As PyTorch ops
(scale, clamp, index, gather, interpolate, select; and their backward) it took
about 2 ms per 128 x 128 view and 50 ms per 647 x 813 view on this project's
2-core machine, as much as the rest of a training step; one pass writing the
value and its slope takes a fraction of that.  The loop runs over a flat
contiguous image with unsigned indices; the gather from the table keeps it
from vectorising fully (AVX2 has gathers, LLVM uses them only sometimes).
"""

from __future__ import annotations

import numpy as np

from .numba_runtime import kernel, run_parallel

__all__ = ["expected_max"]

_PIXELS_PER_WORKER = 131_072


@kernel
def _expected_max(
    image: np.ndarray,
    table: np.ndarray,
    scale: float,
    worker: int,
    workers: int,
    value: np.ndarray,
    slope: np.ndarray,
) -> None:  # pragma: no cover - compiled by numba
    """``value[i]``, ``slope[i]``: the map at ``image[i]`` (flat arrays) and its derivative, for this worker's
    share of the pixels."""
    count = image.shape[0]
    first, last = (count * worker) // workers, (count * (worker + 1)) // workers
    bins = table.shape[0] - 1
    top = bins / scale
    for i in range(first, last):
        u = np.uint64(i)
        x = image[u]
        if x < top:  # NaN is not below the top: it passes through
            position = max(x, 0.0) * scale
            k = min(np.uint64(position), np.uint64(bins - 1))
            rise = table[k + np.uint64(1)] - table[k]
            value[u] = table[k] + rise * (position - k)
            slope[u] = rise * scale if x > 0.0 else 0.0
        else:
            value[u] = x
            slope[u] = 1.0


def expected_max(image: np.ndarray, table: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The map's values and slopes at every pixel of a contiguous float image.

    Parameters
    ----------
    image
        Rendered image (float32 or float64, any shape).
    table
        The map at ``k / scale`` for ``k = 0 .. bins`` (``image.dtype``); the identity above ``bins / scale``.
    scale
        Table entries per unit of intensity.
    """
    flat = image.reshape(-1)
    value, slope = np.empty_like(flat), np.empty_like(flat)
    run_parallel(_expected_max, (flat, table, image.dtype.type(scale)), (value, slope), flat.size, _PIXELS_PER_WORKER)
    return value.reshape(image.shape), slope.reshape(image.shape)
