"""Image metrics that cannot hide a missing neuron.

A MIP of a sparse neuron is mostly dark background, so whole-image PSNR (and
to a lesser degree SSIM) stays high when most of the neuron is missing: leaving
out faint dendrites (intensity 0.07) on 2 % of the pixels costs 1e-4 of MSE,
which still reads 40 dB.  This module therefore also scores the *foreground*
of the target, the pixels clearly above its background:

``fg_psnr``
    PSNR over the foreground pixels only (dilated by a few pixels so that
    blurred or shifted structure is scored too), with data range 1.
``recall``
    Fraction of the (undilated) foreground pixels that the rendering reproduces
    with at least half their target value; a missing dendrite lowers it in
    proportion to its length, however faint it is.
``fg_fraction``
    Fraction of the pixels in the (undilated) foreground, to read the two above.

Targets are normalised to [0, 1] (:class:`.targets.Normalization`); with the
default ``background`` rule the background of the MIPs sits at (and is clipped
to) 0 with its noise above.  :func:`foreground_level` estimates where that
background ends from the target itself (see there for the estimator).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import numpy as np
import torch
from scipy import ndimage, special

from .losses import SSIM_WINDOW, psnr, ssim

FOREGROUND_K = 4.0
"""Noise standard deviations between the background centre and the foreground level."""

FOREGROUND_FLOOR = 0.02
"""Smallest margin (in normalised intensity) between the background centre and the foreground level."""

_MAX_SAMPLES = 1 << 22
"""Pixels :func:`foreground_level` looks at, at most (a regular subsample of larger images)."""

_MAD_TO_SIGMA = 1.0 / 0.6744897501960817
"""1 / the 75th percentile of the standard normal: the MAD of a normal distribution is 0.6745 sigma."""

_TAIL_QUARTILE_RATIO = 0.65
"""Largest (25th / 50th percentile) of the background tail above a clipped minimum for it to be noise.

