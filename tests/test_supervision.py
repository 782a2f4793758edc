"""`baton serve`'s supervision (baton/serve.py: Stack.supervise) and a prefill worker's decode directory
(services/prefill/destinations.py), without a model: a service that exits is started again after a backoff, at
most --max-restarts times a minute, then everything stops saying why; an address the directory does not know is
looked up in a registry read that starts after it came, shared by every caller waiting, and refused when it is
not there; what the registry listed lately stays known for a while."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest

from baton.errors import UnknownPeer
from baton.rpc.registry import WorkerInfo
from baton.serve import Stack, exit_status
from services.prefill.destinations import DecodeDirectory


def test_exit_status_reads_as_people_say_it() -> None:
    assert exit_status(-9) == "signal SIGKILL" and exit_status(1) == "code 1" and exit_status(-15) == "signal SIGTERM"


def test_a_service_that_keeps_dying_is_restarted_until_its_budget_is_spent(capsys: pytest.CaptureFixture[str]) -> None:
    stack = Stack(dict(os.environ), max_restarts=2)
    stack.start("decode-0", ["no-such-command"], "127.0.0.1:1")  # exits at once with code 2 (argparse)
    deadline = time.monotonic() + 60
    problem = None
    while problem is None:
        assert time.monotonic() < deadline, capsys.readouterr().err
        problem = stack.supervise(time.monotonic())
        time.sleep(0.05)
    err = capsys.readouterr().err
    assert err.count("exited with code 2; starting it again in") == 2
    assert "again in 0.5 s (restart 1 of at most 2" in err and "again in 1 s (restart 2 of at most 2" in err
    assert err.count("decode-0 started again (pid") == 2
    assert "restarted 2 times within a minute already (--max-restarts 2); stopping" in problem
    stack.stop()


def test_restarts_older_than_a_minute_do_not_count(capsys: pytest.CaptureFixture[str]) -> None:
    stack = Stack(dict(os.environ), max_restarts=1)
    child = stack.start("prefill-0", ["no-such-command"], "127.0.0.1:1")
    child.proc.wait(30)
    t = time.monotonic()
    assert stack.supervise(t) is None  # restart 1 of 1, due in 0.5 s
    assert stack.supervise(t + 0.6) is None and child.due is None  # started again
    child.proc.wait(30)
    assert stack.supervise(t + 61) is None  # a minute later: its first restart no longer counts
    assert child.due is not None
    stack.stop()


class FakeRegistry:
    url = "redis://fake"

    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.reads = 0
        self.fail = False

    async def workers(self, role: str) -> list[WorkerInfo]:
        self.reads += 1
        await asyncio.sleep(0.05)
        if self.fail:
            raise ConnectionError("down")
        return [WorkerInfo(role, a, "fp", {}) for a in self.addresses]

    async def close(self) -> None:
        pass


def test_the_decode_directory_knows_its_flags_and_its_registry() -> None:
    async def scenario() -> None:
        static = DecodeDirectory(["d:1"])
        await static.check("d:1")
        with pytest.raises(UnknownPeer) as e:
            await static.check("elsewhere:1")
        assert "elsewhere" not in str(e.value)  # the refusal tells nothing about the address

        reg = FakeRegistry()
        known = DecodeDirectory(registry=reg, refresh_s=0.3, forget_s=2.0)  # type: ignore[arg-type]
        reg.addresses = ["d:2"]
        results: list[Any] = await asyncio.gather(*(known.check("d:2") for _ in range(20)), return_exceptions=True)
        assert results == [None] * 20 and reg.reads == 1  # twenty callers, one read
        reg.addresses = ["d:2", "d:3"]
        await known.check("d:3")  # registered since: the check waits for the next read (not sooner than 0.3 s)
        assert reg.reads == 2
        with pytest.raises(UnknownPeer):
            await known.check("d:9")  # never registered: refused after one more read
        assert reg.reads == 3
        reg.addresses = []  # Redis came back empty (restarted): what it listed lately stays known a while
        with pytest.raises(UnknownPeer):
            await known.check("d:8")
        await known.check("d:2")
        reg.fail = True
        await asyncio.sleep(2.1)
        with pytest.raises(UnknownPeer):
            await known.check("d:2")  # forgotten once it has not been listed for forget_s

    asyncio.run(scenario())


def test_the_decode_directory_waits_one_heartbeat_ttl_for_a_worker_to_reregister() -> None:
    """A prefill worker restarted while Redis came back empty knows no decode worker until their next heartbeats;
    a push to one of them waits for that (up to patience_s), and only an address never listed is refused."""
    async def scenario() -> None:
        reg = FakeRegistry()
        known = DecodeDirectory(registry=reg, refresh_s=0.1, patience_s=1.0)  # type: ignore[arg-type]

        async def reregister() -> None:
            await asyncio.sleep(0.5)
            reg.addresses = ["d:5"]

        later = asyncio.create_task(reregister())
        await known.check("d:5")
        await later
        assert reg.reads >= 3  # read again and again until the heartbeat came
        started = time.monotonic()
        with pytest.raises(UnknownPeer):
            await known.check("d:7")
        assert time.monotonic() - started >= 1.0

    asyncio.run(scenario())
