"""Scale benchmark of block-wise fitting: a synthetic volume several times a worker's memory, fitted on a LocalCluster.

1. Writes a volume of neurons as OME-Zarr, tile by tile on the cluster's workers
   (never whole in memory): a grid of tiles, each Poisson noise on the confocal
   background, a fraction of them holding one rasterised procedural neuron
   (:func:`napari_neurogs_mip.sample.clean_volume`, soma ~1, distal dendrites ~0.1).
   The tiles are not aligned with the fit's blocks, so neurons cross the seams.
2. Fits it with :func:`napari_neurogs_mip.blocks.fit_blocks` on a LocalCluster of
   worker processes, each limited to ``--memory-limit``, while sampling every
   worker's resident memory.
3. Prints: blocks/s, peak memory per worker (sampled RSS and the process's own
   high-water mark), total time, and seam quality: the PSNR of the merged model's
   MIP of the whole volume against the volume's MIP, over the fitted blocks'
   footprint, next to the blocks' own PSNR (each against its own targets), and
   inside the seam bands (within a halo of a face between two fitted cores)
   against away from them.
4. Draws target | merged render | residual (the whole ``xy`` MIP reduced, and a
   native-resolution crop across seams, faces drawn) to ``--picture``.

Default: 64 x 4224 x 4224 float32 voxels (4.25 GiB) on 2 workers of 1 GiB.
Run: ``python benchmarks/bench_blocks.py [--out /tmp/bench-blocks] [--picture docs/images/blocks-merged.png]``
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import threading
import time
from pathlib import Path

import numpy as np
from pictures import comparison_row, save_rows

from napari_neurogs_mip.blocks import ClusterSpec, fit_blocks
from napari_neurogs_mip.blocks.engine import open_client, run_tasks
from napari_neurogs_mip.blocks.fit import peak_rss
from napari_neurogs_mip.blocks.merge import pooled_psnr
from napari_neurogs_mip.blocks.mips import render_view
from napari_neurogs_mip.blocks.plan import plan_blocks
from napari_neurogs_mip.blocks.survey import DEFAULT_CELL, survey_region
from napari_neurogs_mip.frames import Frame
from napari_neurogs_mip.io.checkpoint import load_checkpoint
from napari_neurogs_mip.io.lazy import write_ome_zarr
from napari_neurogs_mip.render import Renderer
from napari_neurogs_mip.train import FitConfig
from napari_neurogs_mip.views import make_views

GIB = float(1 << 30)


def write_tile(array, index: tuple[int, int, int], tile: tuple[int, int, int], fraction: float, seed: int) -> int:
    """Generate tile ``index`` of the volume and write it into the zarr ``array`` (runs on a worker); returns
    whether it holds a neuron."""
    from napari_neurogs_mip.sample import Imaging, add_noise, clean_volume, procedural_skeleton

    region = tuple(slice(i * t, min((i + 1) * t, n)) for i, t, n in zip(index, tile, array.shape))
    shape = tuple(s.stop - s.start for s in region)
    rng = np.random.default_rng([seed, *index])
    neuron = bool(rng.random() < fraction) and min(shape[1:]) >= 96
    imaging = Imaging()
    if neuron:
        clean = clean_volume(procedural_skeleton(shape, seed=int(rng.integers(1 << 31))), shape, imaging)
    else:
        clean = np.full(shape, imaging.background, np.float32)
    array[region] = add_noise(clean, imaging, seed=int(rng.integers(1 << 31)))
    return int(neuron)


def make_volume(client, path: Path, shape, tile, chunk, fraction: float, seed: int) -> tuple[int, float]:
    """Write the synthetic volume (one task per tile of whole chunks); returns the neurons drawn and the seconds
    taken."""
    if any(t % c for t, c in zip(tile, chunk)):
        raise ValueError(f"--tile {tile} must be whole --chunk {chunk}s: two tasks must never write one chunk")
    started = time.perf_counter()
    grid = [math.ceil(n / t) for n, t in zip(shape, tile)]
    neurons = []
    with write_ome_zarr(path, shape, "float32", chunk, (1.0, 1.0, 1.0), overwrite=True) as array:
        items = [(array, (z, y, x), tuple(tile), fraction, seed) for z in range(grid[0]) for y in range(grid[1])
                 for x in range(grid[2])]  # fmt: skip
        run_tasks(client, write_tile, items, neurons.append, [f"tile-{i}" for i in range(len(items))])
    return sum(neurons), time.perf_counter() - started


class MemorySampler:
    """Samples every worker's resident memory (bytes) in a background thread."""

    def __init__(self, client, every: float = 0.25) -> None:
        self.client, self.every = client, every
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for worker, rss in self.client.run(_rss).items():
                    self.peaks[worker] = max(self.peaks.get(worker, 0), rss)
            except Exception:  # a worker restarting, or the cluster closing
                pass
            self._stop.wait(self.every)


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def core_side_mips(source, core, denoise: float) -> tuple:
    """The ``xz`` and ``yz`` MIPs of one core's voxels as the fit's targets are (the survey's of that region:
    denoised over ``denoise`` voxels, exactly) (runs on a worker)."""
    region = tuple(slice(a, b) for a, b in core)
    targets = survey_region(source, region, (DEFAULT_CELL,) * 3, denoise).targets
    return core, targets["xz"], targets["yz"]


