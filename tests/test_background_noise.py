"""The background-noise model of the loss (:class:`BackgroundMax`): what it computes, and what it does to a fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_neurogs_mip import losses
from napari_neurogs_mip.frames import VolumeGeometry
from napari_neurogs_mip.initial_model import init_from_volume
from napari_neurogs_mip.losses import BackgroundMax
from napari_neurogs_mip.sample import Imaging, add_noise, procedural_skeleton, rasterize_skeleton
from napari_neurogs_mip.targets import targets_from_volume
from napari_neurogs_mip.train import FitConfig, Trainer


def _background(rng: np.random.Generator, size: int = 5000) -> np.ndarray:
    # A normalised MIP's background: noise maxima around the median, clipped at 0.
    return np.clip(rng.gumbel(0.0, 0.01, size) - 0.004, 0.0, None)


def test_it_is_the_expected_maximum_with_the_background_and_its_slope_is_the_share_below():
    rng = np.random.default_rng(0)
    background = _background(rng)
    seen = BackgroundMax(background)
    rendered = torch.tensor(rng.uniform(0.0, 1.2 * seen.top, 500), dtype=torch.float64, requires_grad=True)
    values = seen(rendered)
    values.sum().backward()
    m = rendered.detach().numpy()
    expected = np.maximum(m[:, None], background[None]).mean(axis=1)
    np.testing.assert_allclose(values.detach().numpy(), expected, atol=1e-6)
    share_below = (background[None] < m[:, None]).mean(axis=1)
    # Piecewise linear on 1024 bins: the slope is the share below some point of the pixel's bin.
    assert np.abs(rendered.grad.numpy() - share_below).max() < 0.05
    above = m >= seen.top
    assert above.any() and np.array_equal(values.detach().numpy()[above], m[above])
    assert float(seen(torch.zeros(1))) == pytest.approx(background.mean(), abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_cpu_kernel_computes_what_the_pytorch_ops_compute(dtype, monkeypatch):
    seen = BackgroundMax(_background(np.random.default_rng(2)))
    image = torch.tensor(np.random.default_rng(3).uniform(-0.01, 1.3 * seen.top, (37, 53)), dtype=dtype)

    def value_and_slope() -> tuple[torch.Tensor, torch.Tensor]:
        leaf = image.clone().requires_grad_(True)
        value = seen(leaf)
        value.backward(torch.ones_like(value))
        return value.detach(), leaf.grad

    kernel = value_and_slope()
    monkeypatch.setattr(losses, "_cpu_kernels_apply", lambda *images: False)
    reference = value_and_slope()
    assert kernel[0].dtype == dtype
    np.testing.assert_allclose(kernel[0], reference[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(kernel[1][image > 0], reference[1][image > 0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kernel", [True, False], ids=["numba", "pytorch"])
def test_a_noise_free_background_changes_nothing_and_nan_is_kept(kernel, monkeypatch):
    if not kernel:
        monkeypatch.setattr(losses, "_cpu_kernels_apply", lambda *images: False)
    seen = BackgroundMax(np.zeros(1000))
    image = torch.tensor([0.0, 0.25, 1.0, float("nan")])
    out = seen(image)
    assert torch.equal(out[:3], image[:3]) and torch.isnan(out[3])
    noisy = BackgroundMax(_background(np.random.default_rng(1)))
    out = noisy(torch.tensor([float("nan"), 0.0]))
    assert bool(torch.isnan(out[0])) and float(out[1]) > 0
    with pytest.raises(ValueError, match="finite background"):
        BackgroundMax(np.array([0.1, np.inf]))


GEOMETRY = VolumeGeometry((16, 48, 48), (2.0, 1.0, 1.0))


@pytest.fixture(scope="module")
def stacks() -> tuple[np.ndarray, np.ndarray]:
    """A neuron with a background and Poisson noise, and the same without noise."""
    imaging = Imaging(photons=150.0)
    clean = rasterize_skeleton(procedural_skeleton(GEOMETRY.shape_zyx, seed=3), GEOMETRY.shape_zyx, imaging)
    return add_noise(clean, imaging, seed=4), clean


def _background_render(stacks: tuple[np.ndarray, np.ndarray], background_noise: bool) -> tuple[float, float]:
    """Fit the noisy stack; the mean render over the views' backgrounds, and that of the noise-free MIPs."""
    noisy, clean = stacks
    targets = targets_from_volume(noisy, GEOMETRY, ["xy", "xz", "yz"], None)
    model = init_from_volume(noisy, GEOMETRY, 150, targets.low, targets.high, 1000)
    config = FitConfig(iterations=150, backend="torch", device="cpu", densify=False, background_noise=background_noise)
    trainer = Trainer(model, targets, config)
    for _ in trainer.run():
        pass
    backgrounds = targets.backgrounds()
    rendered = [r.numpy() for r in trainer.render()]
    clean_mips = [np.clip((clean.max(axis=a) - low) / (targets.high - low), 0, 1)
                  for a, low in zip((0, 1, 2), targets.view_lows)]  # fmt: skip
    assert all(b.sum() > 300 for b in backgrounds)
    return (
        float(np.mean([r[b].mean() for r, b in zip(rendered, backgrounds)])),
        float(np.mean([c[b].mean() for c, b in zip(clean_mips, backgrounds)])),
    )


def test_with_the_noise_model_the_fit_paints_no_haze_over_the_background(stacks):
    with_model, clean = _background_render(stacks, background_noise=True)
    without, _ = _background_render(stacks, background_noise=False)
    # Without it the render is pulled up to the mean of the noise maxima; with it, down near the noise-free MIPs.
    assert without > 2 * with_model
    assert abs(with_model - clean) < 0.5 * abs(without - clean)
