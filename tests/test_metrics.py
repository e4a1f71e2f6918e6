"""Foreground-aware metrics: a missing neuron must show, whatever the whole-image PSNR says."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.draw import line
from skimage.metrics import structural_similarity

from napari_neurogs_mip.metrics import FOREGROUND_FLOOR, foreground_level, foreground_mask, format_table, score

SHAPE = (128, 128)


def neuron_mip(noise: float = 0.0, offset: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A sparse neuron MIP: a bright soma and six faint 1-pixel dendrites (0.1 fading to 0.05).

    Returns the noise-free image, the noisy target (background ``offset`` + normal noise, clipped to
    [0, 1] like a normalised target) and the dendrite mask.
    """
    rows, cols = np.mgrid[: SHAPE[0], : SHAPE[1]]
    d2 = (rows - 64.0) ** 2 + (cols - 64.0) ** 2
    clean = np.where(d2 <= 36, 1.0 - 0.4 * d2 / 36, 0.0)
    dendrites = np.zeros(SHAPE, bool)
    for angle in np.linspace(0, 2 * np.pi, 6, endpoint=False) + 0.3:
        r0, c0 = 64 + 7 * np.sin(angle), 64 + 7 * np.cos(angle)
        r1, c1 = 64 + 60 * np.sin(angle), 64 + 60 * np.cos(angle)
        rr, cc = line(round(r0), round(c0), round(r1), round(c1))
        values = np.linspace(0.1, 0.05, rr.size)
        clean[rr, cc] = np.maximum(clean[rr, cc], values)
        dendrites[rr, cc] = True
    rng = np.random.default_rng(seed)
    target = np.clip(clean + offset + noise * rng.standard_normal(SHAPE), 0.0, 1.0) if noise else clean.copy()
    return clean, target, dendrites


def numpy_psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a - b) ** 2)))


@pytest.mark.parametrize("noise", [0.0, 0.01], ids=["zero-background", "noisy-background"])
def test_missing_dendrites_show_in_recall_and_fg_psnr_not_in_psnr(noise: float) -> None:
    clean, target, dendrites = neuron_mip(noise)
    good = 0.98 * clean  # what a model renders: no noise, a small gain error
    bad = np.where(dendrites, 0.0, good)  # the same without the dendrites
    with_dendrites, without = score(good, target), score(bad, target)

    assert without["psnr"] > 28.0  # the whole-image PSNR hides the missing dendrites
    assert without["recall"] < 0.5
    assert with_dendrites["recall"] > 0.95
    assert without["fg_psnr"] < without["psnr"] - 6.0
    assert without["fg_psnr"] < with_dendrites["fg_psnr"] - 6.0
    # The foreground is the neuron: soma and dendrites, a few % of the image.
    assert 0.015 < with_dendrites["fg_fraction"] < 0.04


def test_foreground_level_zero_background_is_the_floor() -> None:
    _, target, _ = neuron_mip(0.0)
    assert foreground_level(target) == pytest.approx(FOREGROUND_FLOOR)
    mask = foreground_mask(target, dilate=0)
    np.testing.assert_array_equal(mask, target > 0)


@pytest.mark.parametrize("clipped", [True, False], ids=["clipped-at-0", "unclipped"])
def test_foreground_level_between_noise_and_faint_dendrites(clipped: bool) -> None:
    clean, _, dendrites = neuron_mip()
    rng = np.random.default_rng(1)
    target = clean + 0.01 * rng.standard_normal(SHAPE)
    if clipped:
        target = np.clip(target, 0.0, 1.0)
    level = foreground_level(target)
    assert 0.03 < level < 0.05  # above 3 noise sigmas, below the faintest dendrite (0.05)
    background = clean == 0
    assert np.mean(target[background] > level) < 1e-3
    assert np.mean(foreground_mask(target, dilate=0)[dendrites]) > 0.9


@pytest.mark.parametrize("offset", [-0.01, -0.005, 0.0, 0.005, 0.01])
def test_foreground_level_with_background_clipped_off_centre(offset: float) -> None:
    """Views whose background centre is not the normalisation's 0: 16 % to 84 % of it is clipped to 0."""
    clean, target, _ = neuron_mip(noise=0.01, offset=offset, seed=2)
    level = foreground_level(target)
    assert level == pytest.approx(offset + 0.04, abs=0.008)
    noise_only = clean == 0
    assert np.mean(foreground_mask(target, dilate=0)[noise_only]) < 1e-3


@pytest.mark.parametrize("clipped", [True, False], ids=["normalised-like-a-target", "unclipped"])
def test_mip_noise_rarely_crosses_the_level(clipped: bool) -> None:
    """MIP background is the maximum of many noise samples: skewed to the bright side, where the level is."""
    clean, _, dendrites = neuron_mip()
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((100, *SHAPE)).max(axis=0)
    noise = 0.01 * (noise - np.median(noise)) / noise.std()  # MIP noise with sigma 0.01 around 0
    target = np.clip(clean + noise, 0.0, 1.0) if clipped else clean + noise + 0.05
    background = clean == 0
    level = foreground_level(target)
    assert np.mean(target[background] > level) < 3e-3  # 1.4e-3 to 1.8e-3 here; 5e-3 with a normal sigma
    mask = foreground_mask(target, dilate=0)
    assert np.mean(mask[background]) < 5e-4  # isolated crossings are not foreground
    assert np.mean(mask[dendrites]) > 0.9


