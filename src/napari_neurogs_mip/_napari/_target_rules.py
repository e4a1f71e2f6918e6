"""Which layers the Fit MIP widget offers as targets and starts, and which 2D layers form a set of MIPs.

The rules work on :class:`LayerInfo`, a plain description that the Qt side
makes from each napari layer, so they are tested without a viewer.  Nothing
here imports Qt or napari.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..views import AXIS_VIEWS, parse_view_specs
from ._layers import PROJECTION_KEY, ROLE_KEY, mip_view_name

OUR_OUTPUT_ROLES = ("rendered", "residual", "labels")
"""Live layers a fit writes: never a target (``target <view>`` layers may be: they are the data)."""


@dataclass(frozen=True)
class LayerInfo:
    """What the rules need to know of a layer.

    Attributes
    ----------
    name
        Layer name.
    kind
        ``image``, ``points`` or ``other``.
    ndim
        Number of data dimensions.
    rgb
        Whether an image layer is RGB(A) (never a target).
    metadata
        The layer metadata.
    """

    name: str
    kind: str
    ndim: int
    rgb: bool = False
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def role(self) -> str | None:
        """The live fit role of the layer (``target``, ``rendered``...), ``None`` for the user's layers."""
        role = self.metadata.get(ROLE_KEY)
        return str(role) if role is not None else None


def offered_targets(layers: Sequence[LayerInfo]) -> list[str]:
    """Names of the layers a fit can target: grey-level images of 2 or more dimensions, not our live outputs."""
    return [
        layer.name
        for layer in layers
        if layer.kind == "image" and not layer.rgb and layer.ndim >= 2 and layer.role not in OUR_OUTPUT_ROLES
    ]


def offered_starts(layers: Sequence[LayerInfo]) -> list[str]:
    """Names of the Points layers a fit can start from: 3D or more, not an xy projection of another."""
    return [
        layer.name
        for layer in layers
        if layer.kind == "points" and layer.ndim >= 3 and PROJECTION_KEY not in layer.metadata
    ]


def mip_set(chosen: LayerInfo, view: str, layers: Sequence[LayerInfo]) -> dict[str, str]:
    """The MIP targets of a 2D layer: ``{view: layer name}``, the chosen layer first as ``view``, then every
    other 2D target layer that names a view not yet taken (``cell xz``, or ``view`` metadata).

    Raises
    ------
    ValueError
        A view name that is no view (e.g. ``sideways``).
    """
    found = {view: chosen.name}
    for layer in layers:
        if layer.name == chosen.name or layer.ndim != 2 or layer.name not in offered_targets([layer]):
            continue
        other = mip_view_name(layer.name, layer.metadata)
        if other and other not in found:
            found[other] = layer.name
    for name in found:
        if name not in AXIS_VIEWS:
            parse_view_specs(name)
    return found
