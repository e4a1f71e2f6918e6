"""How the cpu backend's numba kernels (``project_cpu``, ``raster_cpu``) are compiled and run.

``jit`` compiles helpers, ``kernel`` the thread-pool kernels (no GIL); both are
compiled once per dtype (float32 for training, float64 for tests) and cached on
disk (``cache=True``).  Without numba both are the identity and
``IMPORT_ERROR`` says why the cpu backend cannot run.

The kernels are compiled with ``nogil=True`` and take ``(worker, num_workers)``
arguments: worker ``w`` handles items ``w, w + num_workers, ...``.  They run on
``THREADS`` threads, the calling one and a private pool of ``THREADS - 1``
(default: every CPU this process may use,
independent of ``torch.get_num_threads()``, so that a fit may run PyTorch
single-threaded, which is far more robust on a busy machine, and still run the
kernels in parallel).  numba's own ``parallel=True`` is avoided on purpose: its
OpenMP layer loads a second OpenMP runtime next to PyTorch's, and the idle
threads of each spin on the cores the other needs (measured: a full training
step 25x slower); its workqueue layer is process-global and aborts on
concurrent calls (a GUI thread and a fit thread).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

try:
    from numba import njit

    IMPORT_ERROR: str | None = None
except ImportError as error:  # pragma: no cover - exercised only without numba
    IMPORT_ERROR = f"cpu backend unavailable: numba cannot be imported ({error})"


def _identity(function: Any) -> Any:  # pragma: no cover - only without numba
    return function


# ``error_model="numpy"``: a float division by zero gives inf / nan as in numpy instead of raising
# ZeroDivisionError; the test numba inserts for the Python model is a branch per division, which keeps every
# loop with a division scalar (the kernels divide only where they have excluded zero, or discard the result).
jit: Callable[[Any], Any] = (
    njit(cache=True, inline="always", error_model="numpy") if IMPORT_ERROR is None else _identity
)
"""Compile a helper: inlined into the kernels that call it; called from Python it holds the GIL."""
kernel: Callable[[Any], Any] = njit(cache=True, nogil=True, error_model="numpy") if IMPORT_ERROR is None else _identity
"""Compile a kernel for :func:`run_parallel` (releases the GIL)."""


# --------------------------------------------------------------------------- exponentials


def _expf(x):  # pragma: no cover - compiled by numba; no annotations: numba compares signatures
    """float32 ``exp`` (Cephes ``expf``, <= 1 ulp), argument clamped to the finite range."""
    x = min(max(x, np.float32(-87.0)), np.float32(88.0))
    # Round x / ln 2 to an integer with the 1.5 * 2^23 trick; the low bits of t hold that integer.
    t = x * np.float32(1.4426950408889634) + np.float32(12582912.0)
    n = t - np.float32(12582912.0)
    r = x - n * np.float32(0.693359375)
    r = r - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    bits = np.int32((np.float32(t).view(np.int32) - np.int32(0x4B400000) + np.int32(127)) << np.int32(23))
    return p * bits.view(np.float32)


def _expd(x):  # pragma: no cover - compiled by numba; no annotations (see _expf)
    """float64 ``exp`` (Cephes Pade form, <= 2 ulp), argument clamped to the finite range."""
    x = min(max(x, -708.0), 709.0)
    t = x * 1.4426950408889634 + 6755399441055744.0
    n = t - 6755399441055744.0
    r = x - n * 6.93145751953125e-1
    r = r - n * 1.42860682030941723212e-6
    xx = r * r
    px = r * ((1.26177193074810590878e-4 * xx + 3.02994407707441961300e-2) * xx + 9.99999999999999999910e-1)
    qx = ((3.00198505138664455042e-6 * xx + 2.52448340349684104192e-3) * xx + 2.27265548208155028766e-1) * xx + 2.0
    e = 1.0 + 2.0 * (px / (qx - px))
    bits = np.int64((np.float64(t).view(np.int64) - np.int64(0x4338000000000000) + np.int64(1023)) << np.int64(52))
    return e * bits.view(np.float64)


def exp(x):  # pragma: no cover - replaced by the overload inside kernels
    """Inline ``exp`` for float32 and float64 that LLVM vectorises without SVML (kernels only)."""
    raise NotImplementedError


if IMPORT_ERROR is None:
    from numba import types
    from numba.extending import overload

    @overload(exp, inline="always")
    def _exp_overload(x):
        if x == types.float32:
            return _expf
        if x == types.float64:
            return _expd
        return None


def trailing_zeros(x):  # pragma: no cover - replaced by the intrinsic inside kernels
    """Index of the lowest set bit of an integer (kernels only): a loop over a bit mask visits the set bits only."""
    raise NotImplementedError


if IMPORT_ERROR is None:
    from llvmlite import ir
    from numba.extending import intrinsic

    @intrinsic
    def trailing_zeros(typingctx, x):
        if not isinstance(x, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            return builder.cttz(args[0], ir.Constant(ir.IntType(1), 0))

        return x(x), codegen


def maximum(a, b):  # pragma: no cover - replaced by the intrinsic inside kernels
    """The larger of two floats of one type, neither NaN (kernels only).

    LLVM's ``maxnum`` without NaN handling: one ``max`` instruction per vector.  ``max(m[i], x)`` written as a
    compare and a select is stored by the loop vectoriser as a *masked* store of ``x`` where it is larger, which
    later loads of ``m[i]`` cannot take from the store buffer (they wait for it to reach the cache).
    """
    raise NotImplementedError


if IMPORT_ERROR is None:

    @intrinsic
    def maximum(typingctx, a, b):
        if not isinstance(a, types.Float) or a != b:
            return None

        def codegen(context, builder, signature, args):
            value = context.get_value_type(a)
            function = builder.module.declare_intrinsic("llvm.maxnum", [value], ir.FunctionType(value, [value, value]))
            return builder.call(function, args, fastmath=("nnan", "nsz"))

        return a(a, b), codegen


THREADS: int | None = None
"""Threads of the kernels; ``None``: the CPUs this process may use (independent of ``torch.get_num_threads()``)."""

_TASKS_PER_THREAD = 4  # more tasks than threads balance uneven work

_pool: ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] = (0, 0)
_pool_lock = threading.Lock()


def _executor(threads: int) -> ThreadPoolExecutor:
    """The shared pool of ``threads`` threads (rebuilt after a fork or a change of ``threads``)."""
    global _pool, _pool_key
    key = (os.getpid(), threads)
    with _pool_lock:
        if _pool is None or _pool_key != key:
            if _pool is not None and _pool_key[0] == key[0]:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cpu_kernels")
            _pool_key = key
        return _pool


def numpy_view(tensor: Any) -> np.ndarray:
    """A numpy view of a CPU tensor for the kernels (a copy only when it is not contiguous)."""
    return tensor.detach().contiguous().numpy()


def available_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def worker_threads() -> int:
    """Threads that run the kernels (the caller and ``- 1`` pool threads): :data:`THREADS`, or every CPU this
    process may use."""
    return max(1, THREADS or available_cpus())


def run_parallel(kernel: Callable, before: tuple, after: tuple, work: int, min_work: int = 1) -> None:
    """Run ``kernel(*before, worker, num_workers, *after)`` for every worker, on this thread and the pool.

    Parameters
    ----------
    work
        Number of independent items (tiles, Gaussians); no more workers than items.
    min_work
        Items worth one worker: smaller jobs run on the calling thread, since
        handing them to the pool costs more than it saves.
    """
    threads = worker_threads()
    workers = max(1, min(work // max(1, min_work), threads * _TASKS_PER_THREAD if threads > 1 else 1))
    if workers == 1:
        kernel(*before, 0, 1, *after)
        return
    # The calling thread takes tasks too, beside ``threads - 1`` helpers from the pool, each taking the next
    # task until none is left: one hand-off per helper instead of one per task (a hand-off, a thread waking
    # up, costs ~10-20 us; a step makes about a dozen calls), and no thread sits idle waiting for the others.
    tasks = itertools.count()

    def take_tasks() -> None:
        while (worker := next(tasks)) < workers:  # ``next`` on a count is atomic under the GIL
            kernel(*before, worker, workers, *after)

    pool = _executor(threads - 1)
    helpers = [pool.submit(take_tasks) for _ in range(min(threads, workers) - 1)]
    take_tasks()
    for helper in helpers:
        if not helper.cancel():  # a helper that has not started has nothing left to do
            helper.result()