def test_foreground_level_of_a_dense_image() -> None:
    """Nuclei cover ~60 % of the image: the median is foreground, the background still is found."""
    rng = np.random.default_rng(3)
    rows, cols = np.mgrid[:256, :256]
    image = np.full((256, 256), 0.1)
    nuclei = np.zeros((256, 256), bool)
    for _ in range(300):
        r, c = rng.uniform(0, 256, 2)
        radius = rng.uniform(5, 12)
        d2 = (rows - r) ** 2 + (cols - c) ** 2
        inside = d2 <= radius**2
        image[inside] = np.maximum(image[inside], (rng.uniform(0.3, 1.0) * (1 - 0.5 * d2 / radius**2))[inside])
        nuclei |= inside
    image += 0.01 * rng.standard_normal(image.shape)
    assert nuclei.mean() > 0.5 and np.median(image) > 0.2
    level = foreground_level(image)
    assert 0.12 < level < 0.2
    assert np.mean(foreground_mask(image, dilate=0) == nuclei) > 0.995


def test_fg_psnr_recall_and_fraction_match_numpy_over_the_mask() -> None:
    clean, target, dendrites = neuron_mip(0.01)
    rendered = np.where(dendrites, 0.5 * clean, 0.9 * clean)
    result = score(rendered, target)
    dilated = foreground_mask(target)  # dilate=2, as score uses
    undilated = foreground_mask(target, dilate=0)
    assert dilated.sum() > 3 * undilated.sum() > 0
    assert result["fg_psnr"] == pytest.approx(numpy_psnr(rendered[dilated], target[dilated]), rel=1e-12)
    assert result["psnr"] == pytest.approx(numpy_psnr(rendered, target), rel=1e-9)
    assert result["recall"] == pytest.approx(np.mean(rendered[undilated] >= 0.5 * target[undilated]))
    assert result["fg_fraction"] == pytest.approx(undilated.mean())


def test_ssim_agrees_with_skimage_and_tensors_score_like_arrays() -> None:
    clean, target, dendrites = neuron_mip(0.01)
    rendered = np.clip(np.where(dendrites, 0.0, clean) + 0.02 * np.random.default_rng(4).random(SHAPE), 0, 1)
    rendered, target = rendered.astype(np.float32), target.astype(np.float32)
    expected = structural_similarity(
        target.astype(np.float64),
        rendered.astype(np.float64),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
    )
    result = score(rendered, target)
    assert abs(result["ssim"] - expected) < 1e-4
    assert score(torch.from_numpy(rendered), torch.from_numpy(target)) == pytest.approx(result, rel=1e-12)


def test_small_image_has_nan_ssim() -> None:
    target = np.zeros((8, 9))
    target[3:5, 2:7] = 0.5
    result = score(0.9 * target, target)
    assert math.isnan(result["ssim"])
    assert result["recall"] == 1.0 and math.isfinite(result["psnr"]) and math.isfinite(result["fg_psnr"])


def test_all_zero_target_has_nan_foreground_metrics() -> None:
    target = np.zeros(SHAPE)
    same = score(np.zeros(SHAPE), target)
    assert same["psnr"] == math.inf and same["ssim"] == pytest.approx(1.0) and same["fg_fraction"] == 0.0
    assert math.isnan(same["fg_psnr"]) and math.isnan(same["recall"])
    other = score(np.full(SHAPE, 0.1), target)
    assert other["psnr"] == pytest.approx(20.0)
    assert math.isnan(other["fg_psnr"]) and math.isnan(other["recall"])


def test_foreground_mask_dilation_and_isolated_pixels() -> None:
    image = np.zeros((32, 32))
    image[5, 5] = 1.0  # a lone bright point: kept
    image[20, 20] = 0.03  # a lone pixel just above the level (0.02): noise, dropped
    image[25, 10:12] = 0.03  # two touching pixels just above the level: kept
    image[31, 31] = 0.03  # a lone faint pixel in the corner: dropped (outside the image is not foreground)
    mask = foreground_mask(image, dilate=0)
    assert mask.sum() == 3 and mask[5, 5] and not mask[20, 20] and mask[25, 10:12].all() and not mask[31, 31]
    dilated = foreground_mask(image, dilate=2)
    assert dilated[:15, :15].sum() == 13  # the disk of radius 2
    assert dilated[0:4, :].sum() == 1  # (3, 5) only
    with pytest.raises(ValueError, match="dilate"):
        foreground_mask(image, dilate=-1)
    with pytest.raises(ValueError, match="one shape"):
        score(image, image[:-1])


def test_format_table() -> None:
    scores = {
        "xy": {"psnr": 30.0, "fg_psnr": 20.0, "recall": 0.5, "ssim": 0.9, "fg_fraction": 0.02},
        "xz": {"psnr": 40.0, "fg_psnr": math.nan, "recall": math.nan, "ssim": 0.8, "fg_fraction": 0.0},
        "orbit_07": {"psnr": 25.0, "fg_psnr": 15.0, "recall": 0.25, "ssim": math.nan, "fg_fraction": 0.01},
    }
    table = format_table(scores, held_out={"orbit_07"})
    lines = table.splitlines()
    for name in scores:
        assert any(row.split()[0] == name for row in lines)
    assert "held-out" in table and "trained" in table
    means = [row.split() for row in lines if row.startswith("mean")]
    assert [row[1] for row in means] == ["trained", "held-out"]
    assert means[0][2:6] == ["35.00", "20.00", "0.500", "0.8500"]  # NaNs left out of the means
    assert means[1][2:6] == ["25.00", "15.00", "0.250", "nan"]
    widths = {len(row) for row in lines}
    assert len(widths) == 1  # fixed width: every row, rules included, has one length
    only_trained = format_table({"xy": scores["xy"]})
    assert "held-out" not in only_trained and sum(r.startswith("mean") for r in only_trained.splitlines()) == 1
