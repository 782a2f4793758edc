"""Slow clients on the router's HTTP API (services/router/http_timeouts.py, `--read-timeout-s`): a connection
that has not delivered a whole request (headers and body) within the read timeout is answered 408 and closed,
while normal requests keep being served, a slow request that completes in time is served, and a response
(an SSE stream) that lasts longer than the timeout is not cut.

The first test runs a real `baton router` (no reachable workers: it serves HTTP all the same) with
`--read-timeout-s 1` and holds 60 slowloris connections against it; the others run uvicorn with the protocol
class in this process over tiny ASGI apps. Everything is on loopback and bounded by a few seconds."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baton.serve import free_port
from services.router.http_timeouts import read_timeout_protocol
from tests.support.processes import processes
from tests.test_http_api import serve

HOST = "127.0.0.1"
TIMEOUT_S = 2.0  # the server's read timeout in these tests (well-behaved slow requests take 0.6 s)
SLACK_S = 1.5  # a connection past its deadline is closed within this


@dataclass
class Outcome:
    answer: bytes  # what the server sent
    closed_after: float | None  # seconds from connecting until the server closed; None: still open when we gave up


async def dribble(port: int, first: bytes, piece: bytes = b"", every: float = 0.3,
                  give_up: float = TIMEOUT_S + SLACK_S + 1.0) -> Outcome:
    """Connect, send `first`, then `piece` every `every` seconds, until the server closes or `give_up` passes."""
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection(HOST, port)
    answer, closed = b"", None
    try:
        writer.write(first)
        while time.monotonic() - t0 < give_up:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), every)
            except TimeoutError:
                writer.write(piece)
                continue
            except ConnectionError:
                chunk = b""
            if not chunk:
                closed = time.monotonic() - t0
                break
            answer += chunk
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return Outcome(answer, closed)


async def pieces(port: int, parts: list[bytes], every: float, give_up: float = 10.0) -> Outcome:
    """Send `parts` `every` seconds apart, then read until the server closes (or `give_up` seconds from the start)."""
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(every)
        try:
            answer = await asyncio.wait_for(reader.read(), give_up - (time.monotonic() - t0))
        except TimeoutError:
            return Outcome(b"", None)
        return Outcome(answer, time.monotonic() - t0)
    finally:
        writer.close()


def get(port: int, path: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def assert_cut(outcomes: list[Outcome], answer_408: bool) -> None:
    for o in outcomes:
        assert o.closed_after is not None, f"connection still open after {TIMEOUT_S + SLACK_S + 1} s"
        assert TIMEOUT_S - 0.05 <= o.closed_after <= TIMEOUT_S + SLACK_S, o.closed_after
        if answer_408:
            assert status(o.answer) == 408 and o.answer.endswith(b"Request Timeout\n"), o.answer
        else:
            assert o.answer == b"", o.answer


def wait_http(port: int, proc: Any, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"router exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
        with contextlib.suppress(OSError):
            if get(port, "/health")[0] == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"router HTTP not up after {timeout} s:\n{log.read_text()[-3000:]}")


def test_router_cuts_slowloris_connections_and_keeps_serving(tiny_llama_dir: Path, tmp_path: Path) -> None:
    grpc_port, http_port = free_port(), free_port()
    with processes(tmp_path) as ps:
        proc = ps.baton("router", "router", "--host", HOST, "--grpc-port", str(grpc_port), "--http-port",
                        str(http_port), "--decode", "127.0.0.1:1", "--prefill", "127.0.0.1:2",
                        "--model", str(tiny_llama_dir), "--read-timeout-s", str(TIMEOUT_S))
        wait_http(http_port, proc, tmp_path / "router.log")

        async def attack() -> tuple[list[Outcome], ...]:
            head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
            headers = [dribble(http_port, head, b"X-Slow: 1\r\n") for _ in range(50)]
            post = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 1000\r\n\r\n{")
            bodies = [dribble(http_port, post, b" ") for _ in range(6)]
            silent = [dribble(http_port, b"") for _ in range(4)]
            # well-behaved and slow, complete within the timeout: headers over 0.6 s; a body over 0.6 s (answered
            # 400: no prompt, which shows it was read whole)
            slow_get = pieces(http_port, [b"GET /v1/models HTTP/1.1\r\n", b"Host: x\r\n", b"Connection: close\r\n",
                                           b"\r\n"], every=0.2)
            body = b'{"model": "m"}'
            slow_post = pieces(http_port, [b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body),
                                            body[:5], body[5:10], body[10:]], every=0.2)
            tasks = [asyncio.gather(*group) for group in (headers, bodies, silent, [slow_get, slow_post])]
            await asyncio.sleep(0.5)  # the slowloris connections are open: normal requests are served meanwhile
            during = await asyncio.gather(*(asyncio.to_thread(get, http_port, p) for p in ("/health", "/v1/models")))
            assert [s for s, _ in during] == [200, 200], during
            return tuple(await asyncio.gather(*tasks))

        headers, bodies, silent, slow = asyncio.run(attack())  # bounded: each connection gives up after 3.5 s
        assert_cut(headers, answer_408=True)
        assert_cut(bodies, answer_408=True)
        assert_cut(silent, answer_408=False)
        assert status(slow[0].answer) == 200 and b'"object":"list"' in slow[0].answer, slow[0].answer
        assert status(slow[1].answer) == 400 and b"prompt" in slow[1].answer, slow[1].answer
        assert get(http_port, "/health") == (200, {"status": "ok"})  # and after
        assert get(http_port, "/v1/models")[0] == 200
        assert proc.poll() is None


# ---- uvicorn with the protocol class in this process -------------------------------------------------------------
STREAM_CHUNKS = 5
STREAM_EVERY_S = 0.2  # the stream lasts 1 s, 2.5 times the read timeout below


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """/stream: reads the body, then streams STREAM_CHUNKS SSE events; /early: answers 413 without reading."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/early":
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
        return
    body, more = b"", True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return
        body, more = body + message.get("body", b""), message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    for i in range(STREAM_CHUNKS):
        await send({"type": "http.response.body", "body": b"data: %d %s\n\n" % (i, body), "more_body": True})
        await asyncio.sleep(STREAM_EVERY_S)
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


