"""Dense O(H * W * K) MIP rasteriser: the baseline the tiled backends are measured against.

Every pixel of every view is tested against every Gaussian, with the same rule
as the other backends: pixel ``p`` receives pair ``(view, k)`` iff ``p`` lies in
the pair's rectangle and ``q <= CUTOFF_SIGMA**2``.  Work is chunked over
Gaussians so that one chunk holds at most ``max_elements`` (pixel, Gaussian)
entries, and each chunk runs under activation checkpointing, so memory stays
``O(H * W + max_elements)`` in the forward *and* the backward pass (the chunk is
recomputed during backward).

Soft mode uses two passes: the per-pixel maximum ``m`` (detached, as in the
reference; softmax does not depend on it), then ``S = sum exp(beta (g - m))``
and ``W = sum g exp(beta (g - m))`` chunk by chunk; ``out = W / S``.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from napari_neurogs_mip.render.project import CUTOFF_SIGMA, Projection
from napari_neurogs_mip.render.raster_torch import MODES

DEFAULT_MAX_ELEMENTS = 2**25
"""(pixel, Gaussian) entries per chunk: about 128 MiB per float32 temporary."""


def _gaussians(
    xs: torch.Tensor,
    ys: torch.Tensor,
    means2d: torch.Tensor,
    conics: torch.Tensor,
    amplitudes: torch.Tensor,
    rects: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``g`` [P, k] and the hit mask of ``k`` Gaussians at pixels ``(xs, ys)`` [P]."""
    dx = xs[:, None] - means2d[None, :, 0]
    dy = ys[:, None] - means2d[None, :, 1]
    q = conics[None, :, 0] * dx * dx + 2 * conics[None, :, 1] * dx * dy + conics[None, :, 2] * dy * dy
    inside = (xs[:, None] >= rects[None, :, 0]) & (xs[:, None] <= rects[None, :, 2])
    inside &= (ys[:, None] >= rects[None, :, 1]) & (ys[:, None] <= rects[None, :, 3])
    hit = inside & (q <= CUTOFF_SIGMA**2)
    return amplitudes[None, :] * torch.exp(-0.5 * q), hit


def _chunk_max(xs, ys, means2d, conics, amplitudes, rects):
    g, hit = _gaussians(xs, ys, means2d, conics, amplitudes, rects)
    return torch.where(hit, g, torch.full_like(g, float("-inf"))).amax(dim=1)


def _chunk_sums(xs, ys, shift, beta, means2d, conics, amplitudes, rects):
    g, hit = _gaussians(xs, ys, means2d, conics, amplitudes, rects)
    weight = torch.where(hit, torch.exp(beta * (g - shift[:, None])), torch.zeros_like(g))
    return weight.sum(dim=1), (weight * g).sum(dim=1)


def render_dense(
    projection: Projection, mode: str = "soft", beta: float = 50.0, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> list[torch.Tensor]:
    """Render every view by testing all pixels against all Gaussians; one [H, W] image per view.

    Differentiable w.r.t. ``projection.means2d``, ``conics`` and ``amplitudes``.

    Parameters
    ----------
    projection
        Projected Gaussians (any device).
    mode
        ``soft`` or ``max``.
    beta
        Soft-MIP sharpness, 1/intensity.
    max_elements
        Upper bound on (pixel, Gaussian) entries evaluated at once.
    """
    if mode not in MODES:
        raise ValueError(f"unknown render mode {mode!r}; expected one of {MODES}")
    device, dtype = projection.means2d.device, projection.means2d.dtype
    num_gaussians = projection.means2d.shape[1]
    images = []
    for view, (height, width) in enumerate(projection.shapes):
        ys, xs = torch.meshgrid(
            torch.arange(height, device=device, dtype=dtype),
            torch.arange(width, device=device, dtype=dtype),
            indexing="ij",
        )
        xs, ys = xs.reshape(-1), ys.reshape(-1)
        chunk = max(1, max_elements // xs.numel())
        rects = projection.rects[view].to(dtype)
        pieces = [
            (projection.means2d[view, s : s + chunk], projection.conics[view, s : s + chunk],
             projection.amplitudes[view, s : s + chunk], rects[s : s + chunk])
            for s in range(0, num_gaussians, chunk)
        ]  # fmt: skip
        peak = torch.full_like(xs, float("-inf"))
        if mode == "max":
            for piece in pieces:
                peak = torch.maximum(peak, checkpoint(_chunk_max, xs, ys, *piece, use_reentrant=False))
            flat = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        else:
            with torch.no_grad():
                for piece in pieces:
                    peak = torch.maximum(peak, _chunk_max(xs, ys, *(p.detach() for p in piece)))
            shift = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
            norm = torch.zeros_like(xs)
            weighted = torch.zeros_like(xs)
            for piece in pieces:
                s, w = checkpoint(_chunk_sums, xs, ys, shift, beta, *piece, use_reentrant=False)
                norm = norm + s
                weighted = weighted + w
            flat = torch.where(norm > 0, weighted / torch.where(norm > 0, norm, torch.ones_like(norm)), norm)
        if not pieces:  # K == 0: keep the result attached to the graph, as the other backends do
            flat = flat + 0 * projection.amplitudes.sum()
        images.append(flat.reshape(height, width))
    return images
