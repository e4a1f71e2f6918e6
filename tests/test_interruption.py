"""Interrupting real ``neurogs-mip fit`` subprocesses: signals, resuming, a busy folder and a full disk.

Every fit here is a small one of the built-in sample (3 views at half
resolution, 200 Gaussians, no density control, the numba ``cpu`` backend) that
saves every 5 steps.  Waits are generous and only ever for an event (a step, a
file, the exit): no test asserts how long anything takes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from napari_neurogs_mip.io.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
SMALL_FIT = (
    "--sample", "--downsample", "2", "--num_views", "3", "--num_gaussians", "200", "--no-densify",
    "--backend", "cpu", "--device", "cpu", "--save-every", "5",
)  # fmt: skip
LONG = ("--iterations", "1000")
"""More steps than any test lets run: the signal always lands mid-fit."""
WAIT_S = 900.0
"""Generous: the first fit of a checkout compiles the numba kernels (about 25 s alone), on a shared machine."""
TEMP = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")
REPORT = re.compile(r"interrupted by (SIG\w+) at iteration (\d+) of (\d+): saved (.+?) \(a consistent checkpoint\)")


@dataclass
class Fit:
    """A ``neurogs-mip fit`` subprocess with its output in files (readable while it runs)."""

    process: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait(self, timeout: float = WAIT_S) -> int:
        """The exit status (the fit is killed, and the test fails, if it outlives ``timeout``)."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"the fit did not end within {timeout} s; stderr: {self.stderr[-2000:]}")


def start_fit(args: Sequence[str], logs: Path, name: str) -> Fit:
    """Start ``neurogs-mip fit ARGS`` with stdout and stderr in ``logs/name.*.txt``."""
    logs.mkdir(parents=True, exist_ok=True)
    stdout_path, stderr_path = logs / f"{name}.stdout.txt", logs / f"{name}.stderr.txt"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "napari_neurogs_mip.cli", "fit", *args], stdout=out, stderr=err, env=env
        )
    return Fit(process, stdout_path, stderr_path)


@contextlib.contextmanager
def running(fit: Fit) -> Iterator[Fit]:
    """Yield ``fit``; kill it on the way out if a failed assertion left it running."""
    try:
        yield fit
    finally:
        if fit.process.poll() is None:
            fit.process.kill()
            fit.process.wait()


def wait_until(condition: Callable[[], bool], fit: Fit, what: str, timeout: float = WAIT_S) -> None:
    """Poll ``condition`` while ``fit`` runs; fail naming ``what`` if the fit ends or the time runs out first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if fit.process.poll() is not None:
            pytest.fail(f"the fit ended (exit {fit.process.returncode}) before {what}; stderr: {fit.stderr[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout} s; stderr: {fit.stderr[-2000:]}")
        time.sleep(0.01)


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if TEMP.match(p.name)) if folder.is_dir() else []


def catches_sigterm(pid: int) -> bool:
    """Whether ``pid`` has installed a SIGTERM handler (``/proc``; Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


@dataclass
class Interrupted:
    """A fit stopped by a signal after it had written its first checkpoint."""

    out: Path
    returncode: int
    stderr: str
    logs: Path


@pytest.fixture(scope="module")
def interrupt(tmp_path_factory: pytest.TempPathFactory) -> Callable[[signal.Signals], Interrupted]:
    """``interrupt(SIG)``: a fit sent SIG once its first checkpoint exists (run once per signal and module)."""
    done: dict[signal.Signals, Interrupted] = {}

    def run(signum: signal.Signals) -> Interrupted:
        if signum not in done:
            root = tmp_path_factory.mktemp(f"interrupt_{signum.name}")
            out, logs = root / "run", root / "logs"
            with running(start_fit([*SMALL_FIT, *LONG, "--out", str(out)], logs, "fit")) as fit:
                # A checkpoint on disk: the fit is past start-up and in its steps.
                wait_until(lambda: any(out.glob("checkpoint_iter*.pt")), fit, "first checkpoint")
                fit.process.send_signal(signum)
                returncode = fit.wait()
            done[signum] = Interrupted(out, returncode, fit.stderr, logs)
        return done[signum]

    return run


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["TERM", "INT"])
def test_signal_mid_fit_saves_a_checkpoint_of_the_reported_iteration(
    interrupt: Callable[[signal.Signals], Interrupted], signum: signal.Signals, status: int
) -> None:
    run = interrupt(signum)
    assert run.returncode == status, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    report = REPORT.search(run.stderr)
    assert report is not None, f"no 'interrupted by ... at iteration N: saved FILE' line in: {run.stderr[-2000:]}"
    assert report.group(1) == signum.name
    iteration, saved = int(report.group(2)), Path(report.group(4))
    assert iteration >= 5  # the first checkpoint (step 5) existed before the signal
    assert saved == run.out / f"checkpoint_iter{iteration}.pt"
    assert load_checkpoint(saved).iteration == iteration
    # Atomic writes: a signal never leaves a temporary file, and every model file loads.
    assert temp_files(run.out) == []
    for path in run.out.glob("*.pt"):
        load_checkpoint(path)


