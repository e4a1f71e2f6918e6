"""Where the block tasks run: a dask.distributed cluster (local, any scheduler, or SLURM) or this process.

* :func:`open_client` starts a :class:`dask.distributed.LocalCluster` (``workers``
  processes of ``threads_per_worker`` task threads, each process limited to
  ``memory_limit``; by default one single-threaded worker per CPU) or connects to
  a running scheduler (``tcp://host:8786``), and prints the dashboard's address.
* :func:`run_tasks` submits one task per item and hands each result to a
  callback as it arrives; with ``client=None`` the tasks run here, one by one.
* :func:`slurm_cluster` is the dask-jobqueue recipe for SLURM (see ``docs/blocks.md``).

Why one task thread per worker: a block fit keeps every core busy by itself (the
cpu renderer's kernels run on their own pool of one thread per CPU), and the
fit's memory is per task: with one task per worker process the worker's memory
limit is the block's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..numba_runtime import available_cpus

WORKER_MEMORY = {
    # Tasks hold no dask-managed data worth spilling (a result is a small record): the fit's memory is unmanaged,
    # so spilling would only write survey parts to disk, and pausing at 80 % would wait for memory that freed
    # allocations may never hand back to the OS (a worker paused for good).  A worker above 95 % of its limit is
    # still restarted (its block is retried, then reported as failed).
    "distributed.worker.memory.target": False,
    "distributed.worker.memory.spill": False,
    "distributed.worker.memory.pause": False,
}


class EngineError(RuntimeError):
    """The cluster could not be started or reached (the message names the option)."""


@dataclass(frozen=True)
class ClusterSpec:
    """The cluster to run blocks on.

    Attributes
    ----------
    scheduler
        Address of a running dask scheduler (``tcp://host:8786``, e.g. of a SLURMCluster); ``None`` starts a
        LocalCluster with the settings below.
    workers
        LocalCluster worker processes (default: CPUs / ``threads_per_worker``).
    threads_per_worker
        Tasks a worker runs at once.
    memory_limit
        Per worker process, bytes or text such as ``"2GB"`` (default: dask's, the machine's memory shared out).
    processes
        Workers in processes (the memory limit applies to each); ``False`` runs them as threads of this process
        (no per-worker limit: quick to start, for tests and small volumes).
    """

    scheduler: str | None = None
    workers: int | None = None
    threads_per_worker: int = 1
    memory_limit: str | int | None = None
    processes: bool = True

    def __post_init__(self) -> None:
        if self.scheduler and (self.workers is not None or self.memory_limit is not None):
            raise ValueError(
                "--scheduler connects to workers that already run: --workers and --memory-limit apply to a local "
                "cluster only; leave them out (set them where the workers are started)"
            )
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.threads_per_worker < 1:
            raise ValueError(f"--threads-per-worker must be >= 1, got {self.threads_per_worker}")
        if self.memory_limit is not None and not self.processes:
            raise ValueError(
                "--memory-limit limits worker processes; with --no-processes the workers are threads of one "
                "process and no per-worker limit can be kept"
            )
        if self.memory_limit is not None:
            parse_memory(self.memory_limit)


def parse_memory(value: str | int) -> int:
    """Bytes of ``value`` (``2GB``, ``1.5GiB``, ``500MB`` or a number of bytes); ``ValueError`` naming
    ``--memory-limit`` otherwise."""
    from dask.utils import parse_bytes

    try:
        parsed = int(parse_bytes(value)) if isinstance(value, str) else int(value)
    except (ValueError, TypeError):
        raise ValueError(f"--memory-limit {value!r} is not a size such as 2GB, 1.5GiB or 500MB") from None
    if parsed <= 0:
        raise ValueError(f"--memory-limit must be a positive size, got {value!r}")
    return parsed


@contextlib.contextmanager
def open_client(spec: ClusterSpec, log: Callable[[str], None] = print) -> Iterator[Any]:
    """A dask client of the cluster ``spec`` describes, closed (with any cluster started here) on exit.

    Raises
    ------
    EngineError
        The scheduler at ``spec.scheduler`` cannot be reached, or the local cluster does not start.
    """
    import dask
    from dask.distributed import Client, LocalCluster

    cluster = None
    if spec.scheduler:
        try:
            client = Client(spec.scheduler, timeout="30s")
        except (OSError, TimeoutError) as error:
            raise EngineError(f"--scheduler {spec.scheduler}: cannot reach a dask scheduler there ({error})") from None
        log(f"dask: scheduler {spec.scheduler} with {len(client.scheduler_info()['workers'])} worker(s)")
    else:
        workers = spec.workers or max(1, available_cpus() // spec.threads_per_worker)
        # Threads of this process share its memory: dask's per-worker limit would pause them on the whole
        # process's size, so none is set.
        limit = (spec.memory_limit if spec.memory_limit is not None else "auto") if spec.processes else 0
        try:
            with dask.config.set(WORKER_MEMORY):
                cluster = LocalCluster(
                    n_workers=workers, threads_per_worker=spec.threads_per_worker, memory_limit=limit,
                    processes=spec.processes, dashboard_address=":0" if _has_dashboard() else None,
                    silence_logs=logging.ERROR,
                )  # fmt: skip
        except Exception as error:  # dask raises many types when workers fail to start
            raise EngineError(f"the local dask cluster did not start ({type(error).__name__}: {error})") from error
        client = Client(cluster)
        limits = worker_memory_limits(client)
        shown = f", {_gib(min(limits))} each" if limits and min(limits) else ""
        kind = "processes" if spec.processes else "threads of this process"
        log(f"dask: local cluster of {workers} worker {kind} x {spec.threads_per_worker} thread(s){shown}")
    log(f"dask dashboard: {client.dashboard_link}" if _has_dashboard() else
        "dask dashboard: not served (install bokeh>=3.1 to watch the tasks in a browser)")  # fmt: skip
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _has_dashboard() -> bool:
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return False
    return True


def _gib(nbytes: float) -> str:
    return f"{nbytes / (1 << 30):.2f} GiB"


def worker_memory_limits(client: Any) -> list[int]:
    """Each worker's memory limit in bytes (0: none)."""
    return [int(w.get("memory_limit") or 0) for w in client.scheduler_info()["workers"].values()]


def run_tasks(
    client: Any | None,
    function: Callable[..., Any],
    arguments: Sequence[tuple],
    on_result: Callable[[Any], None],
    names: Sequence[str] | None = None,
    keep_going: bool = False,
) -> dict[int, BaseException]:
    """Run ``function(*arguments[i])`` for every ``i`` and pass each result to ``on_result`` as it arrives.

    Parameters
    ----------
    client
        A dask client (tasks run on its workers, at most ``workers x threads`` at once), or ``None`` to run
        them here one after another.
    names
        Task names (shown on the dashboard); default: the function's name.
    keep_going
        Collect failed tasks and run the rest (their exceptions are returned by index); else the first failure
        is raised.

    When ``on_result`` raises (or the caller is interrupted) the tasks not started are cancelled; the ones
    running finish or die with their worker.
    """
    failed: dict[int, BaseException] = {}
    if client is None:
        for index, args in enumerate(arguments):
            try:
                result = function(*args)
            except Exception as error:
                if not keep_going:
                    raise
                failed[index] = error
                continue
            on_result(result)
        return failed
    from dask.distributed import as_completed

    run = uuid.uuid4().hex[:8]
    labels = names or [f"{function.__name__}-{i}" for i in range(len(arguments))]
    futures = [
        client.submit(function, *args, key=f"{label}-{run}", pure=False) for label, args in zip(labels, arguments)
    ]
    index = {future.key: i for i, future in enumerate(futures)}
    try:
        for future in as_completed(futures):
            if future.status == "error":
                error = future.exception()
                if not keep_going:
                    raise error
                failed[index[future.key]] = error
            else:
                on_result(future.result())
            future.release()
    finally:
        client.cancel([f for f in futures if not f.done()])
    return failed


def slurm_cluster(
    memory: str,
    cpus: int = 8,
    gpus: int = 0,
    queue: str | None = None,
    walltime: str = "02:00:00",
    account: str | None = None,
    job_extra: Sequence[str] = (),
    **options: Any,
) -> Any:
    """A dask-jobqueue ``SLURMCluster`` whose jobs each run one block worker.

    Each job books ``cpus`` CPUs, ``memory`` and ``gpus`` GPUs (``--gres=gpu:N``) and runs one worker process with
    one task thread: the fit uses the CPUs itself (the cpu renderer's kernels, or the data loading beside a GPU),
    and one block at a time keeps the job's memory the block's.  Scale with ``cluster.scale(jobs=N)`` or
    ``cluster.adapt(minimum=0, maximum=N)`` and pass the cluster's ``scheduler_address`` as ``--scheduler`` (or the
    cluster itself to :func:`.run.fit_blocks`).

    Parameters
    ----------
    memory
        Memory per job (``"16GB"``); the worker's limit.
    cpus
        CPUs per job (``--cpus-per-task``).
    gpus
        GPUs per job (0: none); fit with ``--device cuda`` on them.
    queue, walltime, account
        SLURM partition, time limit and account.
    job_extra
        More ``#SBATCH`` directives.
    options
        Passed to ``SLURMCluster`` (e.g. ``job_script_prologue=["module load cuda"]``).

    Raises
    ------
    ImportError
        dask-jobqueue is not installed (``pip install dask-jobqueue``).
    """
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as error:
        raise ImportError("the SLURM recipe needs dask-jobqueue: pip install dask-jobqueue") from error
    directives = [*job_extra, *([f"--gres=gpu:{gpus}"] if gpus else [])]
    options.setdefault("local_directory", os.environ.get("TMPDIR", "/tmp"))
    return SLURMCluster(
        cores=1, processes=1, job_cpu=cpus, memory=memory, queue=queue, walltime=walltime, account=account,
        job_extra_directives=directives, **options,
    )  # fmt: skip