def seam_quality(client, out: Path, volume: Path, block, halo: int) -> dict:
    """PSNR of the merged model's MIPs against the volume's, next to the blocks' own fits (pooled), per view.

    ``xy`` (rays along z, as long as a block's: the blocks span z): the merged model's MIP of the whole volume
    against the volume's, over the fitted blocks' footprint, also split into the seam bands (within a halo of a
    face between cores) and the rest.  ``xz`` and ``yz``: the MIP of the whole volume takes the maximum of the
    noise over rays 16 times a block's, a brighter and flatter background than any block was fitted to; so the
    like-for-like number is per slab: each row (column) of cores' own ``xz`` (``yz``) MIP against the merged
    Gaussians centred in that slab, across all the faces between its cores.
    """
    import tifffile

    from napari_neurogs_mip.io.lazy import open_volume
    from napari_neurogs_mip.targets import Normalization

    checkpoint = load_checkpoint(out / "neurogs_renderer_optimized.pt")
    model = checkpoint.model.to_frame(Frame.PHYSICAL)
    stored = checkpoint.metadata["normalization"]
    low, high = stored["low"], stored["high"]
    per_view = Normalization("fixed", low=low, high=high, view_background=stored["view_background"])
    geometry = model.geometry
    records = {p.stem: json.loads(p.read_text()) for p in (out / "blocks").glob("*.json")}
    fitted = [r for r in records.values() if r["status"] == "fitted"]
    blocks = plan_blocks(geometry.shape_zyx, block, (0, 0, 0))
    fitted_blocks = [b for b in blocks if b.name in {r["name"] for r in fitted}]
    renderer = Renderer.create("cpu", "auto", checkpoint.metadata["renderer"]["mode"],
                               checkpoint.metadata["renderer"]["beta"])  # fmt: skip
    views = {v.name: v for v in make_views(["xy", "xz", "yz"], geometry)}
    axes = {"xy": (1, 2), "xz": (0, 2), "yz": (0, 1)}

    def normalised(raw: np.ndarray, view_low: float | None = None) -> np.ndarray:
        level = per_view.view_low(raw, low, high) if view_low is None else view_low
        return np.clip((raw - level) / (high - level), 0, 1).astype(np.float32)  # as targets._normalise

    def footprint(name: str, chosen) -> np.ndarray:
        rows, cols = axes[name]
        mask = np.zeros(views[name].shape, bool)
        for b in chosen:
            mask[b.core[rows][0] : b.core[rows][1], b.core[cols][0] : b.core[cols][1]] = True
        return mask

    def psnr(errors: list[np.ndarray]) -> float:
        return float(-10 * np.log10(np.concatenate(errors).mean()))

    rows: dict[str, dict] = {}
    images = {}
    for name, view in views.items():
        raw = tifffile.imread(out / "target_mips" / f"{name}.tif")
        target = normalised(raw, stored["view_lows"][name])
        render = render_view(model, view, renderer)
        error = (render - target) ** 2
        mask = footprint(name, fitted_blocks)
        rows[name] = {"merged_whole_volume": psnr([error[mask]]), "blocks": pooled_psnr(fitted, name)}
        images[name] = (target, render)
    # xy: the seam bands.
    error = (images["xy"][1] - images["xy"][0]) ** 2
    mask = footprint("xy", fitted_blocks)
    seam = np.zeros(mask.shape, bool)
    for b in fitted_blocks:
        for axis in (1, 2):
            for face in b.core[axis]:
                if 0 < face < geometry.shape_zyx[axis]:
                    band = slice(max(0, face - halo), face + halo)
                    other = slice(*b.core[3 - axis])
                    seam[(band, other) if axis == 1 else (other, band)] = True
    seam &= mask
    rows["xy"].update(seam_band=psnr([error[seam]]), away_from_seams=psnr([error[mask & ~seam]]),
                      seam_fraction=float(seam.sum() / mask.sum()))  # fmt: skip
    # xz, yz: per slab of cores, like-for-like with the blocks' own side views.
    source = open_volume(volume)
    parts: list = []
    denoise = float(checkpoint.metadata["config"]["denoise"])
    run_tasks(client, core_side_mips, [(source, b.core, denoise) for b in fitted_blocks], parts.append)
    voxels = model.means.detach().double().numpy() / geometry.spacing_xyz
    for name, slab_axis in (("xz", 1), ("yz", 2)):
        errors = []
        for slab in sorted({b.index[slab_axis] for b in fitted_blocks}):
            members = [b for b in blocks if b.index[slab_axis] == slab]
            chosen = [b for b in fitted_blocks if b.index[slab_axis] == slab]
            raw = np.full(views[name].shape, np.nan, np.float32)
            rows_axis, cols_axis = axes[name]
            for core, xz, yz in parts:
                if any(tuple(map(tuple, core)) == b.core for b in chosen):
                    raw[core[rows_axis][0] : core[rows_axis][1], core[cols_axis][0] : core[cols_axis][1]] = (
                        xz if name == "xz" else yz)  # fmt: skip
            mask = footprint(name, chosen)
            owned = np.any([b.owns(voxels, geometry.shape_zyx) for b in members], axis=0)
            subset = {n: t[torch_index(owned)] for n, t in model.tensors().items()}
            render = render_view(type(model)(**subset, frame=model.frame, geometry=geometry), views[name], renderer)
            target = normalised(np.where(mask, raw, np.nanmedian(raw[mask])))
            errors.append(((render - target) ** 2)[mask])
        rows[name]["merged_per_slab"] = psnr(errors)
    return {"views": rows, "images": images, "fitted": fitted}


