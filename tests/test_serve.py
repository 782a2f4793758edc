"""`baton serve` as users run it, with a Redis registry under a non-default --redis-prefix: every service (router,
prefill and decode workers) honours the prefix, so the stack serves, and nothing is registered under the default
prefix that another cluster sharing the Redis would read."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import jsonschema
import openai
import pytest
import redis

from baton.client import BatonClient
from baton.engine.models import LoadedModel
from baton.serve import ephemeral_ports, free_port
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc
from tests.support.metrics import Scrape
from tests.support.oracle import LOGPROB_TOLERANCE, reference, reference_logprobs
from tests.support.processes import ROOT, processes, worker_channel
from tests.support.serve import Serve

PREFIX = "team-a"


def test_ports_handed_out_are_outside_the_ephemeral_range_and_distinct() -> None:
    """An outgoing connection takes a port of the kernel's ephemeral range: a port picked there could be taken between
    the pick and the bind of the server it is meant for (CI once failed so)."""
    taken: set[int] = set()
    ports = [free_port(taken) for _ in range(50)]
    assert len(set(ports)) == 50 and taken == set(ports)
    assert not any(port in ephemeral_ports() for port in ports)



def test_baton_serve_under_a_redis_prefix(tiny_llama_dir: Path, tiny_llama: LoadedModel, tmp_path: Path) -> None:
    with processes(tmp_path) as ps:
        url = ps.redis()
        http_port, grpc_port = free_port(), free_port()
        log = (tmp_path / "serve.log").open("wb")
        serve = subprocess.Popen(
            [sys.executable, "-m", "baton.cli", "serve", "--model", str(tiny_llama_dir), "--threads", "1",
             "--redis", url, "--redis-prefix", PREFIX, "--http-port", str(http_port), "--grpc-port", str(grpc_port)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,  # without a token of its own: it makes one
            env={**{k: v for k, v in os.environ.items() if not k.startswith("BATON_INTERNAL_TOKEN")},
                 "PYTHONUNBUFFERED": "1"},
        )
        try:
            deadline = time.monotonic() + 180
            while b"Baton is ready" not in (tmp_path / "serve.log").read_bytes():
                assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "baton serve did not become ready"
                time.sleep(0.2)
            keys = sorted(str(k) for k in redis.Redis.from_url(url, decode_responses=True).keys("*"))
            assert {k.split(":")[0] for k in keys} == {PREFIX}, keys
            assert sum(":worker:decode:" in k for k in keys) == 1 and sum(":worker:prefill:" in k for k in keys) == 1
            # the token baton serve made for this run is nobody else's: the session's is refused
            (decode,) = Serve(serve, tmp_path / "serve.log", "", "").decode()
            with worker_channel(decode) as ch, pytest.raises(grpc.RpcError) as e:
                baton_pb2_grpc.DecodeWorkerStub(ch).Occupancy(pb.OccupancyRequest(), timeout=10)
            assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED

            prompts = [[5 + i, 17, 300 + i, 42] for i in range(4)]
            with BatonClient(f"127.0.0.1:{grpc_port}") as client:
                for ids in prompts:
                    out = client.generate(ids, max_new_tokens=6, ignore_eos=True)
                    assert out.token_ids == reference(tiny_llama, ids, 6)
            http = f"http://127.0.0.1:{http_port}"
            names = [m["id"] for m in httpx.get(f"{http}/v1/models", timeout=10).json()["data"]]
            assert names == [str(tiny_llama_dir), tiny_llama_dir.name]  # --model as given, and its directory's name
            body = {"model": tiny_llama_dir.name, "prompt": prompts[0], "max_tokens": 6, "ignore_eos": True}
            r = httpx.post(f"{http}/v1/completions", timeout=60, json=body)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6
            assert r.json()["model"] == tiny_llama_dir.name
            r = httpx.post(f"{http}/v1/completions", timeout=60, json={**body, "model": "nope"})
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
            # on a CPU the workers share the cores, so these short prompts were prefilled inside the decode batch
            # (--local-prefill-tokens auto) and no KV travelled
            running = Serve(serve, tmp_path / "serve.log", "", "")
            decode_metrics = Scrape(httpx.get(running.metrics_url("decode-0"), timeout=10).text)
            prefill_metrics = Scrape(httpx.get(running.metrics_url("prefill-0"), timeout=10).text)
            assert decode_metrics.value("baton_decode_local_prefills_total") == len(prompts) + 1
            assert decode_metrics.value("baton_decode_kv_received_bytes_total") == 0
            assert prefill_metrics.value("baton_prefill_prompt_tokens_total") == 0
            check_openai_surface(http, tiny_llama_dir.name, prompts, tiny_llama)
        finally:
            serve.send_signal(signal.SIGTERM)
            assert serve.wait(timeout=60) == 0
            log.close()


def check_openai_surface(http: str, model: str, prompts: list[list[int]], lm: LoadedModel) -> None:
    """What evaluation harnesses, samplers and extractors send, through `baton serve`: several prompts with echo
    and logprobs (equal to transformers'), and a chat held to a JSON schema."""
    with openai.OpenAI(base_url=f"{http}/v1", api_key="x", max_retries=0, timeout=60) as oa:
        out = oa.completions.create(model=model, prompt=prompts[:2], max_tokens=3, echo=True, logprobs=2,
                                    temperature=0, extra_body={"ignore_eos": True})
        assert sorted(c.index for c in out.choices) == [0, 1]
        for choice in out.choices:
            ids = prompts[choice.index]
            lp = choice.logprobs
            assert lp is not None and lp.token_logprobs is not None and len(lp.token_logprobs) == len(ids) + 3
            full = ids + reference(lm, ids, 3)
            dist = reference_logprobs(lm, full)
            assert lp.token_logprobs[0] is None
            for i in range(1, len(full)):
                assert abs(lp.token_logprobs[i] - float(dist[i - 1, full[i]])) < LOGPROB_TOLERANCE
        schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
                  "required": ["n"], "additionalProperties": False}
        chat = oa.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "A digit in JSON, please."}], max_tokens=40,
            response_format={"type": "json_schema", "json_schema": {"name": "digit", "schema": schema}})
        assert chat.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(chat.choices[0].message.content or ""), schema)
