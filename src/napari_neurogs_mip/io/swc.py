"""SWC neuron skeletons (id, type, x, y, z, radius, parent), in voxel units."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Skeleton:
    """A tree of nodes.

    Attributes
    ----------
    positions
        [N, 3] node centres (x, y, z), voxel units.
    radii
        [N] node radii, voxel units.
    parents
        [N] row index of each node's parent, -1 for roots.
    """

    positions: np.ndarray
    radii: np.ndarray
    parents: np.ndarray

    def edges(self) -> np.ndarray:
        """[E, 2] (child, parent) row indices."""
        child = np.nonzero(self.parents >= 0)[0]
        return np.stack([child, self.parents[child]], axis=1)


def read_swc(path: str | os.PathLike) -> Skeleton:
    """Read an SWC file; lines starting with ``#`` are comments.

    Raises
    ------
    ValueError
        Malformed lines, duplicate ids, unknown parents or non-finite values (the
        message names the file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such SWC file: {path}")
    rows: list[tuple[int, float, float, float, float, int]] = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        fields = text.split()
        if len(fields) < 7:
            raise ValueError(f"{path}:{number}: expected 7 fields (id type x y z radius parent), got {len(fields)}")
        try:
            node, x, y, z, r, parent = int(fields[0]), *map(float, fields[2:6]), int(float(fields[6]))
        except ValueError as error:
            raise ValueError(f"{path}:{number}: {error}") from None
        if not np.all(np.isfinite([x, y, z, r])):
            raise ValueError(f"{path}:{number}: non-finite coordinate or radius")
        rows.append((node, x, y, z, r, parent))
    if not rows:
        raise ValueError(f"{path} holds no SWC nodes")
    ids = [row[0] for row in rows]
    index = {node: i for i, node in enumerate(ids)}
    if len(index) != len(ids):
        raise ValueError(f"{path}: node ids repeat")
    parents = []
    for node, *_, parent in rows:
        if parent != -1 and parent not in index:
            raise ValueError(f"{path}: node {node} names unknown parent {parent}")
        parents.append(index.get(parent, -1))
    table = np.array([row[1:5] for row in rows], dtype=np.float64)
    return Skeleton(table[:, :3], np.maximum(table[:, 3], 0.0), np.array(parents, dtype=np.int64))
