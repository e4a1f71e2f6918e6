"""The summed field of a model on a voxel grid, and its exact axis MIPs.

``V_hat(x) = sum_k a_k exp(-1/2 (x - mu_k)^T Sigma_k^-1 (x - mu_k))`` is
evaluated at voxel centres by scattering each Gaussian's box of voxels within
``CUTOFF_SIGMA`` (3D Mahalanobis, the same cut-off as the splat renderer), so
memory scales with the footprints.  Differentiable through ``index_add``.
"""

from __future__ import annotations

import torch

from ..frames import VolumeGeometry
from ..model import GaussianModel
from ..targets import area_resample, axis_mip
from ..views import View
from .project import CUTOFF_SIGMA

_ENTRIES_PER_CHUNK = 1 << 22


def voxelize(model: GaussianModel, geometry: VolumeGeometry | None = None) -> torch.Tensor:
    """The field of a physical-frame model at the voxel centres of ``geometry``: [Z, Y, X]."""
    geometry = geometry or model.geometry
    if geometry is None:
        raise ValueError("voxelize needs the volume geometry")
    if model.frame.value != "physical":
        raise ValueError(f"voxelize takes a model in the physical frame, got {model.frame.value}")
    device, dtype = model.means.device, model.means.dtype
    spacing = torch.as_tensor(geometry.spacing_xyz, dtype=dtype, device=device)
    shape_xyz = torch.as_tensor(geometry.shape_xyz, device=device).long()
    covariances = model.covariances()
    precision = torch.linalg.inv(covariances)
    amplitudes = model.amplitudes()
    # Bounding box of each cut-off ellipsoid, in voxel indices.
    reach = CUTOFF_SIGMA * torch.sqrt(torch.diagonal(covariances, dim1=-2, dim2=-1).detach()) / spacing
    centre = model.means.detach() / spacing
    low = torch.ceil(centre - reach).clamp_min(0).long()
    high = torch.minimum(torch.floor(centre + reach).long(), shape_xyz - 1)
    sizes = (high - low + 1).clamp_min(0)
    counts = sizes.prod(dim=1)
    flat = torch.zeros(int(torch.prod(shape_xyz)), dtype=dtype, device=device)
    live = torch.nonzero(counts > 0).squeeze(1)
    bounds = torch.cumsum(counts[live], 0)
    start = 0
    while start < live.numel():
        # Take as many Gaussians as fit into one chunk of entries (at least one).
        base = int(bounds[start - 1]) if start else 0
        stop = max(start + 1, int(torch.searchsorted(bounds, base + _ENTRIES_PER_CHUNK, right=True)))
        flat = _scatter(flat, live[start:stop], model.means, precision, amplitudes, low, sizes, spacing, shape_xyz)
        start = stop
    return flat.reshape(geometry.shape_zyx)


def _scatter(
    flat: torch.Tensor,
    index: torch.Tensor,
    means: torch.Tensor,
    precision: torch.Tensor,
    amplitudes: torch.Tensor,
    low: torch.Tensor,
    sizes: torch.Tensor,
    spacing: torch.Tensor,
    shape_xyz: torch.Tensor,
) -> torch.Tensor:
    counts = sizes[index].prod(dim=1)
    owner = torch.repeat_interleave(index, counts)
    local = torch.arange(int(counts.sum()), device=flat.device) - torch.repeat_interleave(
        torch.cumsum(counts, 0) - counts, counts
    )
    size = sizes[owner]
    offset = torch.stack(
        [local % size[:, 0], (local // size[:, 0]) % size[:, 1], local // (size[:, 0] * size[:, 1])], 1
    )
    voxel = low[owner] + offset
    delta = voxel.to(means.dtype) * spacing - means[owner]
    q = torch.einsum("ni,nij,nj->n", delta, precision[owner], delta)
    inside = q <= CUTOFF_SIGMA**2
    values = amplitudes[owner[inside]] * torch.exp(-0.5 * q[inside])
    voxel = voxel[inside]
    linear = (voxel[:, 2] * shape_xyz[1] + voxel[:, 1]) * shape_xyz[0] + voxel[:, 0]
    return flat.index_add(0, linear, values)


def check_field_views(views: list[View]) -> None:
    """Raise ``ValueError`` unless every view is an axis view (the only views the field mode renders)."""
    orbit = [v.name for v in views if not v.is_axis]
    if orbit:
        raise ValueError(f"the field mode renders axis views only (xy, xz, yz); got orbit views {orbit}")


def field_mips(model: GaussianModel, views: list[View]) -> list[torch.Tensor]:
    """Exact MIPs of the summed field for axis views (native grid, then area-averaged to each view)."""
    check_field_views(views)
    volume = voxelize(model)
    return [area_resample(axis_mip(volume, view.name), view.shape) for view in views]
