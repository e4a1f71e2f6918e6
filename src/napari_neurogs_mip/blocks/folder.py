"""The run folder of a block fit: what it holds, and whether a later run may take it up again.

::

    out/
      plan.json                      what the run fits (volume, block, halo, views, settings)
      survey.npz                     the survey of the volume (axis MIPs, cells)
      blocks/block_z000_y001_x002.pt    a block's kept Gaussians (written first)
      blocks/block_z000_y001_x002.json  its record: the block is finished (written last)
      neurogs_renderer_optimized.pt  the merged model
      mips/, target_mips/            the model's MIPs, the volume's axis MIPs

Every file is written atomically.  A later run in the same folder must fit the
same thing (:func:`check_same_run`); it may compute it elsewhere or otherwise
(:data:`FREE_SETTINGS`).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..io.atomic import atomic_path
from ..io.lazy import LazyVolume
from ..io.run_folder import RunFolderError
from ..train import FitConfig
from .engine import run_tasks
from .survey import Survey, run_survey

PLAN_NAME = "plan.json"
SURVEY_NAME = "survey.npz"
BLOCKS_DIR = "blocks"
MIPS_DIR = "mips"
TARGET_MIPS_DIR = "target_mips"
PLAN_FORMAT = "napari-neurogs-mip blocks"
FREE_SETTINGS = ("out", "preview_every", "save_every", "device", "backend")
"""FitConfig settings a later run may change (where and how it computes, not what it fits)."""


def source_key(source: LazyVolume) -> dict[str, Any]:
    """The data a run reads: file, level, selection, shape and type (not the spacing, which the survey ignores)."""
    return {
        "path": str(Path(source.path).resolve()),
        "array": source.array,
        "key": list(source.key),
        "shape_zyx": list(source.shape_zyx),
        "dtype": source.dtype,
    }


def run_key(
    source: LazyVolume, block_zyx: Sequence[int], halo_zyx: Sequence[int], cell_zyx: Sequence[int],
    specs: Sequence[str], downsample: float | None, normalize: str, num_gaussians: int | None, config: FitConfig,
) -> dict[str, Any]:  # fmt: skip
    """What a run fits (plain types): a later run in the same folder must have the same."""
    return {
        "format": PLAN_FORMAT,
        "version": 1,
        "source": source_key(source),
        "spacing_zyx": list(source.spacing_zyx),
        "block": list(block_zyx),
        "halo": list(halo_zyx),
        "cell": list(cell_zyx),
        "views": list(specs),
        "downsample": downsample,
        "normalize": normalize,
        "num_gaussians": num_gaussians,
        "config": {k: v for k, v in config.to_dict().items() if k not in FREE_SETTINGS},
    }


def read_plan(out: Path) -> dict[str, Any] | None:
    """The plan an earlier run saved in ``out``, or ``None``."""
    try:
        plan = json.loads((out / PLAN_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return plan if isinstance(plan, dict) and plan.get("format") == PLAN_FORMAT else None


def check_same_run(out: Path, previous: dict[str, Any] | None, key: dict[str, Any]) -> None:
    """Refuse a run whose ``key`` differs from the ``previous`` run's in ``out``, naming the differences."""
    if previous is None or previous == key:
        return
    changed = [f"{name} {previous.get(name)!r} -> {key[name]!r}" for name in key if previous.get(name) != key[name]]
    raise RunFolderError(
        f"--out {out} holds a block run with other settings ({'; '.join(changed)}); run with the same settings to "
        "take it up again, choose another --out, or pass --overwrite to start again"
    )


def write_plan(out: Path, key: dict[str, Any]) -> None:
    """Save the run's key as ``plan.json`` (atomic)."""
    with atomic_path(out / PLAN_NAME) as tmp:
        tmp.write_text(json.dumps(key, indent=1), encoding="utf-8")


def clear(out: Path) -> None:
    """Remove an earlier block run's files from ``out`` (``overwrite``; the model files are the lock's)."""
    for name in (BLOCKS_DIR, MIPS_DIR, TARGET_MIPS_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (PLAN_NAME, SURVEY_NAME):
        (out / name).unlink(missing_ok=True)


def survey_of(
    out: Path, source: LazyVolume, cell_zyx: tuple[int, int, int], client: Any,
    progress: Callable[[int, int], None], log: Callable[[str], None], denoise: float = 0.0,
) -> Survey:  # fmt: skip
    """The survey an earlier run saved for this volume, cell size and denoising, else one made now on ``client``
    (and saved)."""
    key = {**source_key(source), "cell": list(cell_zyx), "denoise": denoise}
    path = out / SURVEY_NAME
    found = Survey.load(path, key)
    if found is not None:
        log(f"survey: read from {path}")
        return found
    started = time.perf_counter()
    survey = run_survey(source, cell_zyx, lambda f, a, r: run_tasks(client, f, a, r), progress, denoise)
    survey.save(path, key)
    denoised = f", denoised along its structures over {denoise:g} voxels" if denoise > 0 else ""
    log(f"survey: the whole volume read once in {time.perf_counter() - started:.1f} s (axis MIPs{denoised}, cells "
        f"of {' x '.join(map(str, cell_zyx))} voxels)")  # fmt: skip
    return survey
