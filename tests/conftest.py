"""Fixtures shared by the test suite.

``shared_dir`` is the ``shared/`` reference folder beside the repository
(CI sees it at ``../shared`` from the project root).  Tests that need it skip,
with the reason, when it is absent: the project must never require it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ``shared/`` reference folder (``../shared`` from the repository root); skips when absent."""
    if not SHARED_DIR.is_dir():
        pytest.skip(f"shared reference data not found at {SHARED_DIR} (expected ../shared from the repository root)")
    return SHARED_DIR


@pytest.fixture(scope="session")
def shared_checkpoints(shared_dir: Path) -> list[Path]:
    """The real checkpoint files in ``shared/data/checkpoints`` (skips when there are none)."""
    paths = sorted((shared_dir / "data" / "checkpoints").glob("*.pt"))
    if not paths:
        pytest.skip(f"no checkpoint files in {shared_dir / 'data' / 'checkpoints'}")
    return paths


@pytest.fixture
def volume_tif(tmp_path: Path) -> Path:
    """A small float32 TIFF volume (12 x 24 x 24) of sparse bright voxels, written by tifffile."""
    rng = np.random.default_rng(0)
    path = tmp_path / "volume.tif"
    tifffile.imwrite(path, (rng.random((12, 24, 24)) ** 6).astype(np.float32))
    return path
