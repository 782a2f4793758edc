"""A worker process's compute loop runs on the main thread, its asyncio side on another (baton/rpc/main_thread.py);
signals reach the event loop."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import threading

import pytest

from baton.rpc.main_thread import MainThread


def test_the_loop_gets_the_main_thread_and_a_signal_stops_the_coroutine() -> None:
    main_thread = MainThread()
    seen: dict[str, threading.Thread] = {}
    inbox: queue.SimpleQueue[str] = queue.SimpleQueue()

    def compute() -> None:  # a compute loop: runs until told to stop
        seen["compute"] = threading.current_thread()
        while inbox.get() != "stop":
            pass

    async def serve() -> int:
        seen["asyncio"] = threading.current_thread()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        main_thread.on_signal(lambda: loop.call_soon_threadsafe(stop.set))
        started = main_thread.spawn(compute, "compute")
        os.kill(os.getpid(), signal.SIGTERM)  # handled on the main thread, inside compute's inbox.get()
        await stop.wait()
        inbox.put("stop")
        await asyncio.to_thread(started.join)
        return 7

    before = signal.getsignal(signal.SIGTERM)
    assert main_thread.run(serve) == 7
    assert seen["compute"] is threading.main_thread() and seen["asyncio"] is not threading.main_thread()
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back


def test_the_coroutine_error_is_raised_on_the_main_thread() -> None:
    async def fail() -> int:
        raise RuntimeError("no port")

    with pytest.raises(RuntimeError, match="no port"):
        MainThread().run(fail)
