"""Sample data contributions: the procedural neuron volume and a matching initial model.

Both are made by the core (:func:`napari_neurogs_mip.sample.sample_volume`,
:func:`napari_neurogs_mip.prepare.prepare_fit`), with fixed seeds, so they
are the same on every machine and line up in world (physical) coordinates.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..frames import VolumeGeometry
from ..prepare import FitInputs, prepare_fit
from ..sample import sample_volume
from ._layers import LayerDataTuple, model_to_points, volume_image

SAMPLE_GAUSSIANS = 2000
"""Gaussians in the sample's initial model: a fixed count (the seed design's), so the sample stays the same
whatever the core's automatic count (one per foreground cell) becomes."""


@lru_cache(maxsize=1)
def _sample() -> tuple[np.ndarray, VolumeGeometry]:
    # Making the sample takes about a second; it is the same every time.
    volume, geometry = sample_volume()
    volume.setflags(write=False)
    return volume, geometry


def sample_neuron() -> list[LayerDataTuple]:
    """The built-in procedural neuron: 40 x 128 x 128 voxels of 1.5 x 0.5 x 0.5 um."""
    volume, geometry = _sample()
    volume = volume.copy()
    data, kwargs, kind = volume_image(volume, geometry, "sample neuron")
    kwargs["metadata"] = {"neurogs_sample": True}
    return [(data, kwargs, kind)]


def sample_initial_model(num_gaussians: int = SAMPLE_GAUSSIANS) -> list[LayerDataTuple]:
    """An initial model for the sample neuron: Gaussians spread over its foreground, as a Points layer.

    The intensities are normalised with the same rule as a fit's targets
    (``background``), so the amplitudes are what a fit would start from.  Saving
    the layer (File > Save Selected Layers, ``.pt``) writes a checkpoint in the
    NeuRoGS frame, like the command line's initial models.
    """
    volume, geometry = _sample()
    inputs = FitInputs(volume=volume.copy(), voxel_size=geometry.spacing_zyx, num_gaussians=num_gaussians)
    model = prepare_fit(inputs).model  # what a fit of the sample starts from, in the NeuRoGS frame
    return [model_to_points(model, name="sample initial model", extra={"family": "initial", "iteration": 0})]
