"""Workers that share one machine's CPU cores take turns on them instead of fighting over them.

On a CPU-only machine `baton serve` runs a prefill and a decode worker side by side. Given every core each, the
two thrash whenever both compute (oversubscribed OpenMP threads); given half the cores each, cores sit idle
whenever one of them has nothing to do, and the decode batch, busy all the time, runs at half speed. With a
shared pair of lock files they take turns the way the in-process engine does: a prefill waits at most for the
layer of the decode step in progress, then runs on every core while decoding waits; decoding has every core
whenever no prefill is waiting.

Two flock(2) locks on files next to each other (locks of separate open files, so they also work between
threads of one process):
- `<path>.want` is held exclusively by a prefill that waits for the cores or runs on them; a decode step first
  waits until it is free (taking and dropping a shared lock). This is what gives prefill priority.
- `<path>.run` is held by whichever forward pass is running. A decode step gives it up between two layers when a
  prefill is waiting (`yield_to_prefill`, called by the engine before each layer), so a prefill waits for one
  layer of a decode step, not a whole step.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO


class SharedCores:
    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)  # e.g. a fresh volume (docker-compose.cpu.yml)
        self._want = self._open(path + ".want")
        self._run = self._open(path + ".run")

    @staticmethod
    def _open(path: str) -> IO[bytes]:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        return os.fdopen(fd, "r+b")

    @contextmanager
    def prefill(self) -> Iterator[None]:
        """Hold the cores for one prefill forward pass; waits until a decode step in progress reaches its next
        layer (yield_to_prefill) or ends."""
        fcntl.flock(self._want, fcntl.LOCK_EX)
        try:
            fcntl.flock(self._run, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._run, fcntl.LOCK_UN)
        finally:
            fcntl.flock(self._want, fcntl.LOCK_UN)

    @contextmanager
    def decode_step(self) -> Iterator[None]:
        """Hold the cores for one decode step; waits while a prefill waits or runs."""
        fcntl.flock(self._want, fcntl.LOCK_SH)  # blocks while a prefill holds it
        fcntl.flock(self._want, fcntl.LOCK_UN)
        fcntl.flock(self._run, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._run, fcntl.LOCK_UN)

    def yield_to_prefill(self) -> None:
        """Inside decode_step: if a prefill is waiting, let it run on the cores, then take them back."""
        try:
            fcntl.flock(self._want, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # a prefill holds it: it waits for the cores or is about to
            fcntl.flock(self._run, fcntl.LOCK_UN)
            fcntl.flock(self._want, fcntl.LOCK_SH)
            fcntl.flock(self._want, fcntl.LOCK_UN)
            fcntl.flock(self._run, fcntl.LOCK_EX)
            return
        fcntl.flock(self._want, fcntl.LOCK_UN)
