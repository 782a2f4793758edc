"""Overload and deadlines, through a whole stack in this process (tests/support/inproc.py) with one decode row and room
for one waiting request: past the queue bound a request is refused with RESOURCE_EXHAUSTED / HTTP 429 and a
retry hint; a request's deadline (its `timeout` field, or the client's gRPC deadline) ends it cleanly wherever
it is (waiting for a row, prefilling, decoding): the row is freed, the prefill dropped, the client told."""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from transformers import PreTrainedTokenizerBase

from baton.rpc.load import Role
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc
from services.router.main import add_arguments
from tests.support.inproc import Options, Stack, running_stack
from tests.support.oracle import wait_for


@pytest.fixture(scope="module")
def stack(tokenizer: PreTrainedTokenizerBase) -> Iterator[Stack]:
    with running_stack(tokenizer, Options(max_batch=1, max_queue=1)) as s:
        yield s


@pytest.fixture
def clean(stack: Stack) -> Iterator[Stack]:
    """The stack, idle before and after the test."""
    stack.wait_idle()
    yield stack
    stack.prefill_gate.set()
    stack.wait_idle()



def request(rid: str, max_new: int = 4, timeout: float = 0.0) -> pb.GenerateRequest:
    params = pb.SamplingParameters(max_new_tokens=max_new, ignore_eos=True)
    return pb.GenerateRequest(request_id=rid, token_ids=pb.TokenIds(ids=[5, 6, 7]), parameters=params,
                              timeout=timeout)


@contextlib.contextmanager
def row_taken(stack: Stack) -> Iterator[None]:
    """The decode worker's only row, reserved directly (its KV never comes), until the block ends; the router has
    seen the worker full when the block starts."""
    with grpc.insecure_channel(stack.decode_address) as ch:
        wr = pb.WorkerRequest(request_id="hog", prompt_ids=[1, 2, 3], parameters=pb.SamplingParameters())
        call = baton_pb2_grpc.DecodeWorkerStub(ch).Decode(pb.DecodeRequest(request=wr, kv_timeout_seconds=60),
                                                          timeout=60)
        assert not next(call).token_ids
        wait_for(lambda: stack.loop.call(lambda: stack.router.scheduler.reports(Role.DECODE)[0].decode.free_rows) == 0)
        try:
            yield
        finally:
            call.cancel()


def queued(stack: Stack) -> int:
    return stack.loop.call(lambda: stack.router.scheduler.queued)


def test_past_the_queue_bound_requests_are_refused_with_a_retry_hint(clean: Stack) -> None:
    with grpc.insecure_channel(clean.grpc) as ch:
        stub = baton_pb2_grpc.RouterStub(ch)
        with row_taken(clean):
            waiting = stub.Generate.future(request("waits"), timeout=60)
            wait_for(lambda: queued(clean) == 1)
            with pytest.raises(grpc.RpcError) as e:
                stub.Generate(request("refused"), timeout=30)
            assert e.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue is full" in e.value.details()
            assert ("retry-after-s", "1") in e.value.trailing_metadata()
            r = httpx.post(f"{clean.http}/v1/completions", json={"prompt": [5, 6], "max_tokens": 2}, timeout=30)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
        done = waiting.result(timeout=60)  # the row is free again: the waiting request runs
        assert done.finish_reason == pb.FINISH_REASON_LENGTH and len(done.token_ids) == 4


def test_a_deadline_passing_in_the_queue(clean: Stack) -> None:
    with grpc.insecure_channel(clean.grpc) as ch, row_taken(clean):
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            baton_pb2_grpc.RouterStub(ch).Generate(request("queued", timeout=0.4), timeout=30)
        assert e.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED, e.value
        assert time.monotonic() - start < 5
        assert queued(clean) == 0
        r = httpx.post(f"{clean.http}/v1/completions", json={"prompt": [5, 6], "max_tokens": 2, "timeout": 0.4},
                       timeout=30)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
        assert queued(clean) == 0


@pytest.mark.parametrize("how", ["field", "grpc deadline", "http"])
def test_a_deadline_passing_during_prefill_drops_it_everywhere(clean: Stack, how: str) -> None:
    clean.prefill_gate.clear()  # prefills wait here
    received_before = clean.loop.call(lambda: clean.decode.occupancy().kv_received)
    cancelled_before = clean.prefill.metrics.value("baton_prefill_requests_total", outcome="cancelled")
    if how == "http":
        r = httpx.post(f"{clean.http}/v1/completions", json={"prompt": [5, 6], "max_tokens": 2, "timeout": 0.5},
                       timeout=30)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
    else:
        with grpc.insecure_channel(clean.grpc) as ch, pytest.raises(grpc.RpcError) as e:
            baton_pb2_grpc.RouterStub(ch).Generate(request("slow", timeout=0.5 if how == "field" else 0.0),
                                                   timeout=0.5 if how == "grpc deadline" else 30)
        assert e.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    clean.wait_idle()  # the decode row is given back, the router holds nothing
    wait_for(lambda: clean.prefill.metrics.value("baton_prefill_requests_total", outcome="cancelled")
             == cancelled_before + 1)  # dropped, though its compute had begun
    clean.prefill_gate.set()
    wait_for(lambda: clean.prefill.occupancy().waiting == 0)
    time.sleep(0.2)
    assert clean.loop.call(lambda: clean.decode.occupancy().kv_received) == received_before  # no KV was shipped


@pytest.fixture
def slow_decode(clean: Stack, monkeypatch: pytest.MonkeyPatch) -> Stack:
    """Each decode step takes 20 ms at least, so a long generation surely outlives a short deadline."""
    engine = clean.decode.engine
    step = engine.step

    def slow_step() -> Any:
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    return clean


def test_a_deadline_passing_while_decoding_frees_the_row(slow_decode: Stack) -> None:
    stack = slow_decode
    with grpc.insecure_channel(stack.grpc) as ch:
        tokens: list[int] = []
        with pytest.raises(grpc.RpcError) as e:
            for m in baton_pb2_grpc.RouterStub(ch).GenerateStream(request("long", 900, timeout=1.0), timeout=30):
                tokens += m.token_ids
        assert e.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED and 0 < len(tokens) < 900
    stack.wait_idle()
    body = {"prompt": [5, 6, 7], "max_tokens": 900, "ignore_eos": True, "stream": True, "timeout": 1.0}
    r = httpx.post(f"{stack.http}/v1/completions", json=body, timeout=30)
    events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "timeout_error"
    assert len(events) > 3  # tokens came before the deadline
    stack.wait_idle()


def test_generation_still_works_between_the_limits(clean: Stack) -> None:
    results: list[pb.GenerateResponse] = []
    with grpc.insecure_channel(clean.grpc) as ch:
        stub = baton_pb2_grpc.RouterStub(ch)
        threads = [threading.Thread(target=lambda i=i: results.append(stub.Generate(request(f"ok{i}"), timeout=60)))
                   for i in range(2)]  # one runs, one waits in the queue
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert sorted(r.request_id for r in results) == ["ok0", "ok1"]


def test_router_flags_have_env_twins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATON_MAX_BODY_BYTES", "1234")
    monkeypatch.setenv("BATON_API_KEY", "k")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert (args.max_body_bytes, args.api_key, args.tls_cert) == (1234, "k", None)
    args = parser.parse_args(["--max-body-bytes", "99", "--api-key", "other", "--tls-ca", "ca.pem"])
    assert (args.max_body_bytes, args.api_key, args.tls_ca) == (99, "other", "ca.pem")
