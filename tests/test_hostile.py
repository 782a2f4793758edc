"""A hostile local client against `baton serve`, as the probe of issue 17 ran it: every finding has a test here,
through the command users run. The workers' ports answer nobody without the cluster's internal token; the id a
client sees cannot cancel its request on a worker; a KV lease has an upper bound; a prefill worker dials only
decode workers it knows; reserved rows and KV show in the metrics; slow clients are cut off; request ids with
control characters, HEAD /health and long inputs in refusals behave. After the whole suite the service still
answers exactly, no request is left running, and no worker's memory has grown by more than 10%.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
import pytest

from baton.engine.models import LoadedModel
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc
from tests.support.oracle import reference
from tests.support.processes import wait_idle, worker_channel
from tests.support.serve import Serve, baton_serve

READ_TIMEOUT_S = 1.0
MAX_KV_TIMEOUT_S = 3.0  # the decode worker's longest KV lease (the router asks for 30 s: it gets this)
PROMPT = [5, 17, 300, 42, 7]


@pytest.fixture(scope="module")
def serve(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    with baton_serve(tiny_llama_dir, tmp_path_factory.mktemp("hostile"),
                     env={"BATON_READ_TIMEOUT_S": str(READ_TIMEOUT_S),
                          "BATON_MAX_KV_TIMEOUT_S": str(MAX_KV_TIMEOUT_S)}) as s:
        yield s


@pytest.fixture(scope="module")
def baseline(serve: Serve, tiny_llama: LoadedModel) -> dict[str, int]:
    """The workers' RSS after ordinary requests of the shapes the suite sends, before any hostile one."""
    for n in (8, 300, 12):
        assert completion(serve, PROMPT, n) == reference(tiny_llama, PROMPT, n)
    return {name: psutil.Process(serve.pid(name)).memory_info().rss for name in ("decode-0", "prefill-0")}


def completion(serve: Serve, ids: list[int], n: int) -> list[int]:
    with grpc.insecure_channel(serve.grpc) as ch:
        reply = baton_pb2_grpc.RouterStub(ch).Generate(
            pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids),
                               parameters=pb.SamplingParameters(max_new_tokens=n, ignore_eos=True)), timeout=60)
    return list(reply.token_ids)


def worker_request(rid: str, max_new: int = 8) -> pb.WorkerRequest:
    return pb.WorkerRequest(request_id=rid, prompt_ids=PROMPT,
                            parameters=pb.SamplingParameters(max_new_tokens=max_new, ignore_eos=True))


def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()