Measured from the minimum, the tail of a normal distribution above any cut has a ratio below 0.56 (0.47 for
a cut at the centre, 0.42 far out); foreground that starts above a gap (a noise-free background) gives
ratios near 1.
"""

_MIN_TAIL_PIXELS = 16
"""Fewest background pixels above a clipped minimum to estimate the noise from; fewer: noise-free."""


def _as_numpy(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """float64 numpy copy (or view) of an image given as an array or a tensor on any device."""
    if isinstance(image, torch.Tensor):
        return image.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(image, dtype=np.float64)


def _half_sample_mode(values: np.ndarray) -> float:
    """Half-sample mode (Bickel and Frühwirth 2006) of sorted values: repeatedly keep the shortest half.

    Parameter-free and robust; with many equal values (a clipped or noise-free background) it returns that value.
    """
    x = values
    while x.size > 3:
        half = (x.size + 1) // 2
        widths = x[half - 1 :] - x[: x.size - half + 1]
        start = int(np.argmin(widths))
        x = x[start : start + half]
    if x.size == 3:
        x = x[:2] if x[1] - x[0] <= x[2] - x[1] else x[1:]
    return float(np.mean(x))


def _lower_side_sigma(x: np.ndarray, centre: float) -> float | None:
    """Noise sigma from the background's 25th percentile, or ``None`` when that lies on a clipped minimum.

    The pixels below the background centre are background only (the foreground is brighter), and the one
    at half their rank is the background's 25th percentile, ``centre - 0.6745 sigma``: this holds whatever
    the amount of foreground.
    """
    n_low = int(np.searchsorted(x, centre, side="right"))  # pixels at or below the centre
    quartile = float(x[max(n_low - 1, 0) // 2])
    if quartile <= x[0]:
        return None
    return max(0.0, (centre - quartile) * _MAD_TO_SIGMA)


def _censored_fit(x: np.ndarray, k: float) -> tuple[float, float]:
    """Centre and sigma of a normal background whose lower part is clipped to the minimum of sorted ``x``.

    With ``B`` pixels of background, of which ``atom`` sit at the minimum (clipped), the minimum is the
    background's ``atom / B`` quantile.  A normal distribution is fitted through two quantiles of the
    background: the larger of its median and that clipped one, and the larger of its 75th percentile and
    the median of its tail above the minimum (the upper quantiles matter: MIP noise is skewed to the bright
    side).  ``B`` is the number of pixels minus those above the resulting level, iterated from all pixels.
    When the tail above the minimum is too small, or starts above a gap (``_TAIL_QUARTILE_RATIO``:
    foreground over a noise-free background), the noise is 0.
    """
    n = x.size
    minimum = float(x[0])
    n_atom = int(np.searchsorted(x, minimum, side="right"))
    n_fg = 0
    centre, sigma = minimum, 0.0
    for _ in range(20):
        background = n - n_fg
        n_tail = background - n_atom  # background pixels above the minimum
        if n_tail < _MIN_TAIL_PIXELS:
            return minimum, 0.0
        quarter = float(x[n_atom + n_tail // 4 - 1]) - minimum
        half = float(x[n_atom + n_tail // 2 - 1]) - minimum
        if half <= 0 or quarter > _TAIL_QUARTILE_RATIO * half:
            return minimum, 0.0
        p_low = max(0.5, n_atom / background)
        p_high = max(0.75, (n_atom + n_tail / 2) / background)
        x_low = minimum if n_atom >= background / 2 else float(x[int(p_low * background) - 1])
        x_high = float(x[int(p_high * background) - 1])
        z_low, z_high = float(special.ndtri(p_low)), float(special.ndtri(p_high))
        if x_high <= x_low:
            return minimum, 0.0
        sigma = (x_high - x_low) / (z_high - z_low)
        centre = x_low - z_low * sigma
        updated = n - int(np.searchsorted(x, centre + k * sigma, side="right"))
        if updated == n_fg:
            break
        n_fg = updated
    return centre, sigma


def _background(target: np.ndarray | torch.Tensor, k: float) -> tuple[float, float]:
    """Centre and noise sigma of the background of ``target`` (see :func:`foreground_level`)."""
    values = _as_numpy(target).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("foreground_level needs an image with at least one finite pixel")
    if values.size > _MAX_SAMPLES:
        values = values[:: -(-values.size // _MAX_SAMPLES)]
    x = np.sort(values)
    # Mode of the lowest quarter of the histogram: the background peak even when most pixels are foreground.
    centre = _half_sample_mode(x[: (x.size + 3) // 4])
    sigma = _lower_side_sigma(x, centre)
    # When the background is most of the image, the mode of the lowest quarter sits low on its peak; the
    # median of the pixels within 3 sigma of the centre moves it onto the peak's centre.
    for _ in range(50):
        if sigma is None or sigma == 0:
            break
        lo = np.searchsorted(x, centre - 3 * sigma, side="left")
        hi = np.searchsorted(x, centre + 3 * sigma, side="right")
        updated = float(np.median(x[lo:hi]))
        converged = abs(updated - centre) <= 1e-3 * sigma
        centre = updated
        sigma = _lower_side_sigma(x, centre)
        if converged:
            break
    if sigma is None:
        return _censored_fit(x, k)
    # MIP background is skewed to the bright side (a maximum of noise samples), so the upper side of the peak
    # is the one that reaches the level: take the larger of the two spreads.  The pixels at or below the
    # centre are half the background, so as many again above it reach its 75th percentile,
    # ``centre + 0.6745 sigma``; foreground brighter than that does not move it.
    n_low = int(np.searchsorted(x, centre, side="right"))
    upper = float(x[min(n_low + n_low // 2, x.size) - 1]) - centre
    return centre, max(sigma, upper * _MAD_TO_SIGMA)


def foreground_level(
    target: np.ndarray | torch.Tensor, *, k: float = FOREGROUND_K, floor: float = FOREGROUND_FLOOR
) -> float:
    """Intensity above which a pixel of a normalised target MIP counts as foreground.

    ``level = max(centre + k * sigma, max(centre, minimum) + floor)``, where ``centre`` and ``sigma`` are
    the centre and noise standard deviation of the background, estimated from the pixel values alone:

    * ``centre``: the half-sample mode of the *lowest quarter* of the pixel values, refined to the median
      of the pixels within ``3 sigma`` of it.  For a sparse neuron (most pixels background) this is the
      background; for a dense image (many nuclei: the median pixel is foreground) the lowest quarter still
      holds the background peak as long as the background covers about a quarter of the image or more.
    * ``sigma``: the larger of the spreads given by the background's 25th percentile (the pixels below
      ``centre``, which no foreground reaches) and by its 75th percentile (as many pixels again above
      ``centre``; MIP noise is skewed to the bright side, where the level is), each ``0.6745 sigma`` from
      ``centre`` for normal noise.
    * When that 25th percentile lies on the minimum of the image, the background is clipped there (the
      ``background`` normalisation maps the median pixel to 0) or noise-free: ``centre`` and ``sigma`` then
      come from a normal distribution censored at the minimum, fitted to the share of pixels at the minimum
      and the upper quantiles of the background pixels above it; a noise-free background (no continuous
      tail of pixels just above the minimum) has ``sigma = 0``.

    The estimate needs no parameter of the data; it fails (too high a level) when the background is less
    than about a quarter of the image, and for a dense image normalised with the ``background`` rule (its
    median is foreground, so the background is clipped together with the dimmest foreground).

    Parameters
    ----------
    target
        [H, W] (or any shape) normalised target image; non-finite pixels are ignored.
    k
        Noise standard deviations between the background centre and the level.  MIP background is the
        maximum of many noise samples, with a heavier upper tail than a normal distribution; 4 keeps the
        share of background pixels above the level near 1e-3 or below.
    floor
        Smallest margin above the background centre (or above the minimum, if the centre lies below it).
        A noise-free background (synthetic data, or noise below the intensity quantisation) has
        ``sigma = 0``: without a floor every rounding error above the background would be foreground.
        0.02 is 5 steps of 8-bit data and well below faint neurites.

    Returns
    -------
    float
        The level; pixels strictly above it are foreground.

    Raises
    ------
    ValueError
        If the image has no finite pixel.
    """
    return _level(_as_numpy(target), k, floor)[0]


def _level(values: np.ndarray, k: float, floor: float) -> tuple[float, float]:
    """:func:`foreground_level` and the background centre it is measured from."""
    centre, sigma = _background(values, k)
    minimum = float(np.min(values[np.isfinite(values)]))
    return max(centre + k * sigma, max(centre, minimum) + floor), centre


def foreground_mask(target: np.ndarray | torch.Tensor, dilate: int = 2, level: float | None = None) -> np.ndarray:
    """Pixels of ``target`` above :func:`foreground_level`, without isolated noise, optionally dilated.

    A pixel above the level with no 8-neighbour above it counts only if it is twice as far above the
    background centre as the level.  Noise crosses the level at isolated pixels (1e-3 of the background or
    less, see ``k``), and such a pixel could never be reproduced by a rendering: left in, these pixels would
    cap the recall of a perfect rendering of a sparse neuron noticeably below 1.  Neurites and somata are
    connected runs of pixels; a lone genuine point (e.g. a neuron shrunk to a pixel in a coarse view) is
    kept when it is bright.

    Parameters
    ----------
    target
        [H, W] normalised target image.
    dilate
        Radius in pixels of the disk (``row**2 + col**2 <= dilate**2``) the foreground is dilated with;
        0 for none.
    level
        The foreground level if known (e.g. :meth:`.targets.Targets.foreground_levels`, estimated on the
        raw MIP before normalisation clipped its background); by default :func:`foreground_level` of
        ``target``, with the background at 0.

    Returns
    -------
    np.ndarray
        bool [H, W] mask.

    Raises
    ------
    ValueError
        If ``target`` is not 2-D or has no finite pixel, or ``dilate`` is not an integer >= 0.
    """
    if int(dilate) != dilate or dilate < 0:
        raise ValueError(f"dilate must be an integer >= 0, got {dilate}")
    image = _as_numpy(target)
    if image.ndim != 2:
        raise ValueError(f"foreground_mask needs an [H, W] image, got shape {image.shape}")
    return _dilated(_foreground(image, level), int(dilate))


def _foreground(image: np.ndarray, level: float | None = None) -> np.ndarray:
    """Undilated :func:`foreground_mask` of a float64 [H, W] image."""
    # A given level belongs to a normalised target, whose background sits at 0.
    level, centre = _level(image, FOREGROUND_K, FOREGROUND_FLOOR) if level is None else (level, 0.0)
    above = image > level  # NaN pixels compare False
    ring = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]], np.uint8)
    neighbours = ndimage.convolve(above.astype(np.uint8), ring, mode="constant", cval=0)
    return above & ((neighbours > 0) | (image > 2 * level - centre))


def _dilated(mask: np.ndarray, radius: int) -> np.ndarray:
    """``mask`` dilated by the disk ``row**2 + col**2 <= radius**2``."""
    if radius == 0 or not mask.any():
        return mask
    rows, cols = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return ndimage.binary_dilation(mask, structure=rows**2 + cols**2 <= radius**2)


def score(
    rendered: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor, foreground: np.ndarray | None = None
) -> dict[str, float]:
    """Whole-image and foreground metrics of one rendered view against its target.

    Parameters
    ----------
    rendered, target
        [H, W] images in [0, 1] (numpy arrays or tensors on any device).
    foreground
        bool [H, W] undilated foreground to use instead of ``target``'s own (e.g. that of the noisy
        target when scoring against a noise-free one, whose background level cannot be told from the data).

    Returns
    -------
    dict[str, float]
        ``psnr``
            Whole-image PSNR in dB (:func:`.losses.psnr`, data range 1; ``inf`` for identical images).
        ``ssim``
            Whole-image SSIM (:func:`.losses.ssim` in float64); NaN when a side is shorter than
            ``SSIM_WINDOW`` pixels.
        ``fg_psnr``
            PSNR in dB over the foreground of ``target`` dilated by 2 pixels (:func:`foreground_mask`),
            data range 1; ``inf`` when those pixels match exactly.
        ``recall``
            Fraction of the undilated foreground pixels where ``rendered >= target / 2``.
        ``fg_fraction``
            Fraction of all pixels in the undilated foreground.

        ``fg_psnr`` and ``recall`` are NaN when the target has no foreground (e.g. an all-zero target):
        there is nothing to miss, and a number would read as a score.

    Raises
    ------
    ValueError
        If the images are not two [H, W] arrays of one shape.
    """
    r = torch.as_tensor(_as_numpy(rendered))
    t = torch.as_tensor(_as_numpy(target))
    if r.shape != t.shape or r.ndim != 2:
        raise ValueError(f"score needs two [H, W] images of one shape, got {tuple(r.shape)} and {tuple(t.shape)}")
    rn, tn = r.numpy(), t.numpy()
    fg = _foreground(tn) if foreground is None else np.asarray(foreground, dtype=bool)
    if fg.shape != tn.shape:
        raise ValueError(f"the foreground mask has shape {fg.shape}, the images {tn.shape}")
    fg_dilated = _dilated(fg, 2)
    if fg.any():
        error = float(np.mean((rn[fg_dilated] - tn[fg_dilated]) ** 2))
        fg_psnr = math.inf if error == 0 else 10.0 * math.log10(1.0 / error)
        recall = float(np.mean(rn[fg] >= 0.5 * tn[fg]))
    else:
        fg_psnr = recall = math.nan
    similarity = float(ssim(r, t)) if min(r.shape) >= SSIM_WINDOW else math.nan
    return {
        "psnr": psnr(r, t),
        "ssim": similarity,
        "fg_psnr": fg_psnr,
        "recall": recall,
        "fg_fraction": float(np.mean(fg)),
    }


_COLUMNS = (
    # (header, key, width, format)
    ("PSNR", "psnr", 8, ".2f"),
    ("fg PSNR", "fg_psnr", 8, ".2f"),
    ("recall", "recall", 7, ".3f"),
    ("SSIM", "ssim", 7, ".4f"),
    ("fg %", "fg_fraction", 6, ".1%"),
)


def _mean(values: list[float]) -> float:
    """Mean of the non-NaN values (``inf`` if one is ``inf``); NaN if there are none."""
    finite = [v for v in values if not math.isnan(v)]
    return math.fsum(finite) / len(finite) if finite else math.nan


def format_table(scores: Mapping[str, Mapping[str, float]], held_out: Collection[str] = ()) -> str:
    """Fixed-width text table of per-view :func:`score` results, with mean rows per group.

    Parameters
    ----------
    scores
        ``{view name: score(rendered, target)}``, rows in this order; missing keys show as ``nan``.
    held_out
        Names of the views not trained on; the others are ``trained``.

    Returns
    -------
    str
        One header line, one line per view (name, ``trained``/``held-out``, PSNR, fg PSNR, recall, SSIM,
        fg %), then a ``mean`` line for each non-empty group: the mean of the view values, PSNRs in dB,
        NaNs (no foreground, image too small for SSIM) left out.  No trailing newline.
    """
    held = set(held_out)
    groups = {"trained": [n for n in scores if n not in held], "held-out": [n for n in scores if n in held]}
    name_width = max([4, *(len(n) for n in scores)])
    group_width = len("held-out")

    def line(name: str, group: str, values: list[float] | None) -> str:
        cells = [f"{name:<{name_width}}", f"{group:<{group_width}}"]
        for (header, _, width, fmt), value in zip(_COLUMNS, values or [None] * len(_COLUMNS)):
            if value is None:
                cells.append(f"{header:>{width}}")
            else:
                cells.append(f"{'nan':>{width}}" if math.isnan(value) else f"{value:>{width}{fmt}}")
        return "  ".join(cells).rstrip()

    rows = [line("view", "set", None)]
    rule = "-" * len(rows[0])
    rows.append(rule)
    for name in scores:
        group = "held-out" if name in held else "trained"
        rows.append(line(name, group, [float(scores[name].get(key, math.nan)) for _, key, _, _ in _COLUMNS]))
    means = [
        line("mean", group, [_mean([float(scores[n].get(key, math.nan)) for n in names]) for _, key, _, _ in _COLUMNS])
        for group, names in groups.items()
        if names
    ]
    if means:
        rows += [rule, *means]
    return "\n".join(rows)