@contextlib.contextmanager
def served(read_timeout_s: float, keep_alive_s: int) -> Iterator[int]:
    server = serve(app, http=read_timeout_protocol(read_timeout_s), timeout_keep_alive=keep_alive_s)
    try:
        yield next(server).port
    finally:
        server.close()


def test_a_stream_longer_than_the_timeout_is_not_cut() -> None:
    with served(read_timeout_s=0.4, keep_alive_s=5) as port:
        conn = http.client.HTTPConnection(HOST, port, timeout=10)
        try:
            for n, body in enumerate((b"first", b"second")):  # two requests on one keep-alive connection
                if n:
                    time.sleep(0.6)  # idle between requests: the keep-alive timeout (5 s) applies, not the read one
                t0 = time.monotonic()
                conn.request("POST", "/stream", body=body)
                resp = conn.getresponse()
                events = resp.read().decode().split("\n\n")
                assert resp.status == 200
                assert events[:-1] == [f"data: {i} {body.decode()}" for i in range(STREAM_CHUNKS)] + ["data: [DONE]"]
                assert time.monotonic() - t0 >= STREAM_CHUNKS * STREAM_EVERY_S
        finally:
            conn.close()


def test_an_early_answer_does_not_leave_the_connection_unbounded() -> None:
    """An app may answer before reading the body (e.g. 413 by Content-Length). A client that then dribbles the
    body is still cut at the read timeout; one that completes the body and idles is closed by the keep-alive
    timeout (uvicorn alone leaves that connection without any timer)."""
    head = b"POST /early HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n"

    async def both(port: int) -> tuple[Outcome, Outcome]:
        # the body 0.3 s after the headers (after the answer), then nothing
        idle = pieces(port, [head, b"x" * 20], every=0.3, give_up=0.6 + 1 + SLACK_S)
        return await asyncio.gather(dribble(port, head, b"x"), idle)

    with served(read_timeout_s=TIMEOUT_S, keep_alive_s=1) as port:
        dribbled, idle = asyncio.run(both(port))
    assert dribbled.closed_after is not None and TIMEOUT_S - 0.05 <= dribbled.closed_after <= TIMEOUT_S + SLACK_S
    assert idle.closed_after is not None, "idle connection not closed"
    assert 0.3 + 1 - 0.05 <= idle.closed_after <= 0.6 + 1 + SLACK_S, idle.closed_after  # keep-alive: 1 s
    for o in (dribbled, idle):
        assert status(o.answer) == 413 and o.answer.count(b"HTTP/1.1") == 1, o.answer  # no 408 after an answer
