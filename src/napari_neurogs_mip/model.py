"""The Gaussian model: K anisotropic 3D Gaussians in an explicit frame.

``V_hat(x) = sum_k a_k exp(-1/2 (x - mu_k)^T Sigma_k^-1 (x - mu_k))`` with
``Sigma_k = R_k diag(s_k^2) R_k^T``, ``s_k = exp(log_scales_k)``, ``R_k`` the
rotation of the normalised quaternion ``(w, x, y, z)`` and
``a_k = exp(log_amplitudes_k)``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from .frames import Frame, VolumeGeometry

PARAMETER_NAMES = ("means", "log_scales", "quaternions", "log_amplitudes")


def quaternion_to_rotation(quaternions: torch.Tensor) -> torch.Tensor:
    """Rotation matrices [K, 3, 3] of quaternions [K, 4] in (w, x, y, z) order.

    The quaternions are normalised first: real files hold unnormalised ones.
    """
    q = quaternions / quaternions.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w, x, y, z = q.unbind(-1)
    rows = (
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    )  # fmt: skip
    return torch.stack(rows, dim=-1).reshape(*q.shape[:-1], 3, 3)


def rotation_to_quaternion(rotations: torch.Tensor) -> torch.Tensor:
    """Unit quaternions [K, 4] (w, x, y, z, with w >= 0) of proper rotations [K, 3, 3]."""
    r = rotations
    trace = r[..., 0, 0] + r[..., 1, 1] + r[..., 2, 2]
    # Shepperd's method: pick the largest of 4 candidates for numerical stability.
    candidates = torch.stack(
        [
            1 + trace,
            1 + r[..., 0, 0] - r[..., 1, 1] - r[..., 2, 2],
            1 - r[..., 0, 0] + r[..., 1, 1] - r[..., 2, 2],
            1 - r[..., 0, 0] - r[..., 1, 1] + r[..., 2, 2],
        ],
        dim=-1,
    )
    best = candidates.argmax(dim=-1)
    out = torch.empty(*r.shape[:-2], 4, dtype=r.dtype, device=r.device)
    s = torch.sqrt(candidates.gather(-1, best[..., None]).squeeze(-1).clamp_min(1e-12)) * 2
    q_w = torch.stack(
        [
            s / 4,
            (r[..., 2, 1] - r[..., 1, 2]) / s,
            (r[..., 0, 2] - r[..., 2, 0]) / s,
            (r[..., 1, 0] - r[..., 0, 1]) / s,
        ],
        -1,
    )
    q_x = torch.stack(
        [
            (r[..., 2, 1] - r[..., 1, 2]) / s,
            s / 4,
            (r[..., 0, 1] + r[..., 1, 0]) / s,
            (r[..., 0, 2] + r[..., 2, 0]) / s,
        ],
        -1,
    )
    q_y = torch.stack(
        [
            (r[..., 0, 2] - r[..., 2, 0]) / s,
            (r[..., 0, 1] + r[..., 1, 0]) / s,
            s / 4,
            (r[..., 1, 2] + r[..., 2, 1]) / s,
        ],
        -1,
    )
    q_z = torch.stack(
        [
            (r[..., 1, 0] - r[..., 0, 1]) / s,
            (r[..., 0, 2] + r[..., 2, 0]) / s,
            (r[..., 1, 2] + r[..., 2, 1]) / s,
            s / 4,
        ],
        -1,
    )
    for index, q in enumerate((q_w, q_x, q_y, q_z)):
        out = torch.where((best == index)[..., None], q, out)
    out = out / out.norm(dim=-1, keepdim=True)
    return torch.where(out[..., :1] < 0, -out, out)


def covariance(log_scales: torch.Tensor, quaternions: torch.Tensor) -> torch.Tensor:
    """Covariances [K, 3, 3] ``R diag(s^2) R^T`` in the model's frame units squared."""
    rotation = quaternion_to_rotation(quaternions)
    variances = torch.exp(2 * log_scales)
    return (rotation * variances[..., None, :]) @ rotation.transpose(-1, -2)


