"""A worker's compute loop on the process's main thread, its asyncio side on a thread of its own.

PyTorch's OpenMP parallel regions (oneDNN's and MKL's GEMMs, parallel ops) started from a thread that Python
created ran on one core only on our CPU machines, whatever torch.set_num_threads said: on a 2-core EPYC a
[32 x 576] x [576 x 1536] linear layer took 0.36 ms from the main thread (CPU time 1.96x wall time) and 0.82 ms
from another (0.9x), and a decode step of 32 rows 171 ms against 257 ms. So a worker process gives its main
thread to its compute loop (the decode loop, the prefill compute loop) and runs asyncio (gRPC, the registry
heartbeat) on another thread. Python delivers signals to the main thread; MainThread passes them on to whoever
asked (the worker frame sets its stop event on the event loop).

The compute loop gives up the GIL around every PyTorch op, hundreds of times a step, and takes it back after
each; while the asyncio thread runs Python (streaming tokens), each take-back waits up to the interpreter's
switch interval. MainThread shortens it (SWITCH_INTERVAL_S) so that neither side waits on the other for long.

Without a MainThread (tests that drive a worker from their own event loop) the compute loop runs on a new
thread, as `in_new_thread` does.
"""

from __future__ import annotations

import asyncio
import queue
import signal
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

SWITCH_INTERVAL_S = 0.0005  # Python's default is 0.005


class Started(Protocol):
    """A compute loop that was started: join waits until it has returned."""

    def join(self, timeout: float | None = None) -> None: ...


Spawn = Callable[[Callable[[], None], str], Started]  # (loop, name) -> the started loop


def in_new_thread(fn: Callable[[], None], name: str) -> Started:
    thread = threading.Thread(target=fn, name=name, daemon=True)
    thread.start()
    return thread


class _Job:
    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self.done = threading.Event()

    def join(self, timeout: float | None = None) -> None:
        self.done.wait(timeout)


class MainThread:
    """Runs a coroutine's event loop on a second thread while the main thread runs the compute loops spawned."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._on_signal: list[Callable[[], object]] = []

    def spawn(self, fn: Callable[[], None], name: str) -> Started:
        """Queue `fn` for the main thread (from any thread); it starts once run() is under way. (`name` names a
        new thread in `in_new_thread`; the main thread keeps its own.)"""
        job = _Job(fn)
        self._jobs.put(job)
        return job

    def on_signal(self, callback: Callable[[], object]) -> None:
        """Call `callback` (on the main thread, from the signal handler) on SIGTERM or SIGINT."""
        self._on_signal.append(callback)

    def run(self, main: Callable[[], Coroutine[Any, Any, int]]) -> int:
        """asyncio.run(main()) on another thread; here, the spawned loops one after another, until main returns.
        Returns main's result (or raises its error)."""
        outcome: list[int] = []
        errors: list[BaseException] = []

        def side() -> None:
            try:
                outcome.append(asyncio.run(main()))
            except BaseException as e:  # noqa: BLE001 - raised again on the main thread
                errors.append(e)
            finally:
                self._jobs.put(None)  # wake the main thread: nothing more will be spawned

        def handler(signum: int, frame: object) -> None:
            for callback in list(self._on_signal):
                callback()

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        thread = threading.Thread(target=side, name="asyncio", daemon=True)
        thread.start()
        try:
            while (job := self._jobs.get()) is not None:
                try:
                    job.fn()
                finally:
                    job.done.set()
            thread.join()
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
        if errors:
            raise errors[0]
        return outcome[0]
