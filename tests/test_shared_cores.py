"""Workers sharing cores take turns: a prefill never runs beside a decode step, and goes before the next one."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from baton.shared_cores import SharedCores


def in_thread(fn: Callable[[], None]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def test_prefill_waits_for_the_layer_then_goes_before_the_next_step(tmp_path: Path) -> None:
    path = str(tmp_path / "cores")
    decode, prefill, decode2 = SharedCores(path), SharedCores(path), SharedCores(path)
    log: list[str] = []
    in_step, release = threading.Event(), threading.Event()

    def step() -> None:
        with decode.decode_step():
            log.append("decode starts")
            in_step.set()
            release.wait(5)
            log.append("decode layer boundary")
            decode.yield_to_prefill()  # a prefill is waiting by now: it runs here
            log.append("decode resumes")

    def run_prefill() -> None:
        with prefill.prefill():
            log.append("prefill runs")
            time.sleep(0.2)
            log.append("prefill done")

    def next_step() -> None:
        with decode2.decode_step():
            log.append("next step")

    t1 = in_thread(step)
    assert in_step.wait(5)
    t2 = in_thread(run_prefill)
    time.sleep(0.2)
    assert "prefill runs" not in log  # the decode step holds the cores
    t3 = in_thread(next_step)  # arrives while the prefill waits: must not overtake it
    time.sleep(0.2)
    assert "next step" not in log
    release.set()
    for t in (t1, t2, t3):
        t.join(5)
    assert log[:4] == ["decode starts", "decode layer boundary", "prefill runs", "prefill done"]
    assert sorted(log[4:]) == ["decode resumes", "next step"]  # the two decode steps, in either order


def test_without_a_waiting_prefill_the_step_keeps_the_cores(tmp_path: Path) -> None:
    path = str(tmp_path / "cores")
    decode, prefill = SharedCores(path), SharedCores(path)
    ran = threading.Event()

    def run_prefill() -> None:
        with prefill.prefill():
            ran.set()

    with decode.decode_step():
        decode.yield_to_prefill()  # nobody waits: returns at once, still holding the cores
        t = in_thread(run_prefill)
        assert not ran.wait(0.3)  # a prefill that comes now waits for the step
    assert ran.wait(5)
    t.join(5)
