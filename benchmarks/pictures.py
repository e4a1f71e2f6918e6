"""Pictures for the benchmarks' docs: rows of target | render | residual, labelled, on one canvas.

Intensities are shown with gamma 0.5 so that dendrites at 5-10 % of the soma stay visible; the residual is
render - target, red where the render is too bright and blue where it is missing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np


def comparison_row(target: np.ndarray, render: np.ndarray, gap: int = 4) -> np.ndarray:
    """``target | render | residual`` side by side as one RGB uint8 image; inputs in [0, 1], same shape."""
    grey = [np.repeat((np.sqrt(np.clip(a, 0, 1)) * 255)[..., None], 3, -1) for a in (target, render)]
    residual = np.clip(render, 0, 1) - target
    signed = np.zeros((*residual.shape, 3))
    signed[..., 0] = np.sqrt(np.clip(residual, 0, 1)) * 255
    signed[..., 2] = np.sqrt(np.clip(-residual, 0, 1)) * 255
    spacer = np.full((target.shape[0], gap, 3), 80.0)
    return np.concatenate([grey[0], spacer, grey[1], spacer, signed], axis=1).astype(np.uint8)


def save_rows(
    path: Path,
    title: str,
    rows: list[tuple[str, np.ndarray]],
    caption: int = 14,
    decorate: Callable[[object, int, int], None] | None = None,
) -> Path:
    """Write ``rows`` (label, RGB image) under ``title`` to ``path`` (PNG); ``decorate(draw, index, top)`` may draw
    over row ``index`` whose image starts ``top`` pixels down."""
    from PIL import Image, ImageDraw

    width = max(r.shape[1] for _, r in rows)
    canvas = Image.new("RGB", (width, sum(r.shape[0] + caption + 2 for _, r in rows) + 20), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), title, fill=(255, 255, 255))
    top = 20
    for index, (label, row) in enumerate(rows):
        draw.text((4, top + 2), label, fill=(255, 255, 160))
        canvas.paste(Image.fromarray(row), (0, top + caption))
        if decorate is not None:
            decorate(draw, index, top + caption)
        top += row.shape[0] + caption + 2
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
