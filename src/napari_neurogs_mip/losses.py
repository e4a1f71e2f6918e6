"""Image losses and metrics for MIPs with intensities in [0, 1].

SSIM follows Wang et al. (2004) with an 11 x 11 Gaussian window (sigma 1.5),
``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``, ``L = 1`` and population
(co)variances, averaged over the positions where the window fits inside the
image; this equals scikit-image's ``structural_similarity(...,
gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=1)``, which crops the same border.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def mse(rendered: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error."""
    return torch.mean((rendered - target) ** 2)


def l1(rendered: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error."""
    return torch.mean(torch.abs(rendered - target))


def psnr(rendered: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB (``inf`` for identical images)."""
    error = float(mse(rendered.detach(), target.detach()))
    return math.inf if error == 0 else 10.0 * math.log10(data_range**2 / error)


@functools.lru_cache(maxsize=16)
def _window(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    radius = SSIM_WINDOW // 2
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return (w / w.sum()).to(dtype=dtype, device=device)


def _blur(images: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filter of [N, H, W] images, returned as [N, H - 10, W - 10].

    The N images are channels of one grouped convolution: on the CPU this is 5-7x
    faster, forward and backward, than a batch of single-channel convolutions.
    """
    channels = images.shape[0]
    images = F.conv2d(images[None], window.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(images, window.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)[0]


def ssim(rendered: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM of two [H, W] images (differentiable w.r.t. both).

    CPU images (float32 or float64, numba installed) go to the kernels of
    :mod:`.ssim_cpu`; other devices and dtypes to PyTorch ops.  Both compute the
    same value and gradients (``tests/test_core_losses.py``).

    Raises
    ------
    ValueError
        If either side of the image is shorter than the 11-pixel window.
    """
    if rendered.shape != target.shape or rendered.ndim != 2:
        raise ValueError(
            f"ssim needs two [H, W] images of one shape, got {tuple(rendered.shape)} and {tuple(target.shape)}"
        )
    if min(rendered.shape) < SSIM_WINDOW:
        raise ValueError(
            f"ssim needs images of at least {SSIM_WINDOW} x {SSIM_WINDOW} pixels, got {tuple(rendered.shape)}"
        )
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    if _cpu_kernels_apply(rendered, target):
        from . import ssim_cpu

        return ssim_cpu.ssim(rendered, target, _window(torch.float64, torch.device("cpu")).numpy(), c1, c2)
    return _ssim_torch(rendered, target, c1, c2)


def _cpu_kernels_apply(*images: torch.Tensor) -> bool:
    """Whether the numba kernels (:mod:`.ssim_cpu`, :mod:`.background_cpu`) take these images: CPU images of one
    float32/float64 dtype, numba present."""
    dtype = images[0].dtype
    if dtype not in (torch.float32, torch.float64) or any(i.device.type != "cpu" or i.dtype != dtype for i in images):
        return False
    from .numba_runtime import IMPORT_ERROR

    return IMPORT_ERROR is None


def _ssim_torch(rendered: torch.Tensor, target: torch.Tensor, c1: float, c2: float) -> torch.Tensor:
    """Mean SSIM in PyTorch ops (any device; the reference for :mod:`.ssim_cpu`)."""
    window = _window(rendered.dtype, rendered.device)
    x, y = rendered, target
    stack = torch.stack([x, y, x * x, y * y, x * y])
    mu_x, mu_y, xx, yy, xy = _blur(stack, window)
    var_x = xx - mu_x * mu_x
    var_y = yy - mu_y * mu_y
    cov = xy - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    denominator = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return torch.mean(numerator / denominator)


class BackgroundMax:
    """What a view's MIP shows where the model renders ``m``: ``E[max(m, B)]``, ``B`` the view's background.

    A MIP of a noisy stack is, on every ray, the maximum of the noise along it: its
    background is not the stack's background but a sea of noise maxima, and faint
    structure competes with them.  A model of the noise-free volume compared with
    such a target directly is pulled up to the mean of that sea and paints it as a
    haze over the whole view (on the rasterised neuron, 0.003-0.005 of the range
    where the noise-free MIP is 0.0005; it cost its long-ray views 0.03-0.04 of
    SSIM against the noise-free volume).  Compared as ``E[max(m, B)]``, with ``B``
    drawn from the view's own background pixels, the model can render 0 there and
    faint structure at its own level.  Above the brightest background value the
    map is the identity.

    The map is convex and piecewise linear between the ``bins + 1`` points where it is
    tabulated; its slope at ``m`` is the share of the background below ``m``.
    """

    def __init__(self, background: np.ndarray, bins: int = 1024) -> None:
        """``background``: the view's background pixel values (normalised units, any shape)."""
        values = np.sort(np.asarray(background, dtype=np.float64).ravel())
        if values.size == 0 or not np.all(np.isfinite(values)):
            raise ValueError("BackgroundMax needs finite background values, got none or NaN/Inf")
        self.top = float(max(values[-1], 0.0))
        """The brightest background value: above it the map is the identity."""
        grid = np.linspace(0.0, self.top, bins + 1)
        # E[max(m, B)] = (m * #{B <= m} + sum{B > m}) / n, from the sorted values' cumulative sums.
        below = np.searchsorted(values, grid, side="right")
        above = np.concatenate([[0.0], np.cumsum(values[::-1])])[values.size - below]
        self._table = torch.as_tensor((grid * below + above) / values.size, dtype=torch.float64)
        self._tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        """The table on each device and dtype it was asked for (converted once, not at every step)."""
        self._bins = bins
        self._scale = bins / self.top if self.top > 0 else 0.0

    def _table_for(self, image: torch.Tensor) -> torch.Tensor:
        key = (image.device, image.dtype)
        if key not in self._tables:
            self._tables[key] = self._table.to(device=image.device, dtype=image.dtype)
        return self._tables[key]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """``E[max(image, B)]`` per pixel (differentiable; same shape, dtype and device; NaN stays NaN).

        CPU float images go to the numba pass of :mod:`.background_cpu`, others to PyTorch ops; both compute
        the same values and slopes (``tests/test_background_noise.py``).
        """
        if self.top == 0.0:
            return image.clamp_min(0.0)
        table = self._table_for(image)
        if _cpu_kernels_apply(image):
            return _ExpectedMax.apply(image, table.numpy(), self._scale)
        position = image.clamp(0.0, self.top) * self._scale
        # NaN pixels index the table at 0 and come out as NaN (the trainer must see them).
        index = position.detach().nan_to_num(0.0).floor().clamp(max=self._bins - 1).long()
        low = table[index]
        inside = low + (table[index + 1] - low) * (position - index)
        return torch.where(image < self.top, inside, image)


class _ExpectedMax(torch.autograd.Function):
    """:class:`BackgroundMax` on a CPU image: values and slopes in one numba pass, the slopes kept for backward."""

    @staticmethod
    def forward(ctx: Any, image: torch.Tensor, table: np.ndarray, scale: float) -> torch.Tensor:
        from .background_cpu import expected_max
        from .numba_runtime import numpy_view

        value, slope = expected_max(numpy_view(image), table, scale)
        ctx.slope = torch.from_numpy(slope)
        return torch.from_numpy(value)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad * ctx.slope, None, None


@dataclass(frozen=True)
class LossWeights:
    """``L = lambda_mse * MSE + lambda_ssim * (1 - SSIM) + lambda_l1 * L1``, averaged over views."""

    lambda_mse: float = 1.0
    lambda_ssim: float = 0.1
    lambda_l1: float = 0.0

    def __post_init__(self) -> None:
        for name in ("lambda_mse", "lambda_ssim", "lambda_l1"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.lambda_mse + self.lambda_ssim + self.lambda_l1 == 0:
            raise ValueError("at least one of lambda_mse, lambda_ssim, lambda_l1 must be > 0")


def mip_loss(
    rendered: list[torch.Tensor], targets: list[torch.Tensor], weights: LossWeights
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss averaged over views, and its terms as floats (for logs and plots).

    The terms are read back with one device synchronisation.
    """
    zero = rendered[0].new_zeros(())
    sums = {"mse": zero, "ssim": zero, "l1": zero}
    total = zero
    for image, target in zip(rendered, targets):
        error = mse(image, target)
        total = total + weights.lambda_mse * error
        sums["mse"] = sums["mse"] + error.detach()
        if weights.lambda_ssim > 0:
            similarity = ssim(image, target)
            total = total + weights.lambda_ssim * (1 - similarity)
            sums["ssim"] = sums["ssim"] + similarity.detach()
        if weights.lambda_l1 > 0:
            absolute = l1(image, target)
            total = total + weights.lambda_l1 * absolute
            sums["l1"] = sums["l1"] + absolute.detach()
    total = total / len(rendered)
    values = (torch.stack([*sums.values(), total.detach() * len(rendered)]) / len(rendered)).tolist()
    terms = dict(zip([*sums, "loss"], values))
    return total, terms
