"""SWC neuron skeletons (id, type, x, y, z, radius, parent), in voxel units.

Each line holds ``id type x y z radius parent``; ``#`` starts a comment, and
``type`` and any fields after the seventh are ignored.  A file is refused, with
its name, the line and what was expected, unless:

* ids and parent ids are whole numbers (``7`` or ``7.0``, never ``7.5``), ids are
  ``>= 0`` and unique, and every parent is ``-1`` (a root) or an id in the file;
* the parents form a forest: no node is its own parent and no chain of parents
  comes back to where it started;
* x, y, z and the radius are finite, within :data:`MAX_COORDINATE`, and the
  radius is ``>= 0``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_COORDINATE = 1e12
"""Largest ``|x|``, ``|y|``, ``|z|`` or radius accepted, voxel units.  No volume comes near it (the largest are
about 1e5 voxels a side), and below it everything derived stays finite: positions times voxel spacings up to 1e6
are below 1e18 and their squares below 1e36, under the float32 maximum of 3.4e38, where 1e300 would overflow to
inf.  Whether a large skeleton is affordable (a node at 1e9 means some 5e8 Gaussians) is a resource question for
the caller, not a format one."""

ROOT = -1
"""The parent id of a root node."""

_LAYOUT = "7 fields: id type x y z radius parent"


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


@dataclass(frozen=True)
class _Node:
    """One parsed line: where it was, its ids and its numbers (x, y, z, radius)."""

    line: int
    id: int
    parent: int
    values: tuple[float, float, float, float]


def _error(path: Path, line: int, problem: str, expected: str) -> ValueError:
    return ValueError(f"{path}, line {line}: {problem}; expected {expected}")


def _whole_number(text: str) -> int | None:
    """The integer ``text`` spells (``7``, ``-1``, ``7.0``, ``1e3``), or ``None`` when it is not a whole number."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() else None  # False for 7.5, inf and nan


def _parse_line(path: Path, line: int, fields: list[str]) -> _Node:
    """One node from the fields of a line (see the module docstring for the rules)."""
    if len(fields) < 7:
        raise _error(path, line, f"{len(fields)} fields", _LAYOUT)
    node, parent = _whole_number(fields[0]), _whole_number(fields[6])
    if node is None or node < 0:
        raise _error(path, line, f"node id {fields[0]!r}", "a whole number >= 0")
    if parent is None:
        raise _error(path, line, f"parent id {fields[6]!r} of node {node}", f"a whole number ({ROOT} for a root)")
    values = []
    for name, text in zip(("x", "y", "z", "radius"), fields[2:6]):
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not abs(value) <= MAX_COORDINATE:  # also catches NaN, and text that is no number
            raise _error(path, line, f"{name} = {text!r}", f"a finite number within +-{MAX_COORDINATE:g} voxels")
        values.append(value)
    if values[3] < 0:
        raise _error(path, line, f"radius {fields[5]} of node {node} is negative", "a radius >= 0")
    if parent == node:
        raise _error(path, line, f"node {node} is its own parent", f"another node's id, or {ROOT} for a root")
    return _Node(line, node, parent, (values[0], values[1], values[2], values[3]))


def _parent_rows(path: Path, nodes: list[_Node]) -> np.ndarray:
    """Row index of each node's parent (-1 for roots); ids must be unique and parents must exist."""
    rows: dict[int, int] = {}
    for row, node in enumerate(nodes):
        if node.id in rows:
            first = nodes[rows[node.id]].line
            raise _error(path, node.line, f"node id {node.id} repeats (first on line {first})", "unique node ids")
        rows[node.id] = row
    parents = np.full(len(nodes), -1, dtype=np.int64)
    for row, node in enumerate(nodes):
        if node.parent == ROOT:
            continue
        if node.parent not in rows:
            raise _error(path, node.line, f"parent {node.parent} of node {node.id} is not a node of the file",
                         f"{ROOT} for a root, or the id of a node in the file")  # fmt: skip
        parents[row] = rows[node.parent]
    return parents


def _check_forest(path: Path, nodes: list[_Node], parents: np.ndarray) -> None:
    """Refuse a chain of parents that comes back to where it started (each node is walked once)."""
    state = np.zeros(len(nodes), dtype=np.int8)  # 0: not seen, 1: on the chain being walked, 2: leads to a root
    for start in range(len(nodes)):
        chain = []
        row = start
        while row >= 0 and state[row] == 0:
            state[row] = 1
            chain.append(row)
            row = int(parents[row])
        if row >= 0 and state[row] == 1:
            cycle = chain[chain.index(row) :]
            first = min(cycle, key=lambda r: nodes[r].line)
            ids = " -> ".join(str(nodes[r].id) for r in [*cycle, cycle[0]])
            raise _error(path, nodes[first].line, f"the parents of node {nodes[first].id} go round in a cycle ({ids})",
                         f"a tree: every chain of parents ends at a root (parent {ROOT})")  # fmt: skip
        state[chain] = 2


def read_swc(path: str | os.PathLike) -> Skeleton:
    """Read an SWC file (the rules are in the module docstring).

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Malformed lines, bad or repeated ids, unknown parents, cycles, negative radii, non-finite or huge values,
        or no nodes (the message names the file, the line and what was expected).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such SWC file: {path}")
    nodes = []
    for line, text in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        fields = text.split("#", 1)[0].split()
        if fields:
            nodes.append(_parse_line(path, line, fields))
    if not nodes:
        raise ValueError(f"{path} holds no SWC nodes; expected lines of {_LAYOUT}")
    parents = _parent_rows(path, nodes)
    _check_forest(path, nodes, parents)
    table = np.array([node.values for node in nodes], dtype=np.float64)
    return Skeleton(table[:, :3], table[:, 3], parents)
