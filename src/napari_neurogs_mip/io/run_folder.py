"""The output folder of a fit: one run per folder, locked while it runs.

A fit writes ``checkpoint_iter{N}.pt`` files and, when it finishes,
``neurogs_renderer_optimized.pt``.  Two fits writing one folder would replace
each other's files, and a new fit in a folder of an older one would leave a mix
of both; :func:`claim_run_folder` refuses both unless asked (``overwrite``, or
resuming from a checkpoint of that folder) and holds an advisory lock
(``flock``: the operating system releases it when the process dies, so a
killed fit never leaves the folder locked).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: the lock falls back to an exclusively created file
    fcntl = None  # type: ignore[assignment]

FINAL_NAME = "neurogs_renderer_optimized.pt"
"""File name of a finished fit's model."""
CHECKPOINT_PATTERN = "checkpoint_iter*.pt"
LOCK_NAME = ".neurogs-mip.lock"
_TEMP = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")
"""Temporary files of :func:`.atomic.atomic_path`."""


class RunFolderError(ValueError):
    """The output folder is in use or holds another run's files."""


def checkpoint_name(iteration: int) -> str:
    """File name of the checkpoint written at ``iteration``."""
    return f"checkpoint_iter{iteration}.pt"


def run_files(folder: Path) -> list[Path]:
    """The model files of a fit in ``folder`` (final model and checkpoints), sorted."""
    if not folder.is_dir():
        return []
    return sorted([*folder.glob(CHECKPOINT_PATTERN), *folder.glob(FINAL_NAME)])


def stale_temp_files(folder: Path) -> list[Path]:
    """Temporary files that an interrupted atomic write left in ``folder``."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _TEMP.match(p.name))


@contextlib.contextmanager
def claim_run_folder(folder: Path, *, overwrite: bool = False, resume_from: str | None = None) -> Iterator[list[str]]:
    """Lock ``folder`` for one fit and yield notes on what was cleaned.

    Parameters
    ----------
    folder
        The fit's output folder; created when missing (and removed again if the
        fit leaves it empty).
    overwrite
        Delete another run's model files instead of refusing.
    resume_from
        The checkpoint the fit resumes from: a folder whose run files include it
        is the same run, going on.

    Raises
    ------
    RunFolderError
        Another fit holds the folder, or it holds another run's files.
    """
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    handle = _lock(folder)
    try:
        notes = _prepare(folder, overwrite, resume_from)
        yield notes
    finally:
        _unlock(folder, handle)
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _prepare(folder: Path, overwrite: bool, resume_from: str | None) -> list[str]:
    notes = []
    # Only the lock holder writes here, so every temporary file left is from a killed write.
    stale = stale_temp_files(folder)
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        notes.append(f"removed {len(stale)} temporary file(s) of an interrupted write in {folder}")
    existing = run_files(folder)
    if not existing:
        return notes
    same_run = resume_from is not None and any(_same_file(Path(resume_from), p) for p in existing)
    if same_run:
        notes.append(f"resuming the run in {folder} ({len(existing)} model file(s) there)")
    elif overwrite:
        for path in existing:
            path.unlink()
        notes.append(f"--overwrite: removed {len(existing)} model file(s) of an earlier run in {folder}")
    else:
        names = ", ".join(p.name for p in existing[:3]) + (", ..." if len(existing) > 3 else "")
        raise RunFolderError(
            f"--out {folder} holds another run's files ({names}); choose another --out, resume that run with "
            f"--checkpoint {existing[-1]}, or pass --overwrite to replace it"
        )
    return notes


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _lock(folder: Path) -> int:
    path = folder / LOCK_NAME
    while True:
        if fcntl is None:
            try:
                handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                raise RunFolderError(_busy(folder, path)) from None
        else:
            handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(handle)
                if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise RunFolderError(_busy(folder, path)) from None
                raise
            # The holder before us may have unlinked the file between our open and our lock: lock the new one.
            if not path.exists() or os.stat(path).st_ino != os.fstat(handle).st_ino:
                os.close(handle)
                continue
        # The pid only names the owner in messages (the flock is the lock): a full disk must not stop the fit here.
        with contextlib.suppress(OSError):
            os.ftruncate(handle, 0)
            os.write(handle, f"{os.getpid()}\n".encode())
        return handle


def _busy(folder: Path, path: Path) -> str:
    try:
        pid = path.read_text().strip() or "unknown"
    except OSError:
        pid = "unknown"
    return f"--out {folder} is in use by another fit (process {pid}); wait for it to end or choose another --out"


def _unlock(folder: Path, handle: int) -> None:
    (folder / LOCK_NAME).unlink(missing_ok=True)
    os.close(handle)