@dataclass
class GaussianModel:
    """K anisotropic 3D Gaussians.

    Attributes
    ----------
    means
        [K, 3] centres (x, y, z) in ``frame`` units.
    log_scales
        [K, 3] natural log of the standard deviations along the principal axes, ``frame`` units.
    quaternions
        [K, 4] rotations (w, x, y, z); need not be normalised.
    log_amplitudes
        [K] natural log of the peak intensities (target intensities normalised to [0, 1]).
    frame
        The frame of ``means`` and ``log_scales``.
    geometry
        The volume the frame refers to; ``None`` when unknown (only voxel/physical
        frames without a target are meaningful then).
    """

    means: torch.Tensor
    log_scales: torch.Tensor
    quaternions: torch.Tensor
    log_amplitudes: torch.Tensor
    frame: Frame = Frame.PHYSICAL
    geometry: VolumeGeometry | None = None

    def __post_init__(self) -> None:
        self.frame = Frame.parse(self.frame)
        self.validate()

    @property
    def num_gaussians(self) -> int:
        """Number of Gaussians K."""
        return int(self.means.shape[0])

    def validate(self) -> None:
        """Raise ``ValueError`` unless shapes agree and every value is finite."""
        k = self.means.shape[0] if self.means.ndim == 2 else -1
        expected = {"means": (k, 3), "log_scales": (k, 3), "quaternions": (k, 4), "log_amplitudes": (k,)}
        for name, shape in expected.items():
            tensor = getattr(self, name)
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
            if tuple(tensor.shape) != shape or k < 0:
                raise ValueError(
                    f"{name} has shape {tuple(tensor.shape)}; expected {shape if k >= 0 else '[K, 3]'} "
                    f"(K = number of Gaussians taken from means)"
                )
            if not tensor.is_floating_point():
                raise ValueError(f"{name} must be floating point, got {tensor.dtype}")
            if not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise ValueError(f"{name} holds {bad} NaN/Inf values")
        if k == 0:
            raise ValueError("the model holds no Gaussians (K = 0)")
        norms = self.quaternions.norm(dim=-1)
        if bool((norms < 1e-8).any()):
            raise ValueError(f"{int((norms < 1e-8).sum())} quaternions have zero norm")

    def tensors(self) -> dict[str, torch.Tensor]:
        """The four parameter tensors by their NeuRoGS names."""
        return {name: getattr(self, name) for name in PARAMETER_NAMES}

    def covariances(self) -> torch.Tensor:
        """Covariances [K, 3, 3] in frame units squared."""
        return covariance(self.log_scales, self.quaternions)

    def amplitudes(self) -> torch.Tensor:
        """Peak intensities [K]."""
        return torch.exp(self.log_amplitudes)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> GaussianModel:
        """A copy on ``device`` (and ``dtype``), detached from any graph."""
        moved = {n: t.detach().to(device=device, dtype=dtype or t.dtype).clone() for n, t in self.tensors().items()}
        return replace(self, **moved)

    def with_geometry(self, geometry: VolumeGeometry) -> GaussianModel:
        """The same Gaussians, tied to ``geometry`` (no change of coordinates)."""
        return replace(self, geometry=geometry)

    def to_frame(self, frame: Frame | str, geometry: VolumeGeometry | None = None) -> GaussianModel:
        """The same Gaussians expressed exactly in another frame.

        A per-axis linear map ``A`` takes ``(mu, Sigma)`` to ``(A mu + b, A Sigma A)``;
        scales and rotations in the new frame come from the eigen-decomposition of
        ``A Sigma A`` (float64), so nothing is approximated.  A uniform ``A`` keeps
        the quaternions unchanged.
        """
        frame = Frame.parse(frame)
        geometry = geometry or self.geometry
        if geometry is None:
            if frame is self.frame:
                return self.to(self.means.device)
            raise ValueError(f"converting from the {self.frame.value} frame to {frame.value} needs the volume geometry")
        scale_np, offset_np = geometry.frame_map(self.frame, frame)
        dtype, device = self.means.dtype, self.means.device
        scale = torch.as_tensor(scale_np, dtype=torch.float64, device=device)
        offset = torch.as_tensor(offset_np, dtype=torch.float64, device=device)
        means = (self.means.detach().double() * scale + offset).to(dtype)
        if np.allclose(scale_np, scale_np[0], rtol=1e-12, atol=0):
            log_scales = (self.log_scales.detach().double() + torch.log(scale[0])).to(dtype)
            quaternions = self.quaternions.detach().clone()
        else:
            sigma = covariance(self.log_scales.detach().double(), self.quaternions.detach().double())
            sigma = sigma * scale[:, None] * scale[None, :]
            eigenvalues, eigenvectors = torch.linalg.eigh(sigma)
            # eigh may return a reflection; flip one axis to keep a proper rotation.
            det = torch.linalg.det(eigenvectors)
            eigenvectors[..., :, 0] = eigenvectors[..., :, 0] * torch.sign(det)[..., None]
            log_scales = (0.5 * torch.log(eigenvalues.clamp_min(1e-300))).to(dtype)
            quaternions = rotation_to_quaternion(eigenvectors).to(dtype)
        return GaussianModel(
            means=means,
            log_scales=log_scales,
            quaternions=quaternions,
            log_amplitudes=self.log_amplitudes.detach().clone(),
            frame=frame,
            geometry=geometry,
        )
