"""The router's Scheduler, without sockets: which worker a request goes to, and its bounded wait queue."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from baton.errors import InvalidRequestError, Overloaded, Unavailable
from baton.rpc.load import DecodeLoad, PrefillLoad, Role
from services.router.scheduler import Scheduler, Ticket, WorkerReport


class Clock:
    """A hand-driven wall clock."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def tick(self, dt: float = 1.0) -> float:
        self.now += dt
        return self.now


def decode(
    address: str, rows: int, kv: int, as_of: float, used: int = 0, healthy: bool = True, active: int = 0
) -> WorkerReport:
    load = DecodeLoad(free_rows=rows, kv_tokens_free=kv, kv_tokens_used=used, active_rows=active)
    return WorkerReport(address, load, healthy=healthy, as_of=as_of)


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def settle() -> None:
    """Let every task that can run, run."""
    for _ in range(10):
        await asyncio.sleep(0)


def make(clock: Clock, loads: list[WorkerReport], max_queue: int = 4) -> Scheduler:
    s = Scheduler(max_queue=max_queue, clock=clock)
    s.update(Role.DECODE, loads)
    return s


# ---- decode choice -----------------------------------------------------------------------------------------
def test_never_a_full_worker_while_another_has_room(clock: Clock) -> None:
    s = make(clock, [decode("a", 0, 10_000, clock()), decode("b", 1, 10_000, clock()), decode("c", 8, 50, clock())])
    for _ in range(3):
        t = s.pick_decode(100)  # c has rows but not the KV tokens; a has no row
        assert t is not None and t.address == "b"
        s.release(t)
    t = s.pick_decode(100)
    assert t is not None and t.address == "b"
    assert s.pick_decode(100) is None  # b's one row is now taken by the router's own in-flight request


def test_most_free_capacity_wins(clock: Clock) -> None:
    # capacity for a 100-token request: a = min(8, 3) = 3, b = min(4, 100) = 4, c = min(2, 100) = 2
    s = make(clock, [decode("a", 8, 399, clock()), decode("b", 4, 10_000, clock()), decode("c", 2, 10_000, clock())])
    t = s.pick_decode(100)
    assert t is not None and t.address == "b"
    # for a 10-token request a can take 8 more
    t = s.pick_decode(10)
    assert t is not None and t.address == "a"


def test_ties_are_broken_round_robin(clock: Clock) -> None:
    s = make(clock, [decode(a, 50, 1_000_000, clock()) for a in ("w1", "w2", "w3")])
    picks = []
    for _ in range(9):
        t = s.pick_decode(10)
        assert t is not None
        picks.append(t.address)
        s.release(t)  # so capacities stay tied
    assert Counter(picks) == {"w1": 3, "w2": 3, "w3": 3}
    assert picks[:3] == sorted(picks[:3])  # each takes its turn


def test_in_flight_requests_count_until_a_report_includes_them(clock: Clock) -> None:
    s = make(clock, [decode("a", 4, 1000, clock()), decode("b", 4, 1000, clock())])
    tickets = [s.pick_decode(100) for _ in range(8)]  # a burst between two polls spreads over both workers
    assert all(t is not None for t in tickets)
    assert Counter(t.address for t in tickets if t) == {"a": 4, "b": 4}
    assert s.pick_decode(100) is None
    clock.tick()
    for t in tickets:
        assert t is not None
        s.accepted(t)
    # a report taken before the workers accepted them does not include them: still counted
    s.update(Role.DECODE, [decode("a", 4, 1000, clock() - 0.5), decode("b", 4, 1000, clock() - 0.5)])
    assert s.pick_decode(100) is None
    # a report taken after includes them: now it is the report that says the workers are full
    clock.tick()
    s.update(Role.DECODE, [decode("a", 0, 200, clock(), active=4), decode("b", 0, 200, clock(), active=4)])
    assert s.pick_decode(100) is None
    # one finishes: its row is free at once, before the next report
    clock.tick()
    s.release(tickets[0])  # type: ignore[arg-type]
    t = s.pick_decode(100)
    assert t is not None and t.address == tickets[0].address  # type: ignore[union-attr]
    # and a report taken after it finished is not credited twice
    clock.tick()
    s.update(Role.DECODE, [decode("a", 1, 300, clock(), active=3), decode("b", 0, 200, clock(), active=4)])
    loads = {w.address: w for w in s.reports(Role.DECODE)}
    assert loads[t.address].decode.free_rows == 0  # t (not yet accepted) holds the one free row


