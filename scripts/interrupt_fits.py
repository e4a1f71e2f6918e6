"""Interrupt real ``neurogs-mip fit`` runs at random moments and check that nothing on disk is ever broken.

Each round starts a small fit of the built-in sample as a subprocess, waits for
a random moment of one of three phases and sends SIGTERM or SIGKILL:

* ``startup``: after the process installed its SIGTERM handler, before its first step;
* ``steps``: a random time after the first step;
* ``write``: the moment a temporary file of an atomic checkpoint write appears.

After every round each final-name ``*.pt`` file in the output folder must load.
After SIGTERM the fit must exit 143 without a traceback and leave no temporary
file; once it has made a step, it must report the iteration it stopped at and the
``checkpoint_iter{N}.pt`` it saved, which must load and hold iteration N.  After
SIGKILL a follow-up fit in the same folder (resuming from the latest checkpoint
with ``--extra-iterations``, or with ``--overwrite``) must succeed and remove the
temporary files the kill left.  A fit that handles SIGTERM only once it has locked
its folder (its start-up unprotected) fails the round too.

Run ``python scripts/interrupt_fits.py --rounds 20``; it exits 0 only if every
round passes.  Tests call :func:`run_rounds` with fewer rounds.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

FIT_ARGS = (
    "--sample", "--downsample", "2", "--num_views", "3", "--num_gaussians", "200", "--no-densify",
    "--backend", "cpu", "--device", "cpu", "--save-every", "5",
)  # fmt: skip
"""A small fit that saves often, so that kills land during writes.  The numba ``cpu`` backend ran about 40 steps/s
on two shared cores where ``torch`` ran one or two; its kernels are cached on disk, so only the very first fit of a
checkout pays their compilation (about 25 s)."""
ITERATIONS = 1000
"""Far more steps than a round lets run: every signal lands before the fit ends, even on a fast machine."""
FOLLOW_UP_STEPS = 5
"""Steps of the fit that follows a SIGKILL in the same folder."""
PHASES = ("startup", "steps", "write")
KINDS = (signal.SIGTERM, signal.SIGKILL)
FINAL_NAME = "neurogs_renderer_optimized.pt"
LOCK_NAME = ".neurogs-mip.lock"
STARTUP_TIMEOUT_S = 900.0
"""Generous: a cold numba cache on a loaded machine takes minutes before the first step."""
EXIT_TIMEOUT_S = 300.0
"""How long a signalled fit may take to finish its step and save."""

_PROGRESS = re.compile(r"(\d+)/(\d+) \[")
_REPORT = re.compile(r"interrupted by (SIG\w+) at iteration (\d+) of (\d+): saved (.+?) \(a consistent checkpoint\)")
_CHECKPOINT = re.compile(r"^checkpoint_iter(\d+)\.pt$")
_TEMP = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


@dataclass
class RoundResult:
    """What one round did and what was wrong (``problems`` empty: the round passed)."""

    index: int
    kind: str
    phase: str
    planned_phase: str
    at_s: float
    """Seconds from the start of the fit to the signal."""
    delay_s: float
    """Seconds from the start of the phase to the signal."""
    returncode: int | None = None
    reported_iteration: int | None = None
    pt_files: list[str] = field(default_factory=list)
    tmp_files: list[str] = field(default_factory=list)
    mid_write: bool = False
    """A SIGKILL left the temporary file it was sent at: it landed inside the write."""
    follow_up: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every check of the round passed."""
        return not self.problems

    def line(self, total: int) -> str:
        """One line for the log: kind, moment, phase, exit code, files, verdict."""
        files = f"{len(self.pt_files)} pt, {len(self.tmp_files)} tmp" + (
            " (killed mid-write)" if self.mid_write else ""
        )
        phase = self.phase if self.phase == self.planned_phase else f"{self.phase} (planned {self.planned_phase})"
        stopped = f" stopped at {self.reported_iteration}" if self.reported_iteration is not None else ""
        follow = f"; then {self.follow_up}" if self.follow_up else ""
        verdict = "ok" if self.ok else "FAIL: " + "; ".join(self.problems)
        return (
            f"round {self.index:2d}/{total} {self.kind:7s} at {self.at_s:6.2f} s ({phase} +{self.delay_s:.2f} s) "
            f"exit {self.returncode}{stopped}; files {files}{follow} -> {verdict}"
        )


