"""Prometheus metrics and structured logs: unit tests of baton/metrics.py and baton/logs.py, then the real stack
(router, a prefill and a decode worker as processes) scraped before and after a few requests."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from baton.engine.engine import EngineStats
from baton.logs import JsonFormatter
from baton.metrics import DecodeMetrics, PrefillMetrics, RouterMetrics, serve_metrics
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc
from tests.support.metrics import Scrape
from tests.support.processes import ROOT, free_port, processes

MAX_BATCH = 4
NEW_TOKENS = 6


def exported_names(metrics: RouterMetrics | PrefillMetrics | DecodeMetrics) -> set[str]:
    """Every sample name the registry can export, labelled or not yet observed."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {fam.name + s for fam in metrics.registry.collect() for s in suffixes.get(fam.type, ("",))}


# ---- units ---------------------------------------------------------------------------------------------
def test_each_instance_has_its_own_registry_and_names_follow_prometheus_conventions() -> None:
    first, second = DecodeMetrics(), DecodeMetrics()  # no "Duplicated timeseries": several workers in one process
    first.tokens.inc(3)
    assert Scrape(second.exposition()[0].decode()).value("baton_decode_tokens_generated_total") == 0
    for m in (RouterMetrics(), PrefillMetrics(), first):
        for fam in m.registry.collect():
            if fam.name.startswith("process_"):
                continue
            assert re.fullmatch(r"baton_(router|prefill|decode)_[a-z0-9_]+", fam.name), fam.name
            if fam.type == "histogram":
                assert fam.name.endswith(("_seconds", "_batch_size")), fam.name
    body, content_type = RouterMetrics().exposition(None)
    assert content_type.startswith("text/plain") and b"baton_router_time_to_first_token_seconds_bucket" in body


def test_decode_metrics_fold_in_engine_stats_as_deltas() -> None:
    m, stats = DecodeMetrics(), EngineStats()
    stats.steps, stats.token_rows, stats.idle_rows, stats.decode_s = 1, 4, 1, 0.02
    stats.attended_kv, stats.masked_kv, stats.output_tokens = 40, 10, 4
    stats.record_splice(0.001)
    stats.record_splice(0.002)
    m.engine(stats)
    stats.steps, stats.token_rows, stats.decode_s, stats.output_tokens = 2, 8, 0.05, 8
    stats.record_splice(0.003)
    m.engine(stats)
    m.engine(stats)  # nothing new
    s = Scrape(m.exposition()[0].decode())
    assert s.value("baton_decode_token_rows_total") == 8 and s.value("baton_decode_idle_token_rows_total") == 1
    assert s.value("baton_decode_tokens_generated_total") == 8
    assert s.value("baton_decode_splice_seconds_count") == 3
    assert s.value("baton_decode_step_seconds_count") == 2
    assert s.value("baton_decode_step_seconds_sum") == pytest.approx(0.05)
    assert s.value("baton_decode_idle_token_rows_ratio") == pytest.approx(1 / 8)
    assert s.value("baton_decode_masked_kv_ratio") == pytest.approx(0.25)
    m.occupancy(running=2, waiting=1, reserved=1, rows_free=1, kv_used=30, kv_reserved=20, kv_free=100)
    s = Scrape(m.exposition()[0].decode())
    assert s.value("baton_decode_batch_rows_used") == 3 and s.value("baton_decode_batch_rows_free") == 1


def test_router_metrics_share_a_message_gap_among_its_tokens() -> None:
    m = RouterMetrics()
    m.tokens(2, None)  # the first message: no inter-token gap yet
    m.tokens(4, 0.2)
    m.finished("length", 5, e2e_s=0.5, ttft_s=0.1, queue_s=0.01)
    m.finished("error", 5, e2e_s=0.1, ttft_s=None, queue_s=None)
    s = Scrape(m.exposition()[0].decode())
    assert s.value("baton_router_inter_token_latency_seconds_count") == 4
    assert s.value("baton_router_inter_token_latency_seconds_sum") == pytest.approx(0.2)
    assert s.value("baton_router_generated_tokens_total") == 6 and s.value("baton_router_prompt_tokens_total") == 10
    assert s.value("baton_router_requests_total", outcome="length") == 1
    assert s.value("baton_router_requests_total", outcome="error") == 1
    assert s.value("baton_router_e2e_latency_seconds_count") == 1  # failed requests are not latency samples
    assert s.value("baton_router_time_to_first_token_seconds_count") == 1


def test_metrics_server_serves_and_a_taken_port_is_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    m = PrefillMetrics()
    m.track(running=lambda: 1, waiting=lambda: 3)
    assert serve_metrics(m, "127.0.0.1", 0) is None  # 0: disabled
    server = serve_metrics(m, "127.0.0.1", free_port())
    assert server is not None
    try:
        s = Scrape(httpx.get(f"http://127.0.0.1:{server.port}/metrics").text)
        assert s.value("baton_prefill_requests_waiting") == 3 and s.value("baton_prefill_requests_running") == 1
        with caplog.at_level(logging.ERROR):
            assert serve_metrics(PrefillMetrics(), "127.0.0.1", server.port) is None
        assert "cannot serve metrics" in caplog.text
    finally:
        server.stop()
    with pytest.raises(httpx.ConnectError):  # stopped: nothing listens any more
        httpx.get(f"http://127.0.0.1:{server.port}/metrics")