def test_refusing_worker_is_skipped_until_its_next_report(clock: Clock) -> None:
    s = make(clock, [decode("a", 8, 10_000, clock()), decode("b", 1, 10_000, clock())])
    t = s.pick_decode(10)
    assert t is not None and t.address == "a"
    clock.tick()
    s.refused(t)
    t2 = s.pick_decode(10)
    assert t2 is not None and t2.address == "b"
    clock.tick()
    s.update(Role.DECODE, [decode("a", 8, 10_000, clock()), decode("b", 0, 10_000, clock())])
    t3 = s.pick_decode(10)
    assert t3 is not None and t3.address == "a"


def test_unhealthy_and_unknown_workers_are_never_chosen(clock: Clock) -> None:
    s = make(clock, [decode("a", 8, 10_000, clock(), healthy=False)])
    assert s.pick_decode(10) is None
    s.update(Role.DECODE, [])
    assert s.pick_decode(10) is None


# ---- prefill choice ----------------------------------------------------------------------------------------
def test_prefill_goes_to_the_shortest_queue_with_fair_ties(clock: Clock) -> None:
    s = make(clock, [])
    s.update(Role.PREFILL, [WorkerReport("p1", PrefillLoad(waiting=3), as_of=clock()),
                            WorkerReport("p2", PrefillLoad(waiting=1), as_of=clock()),
                            WorkerReport("p3", PrefillLoad(waiting=1), as_of=clock())])
    picks = [s.pick_prefill().address for _ in range(5)]
    # p2 and p3 alternate, each in-flight prefill counting, until they reach p1's queue of 3
    assert picks[:4] == ["p2", "p3", "p2", "p3"]
    assert picks[4] in ("p1", "p2")
    assert s.pick_prefill(exclude=["p1", "p2"]).address == "p3"
    with pytest.raises(Unavailable):
        s.pick_prefill(exclude=["p1", "p2", "p3"])


# ---- the wait queue ----------------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_queue_bound_refuses_with_overloaded(clock: Clock) -> None:
    s = make(clock, [decode("a", 0, 10_000, clock())], max_queue=2)
    waiters = [asyncio.create_task(s.acquire(10, timeout=10)) for _ in range(2)]
    await asyncio.sleep(0)
    assert s.queued == 2
    with pytest.raises(Overloaded) as e:
        await s.acquire(10, timeout=10)
    assert e.value.retry_after_s is not None and e.value.retry_after_s > 0
    for w in waiters:
        w.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert s.queued == 0


@pytest.mark.asyncio
async def test_waiters_run_in_order_when_capacity_frees(clock: Clock) -> None:
    s = make(clock, [decode("a", 1, 10_000, clock())])
    first = await s.acquire(10, timeout=1)
    order: list[int] = []
    got: list[Ticket] = []

    async def wait(i: int) -> None:
        t = await s.acquire(10, timeout=10)
        order.append(i)
        got.append(t)

    tasks = []
    for i in range(3):
        tasks.append(asyncio.create_task(wait(i)))
        await asyncio.sleep(0)  # enqueue in this order
    assert s.queued == 3
    clock.tick()
    s.release(first)  # the row is free again before the next report: a request finishing wakes the queue
    await settle()
    assert order == [0]
    clock.tick()
    s.update(Role.DECODE, [decode("a", 3, 10_000, clock())])  # a report with more room wakes the queue too
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]
    assert s.queued == 0


@pytest.mark.asyncio
async def test_a_newcomer_does_not_overtake_the_queue(clock: Clock) -> None:
    s = make(clock, [decode("a", 1, 10_000, clock())])
    held = await s.acquire(10)
    queued = asyncio.create_task(s.acquire(10, timeout=10))
    await asyncio.sleep(0)
    late = asyncio.create_task(s.acquire(10, timeout=10))
    await asyncio.sleep(0)
    clock.tick()
    s.release(held)
    assert (await queued).address == "a"
    await settle()
    assert not late.done()  # the freed row went to the earlier waiter
    late.cancel()
    await asyncio.gather(late, return_exceptions=True)


@pytest.mark.asyncio
async def test_wait_times_out_and_cancelled_waiters_leave(clock: Clock) -> None:
    s = make(clock, [decode("a", 0, 10_000, clock())])
    with pytest.raises(Overloaded):
        await s.acquire(10, timeout=0.01)
    assert s.queued == 0
    task = asyncio.create_task(s.acquire(10, timeout=10))
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert s.queued == 0
    # a ticket assigned to a waiter that is giving up goes back
    clock.tick()
    s.update(Role.DECODE, [decode("a", 1, 10_000, clock())])
    t = s.pick_decode(10)
    assert t is not None