class _Fit:
    """A ``neurogs-mip fit`` subprocess whose output goes to files (read while it runs; no pipe can fill up)."""

    def __init__(self, args: Sequence[str], log_prefix: Path) -> None:
        self.stdout_path = log_prefix.with_suffix(".stdout.txt")
        self.stderr_path = log_prefix.with_suffix(".stderr.txt")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.started = time.monotonic()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "napari_neurogs_mip.cli", "fit", *args], stdout=out, stderr=err, env=env
            )

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def wait(self, timeout: float) -> int:
        """The exit status; a fit still running after ``timeout`` is killed (its status is then -9)."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def steps_done(progress: str) -> int:
    """The most steps the tqdm bar in ``progress`` (a fit's stderr) has shown (0: none, or no bar yet)."""
    return max((int(m.group(1)) for m in _PROGRESS.finditer(progress)), default=0)


def catches_sigterm(pid: int) -> bool | None:
    """Whether process ``pid`` has a SIGTERM handler installed (``None``: unknown, no ``/proc``).

    Until ``main()`` installs its handler (about 0.1 s after the interpreter starts) a SIGTERM ends the process by
    the default action; no program can answer it then, so the start-up phase starts once the handler is in place.
    """
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return None


def wait_for_sigterm_handler(fit: _Fit, folder: Path, timeout: float = STARTUP_TIMEOUT_S) -> bool:
    """Return once ``fit`` handles SIGTERM (or has ended); without ``/proc``, after a fixed half second.

    Returns ``False`` when the handler came only after the fit had locked ``folder``: start-up was unprotected
    (a SIGTERM then would have ended it by the default action, without a clean exit status).
    """
    deadline = time.monotonic() + timeout
    while fit.process.poll() is None and time.monotonic() < deadline:
        # Look at the lock first: a handler seen after it may have come after it.
        locked = (folder / LOCK_NAME).exists()
        caught = catches_sigterm(fit.process.pid)
        if caught is None:
            time.sleep(0.5)
            return True
        if caught:
            return not locked
        time.sleep(0.002)
    return True


def wait_for_steps(fit: _Fit, steps: int = 1, timeout: float = STARTUP_TIMEOUT_S) -> bool:
    """Wait until ``fit`` has shown ``steps`` steps; ``False`` if it ended or the time ran out first."""
    deadline = time.monotonic() + timeout
    while fit.process.poll() is None and time.monotonic() < deadline:
        if steps_done(fit.stderr()) >= steps:
            return True
        time.sleep(0.02)
    return False


def temp_files(folder: Path) -> list[str]:
    """Names of the temporary files of atomic writes in ``folder``."""
    try:
        return sorted(entry.name for entry in os.scandir(folder) if _TEMP.match(entry.name))
    except FileNotFoundError:
        return []


def checkpoint_files(folder: Path) -> dict[int, Path]:
    """``checkpoint_iter{N}.pt`` files of ``folder`` by N."""
    if not folder.is_dir():
        return {}
    found = {}
    for path in folder.iterdir():
        match = _CHECKPOINT.match(path.name)
        if match:
            found[int(match.group(1))] = path
    return found


def load_iteration(path: Path) -> int:
    """The iteration the checkpoint at ``path`` records (raises if it does not load)."""
    from napari_neurogs_mip.io.checkpoint import load_checkpoint

    return load_checkpoint(path).iteration


def check_model_files(folder: Path) -> tuple[list[str], list[str]]:
    """Load every final-name ``*.pt`` file of ``folder``; returns their names and the problems found.

    A ``checkpoint_iter{N}.pt`` must also hold iteration N.
    """
    names, problems = [], []
    if not folder.is_dir():
        return names, problems
    for path in sorted(folder.glob("*.pt")):
        names.append(path.name)
        try:
            iteration = load_iteration(path)
        except Exception as error:  # any failure to load is what this harness looks for
            problems.append(f"{path.name} does not load: {type(error).__name__}: {error}")
            continue
        match = _CHECKPOINT.match(path.name)
        if match and iteration != int(match.group(1)):
            problems.append(f"{path.name} holds iteration {iteration}")
    return names, problems


def plan_rounds(rounds: int, rng: random.Random) -> list[tuple[signal.Signals, str]]:
    """``rounds`` (signal, phase) pairs: every pair once per block of six, shuffled.

    Any four consecutive rounds hold both signals (a block has three of each), and twenty hold every pair at
    least three times.
    """
    plan: list[tuple[signal.Signals, str]] = []
    while len(plan) < rounds:
        block = [(kind, phase) for kind in KINDS for phase in PHASES]
        rng.shuffle(block)
        plan.extend(block)
    return plan[:rounds]


def _signal_at(fit: _Fit, kind: signal.Signals, phase: str, folder: Path, rng: random.Random) -> tuple[str, float, str]:
    """Wait for a random moment of ``phase`` and send ``kind``; returns the phase observed when it was sent, the
    delay since the phase began and the temporary file it was sent at (``""``: none)."""
    if phase == "startup":
        # Start-up lasts several seconds (imports, the sample volume, the trainer); the first two are reliably in it.
        delay = rng.uniform(0.0, 2.0)
        begun = time.monotonic()
        while time.monotonic() - begun < delay and fit.process.poll() is None:
            time.sleep(0.01)
        observed = "startup" if steps_done(fit.stderr()) == 0 and not checkpoint_files(folder) else "steps"
        fit.process.send_signal(kind)
        return observed, time.monotonic() - begun, ""
    wait_for_steps(fit)
    begun = time.monotonic()
    if phase == "steps":
        delay = rng.uniform(0.0, 1.5)
        while time.monotonic() - begun < delay and fit.process.poll() is None:
            time.sleep(0.01)
        fit.process.send_signal(kind)
        return "steps", time.monotonic() - begun, ""
    # write: a random step count later, the next temporary file that appears; poll hard, a write lasts milliseconds.
    time.sleep(rng.uniform(0.0, 0.5))
    known = set(temp_files(folder))
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while fit.process.poll() is None and time.monotonic() < deadline:
        new = set(temp_files(folder)) - known
        if new:
            fit.process.send_signal(kind)
            return "write", time.monotonic() - begun, min(new)
        time.sleep(0.0005)
    fit.process.send_signal(kind)
    return "steps", time.monotonic() - begun, ""


def _check_sigterm(result: RoundResult, fit: _Fit, folder: Path) -> None:
    stderr = fit.stderr()
    if result.returncode != 128 + signal.SIGTERM:
        result.problems.append(f"exit {result.returncode}, expected {128 + signal.SIGTERM}")
    if "Traceback" in stderr:
        result.problems.append("a traceback on stderr")
    if result.tmp_files:
        result.problems.append(f"SIGTERM left temporary files {result.tmp_files}")
    report = _REPORT.search(stderr)
    if report is None:
        if result.phase != "startup":
            result.problems.append("no 'interrupted by SIGTERM at iteration N ... saved FILE' message after a step")
        elif "interrupted by SIGTERM" not in stderr:
            result.problems.append("no 'interrupted by SIGTERM' message")
        return
    iteration, total, saved = int(report.group(2)), int(report.group(3)), Path(report.group(4))
    result.reported_iteration = iteration
    expected = folder / (FINAL_NAME if iteration == total else f"checkpoint_iter{iteration}.pt")
    if saved != expected:
        result.problems.append(f"reported {saved}, expected {expected}")
    if not saved.is_file():
        result.problems.append(f"the reported {saved.name} does not exist")
        return
    try:
        loaded = load_iteration(saved)
    except Exception as error:  # a broken reported checkpoint is a finding, not a crash of the harness
        result.problems.append(f"the reported {saved.name} does not load: {error}")
        return
    if loaded != iteration:
        result.problems.append(f"the reported {saved.name} holds iteration {loaded}, not {iteration}")


def _follow_up(result: RoundResult, folder: Path, rng: random.Random, logs: Path) -> None:
    """A fit in the folder a SIGKILL left: it must succeed, remove stale temporary files and leave no new ones."""
    stale = temp_files(folder)
    checkpoints = checkpoint_files(folder)
    if checkpoints and rng.random() < 0.5:
        latest = max(checkpoints)
        args = [*FIT_ARGS, "--checkpoint", str(checkpoints[latest]), "--extra-iterations", str(FOLLOW_UP_STEPS)]
        expected, how = latest + FOLLOW_UP_STEPS, f"resume from {latest}"
    else:
        args = [*FIT_ARGS, "--iterations", str(FOLLOW_UP_STEPS), "--overwrite"]
        expected, how = FOLLOW_UP_STEPS, "--overwrite"
    fit = _Fit([*args, "--out", str(folder)], logs / f"{folder.name}_follow_up")
    returncode = fit.wait(STARTUP_TIMEOUT_S)
    left = temp_files(folder)
    result.follow_up = f"{how}: exit {returncode}, {len(left)} tmp"
    if returncode != 0:
        tail = fit.stderr().strip().splitlines()[-1:] or [""]
        result.problems.append(f"follow-up fit ({how}) exited {returncode}: {tail[0][:200]}")
    if left:
        result.problems.append(f"temporary files survived the follow-up fit: {left}")
    if stale and "temporary file(s) of an interrupted write" not in fit.stdout():
        result.problems.append(f"the follow-up fit did not report removing {len(stale)} stale temporary file(s)")
    if (folder / LOCK_NAME).exists():
        result.problems.append("the follow-up fit left its lock file")
    _, problems = check_model_files(folder)
    result.problems.extend(f"after the follow-up: {p}" for p in problems)
    final = folder / FINAL_NAME
    if returncode != 0 or problems:
        return
    if not final.is_file():
        result.problems.append(f"the follow-up fit wrote no {FINAL_NAME}")
    elif (reached := load_iteration(final)) != expected:
        result.problems.append(f"the follow-up's {FINAL_NAME} is at iteration {reached}, expected {expected}")


def run_round(index: int, kind: signal.Signals, phase: str, rng: random.Random, workdir: Path) -> RoundResult:
    """Start one fit in ``workdir/round_{index}``, send ``kind`` at a random moment of ``phase`` and check it."""
    folder = workdir / f"round_{index:02d}"
    shutil.rmtree(folder, ignore_errors=True)
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    fit = _Fit([*FIT_ARGS, "--iterations", str(ITERATIONS), "--out", str(folder)], logs / folder.name)
    protected = wait_for_sigterm_handler(fit, folder)
    observed, delay, target = _signal_at(fit, kind, phase, folder, rng)
    at = fit.elapsed()
    returncode = fit.wait(EXIT_TIMEOUT_S)
    result = RoundResult(index, kind.name, observed, phase, at, delay, returncode)
    if not protected:
        result.problems.append("no SIGTERM handler until the fit had locked its folder: start-up is unprotected")
    result.tmp_files = temp_files(folder)
    result.pt_files, problems = check_model_files(folder)
    result.problems.extend(problems)
    if returncode == 0:
        result.problems.append("the fit ended before the signal")
    elif kind == signal.SIGTERM:
        _check_sigterm(result, fit, folder)
    else:
        result.mid_write = bool(target) and target in result.tmp_files
        if returncode != -signal.SIGKILL:
            result.problems.append(f"exit {returncode}, expected {-signal.SIGKILL} (killed)")
        _follow_up(result, folder, rng, logs)
    return result


def run_rounds(rounds: int, seed: int, workdir: Path, log: Callable[[str], None] | None = print) -> list[RoundResult]:
    """Run ``rounds`` interrupted fits in ``workdir`` (see the module docstring) and return their results.

    Parameters
    ----------
    rounds
        Number of fits to interrupt; four or more include both signals.
    seed
        Seed of the schedule (signal, phase, delays, follow-up kind) so that a failing run can be repeated.
    workdir
        Folder for the rounds' output folders and logs (created when missing).
    log
        Called with one line per round; ``None`` for silence.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    results = []
    for index, (kind, phase) in enumerate(plan_rounds(rounds, rng), start=1):
        result = run_round(index, kind, phase, rng, workdir)
        results.append(result)
        if log is not None:
            log(result.line(rounds))
    return results


def summarize(results: Sequence[RoundResult]) -> str:
    """A few lines: passed rounds, rounds per signal and phase, kills that landed mid-write."""
    passed = sum(r.ok for r in results)
    pairs = Counter(f"{r.kind}/{r.phase}" for r in results)
    lines = [
        f"{passed}/{len(results)} rounds passed",
        "rounds: " + ", ".join(f"{pair} {count}" for pair, count in sorted(pairs.items())),
        f"SIGKILLs that left a partial temporary file (landed mid-write): {sum(r.mid_write for r in results)}",
        f"SIGTERM stops that reported a saved checkpoint: {sum(r.reported_iteration is not None for r in results)}",
    ]
    lines += [f"FAILED round {r.index}: {'; '.join(r.problems)}" for r in results if not r.ok]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; exit status 0 only if every round passes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="fits to interrupt (default: 20)")
    parser.add_argument("--seed", type=int, default=None, help="schedule seed (default: random, printed)")
    parser.add_argument("--workdir", type=Path, help="folder for the runs (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the runs' folders and logs (failures are kept)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="interrupt-fits-"))
    print(f"{args.rounds} rounds, seed {seed}, in {workdir}")
    started = time.monotonic()
    results = run_rounds(args.rounds, seed, workdir)
    print(summarize(results))
    print(f"took {time.monotonic() - started:.0f} s")
    failed = [r for r in results if not r.ok]
    if args.keep or failed:
        print(f"kept {workdir} (logs in {workdir / 'logs'})")
    elif args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        for result in results:
            shutil.rmtree(workdir / f"round_{result.index:02d}", ignore_errors=True)
        shutil.rmtree(workdir / "logs", ignore_errors=True)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