def torch_index(mask: np.ndarray):
    import torch

    return torch.as_tensor(np.nonzero(mask)[0])


def save_picture(path: Path, target: np.ndarray, render: np.ndarray, cores: list, title: str) -> Path:
    """Two rows of target | merged render | residual: the whole xy MIP (max-pooled) and a native crop across seams
    (the cores' faces drawn dashed), gamma 0.5 as the quality pictures."""
    size = 512
    factor = math.ceil(max(target.shape) / size)
    pad = [(0, -n % factor) for n in target.shape]
    pooled = [np.pad(i, pad).reshape(i.shape[0] // factor + bool(pad[0][1]), factor, -1, factor).max(axis=(1, 3))
              for i in (target, render)]  # fmt: skip
    # The crop: the seam crossing (a corner shared by 4 cores) with the most structure around it.
    corners = {(c["core"][1][0], c["core"][2][0]) for c in cores if c["core"][1][0] and c["core"][2][0]}
    structure = target > 0.25
    best = max(corners, key=lambda p: structure[max(0, p[0] - size // 4): p[0] + size // 4,
                                                max(0, p[1] - size // 4): p[1] + size // 4].sum())  # fmt: skip
    r0 = int(np.clip(best[0] - size // 2, 0, target.shape[0] - size))
    c0 = int(np.clip(best[1] - size // 2, 0, target.shape[1] - size))
    crop = [i[r0 : r0 + size, c0 : c0 + size] for i in (target, render)]
    rows = [(f"whole xy MIP, max-pooled x{factor}", comparison_row(*pooled, gap=6)),
            (f"native crop at y {r0}, x {c0}: cores' faces dashed", comparison_row(*crop, gap=6))]  # fmt: skip
    faces_y = sorted({f for c in cores for f in c["core"][1] if r0 < f < r0 + size})
    faces_x = sorted({f for c in cores for f in c["core"][2] if c0 < f < c0 + size})

    def dash_faces(draw, index: int, top: int) -> None:
        if index != 1:
            return
        for left in (0, size + 6, 2 * (size + 6)):
            for f in faces_y:
                for x in range(0, size, 8):
                    draw.line([(left + x, top + f - r0), (left + x + 4, top + f - r0)], fill=(0, 200, 0))
            for f in faces_x:
                for y in range(0, size, 8):
                    draw.line([(left + f - c0, top + y), (left + f - c0, top + y + 4)], fill=(0, 200, 0))

    title += "   (target | merged render | residual: red too bright, blue missing)"
    return save_rows(path, title, rows, caption=16, decorate=dash_faces)


def main() -> None:
    """Run the benchmark and print its numbers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-blocks"))
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 4224, 4224), metavar=("Z", "Y", "X"))
    parser.add_argument("--tile", type=int, nargs=3, default=(64, 352, 352), metavar=("Z", "Y", "X"),
                        help="generation tiles; one neuron at most per tile")  # fmt: skip
    parser.add_argument("--chunk", type=int, nargs=3, default=(64, 88, 88), metavar=("Z", "Y", "X"),
                        help="zarr chunks (a tile holds whole chunks)")  # fmt: skip
    parser.add_argument("--neurons", type=float, default=0.2, help="fraction of tiles holding a neuron")
    parser.add_argument("--block", type=int, nargs=3, default=(64, 256, 256), metavar=("Z", "Y", "X"))
    parser.add_argument("--halo", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="1GiB")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--densify-every", type=int, default=25)
    parser.add_argument("--views", default="xy,xz,yz")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--picture", type=Path, help="write target | render | residual here (PNG)")
    parser.add_argument("--keep", action="store_true", help="keep the volume from an earlier run of these settings")
    args = parser.parse_args()

    from dask.utils import parse_bytes

    limit = parse_bytes(args.memory_limit)
    voxels = math.prod(args.shape)
    print(f"volume {' x '.join(map(str, args.shape))} float32 = {4 * voxels / GIB:.2f} GiB = "
          f"{4 * voxels / limit:.1f} x the {limit / GIB:.2f} GiB worker limit; {args.workers} workers")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    volume = args.out / "volume.ome.zarr"
    run = args.out / "run"
    stamp = args.out / "volume.json"
    settings = {"shape": list(args.shape), "tile": list(args.tile), "chunk": list(args.chunk), "neurons": args.neurons,
                "seed": args.seed}  # fmt: skip
    started = time.perf_counter()
    spec = ClusterSpec(workers=args.workers, memory_limit=limit)
    with open_client(spec) as client, MemorySampler(client) as sampler:
        first_workers = set(client.scheduler_info()["workers"])
        if args.keep and volume.exists() and stamp.is_file() and json.loads(stamp.read_text()) == settings:
            print(f"volume: kept {volume}")
            generated = 0.0
        else:
            neurons, generated = make_volume(client, volume, args.shape, args.tile, args.chunk, args.neurons,
                                             args.seed)  # fmt: skip
            stamp.write_text(json.dumps(settings))
            print(f"volume: {neurons} neurons written tile by tile in {generated:.1f} s")
        shutil.rmtree(run, ignore_errors=True)
        marks: dict[str, float] = {}

        def on_survey(done: int, total: int) -> None:
            if done == total:
                marks["survey"] = time.perf_counter()

        def on_block(record: dict, done: int, total: int) -> None:
            marks["last"] = time.perf_counter()
            if done % 10 == 0 or done == total:
                print(f"  {done}/{total} blocks", flush=True)

        fit_started = time.perf_counter()
        config = FitConfig(iterations=args.iterations, densify_every=args.densify_every, device="cpu", seed=args.seed)
        result = fit_blocks(volume, run, block=tuple(args.block), halo=args.halo, view_specs=args.views.split(","),
                            config=config, cluster=client, on_survey=on_survey, on_block=on_block)  # fmt: skip
        fit_seconds = time.perf_counter() - fit_started
        high_water = client.run(peak_rss)
        last_workers = set(client.scheduler_info()["workers"])
        sampled = dict(sampler.peaks)
        total = time.perf_counter() - started
        quality = seam_quality(client, run, volume, tuple(args.block), args.halo)
    fitted = len(result.fitted)
    block_seconds = marks.get("last", marks.get("survey", 0)) - marks.get("survey", fit_started)
    print("\n== results")
    print(f"blocks: {len(result.blocks)} planned, {fitted} fitted, {len(result.empty)} skipped (no structure)")
    print(f"blocks/s: {fitted / block_seconds:.3f} ({block_seconds:.1f} s of block fits after the survey)")
    print(f"survey (one pass over {4 * voxels / GIB:.2f} GiB): {marks.get('survey', fit_started) - fit_started:.1f} s")
    print(f"time: generation {generated:.1f} s, fit_blocks {fit_seconds:.1f} s (survey, blocks, merge, MIPs), "
          f"total {total:.1f} s")  # fmt: skip
    print(f"workers restarted: {sorted(first_workers ^ last_workers) or 'none'}")
    for worker in sorted(high_water):
        print(f"peak memory {worker}: sampled RSS {sampled.get(worker, 0) / GIB:.3f} GiB, process high-water "
              f"mark {high_water[worker] / GIB:.3f} GiB (limit {limit / GIB:.2f} GiB)")  # fmt: skip
    under = all(v < limit for v in high_water.values()) and first_workers == last_workers
    print(f"every worker under the limit: {under}")
    print("seam quality, PSNR dB against the volume's MIPs (denoised as the fit's targets; blocks: each block's "
          "own fit against its own targets, pooled):")  # fmt: skip
    for name, row in quality["views"].items():
        merged = row.get("merged_per_slab", row["merged_whole_volume"])
        how = "per slab of cores" if "merged_per_slab" in row else "whole volume"
        line = (f"  {name}: merged ({how}) {merged:.2f}, blocks {row['blocks']:.2f}, difference "
                f"{merged - row['blocks']:+.2f}; merged, whole-volume MIP {row['merged_whole_volume']:.2f}")  # fmt: skip
        if "seam_band" in row:
            line += (f"; seam bands ({row['seam_fraction']:.0%} of the footprint) {row['seam_band']:.2f}, away "
                     f"from seams {row['away_from_seams']:.2f}")  # fmt: skip
        print(line)
    if args.picture:
        target, render = quality["images"]["xy"]
        cores = quality["fitted"]
        every = plan_blocks(args.shape, args.block, (0, 0, 0))
        title = (f"{' x '.join(map(str, args.shape))} voxels, {fitted} of {len(every)} blocks fitted, "
                 f"{args.iterations} steps each")  # fmt: skip
        print(f"picture: {save_picture(args.picture, target, render, cores, title)}")


if __name__ == "__main__":
    main()
