"""Which worker gets a request: transport-free, so every rule here is unit-tested without sockets.

Decode: a request needs `prompt_len + max_new_tokens` KV tokens per row and one row (n, for n choices). Among the
healthy decode workers with free rows and enough free KV tokens, the one where it costs least wins, cost counted in
16-token blocks (Dynamo's KV router, with its default weight 1): the blocks of the prompt the worker would have to
compute (those its prefix cache lacks: decode workers publish the keys of their cached blocks,
baton/engine/prefix_cache.py) plus the KV blocks the worker holds or has promised already. So a conversation's
next turn stays where its history is while the workers' loads differ by less than that history, and requests that
share only a short prefix (a system prompt) spread by load: affinity never fills one worker while another idles.
Ties go to the worker with the most free capacity (how many more requests of this size it could take,
`min(free_rows // rows, kv_tokens_free // need)`), then round-robin, so equal workers take turns. A full worker is
never chosen.

Prefill: the healthy prefill worker with the fewest requests waiting, ties round-robin.

Workers report their load every poll; between two reports the router counts what it sent itself. An
assignment counts against its worker until a report taken after the worker accepted it arrives (the report
then includes it); a request that finishes gives its row and tokens back at once, until a report taken after
it finished arrives. So a burst between two polls spreads over the workers instead of landing on one.

A request no decode worker can take now waits in a FIFO queue of at most `max_queue` requests; past that it
is refused with Overloaded. Waiters are served in order whenever a report arrives or a request finishes.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from baton.engine.prefix_cache import BLOCK_TOKENS
from baton.errors import InvalidRequestError, Overloaded, Unavailable
from baton.rpc.load import DecodeLoad, Load, Role


@dataclass(frozen=True)
class WorkerReport:
    """One worker's load as it last reported it (over gRPC or through the registry)."""

    address: str
    load: Load  # DecodeLoad for a decode worker, PrefillLoad for a prefill worker
    healthy: bool = True  # reachable and serving this router's model
    as_of: float = 0.0  # wall-clock time (time.time()) at which the worker measured this load

    @property
    def decode(self) -> DecodeLoad:
        assert isinstance(self.load, DecodeLoad), f"{self.address} is not a decode worker"
        return self.load


@dataclass
class Ticket:
    """One request assigned to one worker, from the assignment until the request is done there."""

    role: Role
    address: str
    tokens: int  # KV tokens the request holds on a decode worker (0 for prefill)
    rows: int = 1  # decode rows it holds (n choices: n)
    cached_blocks: int = 0  # leading blocks of its prompt the worker's prefix cache held when it was chosen
    id: int = field(default_factory=itertools.count().__next__)
    accepted_at: float | None = None  # when the worker accepted it; None: not yet
    done_at: float | None = None


@dataclass
class _Worker:
    report: WorkerReport
    tickets: dict[int, Ticket] = field(default_factory=dict)  # assigned, accepted or done, not yet reported
    refused_at: float | None = None  # it refused a request: full until a later report says otherwise
    kv_capacity: int = 0  # the most KV tokens it was ever seen to hold and have free: a lower bound of its budget
    failed_at: float | None = None  # the router could not reach it: unhealthy until a report measured after that
    blocks: frozenset[str] = frozenset()  # its prefix cache's block keys, as last reported

    def cached(self, prefix: Sequence[str]) -> int:
        """How many leading blocks of `prefix` (chained block keys) the worker's cache holds."""
        n = 0
        for key in prefix:
            if key not in self.blocks:
                break
            n += 1
        return n

    @property
    def healthy(self) -> bool:
        # A registry read repeats the same record until the worker's next heartbeat: only a report measured after
        # the failure may bring a worker back (a dead one never publishes again).
        return self.report.healthy and (self.failed_at is None or self.report.as_of > self.failed_at)

    def unreported(self, t: Ticket) -> bool:
        """The ticket is live but the last report does not include it yet."""
        return t.done_at is None and (t.accepted_at is None or t.accepted_at >= self.report.as_of)

    def released(self, t: Ticket) -> bool:
        """The ticket is done but the last report still counts it."""
        return t.done_at is not None and t.done_at >= self.report.as_of

    def waiting(self) -> int:
        """Requests waiting on the worker, counting the router's own assignments since the report."""
        waiting = self.report.load.waiting
        for t in self.tickets.values():
            if self.unreported(t):
                waiting += 1
            elif self.released(t):
                waiting = max(0, waiting - 1)
        return waiting

    def room(self) -> tuple[int, int]:
        """A decode worker's (free_rows, kv_tokens_free), counting the router's own assignments since the report."""
        load = self.report.decode
        rows, kv = load.free_rows, load.kv_tokens_free
        for t in self.tickets.values():
            if self.unreported(t):
                rows, kv = rows - t.rows, kv - t.tokens
            elif self.released(t):
                rows, kv = rows + t.rows, kv + t.tokens
        rows = min(rows, load.free_rows + load.active_rows)
        if self.refused_at is not None and self.refused_at >= self.report.as_of:
            rows = 0
        return max(0, rows), max(0, kv)

    def prune(self) -> None:
        """Forget tickets the last report already reflects."""
        for tid, t in list(self.tickets.items()):
            if t.done_at is not None and not self.released(t):
                del self.tickets[tid]
            elif t.done_at is None and t.accepted_at is not None and not self.unreported(t):
                del self.tickets[tid]  # now part of the report; release() of a forgotten ticket is a no-op