def test_resume_after_sigterm_continues_from_the_reported_iteration(
    interrupt: Callable[[signal.Signals], Interrupted],
) -> None:
    run = interrupt(signal.SIGTERM)
    report = REPORT.search(run.stderr)
    assert report is not None, run.stderr[-2000:]
    iteration, saved = int(report.group(2)), report.group(4)
    args = [*SMALL_FIT, "--checkpoint", saved, "--extra-iterations", "3", "--out", str(run.out)]
    with running(start_fit(args, run.logs, "resume")) as fit:
        assert fit.wait() == 0, fit.stderr[-2000:]
    assert f"resuming at iteration {iteration}" in fit.stdout
    final = load_checkpoint(run.out / "neurogs_renderer_optimized.pt")
    assert final.iteration == iteration + 3
    assert len(final.metadata["loss_history"]) == iteration + 3  # the resumed history goes on, not restarts


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc to see the SIGTERM handler")
def test_sigterm_during_startup_exits_143_without_traceback(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with running(start_fit([*SMALL_FIT, *LONG, "--out", str(out)], tmp_path / "logs", "fit")) as fit:
        # As early as the program can answer: until main() installs its handler (~0.1 s) a SIGTERM kills Python by
        # the default action, which no program can change.
        wait_until(lambda: catches_sigterm(fit.process.pid), fit, "SIGTERM handler")
        fit.process.send_signal(signal.SIGTERM)
        returncode = fit.wait()
    assert returncode == 143, fit.stderr[-2000:]
    assert "Traceback" not in fit.stderr
    assert "interrupted by SIGTERM" in fit.stderr
    assert not REPORT.search(fit.stderr), "the signal was meant to land before the first step"
    assert not out.exists() or not list(out.glob("*.pt"))


def test_a_sigterm_during_an_import_waits_for_the_import_to_finish(tmp_path: Path) -> None:
    """An exception in the middle of an import can leave a half-built module behind (seen: numpy, then an
    AttributeError and a traceback); the CLI's handler lets the import finish, then leaves."""
    (tmp_path / "slow_module.py").write_text(
        "import os, signal, time\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(0.5)  # the handler runs during this import\n"
        "COMPLETE = True\n"
    )
    program = (
        "import signal, sys, time\n"
        "from napari_neurogs_mip.cli import Interrupted, _raise_interrupted\n"
        "signal.signal(signal.SIGTERM, _raise_interrupted)\n"
        "try:\n"
        "    import slow_module\n"
        "    print('imported', slow_module.COMPLETE, flush=True)\n"
        "    time.sleep(60)\n"
        "except Interrupted as interrupt:\n"
        "    print('interrupted by', interrupt.signum, 'complete:', getattr(sys.modules.get('slow_module'), 'COMPLETE', False))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True, timeout=WAIT_S,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["imported True", f"interrupted by {int(signal.SIGTERM)} complete: True"]


def _import_script() -> ModuleType:
    path = REPO / "scripts" / "interrupt_fits.py"
    spec = importlib.util.spec_from_file_location("interrupt_fits", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_interrupt_fits_script_rounds_pass(tmp_path: Path) -> None:
    script = _import_script()
    # Seed 1 plans SIGTERM and SIGKILL twice each, at start-up, mid-write and (twice) in a start-up that is cheap.
    results = script.run_rounds(4, seed=1, workdir=tmp_path, log=None)
    assert len(results) == 4
    assert {r.kind for r in results} == {"SIGTERM", "SIGKILL"}
    failures = [r.line(len(results)) for r in results if not r.ok]
    assert not failures, "\n".join(failures)


def test_second_fit_on_a_busy_folder_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    lock = out / ".neurogs-mip.lock"
    with running(start_fit([*SMALL_FIT, *LONG, "--out", str(out)], tmp_path / "logs", "first")) as first:
        # The lock file holds its owner's pid once taken.
        wait_until(lambda: lock.is_file() and lock.read_text().strip() == str(first.process.pid), first, "lock")
        second = start_fit([*SMALL_FIT, *LONG, "--out", str(out)], tmp_path / "logs", "second")
        with running(second):
            assert second.wait() == 2, second.stderr[-2000:]
        assert first.process.poll() is None, "the first fit must still hold the folder"
        first.process.kill()
        first.wait()
    assert "in use" in second.stderr
    assert str(first.process.pid) in second.stderr
    assert "Traceback" not in second.stderr
    assert "model:" not in second.stdout  # refused before it prepared anything


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted at ``tmp_path/disk`` (skips when this process may not mount)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(disk)], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"cannot mount a tmpfs: {error}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True, timeout=60)


def test_full_disk_fails_cleanly_and_keeps_the_previous_checkpoint(tiny_disk: Path, tmp_path: Path) -> None:
    # A checkpoint of 200 Gaussians is ~56 kB and every one is kept: the first fits, the ~18th does not.
    out = tiny_disk / "run"
    with running(start_fit([*SMALL_FIT, *LONG, "--out", str(out)], tmp_path / "logs", "fit")) as fit:
        returncode = fit.wait()
    stderr = fit.stderr
    assert returncode == 1, stderr[-2000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-2000:]
    failed = re.search(r"no space left on device writing (\S+); the previous checkpoint (\S+) is intact", errors[0])
    assert failed is not None, errors[0]
    failed_path, intact = Path(failed.group(1)), Path(failed.group(2))
    name = re.fullmatch(r"checkpoint_iter(\d+)\.pt", failed_path.name)
    assert failed_path.parent == out and name is not None, errors[0]
    assert not failed_path.exists()  # no partial file under the final name
    assert temp_files(out) == []
    for path in out.glob("*.pt"):  # every file left is whole
        load_checkpoint(path)
    assert load_checkpoint(intact).iteration == int(name.group(1)) - 5


def test_fit_on_an_already_full_disk_fails_without_traceback(tiny_disk: Path, tmp_path: Path) -> None:
    handle = os.open(tiny_disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        with contextlib.suppress(OSError):  # ENOSPC: the disk is full
            while True:
                os.write(handle, b"\0" * 4096)
    finally:
        os.close(handle)
    out = tiny_disk / "run"
    with running(start_fit([*SMALL_FIT, *LONG, "--out", str(out)], tmp_path / "logs", "fit")) as fit:
        returncode = fit.wait()
    assert returncode != 0
    assert "Traceback" not in fit.stderr, fit.stderr[-2000:]
    errors = [line for line in fit.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no space left on device" in errors[0].lower(), fit.stderr[-2000:]
    assert temp_files(out) == [] and not list(out.glob("*.pt"))
