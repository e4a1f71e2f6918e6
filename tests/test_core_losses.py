"""SSIM, PSNR and the MIP loss against scikit-image and numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from napari_neurogs_mip.losses import LossWeights, l1, mip_loss, mse, psnr, ssim


def skimage_ssim(a: np.ndarray, b: np.ndarray) -> float:
    return float(
        structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
    )


def _blobs(shape: tuple[int, int], rng: np.random.Generator, count: int = 6) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    image = np.zeros(shape)
    for _ in range(count):
        r, c = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        s = rng.uniform(1.0, 4.0)
        image = np.maximum(image, rng.uniform(0.3, 1.0) * np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * s * s)))
    return image


def _pairs():
    rng = np.random.default_rng(2024)
    for shape in [(11, 11), (16, 23), (64, 64), (37, 80)]:
        a = rng.random(shape)
        yield f"noise-vs-noisier-{shape}", a, np.clip(a + 0.1 * rng.standard_normal(shape), 0, 1)
        yield f"independent-noise-{shape}", rng.random(shape), rng.random(shape)
        blobs = _blobs(shape, rng)
        yield f"blobs-vs-shifted-{shape}", blobs, np.roll(blobs, (1, -2), axis=(0, 1))
        yield f"blobs-vs-dimmed-{shape}", blobs, 0.6 * blobs + 0.05
    rows, cols = np.mgrid[:40, :50]
    yield "gradient-vs-stripes", rows / 39.0, 0.5 + 0.5 * np.sin(cols / 2.0)
    yield "constant-vs-noise", np.full((20, 30), 0.3), rng.random((20, 30))
    yield "zeros-vs-zeros", np.zeros((12, 15)), np.zeros((12, 15))


PAIRS = list(_pairs())


@pytest.mark.parametrize(("name", "a", "b"), PAIRS, ids=[p[0] for p in PAIRS])
def test_ssim_matches_scikit_image(name, a, b):
    expected = skimage_ssim(a, b)
    assert float(ssim(torch.tensor(a), torch.tensor(b))) == pytest.approx(expected, abs=1e-4)
    # float32, as in training
    ours32 = ssim(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32))
    assert ours32.dtype == torch.float32
    assert float(ours32) == pytest.approx(expected, abs=1e-4)
    # symmetric
    assert float(ssim(torch.tensor(b), torch.tensor(a))) == pytest.approx(expected, abs=1e-4)


def test_ssim_extremes_and_errors():
    rng = np.random.default_rng(0)
    a = torch.tensor(rng.random((20, 20)))
    assert float(ssim(a, a)) == pytest.approx(1.0, abs=1e-12)
    assert float(ssim(a, 1 - a)) < 0
    with pytest.raises(ValueError, match="11"):
        ssim(torch.zeros(10, 30), torch.zeros(10, 30))
    with pytest.raises(ValueError, match="shape"):
        ssim(torch.zeros(12, 12), torch.zeros(12, 13))


def test_ssim_gradient_is_correct():
    rng = np.random.default_rng(1)
    a = torch.tensor(rng.random((12, 13)), requires_grad=True)
    b = torch.tensor(rng.random((12, 13)), requires_grad=True)
    assert torch.autograd.gradcheck(ssim, (a, b))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_ssim_cpu_kernels_match_torch_ops(dtype):
    """On the CPU ``ssim`` runs numba kernels; the PyTorch path (used on GPUs) gives the same values and gradients."""
    pytest.importorskip("numba")
    from napari_neurogs_mip import losses

    rng = np.random.default_rng(2)
    rectangular = (rng.random((37, 90)), np.clip(rng.random((37, 90)) * 0.5 + 0.2, 0, 1))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, b in [(a, b) for _, a, b in PAIRS] + [rectangular]:
        results = []
        for function in (ssim, lambda x, y: losses._ssim_torch(x, y, 0.01**2, 0.03**2)):
            x = torch.tensor(a, dtype=dtype, requires_grad=True)
            y = torch.tensor(b, dtype=dtype, requires_grad=True)
            value = function(x, y)
            assert value.dtype == dtype
            if function is ssim:  # the kernels, not the PyTorch ops, compute it on the CPU
                assert type(value.grad_fn).__name__ == "_SsimBackward"
            results.append((value.detach(), *torch.autograd.grad(value, [x, y])))
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(float(want.abs().max()), 1.0))


def test_ssim_torch_ops_gradient_is_correct():
    from napari_neurogs_mip import losses

    rng = np.random.default_rng(1)
    a = torch.tensor(rng.random((12, 13)), requires_grad=True)
    b = torch.tensor(rng.random((12, 13)), requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: losses._ssim_torch(x, y, 0.01**2, 0.03**2), (a, b))


@pytest.mark.parametrize("noise", [0.3, 0.05, 0.001])
def test_psnr_matches_scikit_image(noise):
    rng = np.random.default_rng(3)
    a = rng.random((30, 40))
    b = np.clip(a + noise * rng.standard_normal(a.shape), 0, 1)
    expected = peak_signal_noise_ratio(a, b, data_range=1.0)
    assert psnr(torch.tensor(b), torch.tensor(a)) == pytest.approx(expected, abs=1e-9)
    assert psnr(torch.tensor(b) * 255, torch.tensor(a) * 255, data_range=255.0) == pytest.approx(expected, abs=1e-9)
    # Known value: a uniform error of 0.1 is 20 dB.
    assert psnr(torch.full((5, 5), 0.6), torch.full((5, 5), 0.5)) == pytest.approx(20.0, abs=1e-5)
    assert psnr(torch.tensor(a), torch.tensor(a)) == math.inf


@pytest.mark.parametrize(
    "weights", [LossWeights(), LossWeights(2.0, 0.5, 0.25), LossWeights(0.0, 1.0, 0.0), LossWeights(1.0, 0.0, 3.0)]
)
def test_mip_loss_is_the_weighted_mean_over_views(weights):
    rng = np.random.default_rng(4)
    shapes = [(16, 20), (12, 20), (12, 16)]
    targets = [rng.random(s) for s in shapes]
    rendered = [np.clip(t + 0.2 * rng.standard_normal(t.shape), 0, 1) for t in targets]
    per_view = []
    for r, t in zip(rendered, targets):
        per_view.append({"mse": np.mean((r - t) ** 2), "ssim": skimage_ssim(r, t), "l1": np.mean(np.abs(r - t))})
    expected = np.mean(
        [weights.lambda_mse * v["mse"] + weights.lambda_ssim * (1 - v["ssim"]) + weights.lambda_l1 * v["l1"]
         for v in per_view]
    )  # fmt: skip
    leaves = [torch.tensor(r, requires_grad=True) for r in rendered]
    total, terms = mip_loss(leaves, [torch.tensor(t) for t in targets], weights)
    assert float(total.detach()) == pytest.approx(expected, abs=1e-6)
    assert terms["loss"] == pytest.approx(expected, abs=1e-6)
    assert terms["mse"] == pytest.approx(np.mean([v["mse"] for v in per_view]), rel=1e-9)
    # Terms with zero weight are not computed (reported as 0).
    ssim_expected = np.mean([v["ssim"] for v in per_view]) if weights.lambda_ssim > 0 else 0.0
    l1_expected = np.mean([v["l1"] for v in per_view]) if weights.lambda_l1 > 0 else 0.0
    assert terms["ssim"] == pytest.approx(ssim_expected, abs=1e-6)
    assert terms["l1"] == pytest.approx(l1_expected, abs=1e-9)
    total.backward()
    for leaf in leaves:
        assert leaf.grad is not None and bool(torch.isfinite(leaf.grad).all()) and float(leaf.grad.abs().sum()) > 0


def test_mip_loss_without_ssim_accepts_small_views():
    small = [torch.rand(5, 7)]
    total, _ = mip_loss(small, [torch.zeros(5, 7)], LossWeights(1.0, 0.0, 0.0))
    assert float(total) == pytest.approx(float(mse(small[0], torch.zeros(5, 7))), rel=1e-6)
    assert float(l1(small[0], torch.zeros(5, 7))) == pytest.approx(float(small[0].mean()), rel=1e-6)
    with pytest.raises(ValueError, match="11"):
        mip_loss(small, [torch.zeros(5, 7)], LossWeights())


@pytest.mark.parametrize(
    ("args", "message"),
    [((-1.0, 0.1, 0.0), "lambda_mse"), ((1.0, float("nan"), 0.0), "lambda_ssim"), ((0.0, 0.0, 0.0), "at least one")],
)
def test_loss_weights_reject_bad_values(args, message):
    with pytest.raises(ValueError, match=message):
        LossWeights(*args)