def test_json_log_lines_carry_the_request_id_and_the_request_fields() -> None:
    fmt = JsonFormatter()
    rec = logging.LogRecord("w", logging.INFO, __file__, 1, "request %s done", ("r1",), None)
    rec.request_id = "r1"
    line = json.loads(fmt.format(rec))
    assert line["msg"] == "request r1 done" and line["request_id"] == "r1" and line["level"] == "INFO"
    rec = logging.LogRecord("router", logging.INFO, __file__, 1, "%s", ("{}",), None)
    rec.fields = {"request_id": "r2", "finish_reason": "stop", "e2e_s": 0.5}
    line = json.loads(fmt.format(rec))
    assert line["request_id"] == "r2" and line["finish_reason"] == "stop" and "msg" not in line


def test_grafana_dashboard_queries_only_metrics_that_exist() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "baton.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {n for e in exprs for n in re.findall(r"\bbaton_[a-z0-9_]+", e)}
    known = set().union(*(exported_names(m) for m in (RouterMetrics(), PrefillMetrics(), DecodeMetrics())))
    assert used and used <= known, used - known
    for needed in ("time_to_first_token", "inter_token", "splice", "kv_transfer", "rows_used", "generated_tokens"):
        assert any(needed in n for n in used), needed


# ---- the real stack ------------------------------------------------------------------------------------
@dataclass
class Stack:
    router: str  # gRPC address
    http: str
    decode: str
    prefill: str
    metrics: dict[str, str]  # service -> /metrics URL
    logs: Path