@dataclass(eq=False)
class _Waiter:
    need: int
    rows: int
    prefix: tuple[str, ...]
    future: asyncio.Future[Ticket]


class Scheduler:
    def __init__(
        self, max_queue: int = 256, retry_after_s: float = 1.0, clock: Callable[[], float] = time.time
    ) -> None:
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.clock = clock
        self._workers: dict[Role, dict[str, _Worker]] = {Role.DECODE: {}, Role.PREFILL: {}}
        self._last_pick: dict[Role, str] = {}
        self._queue: deque[_Waiter] = deque()

    # ---- reports -----------------------------------------------------------------------------------
    def update(self, role: Role, reports: Iterable[WorkerReport]) -> None:
        """The latest report of every worker of a role; workers not listed are forgotten."""
        workers = self._workers[role]
        fresh = {report.address: report for report in reports}
        for address in list(workers):
            if address not in fresh:
                del workers[address]
        for address, report in fresh.items():
            w = workers.get(address)
            if w is None:
                w = workers[address] = _Worker(report)
            elif report.as_of >= w.report.as_of or not report.healthy:
                w.report = report
                w.prune()
            if role is Role.DECODE and report is w.report:
                w.blocks = frozenset(report.decode.prefix_blocks)
            if role is Role.DECODE:
                w.kv_capacity = max(w.kv_capacity, report.decode.kv_tokens_free + report.decode.kv_tokens_used)
        if role is Role.DECODE:
            self._wake()

    def reports(self, role: Role) -> list[WorkerReport]:
        """Each worker's report as the scheduler counts it now (plus the router's own changes since)."""
        out = []
        for w in self._workers[role].values():
            load: Load
            if role is Role.DECODE:
                rows, kv = w.room()
                load = replace(w.report.decode, free_rows=rows, kv_tokens_free=kv, waiting=w.waiting())
            else:
                load = replace(w.report.load, waiting=w.waiting())
            out.append(replace(w.report, load=load, healthy=w.healthy))
        return out

    # ---- decode ------------------------------------------------------------------------------------
    def pick_decode(self, need_tokens: int, rows: int = 1, prefix: Sequence[str] = ()) -> Ticket | None:
        """Assign the request to the decode worker where it costs least: the blocks of its `prefix` (its prompt's
        chained block keys) that worker's cache lacks plus the KV blocks it holds or has promised; ties to the
        most capacity, then round-robin. None if none has room. need_tokens: KV tokens for all of its rows."""
        scores: dict[str, tuple[int, int]] = {}  # address -> (cost, -capacity): the lowest wins
        cached: dict[str, int] = {}
        for address, w in self._workers[Role.DECODE].items():
            if w.healthy:
                free, kv = w.room()
                capacity = min(free // rows, kv // max(1, need_tokens))
                if capacity > 0:
                    cached[address] = w.cached(prefix)
                    busy = max(0, w.kv_capacity - kv) // BLOCK_TOKENS
                    scores[address] = (len(prefix) - cached[address] + busy, -capacity)
        if not scores:
            return None
        top = min(scores.values())
        best = [a for a, s in scores.items() if s == top]
        address = self._fair(Role.DECODE, best)
        ticket = self._assign(Role.DECODE, address, need_tokens, rows)
        ticket.cached_blocks = cached[address]
        return ticket

    async def acquire(self, need_tokens: int, timeout: float | None = None, first: bool = False,
                      rows: int = 1, prefix: Sequence[str] = ()) -> Ticket:
        """A decode worker for the request, waiting in FIFO order (at the head with `first`) until one has room.
        Raises Overloaded when the queue is full or the wait times out, Unavailable when no decode worker is
        known, InvalidRequestError when no known worker could ever hold the request."""
        self._check_fits(need_tokens, rows)
        if not self._queue or first:
            ticket = self.pick_decode(need_tokens, rows, prefix)
            if ticket is not None:
                return ticket
        if len(self._queue) >= self.max_queue and not first:
            raise Overloaded(
                f"router queue is full ({self.max_queue} requests waiting); retry after {self.retry_after_s:g}s",
                retry_after_s=self.retry_after_s,
            )
        waiter = _Waiter(need_tokens, rows, tuple(prefix), asyncio.get_running_loop().create_future())
        if first:
            self._queue.appendleft(waiter)
        else:
            self._queue.append(waiter)
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.future), timeout)
        except BaseException as e:  # timed out or cancelled: leave the queue, give back a ticket assigned meanwhile
            if waiter in self._queue:
                self._queue.remove(waiter)
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(waiter.future.result())
            waiter.future.cancel()
            self._wake()
            if isinstance(e, asyncio.TimeoutError):
                raise Overloaded(
                    f"no decode worker had room within {timeout:g}s; retry after {self.retry_after_s:g}s",
                    retry_after_s=self.retry_after_s,
                ) from None
            raise

    def _check_fits(self, need_tokens: int, rows: int = 1) -> None:
        healthy = [w for w in self._workers[Role.DECODE].values() if w.healthy]
        if not healthy:
            raise Unavailable("no decode worker is available", retry_after_s=self.retry_after_s)
        most_rows = max(w.report.decode.free_rows + w.report.decode.active_rows for w in healthy)
        if rows > 1 and rows > most_rows:
            raise InvalidRequestError("n", f"{rows} choices need {rows} decode rows; the largest decode worker has "
                                           f"{most_rows}")
        largest = max(w.kv_capacity for w in healthy)
        if need_tokens > largest:
            raise InvalidRequestError(
                "max_new_tokens",
                f"prompt + max_new_tokens needs {need_tokens} KV tokens, more than any decode worker holds "
                f"({largest})",
            )

    def _wake(self) -> None:
        """Serve waiters in order while the one at the head fits somewhere."""
        while self._queue:
            head = self._queue[0]
            if head.future.done():
                self._queue.popleft()
                continue
            ticket = self.pick_decode(head.need, head.rows, head.prefix)
            if ticket is None:
                return
            self._queue.popleft()
            head.future.set_result(ticket)

    @property
    def queued(self) -> int:
        return len(self._queue)

    # ---- prefill -----------------------------------------------------------------------------------
    def pick_prefill(self, exclude: Iterable[str] = ()) -> Ticket:
        """Assign the request's prefill to the worker with the fewest waiting. Raises Unavailable if none."""
        skip = set(exclude)
        queues = {
            address: w.waiting()
            for address, w in self._workers[Role.PREFILL].items()
            if w.healthy and address not in skip
        }
        if not queues:
            raise Unavailable("no prefill worker is available", retry_after_s=self.retry_after_s)
        shortest = min(queues.values())
        best = [a for a, n in queues.items() if n == shortest]
        ticket = self._assign(Role.PREFILL, self._fair(Role.PREFILL, best), 0)
        ticket.accepted_at = self.clock()  # a prefill worker queues whatever it is sent
        return ticket

    # ---- a ticket's life ---------------------------------------------------------------------------
    def accepted(self, ticket: Ticket) -> None:
        """The worker confirmed the assignment: its reports from now on include it."""
        ticket.accepted_at = self.clock()

    def refused(self, ticket: Ticket) -> None:
        """The worker turned the request down (full, racing another router): skip it until its next report."""
        w = self._workers[ticket.role].get(ticket.address)
        ticket.done_at = self.clock()  # release() is then a no-op
        if w is not None:
            w.tickets.pop(ticket.id, None)
            w.refused_at = ticket.done_at
        self._wake()

    def failed(self, ticket: Ticket) -> None:
        """The worker could not be reached: unhealthy until a report says otherwise."""
        w = self._workers[ticket.role].get(ticket.address)
        ticket.done_at = self.clock()  # release() is then a no-op
        if w is not None:
            w.tickets.pop(ticket.id, None)
            w.failed_at = ticket.done_at
        self._wake()

    def release(self, ticket: Ticket) -> None:
        """The request is done on its worker (finished, failed or cancelled)."""
        if ticket.done_at is not None:
            return
        ticket.done_at = self.clock()
        w = self._workers[ticket.role].get(ticket.address)
        if w is None:
            pass
        elif ticket.id in w.tickets:
            del w.tickets[ticket.id]  # live tickets are kept only until a report includes them: never reported
        else:
            w.tickets[ticket.id] = ticket  # reported as busy: give its room back until a report shows it gone
        if ticket.role is Role.DECODE:
            self._wake()

    # ---- helpers -----------------------------------------------------------------------------------
    def _assign(self, role: Role, address: str, tokens: int, rows: int = 1) -> Ticket:
        ticket = Ticket(role, address, tokens, rows)
        self._workers[role][address].tickets[ticket.id] = ticket
        self._last_pick[role] = address
        return ticket

    def _fair(self, role: Role, tied: list[str]) -> str:
        """Round-robin among tied workers: the first one after the last worker picked, in address order."""
        tied = sorted(tied)
        last = self._last_pick.get(role)
        if last is None:
            return tied[0]
        return next((a for a in tied if a > last), tied[0])

