"""The block-wise fit's napari session without a viewer: events in order, the merged MIPs, stop and restart.

A procedural neuron of 16 x 64 x 64 voxels, cut into 4 blocks of 16 x 32 x 32
(halo 4), 10 steps a block, on worker threads of the test process (see
``test_blocks_fit.py`` for why threads); a run takes a few seconds.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("dask.distributed")
pytest.importorskip("zarr")
pytest.importorskip("psygnal")

from gui_free import gui_modules_loaded
from napari_neurogs_mip._napari._block_session import BlockDone, BlockSession, BlockState, Planned
from napari_neurogs_mip.blocks import ClusterSpec
from napari_neurogs_mip.blocks.merge import block_models
from napari_neurogs_mip.blocks.mips import model_renderer, render_view
from napari_neurogs_mip.frames import Frame
from napari_neurogs_mip.io.checkpoint import load_checkpoint
from napari_neurogs_mip.io.lazy import write_ome_zarr
from napari_neurogs_mip.sample import procedural_skeleton, synthesize
from napari_neurogs_mip.train import FitConfig

TIMEOUT = 120.0
SHAPE = (16, 64, 64)
BLOCKS = 4


def options(workers: int = 2, mode: str = "max") -> dict[str, Any]:
    """``fit_blocks`` settings of a quick run; ``max`` mode makes the merged MIP the exact max of the blocks'."""
    return {
        "block": (16, 32, 32), "halo": 4, "view_specs": ["xy", "xz", "yz"],
        "config": FitConfig(iterations=10, densify_every=5, device="cpu", mode=mode),
        "cluster": ClusterSpec(workers=workers, processes=False),
    }  # fmt: skip


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = synthesize(procedural_skeleton(SHAPE, seed=1), SHAPE, seed=1).noisy
    path = tmp_path_factory.mktemp("block_session") / "volume.ome.zarr"
    with write_ome_zarr(path, data.shape, "float32", (16, 32, 32), (1.5, 0.5, 0.5)) as array:
        array[:] = data
    return path


def _recorder(session: BlockSession) -> list[tuple[str, Any]]:
    """Every state change and event of ``session``, in the order they come."""
    seen: list[tuple[str, Any]] = []
    session.status.events.state.connect(lambda state: seen.append(("state", state)))
    for name in ("planned", "block_done", "finished", "failed"):
        session.events[name].connect(lambda value, name=name: seen.append((name, value)))
    session.events.survey.connect(lambda done, total: seen.append(("survey", (done, total))))
    session.events.ended.connect(lambda: seen.append(("ended", None)))
    return seen


def _blocks(seen: list[tuple[str, Any]]) -> list[BlockDone]:
    return [value for kind, value in seen if kind == "block_done"]


def test_a_run_reports_survey_plan_blocks_in_order_and_the_merged_mips(volume: Path, tmp_path: Path) -> None:
    session = BlockSession()
    seen = _recorder(session)
    session.start(volume, tmp_path / "run", **options())
    assert session.wait(TIMEOUT)
    kinds = [kind for kind, _ in seen]
    first = {kind: kinds.index(kind) for kind in set(kinds)}
    assert first["survey"] < first["planned"] < first["block_done"] < first["finished"] < first["ended"]
    assert kinds[-1] == "ended" and "failed" not in kinds
    states = [value for kind, value in seen if kind == "state"]
    assert states == [BlockState.SURVEYING, BlockState.FITTING, BlockState.MERGING, BlockState.FINISHED]
    planned = next(value for kind, value in seen if kind == "planned")
    assert (planned.total, planned.to_fit, planned.done_before, planned.empty) == (BLOCKS, BLOCKS, 0, 0)
    blocks = _blocks(seen)
    assert [(b.done, b.total, b.earlier) for b in blocks] == [(n, BLOCKS, False) for n in range(1, BLOCKS + 1)]
    assert (session.status.done, session.status.total) == (BLOCKS, BLOCKS)
    assert session.result.summary() in session.status.message
    # The merged MIPs: the max of each block's render of the whole view, and the merged model's MIPs.
    run = tmp_path / "run"
    renderer = model_renderer(options()["config"])
    records = {b.record["name"]: b.record for b in blocks}
    parts = block_models(run / "blocks", records)
    merged = load_checkpoint(run / "neurogs_renderer_optimized.pt").model.to_frame(Frame.PHYSICAL)
    assert [v.name for v in session.views] == ["xy", "xz", "yz"]
    for view, image in zip(session.views, session.images):
        assert image.shape == view.shape and image.max() > 0.5
        union = np.maximum.reduce([render_view(m, view, renderer) for m in parts.values()])
        np.testing.assert_allclose(image, union, atol=1e-6, err_msg=view.name)
        np.testing.assert_allclose(image, render_view(merged, view, renderer), atol=2e-5, err_msg=view.name)


def test_stop_between_blocks_keeps_the_finished_ones_and_a_restart_fits_the_rest(volume: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    session = BlockSession()
    seen = _recorder(session)
    # Stopped as soon as the plan is known: the first block to finish ends the run (one worker thread, so the
    # others wait their turn and are cancelled).
    session.events.planned.connect(lambda planned: session.stop())
    session.start(volume, out, **options(workers=1))
    with pytest.raises(RuntimeError, match="under way"):
        session.start(volume, out, **options())
    assert session.wait(TIMEOUT)
    assert session.state is BlockState.STOPPED and "start again with the same settings" in session.status.message
    assert [value for kind, value in seen if kind == "state"][-2:] == [BlockState.STOPPING, BlockState.STOPPED]
    stopped_at = session.status.done
    finished = sorted(p.stem for p in (out / "blocks").glob("*.json"))
    # The block that saw the stop and any that were running then finished; the rest were never started.
    assert 1 <= stopped_at <= len(finished) < BLOCKS
    assert not (out / "neurogs_renderer_optimized.pt").exists()

    again = BlockSession()
    seen = _recorder(again)
    again.start(volume, out, **options(workers=1))
    assert again.wait(TIMEOUT) and again.state is BlockState.FINISHED
    planned: Planned = next(value for kind, value in seen if kind == "planned")
    assert (planned.done_before, planned.to_fit) == (len(finished), BLOCKS - len(finished))
    blocks = _blocks(seen)
    assert [b.done for b in blocks] == list(range(1, BLOCKS + 1))
    assert sorted(b.record["name"] for b in blocks if b.earlier) == finished
    assert again.result.done_before == finished and len(again.result.fitted) == BLOCKS - len(finished)
    # The blocks read back are in the merged MIPs from the start.
    assert all(image.max() > 0.5 for image in again.images)


def test_bad_input_fails_with_a_message_and_ends(tmp_path: Path) -> None:
    session = BlockSession()
    failed: list[str] = []
    ended = threading.Event()
    session.events.failed.connect(failed.append)
    session.events.ended.connect(ended.set)
    session.start(tmp_path / "missing.ome.zarr", tmp_path / "run", **options())
    assert session.wait(TIMEOUT) and ended.is_set()
    assert session.state is BlockState.FAILED
    assert failed and "Fit blocks failed" in failed[0] and "missing.ome.zarr" in failed[0]


def test_the_block_session_loads_no_qt_or_napari() -> None:
    assert gui_modules_loaded("import napari_neurogs_mip._napari._block_session") == []
