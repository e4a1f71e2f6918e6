"""Reference rasteriser in pure PyTorch (autograd; cpu, cuda or mps).

Every (view, Gaussian, pixel) triple inside a Gaussian's bounding rectangle is
enumerated once, so memory scales with the sum of the footprints, never with
``H * W * K``.  The other backends are tested against this one.

Soft MIP per pixel over the Gaussians ``k`` that reach it, ``g_k = a_k exp(-q_k / 2)``:
``out = sum_k s_k g_k`` with ``s = softmax(beta g)``, computed with the running
maximum ``m`` as ``W / S``, ``S = sum exp(beta (g - m))``, ``W = sum g exp(beta (g - m))``.
The maximum is detached: softmax does not depend on it.  Hard MIP: ``max_k g_k``.
A pixel no Gaussian reaches is 0.
"""

from __future__ import annotations

import torch

from .project import CUTOFF_SIGMA, DEFAULT_BETA, Projection

MODES = ("soft", "max")


def pixel_offsets(shapes: list[tuple[int, int]]) -> list[int]:
    """Start of each view in a flat buffer of all views' pixels (row-major per view)."""
    offsets = [0]
    for height, width in shapes:
        offsets.append(offsets[-1] + height * width)
    return offsets


def split_views(flat: torch.Tensor, shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Cut a flat buffer of all views' pixels into [H, W] images."""
    offsets = pixel_offsets(shapes)
    return [flat[offsets[i] : offsets[i + 1]].reshape(shape) for i, shape in enumerate(shapes)]


def enumerate_pairs(projection: Projection) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (pair, pixel) inside the bounding rectangles.

    Returns
    -------
    pair
        Flat (view * K + gaussian) index of each entry.
    view
        View index of each entry.
    x, y
        Pixel column and row of each entry.
    """
    rects = projection.rects.reshape(-1, 4).long()
    num_gaussians = projection.rects.shape[1]
    widths = (rects[:, 2] - rects[:, 0] + 1).clamp_min(0)
    heights = (rects[:, 3] - rects[:, 1] + 1).clamp_min(0)
    counts = widths * heights
    live = torch.nonzero(counts > 0).squeeze(1)
    counts = counts[live]
    pair = torch.repeat_interleave(live, counts)
    starts = torch.cumsum(counts, 0) - counts
    local = torch.arange(int(counts.sum()), device=rects.device) - torch.repeat_interleave(starts, counts)
    row_width = widths[pair]
    x = rects[pair, 0] + local % row_width
    y = rects[pair, 1] + local // row_width
    return pair, pair // num_gaussians, x, y


def pair_values(projection: Projection) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (pair, pixel) within the cut-off and its value ``g``.

    Returns
    -------
    pair
        Flat (view * K + gaussian) index of each entry.
    pixel
        Index of each entry's pixel in the flat buffer of all views (:func:`pixel_offsets`).
    value
        ``g = a exp(-q / 2)`` (differentiable).
    """
    shapes = projection.shapes
    offsets = torch.tensor(pixel_offsets(shapes), device=projection.means2d.device)
    widths = torch.tensor([w for _, w in shapes], device=projection.means2d.device)
    pair, view, x, y = enumerate_pairs(projection)
    means2d = projection.means2d.reshape(-1, 2)[pair]
    conics = projection.conics.reshape(-1, 3)[pair]
    dx = x.to(means2d.dtype) - means2d[:, 0]
    dy = y.to(means2d.dtype) - means2d[:, 1]
    q = conics[:, 0] * dx * dx + 2 * conics[:, 1] * dx * dy + conics[:, 2] * dy * dy
    inside = q <= CUTOFF_SIGMA**2
    g = projection.amplitudes.reshape(-1)[pair[inside]] * torch.exp(-0.5 * q[inside])
    pixel = offsets[view[inside]] + y[inside] * widths[view[inside]] + x[inside]
    return pair[inside], pixel, g


def rasterize(projection: Projection, mode: str = "soft", beta: float = DEFAULT_BETA) -> list[torch.Tensor]:
    """Render every view of ``projection``; returns one [H, W] image per view."""
    if mode not in MODES:
        raise ValueError(f"unknown render mode {mode!r}; expected one of {MODES}")
    shapes = projection.shapes
    _, pixel, g = pair_values(projection)
    total = sum(h * w for h, w in shapes)
    zeros = torch.zeros(total, dtype=g.dtype, device=g.device)
    if mode == "max":
        flat = zeros.scatter_reduce(0, pixel, g, reduce="amax", include_self=False)
        return split_views(flat, shapes)
    peak = zeros.scatter_reduce(0, pixel, g.detach(), reduce="amax", include_self=False)
    weight = torch.exp(beta * (g - peak[pixel]))
    norm = zeros.index_add(0, pixel, weight)
    weighted = zeros.index_add(0, pixel, g * weight)
    flat = torch.where(norm > 0, weighted / torch.where(norm > 0, norm, torch.ones_like(norm)), zeros)
    return split_views(flat, shapes)