@pytest.mark.asyncio
async def test_requests_that_cannot_be_served_fail_fast(clock: Clock) -> None:
    s = make(clock, [])
    with pytest.raises(Unavailable):
        await s.acquire(10)
    s.update(Role.DECODE, [decode("a", 4, 1000, clock(), used=24)])
    with pytest.raises(InvalidRequestError) as e:
        await s.acquire(2000)  # more than the worker could ever hold
    assert e.value.field == "max_new_tokens"


@pytest.mark.asyncio
async def test_a_busy_worker_is_not_mistaken_for_a_small_one(clock: Clock) -> None:
    s = make(clock, [decode("a", 4, 1000, clock())])
    clock.tick()
    s.update(Role.DECODE, [decode("a", 1, 100, clock(), used=200, active=3)])  # most of its budget promised
    with pytest.raises(Overloaded):  # waits for room (and times out here) instead of being refused as too big
        await s.acquire(500, timeout=0.01)


# ---- cache-aware choice ------------------------------------------------------------------------------------
def cached(address: str, rows: int, blocks: tuple[str, ...], as_of: float, used: int = 0) -> WorkerReport:
    return WorkerReport(address, DecodeLoad(free_rows=rows, kv_tokens_free=100_000 - used, kv_tokens_used=used,
                                            prefix_blocks=blocks), as_of=as_of)


def test_a_request_goes_where_most_of_its_prefix_is(clock: Clock) -> None:
    s = make(clock, [cached("a", 8, ("k1",), clock()), cached("b", 8, ("k1", "k2", "k3"), clock()),
                     cached("c", 8, (), clock())])
    t = s.pick_decode(100, prefix=["k1", "k2", "k3", "k4"])
    assert t is not None and (t.address, t.cached_blocks) == ("b", 3)
    s.release(t)
    t = s.pick_decode(100, prefix=["k1", "x"])  # a and b both hold k1: the tie goes round-robin
    assert t is not None and t.address in ("a", "b") and t.cached_blocks == 1
    s.release(t)
    t = s.pick_decode(100, prefix=["x", "k1"])  # matched from the first block on (keys are chained hashes)
    assert t is not None and t.cached_blocks == 0


def test_affinity_is_weighed_against_load_in_blocks(clock: Clock) -> None:
    """The blocks a worker would compute plus the KV blocks it holds: four cached blocks are worth less than five
    blocks of load more, and more than two."""
    prefix = ["k1", "k2", "k3", "k4"]
    s = make(clock, [cached("hot", 8, tuple(prefix), clock(), used=2 * 16), cached("cold", 8, (), clock())])
    t = s.pick_decode(100, prefix=prefix)
    assert t is not None and t.address == "hot" and t.cached_blocks == 4
    s = make(clock, [cached("hot", 8, tuple(prefix), clock(), used=5 * 16), cached("cold", 8, (), clock())])
    t = s.pick_decode(100, prefix=prefix)
    assert t is not None and t.address == "cold" and t.cached_blocks == 0


def test_requests_sharing_only_a_system_prompt_spread_by_load(clock: Clock) -> None:
    """One worker holds the system prompt every conversation starts with; the first turns still split evenly, as
    each one assigned adds its blocks to its worker's load."""
    s = make(clock, [cached("a", 32, ("s1", "s2"), clock()), cached("b", 32, (), clock())])
    first = [s.pick_decode(100, prefix=["s1", "s2", f"c{i}"]) for i in range(10)]
    assert Counter(t.address for t in first if t is not None) == {"a": 5, "b": 5}


def test_equal_workers_share_conversations_evenly(clock: Clock) -> None:
    """Each conversation's first turn goes round-robin; its later turns follow its history."""
    s = make(clock, [cached("a", 32, (), clock()), cached("b", 32, (), clock())])
    first = [s.pick_decode(100, prefix=[f"c{i}"]) for i in range(10)]
    assert Counter(t.address for t in first if t is not None) == {"a": 5, "b": 5}


def test_prefix_blocks_travel_in_occupancy_and_the_registry() -> None:
    load = DecodeLoad(active_rows=2, prefix_blocks=("ab", "cd"))
    assert DecodeLoad.from_proto(load.to_proto("fp")) == load
    assert DecodeLoad.from_registry(load.to_registry()) == load
    assert DecodeLoad.from_registry({"active_rows": 1}).prefix_blocks == ()  # an older worker's record
    with pytest.raises(ValueError):
        DecodeLoad.from_registry({"prefix_blocks": "ab"})
