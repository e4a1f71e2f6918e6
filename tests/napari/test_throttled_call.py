"""The widgets' refresh: requests merged into one call, never two calls closer than the interval."""

from __future__ import annotations

import time

from napari_neurogs_mip._napari._qt.throttled import ThrottledCall

INTERVAL = 0.3


def _recorder(interval: float = INTERVAL) -> tuple[list[float], ThrottledCall]:
    calls: list[float] = []
    return calls, ThrottledCall(lambda: calls.append(time.perf_counter()), interval)


def test_requests_are_merged_and_spaced_by_the_interval(qtbot) -> None:
    calls, call = _recorder()
    for _ in range(5):
        call.request()
    qtbot.waitUntil(lambda: len(calls) == 1, timeout=5000)
    for _ in range(5):
        call.request()
    qtbot.waitUntil(lambda: len(calls) == 2, timeout=5000)
    qtbot.wait(int(3 * INTERVAL * 1000))
    assert len(calls) == 2  # ten requests, two calls
    # Qt's coarse timers may fire up to 5 % early.
    assert calls[1] - calls[0] >= 0.9 * INTERVAL


def test_now_calls_at_once_and_takes_the_place_of_a_pending_request(qtbot) -> None:
    calls, call = _recorder()
    call.now()
    call.request()  # too soon after the last call: pending
    call.now()
    assert len(calls) == 2
    qtbot.wait(int(3 * INTERVAL * 1000))
    assert len(calls) == 2


def test_cancel_drops_a_pending_request(qtbot) -> None:
    calls, call = _recorder()
    call.now()
    call.request()
    call.cancel()
    qtbot.wait(int(3 * INTERVAL * 1000))
    assert len(calls) == 1


def test_reset_lets_the_next_request_call_without_waiting_for_the_interval(qtbot) -> None:
    # An hour-long interval: without the reset the request below would wait for it, and waitUntil would time out.
    calls, call = _recorder(interval=3600.0)
    call.now()
    call.reset()
    call.request()
    qtbot.waitUntil(lambda: len(calls) == 2, timeout=10_000)
