"""The one shape every bad-input test asserts: exit status 2, the culprit named, no traceback, nothing changed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from napari_neurogs_mip.cli import main


def snapshot(*paths: Path) -> dict[Path, bytes | None]:
    """Every file under ``paths`` (or the file itself) with its bytes; ``None`` for a path that does not exist."""
    files: dict[Path, bytes | None] = {}
    for path in paths:
        if path.is_dir():
            files.update({p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()})
        else:
            files[path] = path.read_bytes() if path.is_file() else None
    return files


def assert_bad_input(capsys, argv: Sequence[str], *culprits: str, unchanged: Sequence[Path] = ()) -> str:
    """Run the CLI on ``argv``: exit status 2, every culprit (flag, file, key) in stderr, no traceback, and
    the files under ``unchanged`` exactly as before (a missing output folder stays missing).  Returns stderr."""
    before = snapshot(*unchanged)
    status = main(list(argv))
    captured = capsys.readouterr()
    assert status == 2, f"exit status {status}; stderr: {captured.err}"
    for culprit in culprits:
        assert culprit in captured.err, f"{culprit!r} not named in: {captured.err}"
    assert "Traceback" not in captured.err
    assert snapshot(*unchanged) == before, f"{[str(p) for p in unchanged]} changed; stderr: {captured.err}"
    for path in unchanged:
        if path.is_dir() or path.parent.is_dir():
            folder = path if path.is_dir() else path.parent
            assert not list(folder.glob(".*.tmp")), f"temporary file left in {folder}"
    return captured.err