@pytest.fixture(scope="module")
def stack(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("metrics-logs")
    with processes(logs) as ps:
        model = ["--model", str(tiny_llama_dir), "--threads", "1"]
        decode, prefill = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        decode_metrics, prefill_metrics = free_port(), free_port()
        ps.baton("decode", "--log-json", "decode", "--host", "127.0.0.1", "--port", decode.split(":")[1],
                 "--metrics-port", str(decode_metrics), "--max-batch", str(MAX_BATCH), *model, wait_address=decode)
        ps.baton("prefill", "--log-json", "prefill", "--host", "127.0.0.1", "--port", prefill.split(":")[1],
                 "--metrics-port", str(prefill_metrics), "--decode", decode, *model, wait_address=prefill)
        grpc_port, http_port = free_port(), free_port()
        ps.baton("router", "--log-json", "router", "--host", "127.0.0.1", "--grpc-port", str(grpc_port),
                 "--http-port", str(http_port), "--decode", decode, "--prefill", prefill, *model,
                 wait_address=f"127.0.0.1:{grpc_port}")
        http = f"http://127.0.0.1:{http_port}"
        eventually(lambda: httpx.get(f"{http}/health").status_code == 200, "the router's HTTP API is up")
        metrics = {"router": f"{http}/metrics", "decode": f"http://127.0.0.1:{decode_metrics}/metrics",
                   "prefill": f"http://127.0.0.1:{prefill_metrics}/metrics"}
        yield Stack(f"127.0.0.1:{grpc_port}", http, decode, prefill, metrics, logs)


def eventually(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """check() once it is true (transport errors count as not yet), or fail saying what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except (httpx.HTTPError, AssertionError):
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.1)


def scrape(url: str) -> Scrape:
    resp = httpx.get(url, timeout=10)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return Scrape(resp.text)


def json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def test_every_service_exports_metrics_that_move_with_requests(stack: Stack) -> None:
    before = {name: scrape(url) for name, url in stack.metrics.items()}
    d0, p0, r0 = before["decode"], before["prefill"], before["router"]
    assert d0.value("baton_decode_batch_rows_free") == MAX_BATCH and d0.value("baton_decode_batch_rows_used") == 0
    assert r0.value("baton_router_requests_running") == 0 and p0.value("baton_prefill_requests_waiting") == 0

    prompts = [[1, 500 + i, 600, 700 + i, 42][: 3 + i % 3] for i in range(4)]
    ids = []
    with grpc.insecure_channel(stack.router) as ch:
        stub = baton_pb2_grpc.RouterStub(ch)
        for i, prompt in enumerate(prompts[:2]):
            ids.append(f"metrics-grpc-{i}")
            params = pb.SamplingParameters(max_new_tokens=NEW_TOKENS, ignore_eos=True)
            stub.Generate(pb.GenerateRequest(request_id=ids[-1], token_ids=pb.TokenIds(ids=prompt), parameters=params),
                          timeout=60)
    for i, prompt in enumerate(prompts[2:]):
        body = {"prompt": prompt, "max_tokens": NEW_TOKENS, "ignore_eos": True, "stream": i == 1}
        resp = httpx.post(f"{stack.http}/v1/completions", json=body, timeout=60)
        assert resp.status_code == 200
        ids.append(json.loads(resp.text)["id"] if i == 0 else json.loads(resp.text.split("data: ")[1])["id"])
    n, tokens, prompt_tokens = len(prompts), len(prompts) * NEW_TOKENS, sum(len(p) for p in prompts)

    def moved(service: str, name: str, by: float, **labels: str) -> Callable[[], bool]:
        start = before[service].value(name, **labels)
        return lambda: scrape(stack.metrics[service]).value(name, **labels) - start >= by

    for service, name, by, labels in [
        ("router", "baton_router_requests_total", n, {"outcome": "length"}),
        ("router", "baton_router_generated_tokens_total", tokens, {}),
        ("router", "baton_router_prompt_tokens_total", prompt_tokens, {}),
        ("router", "baton_router_time_to_first_token_seconds_count", n, {}),
        ("router", "baton_router_e2e_latency_seconds_count", n, {}),
        ("router", "baton_router_queue_time_seconds_count", n, {}),
        ("router", "baton_router_inter_token_latency_seconds_count", 1, {}),
        ("router", "baton_router_worker_choices_total", n, {"role": "decode", "worker": stack.decode}),
        ("router", "baton_router_worker_choices_total", n, {"role": "prefill", "worker": stack.prefill}),
        ("decode", "baton_decode_requests_total", n, {"outcome": "length"}),
        ("decode", "baton_decode_tokens_generated_total", tokens, {}),
        ("decode", "baton_decode_splice_seconds_count", n, {}),
        ("decode", "baton_decode_step_seconds_count", NEW_TOKENS - 1, {}),
        ("decode", "baton_decode_token_rows_total", tokens - n, {}),
        ("decode", "baton_decode_kv_received_bytes_total", 1, {}),
        ("decode", "baton_decode_kv_receive_seconds_count", n, {}),
        ("decode", "baton_decode_kv_wait_seconds_count", n, {}),
        ("decode", "baton_decode_queue_time_seconds_count", n, {}),
        ("prefill", "baton_prefill_requests_total", n, {"outcome": "completed"}),
        ("prefill", "baton_prefill_prompt_tokens_total", prompt_tokens, {}),
        ("prefill", "baton_prefill_batch_size_count", 1, {}),
        ("prefill", "baton_prefill_compute_seconds_count", n, {}),
        ("prefill", "baton_prefill_queue_time_seconds_count", n, {}),
        ("prefill", "baton_prefill_kv_sent_bytes_total", 1, {}),
        ("prefill", "baton_prefill_kv_transfer_seconds_count", n, {}),
    ]:
        eventually(moved(service, name, by, **labels), f"{service} {name}{labels or ''} grew by {by}")

    after = {name: scrape(url) for name, url in stack.metrics.items()}
    d, p, r = after["decode"], after["prefill"], after["router"]
    sent = p.value("baton_prefill_kv_sent_bytes_total") - p0.value("baton_prefill_kv_sent_bytes_total")
    received = d.value("baton_decode_kv_received_bytes_total") - d0.value("baton_decode_kv_received_bytes_total")
    assert sent == received > 0  # every KV byte the prefill worker sent, the decode worker received
    assert r.value("baton_router_inter_token_latency_seconds_count") <= tokens - n
    # idle again: occupancy gauges back to empty, and consistent
    eventually(lambda: scrape(stack.metrics["decode"]).value("baton_decode_batch_rows_used") == 0, "decode idle")
    d = scrape(stack.metrics["decode"])
    assert d.value("baton_decode_batch_rows_free") == MAX_BATCH
    assert d.value("baton_decode_requests_running") == d.value("baton_decode_requests_waiting") == 0
    assert d.value("baton_decode_kv_tokens_used") == 0 and d.value("baton_decode_kv_tokens_free") > 0
    assert 0 <= d.value("baton_decode_idle_token_rows_ratio") <= 1 and 0 <= d.value("baton_decode_masked_kv_ratio") <= 1
    assert r.value("baton_router_requests_running") == r.value("baton_router_requests_waiting") == 0

    # one JSON line per request at the router; each worker logs the id the router gave it (never the client's)
    def logged(service: str, rid: str) -> list[dict[str, Any]]:
        return [line for line in json_lines(stack.logs / f"{service}.log") if line.get("request_id") == rid]

    for rid in ids:
        (line,) = eventually(lambda rid=rid: logged("router", rid), f"the router logged {rid}")  # type: ignore[misc]
        assert line["decode_worker"] == stack.decode and line["prefill_worker"] == stack.prefill
        assert line["completion_tokens"] == NEW_TOKENS and line["finish_reason"] == "length"
        assert line["prompt_tokens"] == len(prompts[ids.index(rid)])
        assert 0 <= line["queue_s"] <= line["ttft_s"] <= line["e2e_s"]
        wid = line["worker_request_id"]
        assert wid and wid != rid
        eventually(lambda wid=wid: logged("decode", wid), f"the decode worker logged {wid}")  # type: ignore[misc]
        eventually(lambda wid=wid: logged("prefill", wid), f"the prefill worker logged {wid}")  # type: ignore[misc]
        assert not logged("decode", rid) and not logged("prefill", rid)
