"""A bound on how long an HTTP client may take to send a request: no slowloris on the router's HTTP API.

uvicorn (0.55) has no read timeout: a client that sends a header line, or a body byte, every few seconds keeps
its connection, and the request's task, forever. `read_timeout_protocol(s)` returns uvicorn's h11 protocol class
with this invariant added:

    While the server waits on a client for a request (from the connection's start for its first request, from
    the request's first byte for later ones, until the request's body is complete), a deadline of
    `read_timeout_s` is armed. When it passes, the request is answered `408 Request Timeout` (unless a response
    to it has started) and the connection is closed.

Once the request is complete (h11's `their_state` leaves IDLE and SEND_BODY) the deadline is disarmed, so the
response, however long it streams (SSE), is never cut by it: the deadline covers receiving, never answering.
Between requests, an idle keep-alive connection stays bounded by uvicorn's own `timeout_keep_alive`; where
uvicorn leaves that timer unarmed (a client that finishes a body after an early answer such as 413 cancels it)
it is armed again, so no connection waits on its client without a timer.

The class is always h11's, also where httptools is installed (uvicorn's "auto" would pick httptools then): the
mechanism reads h11's connection state, and one parser for every deployment keeps the behaviour the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, ClassVar

import h11
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from uvicorn.protocols.http.h11_impl import H11Protocol

REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                   b"content-length: 16\r\nconnection: close\r\n\r\nRequest Timeout\n")


class _Connection(h11.Connection):
    """h11's server side, calling `on_next_cycle` whenever it moves on from one request to the next."""

    def __init__(self, on_next_cycle: Callable[[], None], max_incomplete_event_size: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size)
        self._on_next_cycle = on_next_cycle

    def start_next_cycle(self) -> None:
        super().start_next_cycle()
        self._on_next_cycle()


class ReadTimeoutH11Protocol(H11Protocol):
    """uvicorn's H11Protocol with a deadline on receiving each request (the module docstring states it)."""

    read_timeout_s: ClassVar[float] = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_deadline: asyncio.TimerHandle | None = None
        size = self.config.h11_max_incomplete_event_size
        self.conn = _Connection(self._disarm, DEFAULT_MAX_INCOMPLETE_EVENT_SIZE if size is None else size)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # the first request must be complete within read_timeout_s of connecting

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        """Every change of the client's side passes here (data_received, and on_response_complete, which
        starts the next request's cycle): the deadline follows the state h11 is left in. A request that is
        complete ends its deadline as h11 moves on to the next one (`_Connection`), also when the next one
        starts arriving in the same read."""
        super().handle_events()
        self._track()

    def _track(self) -> None:
        if self.transport.is_closing() or self.transport.get_protocol() is not self:  # closed, or upgraded
            self._disarm()
            return
        their = self.conn.their_state
        if their is h11.SEND_BODY or (their is h11.IDLE and self.conn.trailing_data[0]):
            if self._read_deadline is None:  # a request started arriving: its deadline starts now
                self._arm()
        elif their is h11.IDLE:
            if self._read_deadline is None and self.timeout_keep_alive_task is None:  # idle between requests
                self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                    self.timeout_keep_alive_handler)
        else:  # the request is complete (DONE, MUST_CLOSE), or the connection is over: answering is not bounded
            self._disarm()

    def _arm(self) -> None:
        self._disarm()
        self._read_deadline = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            return
        started = self.conn.their_state is h11.SEND_BODY or bool(self.conn.trailing_data[0])
        if started and self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):  # no response to it has started
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "-"
            self.logger.warning("%s - request not received within %.3g s: 408", client, self.read_timeout_s)
            self.transport.write(REQUEST_TIMEOUT)
        if self.cycle is not None and not self.cycle.response_complete:
            # the app waits in receive(): it gets http.disconnect, and its own response is not written
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.close()


def read_timeout_protocol(read_timeout_s: float) -> type[asyncio.Protocol]:
    """The protocol class to pass as `uvicorn.Config(http=...)`: each request must arrive within
    `read_timeout_s` seconds (> 0)."""
    if not read_timeout_s > 0:
        raise ValueError(f"read timeout must be > 0 s, not {read_timeout_s}")

    class Bounded(ReadTimeoutH11Protocol):
        pass

    Bounded.read_timeout_s = read_timeout_s
    return Bounded
