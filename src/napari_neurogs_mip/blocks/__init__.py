"""Block-wise fitting of volumes larger than memory, on dask.distributed, merged into one model.

Python: :func:`fit_blocks`; command line: ``neurogs-mip fit-blocks`` (:mod:`.command`).  See ``docs/blocks.md``.

=============  ================================================================
module         job
=============  ================================================================
``survey``     one streaming pass: the volume's axis MIPs, where the structure is
``plan``       cores, halos, which cores to skip
``fit``        one block's fit (a worker task) and its result files
``merge``      the blocks' Gaussians as one checkpoint
``mips``       MIPs of the merged model, tile by tile, TIFF or OME-Zarr
``engine``     the dask cluster (local, a scheduler, SLURM)
``folder``     the run folder: its files, and whether a later run may take it up
``run``        the stages in order, restartable
``command``    the ``fit-blocks`` command
=============  ================================================================
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BlockFitError": "run",
    "BlockFitResult": "run",
    "fit_blocks": "run",
    "ClusterSpec": "engine",
    "slurm_cluster": "engine",
}
"""Names exported here, by module: imported on first use, so that ``cli.py`` can import :mod:`.command` (light)
without loading torch and dask."""

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