def scrape(url: str, name: str) -> float:
    for line in httpx.get(url, timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in {url}")


# ---- finding 1: worker ports trust every caller ----------------------------------------------------------------
def calls_to_workers(decode: str, prefill: str, metadata: tuple[tuple[str, str], ...]) -> Iterator[Any]:
    """Every RPC of both workers, as a thunk, sent with `metadata`."""
    with grpc.insecure_channel(decode) as dch, grpc.insecure_channel(prefill) as pch:
        d, p = baton_pb2_grpc.DecodeWorkerStub(dch), baton_pb2_grpc.PrefillWorkerStub(pch)
        kw: dict[str, Any] = {"metadata": metadata, "timeout": 10}
        hoard = pb.DecodeRequest(request=worker_request("x", 8100), kv_timeout_seconds=3600)
        yield lambda: next(d.Decode(hoard, **kw))
        yield lambda: d.PushKv(iter([pb.PushKvRequest(header=pb.KvHeader(request_id="x"))]), **kw)
        yield lambda: d.Cancel(pb.CancelRequest(request_id="x"), **kw)
        yield lambda: d.Occupancy(pb.OccupancyRequest(), **kw)
        yield lambda: p.Prefill(pb.PrefillRequest(request=worker_request("x"), decode_address=decode), **kw)
        yield lambda: p.Cancel(pb.CancelRequest(request_id="x"), **kw)
        yield lambda: p.Occupancy(pb.OccupancyRequest(), **kw)


def test_worker_ports_refuse_callers_without_the_internal_token(serve: Serve, baseline: dict[str, int]) -> None:
    (decode,), (prefill,) = serve.decode(), serve.prefill()
    for _ in range(20):  # many times over: nothing is reserved, computed or kept
        for metadata in ((), (("authorization", "Bearer not-the-token-of-this-cluster"),)):
            for call in calls_to_workers(decode, prefill, metadata):
                assert code_of(call) is grpc.StatusCode.UNAUTHENTICATED
    with worker_channel(decode) as ch:  # the cluster's own token is taken
        occ = baton_pb2_grpc.DecodeWorkerStub(ch).Occupancy(pb.OccupancyRequest(), timeout=10)
    assert occ.active_rows == 0


def test_the_id_a_client_sees_cannot_cancel_its_request_on_a_worker(serve: Serve, tiny_llama: LoadedModel) -> None:
    body = {"prompt": PROMPT, "max_tokens": 300, "temperature": 0, "stream": True, "ignore_eos": True}
    text, ids, cancels = "", set(), list[bool]()
    with httpx.stream("POST", f"{serve.http}/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            ids.add(chunk["id"])
            text += chunk["choices"][0]["text"]
            if len(cancels) < 4:  # even an insider holding the token cannot name it by the client's id
                with worker_channel(serve.decode()[0]) as ch:
                    stub = baton_pb2_grpc.DecodeWorkerStub(ch)
                    cancels.append(stub.Cancel(pb.CancelRequest(request_id=chunk["id"]), timeout=10).found)
    tok = tiny_llama.tokenizer
    assert tok is not None
    assert len(ids) == 1 and cancels == [False] * 4
    assert text == tok.decode(reference(tiny_llama, PROMPT, 300), skip_special_tokens=True)


def test_a_kv_lease_has_an_upper_bound(serve: Serve) -> None:
    with worker_channel(serve.decode()[0]) as ch:
        call = baton_pb2_grpc.DecodeWorkerStub(ch).Decode(
            pb.DecodeRequest(request=worker_request("lease"), kv_timeout_seconds=3600), timeout=60)
        next(call)  # reserved; the KV never comes
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            next(call)
    assert e.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED and "no KV arrived" in str(e.value.details())
    assert time.monotonic() - start < MAX_KV_TIMEOUT_S + 5  # not the hour it asked for


def test_a_prefill_worker_dials_only_decode_workers_it_knows(serve: Serve) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    accepted: list[Any] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(listener.accept())
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    target = f"127.0.0.1:{listener.getsockname()[1]}"
    try:
        with worker_channel(serve.prefill()[0]) as ch:
            stub = baton_pb2_grpc.PrefillWorkerStub(ch)
            for target_address in (target, "10.1.2.3:50061", "localhost:6379"):
                with pytest.raises(grpc.RpcError) as e:
                    stub.Prefill(pb.PrefillRequest(request=worker_request("dial"), decode_address=target_address),
                                 timeout=10)
                assert e.value.code() is grpc.StatusCode.FAILED_PRECONDITION
                assert "decode_address is not a decode worker" in str(e.value.details())
        time.sleep(0.5)
        assert accepted == []  # nothing was dialled
    finally:
        stop.set()
        thread.join(5)
        listener.close()


# ---- finding 2: metrics hide reserved capacity -----------------------------------------------------------------
def test_reserved_rows_and_kv_show_in_the_metrics(serve: Serve) -> None:
    url = serve.metrics_url("decode-0")
    total = scrape(url, "baton_decode_kv_tokens_free")
    with worker_channel(serve.decode()[0]) as ch:
        call = baton_pb2_grpc.DecodeWorkerStub(ch).Decode(
            pb.DecodeRequest(request=worker_request("held", 50), kv_timeout_seconds=30), timeout=60)
        next(call)  # reserved; no KV is ever sent
        assert scrape(url, "baton_decode_requests_reserved") == 1
        assert scrape(url, "baton_decode_batch_rows_used") == 1
        assert scrape(url, "baton_decode_kv_tokens_reserved") == len(PROMPT) + 50
        assert scrape(url, "baton_decode_kv_tokens_free") == total - len(PROMPT) - 50
        call.cancel()
    deadline = time.monotonic() + 10
    while scrape(url, "baton_decode_requests_reserved") != 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert scrape(url, "baton_decode_kv_tokens_reserved") == 0 and scrape(url, "baton_decode_kv_tokens_free") == total


# ---- finding 3: no read timeout ---------------------------------------------------------------------------------
def test_slow_clients_are_cut_off(serve: Serve) -> None:
    port = int(serve.http.rsplit(":", 1)[1])
    socks = []
    for i in range(30):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" if i % 2 else
                  b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{")
        socks.append(s)
    start = time.monotonic()
    for s in socks:
        s.settimeout(READ_TIMEOUT_S + 5)
        data = b""
        while chunk := s.recv(4096):  # until the server closes it
            data += chunk
        assert data.startswith(b"HTTP/1.1 408"), data[:100]
        s.close()
    assert time.monotonic() - start < READ_TIMEOUT_S + 5
    assert httpx.get(f"{serve.http}/health", timeout=10).status_code == 200


# ---- finding 4: ids, HEAD, echoes --------------------------------------------------------------------------------
def test_ids_with_control_characters_head_and_long_inputs(serve: Serve) -> None:
    with grpc.insecure_channel(serve.grpc) as ch:
        stub = baton_pb2_grpc.RouterStub(ch)
        for rid in ("a\nb", "nul\x00", "\x1b[31mred"):
            with pytest.raises(grpc.RpcError) as e:
                stub.Generate(pb.GenerateRequest(request_id=rid, token_ids=pb.TokenIds(ids=PROMPT)), timeout=10)
            assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "request_id" in str(e.value.details())
    assert httpx.head(f"{serve.http}/health", timeout=10).status_code == 200
    bias = {str(i): 200 for i in range(2000)}
    r = httpx.post(f"{serve.http}/v1/completions", json={"prompt": "a", "logit_bias": bias}, timeout=10)
    assert r.status_code == 400 and len(r.text) < 500
    r = httpx.post(f"{serve.http}/v1/completions", json={"model": "nope" * 100, "prompt": "a"}, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found" and len(r.text) < 500


def test_after_the_suite_the_service_is_whole(serve: Serve, baseline: dict[str, int], tiny_llama: LoadedModel) -> None:
    """Runs last (pytest keeps the file's order): exact answers, nothing left running, memory as before."""
    assert completion(serve, PROMPT, 12) == reference(tiny_llama, PROMPT, 12)
    wait_idle(serve.decode(), serve.prefill())
    for name, rss in baseline.items():
        now = psutil.Process(serve.pid(name)).memory_info().rss
        assert now <= rss * 1.10, f"{name} grew from {rss} to {now} bytes"
