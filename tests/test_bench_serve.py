"""`baton bench serve` against a real stack of processes (over gRPC, and over the router's OpenAI-compatible HTTP
API with --api openai), `baton bench costs` on the tiny model, and the plots of both. Behaviour (keys, counts,
ordering), never timings."""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from baton.bench import costs, plot, serve_bench
from baton.bench.loadgen import plan, poisson_arrivals
from baton.bench.openai_load import spread_itl
from baton.bench.workloads import draw, draw_conversations, get_workload
from tests.support.processes import free_port, processes

PCT = ("p50", "p90", "p99")


def _parse(module: Any, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def _is_png(path: Path) -> bool:
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _ordered(pct: dict[str, Any]) -> bool:
    return all(isinstance(pct[q], float) and pct[q] >= 0 for q in PCT) and pct["p50"] <= pct["p90"] <= pct["p99"]


# ---- arrivals and plans ----------------------------------------------------------------------------------
def test_poisson_arrivals_are_seeded_and_bounded() -> None:
    a = poisson_arrivals(5.0, seed=1, duration=4.0)
    assert a == poisson_arrivals(5.0, seed=1, duration=4.0)
    assert a != poisson_arrivals(5.0, seed=2, duration=4.0)
    assert a == sorted(a) and all(0 < t < 4.0 for t in a)
    assert len(poisson_arrivals(5.0, seed=1, count=7)) == 7
    assert poisson_arrivals(5.0, seed=1, count=3, duration=1000.0) == a[:3]
    for bad in (0.0, math.inf):
        with pytest.raises(ValueError):
            poisson_arrivals(bad, seed=0, count=1)


def test_plan_cycles_through_the_pool() -> None:
    pool = draw(get_workload("tiny", num_requests=3), None, vocab_size=50)
    at_once = plan(pool)
    assert [p.request for p in at_once] == pool and all(p.send_at == 0.0 for p in at_once)
    timed = plan(pool, [0.1, 0.2, 0.3, 0.4, 0.5])
    assert [p.request.index for p in timed] == [0, 1, 2, 0, 1]
    assert [p.send_at for p in timed] == [0.1, 0.2, 0.3, 0.4, 0.5]


def test_bad_arguments_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--url", "http://localhost:8000"], ["--rate", "1", "--rates", "1,2"], ["--rates", "1,x"],
                 ["--rate", "0"], ["--duration", "-1"], ["--out", str(tmp_path / "a"), "--out-dir", str(tmp_path)],
                 ["--served-model", "m"],  # a gRPC run names no model
                 # --api openai wants a base URL: scheme and host, a numeric port, nothing after the path
                 ["--api", "openai", "--url", "127.0.0.1:8000"], ["--api", "openai", "--url", "http://"],
                 ["--api", "openai", "--url", "ftp://127.0.0.1:8000"], ["--api", "openai", "--url", "http://h:x/v1"],
                 ["--api", "openai", "--url", "http://127.0.0.1:8000/v1?x=1"]):
        assert serve_bench.main(_parse(serve_bench, argv)) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("baton bench serve: ") and "Traceback" not in err, err
    with pytest.raises(SystemExit):  # argparse: not one of grpc, openai
        _parse(serve_bench, ["--api", "rest"])


def test_openai_base_url() -> None:
    for url in ("http://127.0.0.1:8000", "http://127.0.0.1:8000/", "http://127.0.0.1:8000/v1",
                "http://127.0.0.1:8000/v1/"):
        assert serve_bench.openai_base_url(url) == "http://127.0.0.1:8000", url
    assert serve_bench.openai_base_url("https://gpu.example/proxy/v1") == "https://gpu.example/proxy"
    args = _parse(serve_bench, ["--api", "openai"])
    assert serve_bench.make_target(args).url == "http://127.0.0.1:8000"  # the default port of `baton serve`
    assert serve_bench.make_target(_parse(serve_bench, [])).url == "127.0.0.1:50051"


def test_spread_itl_divides_gaps_like_the_grpc_path() -> None:
    assert spread_itl([], 5) == [] and spread_itl([1.0], 5) == []  # one chunk: its tokens count in the TTFT
    assert spread_itl([0.0, 1.0, 3.0], 3) == [1.0, 2.0]  # a token per chunk: the gaps themselves
    # 7 tokens in 3 chunks: 1 in the first, 6 shared by the 2 later ones, 3 each: each gap divided by 3
    assert spread_itl([0.0, 3.0, 9.0], 7) == pytest.approx([1.0] * 3 + [2.0] * 3)
    # 4 tokens after the first over 3 gaps: the longest gap (2.0) takes two
    assert spread_itl([0.0, 1.0, 3.0, 3.5], 5) == pytest.approx([1.0, 1.0, 1.0, 0.5])
    itl = spread_itl([0.0, 0.4, 1.0, 1.1], 11)
    assert len(itl) == 10 and sum(itl) == pytest.approx(1.1)  # one per token after the first; they add up
    assert spread_itl([0.0, 1.0, 2.0], 2) == [1.0, 1.0]  # more chunks than tokens: one per gap


def test_unreachable_service_fails_cleanly(tiny_llama_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    url = f"127.0.0.1:{free_port()}"
    base = ["--url", url, "--model", str(tiny_llama_dir), "--workload", "tiny", "--no-progress"]
    assert serve_bench.main(_parse(serve_bench, base)) == 1  # the warm-up says so
    out = tmp_path / "down.json"
    args = _parse(serve_bench, [*base, "--no-warmup", "--rate", "inf", "--request-timeout", "5", "--out", str(out)])
    assert serve_bench.main(args) == 1
    r = json.loads(out.read_text())
    assert r["requests_completed"] == 0 and r["requests_failed"] == r["num_requests"] == 6
    assert sum(r["errors"].values()) == 6 and r["api"] == "grpc"
    capsys.readouterr()

    # the same over HTTP: no server to list its models, then none to take the requests
    http = f"http://127.0.0.1:{free_port()}"
    base = ["--api", "openai", "--url", http, "--model", str(tiny_llama_dir), "--workload", "tiny", "--no-progress"]
    assert serve_bench.main(_parse(serve_bench, base)) == 1
    err = capsys.readouterr().err
    assert f"cannot reach {http}/v1/models: ConnectError" in err and "Traceback" not in err, err
    assert serve_bench.main(_parse(serve_bench, [*base, "--served-model", "m"])) == 1  # the warm-up says so
    err = capsys.readouterr().err
    assert f"the service at {http} failed its warm-up requests: ConnectError" in err, err
    args = _parse(serve_bench, [*base, "--served-model", "m", "--no-warmup", "--request-timeout", "5",
                                "--out", str(out)])
    assert serve_bench.main(args) == 1
    r = json.loads(out.read_text())
    assert r["api"] == "openai" and r["served_model"] == "m" and r["url"] == http
    assert r["requests_completed"] == 0 and r["errors"] == {"ConnectError": 6}
    assert "6 requests failed with ConnectError" in capsys.readouterr().err


# ---- against the real stack ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stack:
    grpc: str  # the router's gRPC address host:port
    http: str  # the base URL of its OpenAI-compatible API, http://host:port


def _wait_http(base_url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{base_url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"no HTTP API at {base_url}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def router(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Router, one prefill and one decode worker as processes (no Redis), as `baton serve` runs them; yields the
    router's gRPC address and HTTP base URL."""
    with processes(tmp_path_factory.mktemp("bench-serve-logs")) as ps:
        model = ["--model", str(tiny_llama_dir), "--threads", "1"]
        decode, prefill = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        ps.baton("decode", "decode", "--host", "127.0.0.1", "--port", decode.split(":")[1], "--max-batch", "4",
                 *model, wait_address=decode)
        ps.baton("prefill", "prefill", "--host", "127.0.0.1", "--port", prefill.split(":")[1], "--decode", decode,
                 *model, wait_address=prefill)
        grpc_port, http_port = free_port(), free_port()
        ps.baton("router", "router", "--host", "127.0.0.1", "--grpc-port", str(grpc_port), "--http-port",
                 str(http_port), "--decode", decode, "--prefill", prefill, "--model", str(tiny_llama_dir),
                 wait_address=f"127.0.0.1:{grpc_port}")
        http = f"http://127.0.0.1:{http_port}"
        _wait_http(http)
        yield Stack(f"127.0.0.1:{grpc_port}", http)


def _check_serve(r: dict[str, Any], rate: float | None, policy: str = "baton") -> None:
    for key in ("url", "workload", "rate", "duration", "seed", "policy", "requests_completed", "requests_failed",
                "output_tokens_per_s", "requests_per_s", "ttft_s", "itl_s", "e2e_s"):
        assert key in r, key
    assert r["kind"] == "serve" and r["workload"] == "tiny" and r["policy"] == policy and r["rate"] == rate
    assert r["requests_completed"] > 0 and r["requests_failed"] == 0 and r["errors"] == {}
    assert r["requests_completed"] == r["num_requests"] == len(r["requests"])
    assert r["output_tokens"] == r["requested_output_tokens"]  # EOS ignored: every request ran to its length
    assert r["output_tokens_per_s"] > 0 and r["requests_per_s"] > 0 and r["duration_s"] > 0
    for key in ("ttft_s", "itl_s", "e2e_s", "tpot_s"):
        assert _ordered(r[key]), key
    assert r["ttft_s"]["p50"] <= r["e2e_s"]["p99"]
    for q in r["requests"]:
        assert q["error"] is None and q["finish_reason"] == "length"
        assert 0 <= q["ttft_s"] <= q["e2e_s"] and q["output_tokens"] == q["max_new_tokens"]
        assert q["sent_s"] >= q["scheduled_s"] - 0.01
    json.dumps(r)


def test_poisson_for_a_duration(router: Stack, tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    args = _parse(serve_bench, ["--url", router.grpc, "--model", str(tiny_llama_dir), "--workload", "tiny", "--rate",
                                "8", "--duration", "1.5", "--seed", "3", "--policy", "baton", "--out", str(out)])
    assert serve_bench.main(args) == 0
    r = json.loads(out.read_text())
    _check_serve(r, 8.0)
    assert r["duration"] == 1.5 and r["seed"] == 3 and r["arrivals"] == "poisson"
    expected = poisson_arrivals(8.0, seed=3, duration=1.5)
    assert r["num_requests"] == len(expected)
    assert [q["scheduled_s"] for q in r["requests"]] == expected


def test_whole_workload_at_once_and_a_sweep(router: Stack, tiny_llama_dir: Path, tokenizer: Any,
                                            tmp_path: Path) -> None:
    model = ["--url", router.grpc, "--model", str(tiny_llama_dir), "--workload", "tiny", "--no-warmup"]
    at_once = tmp_path / "inf.json"
    assert serve_bench.main(_parse(serve_bench, [*model, "--rate", "inf", "--out", str(at_once)])) == 0
    r = json.loads(at_once.read_text())
    _check_serve(r, None, "unknown")  # no --policy: the service does not say
    assert r["arrivals"] == "all at t=0" and all(q["scheduled_s"] == 0.0 for q in r["requests"])
    engine_reqs = draw(get_workload("tiny"), tokenizer)  # what `baton bench engine --workload tiny` serves
    assert [(q["prompt_len"], q["max_new_tokens"]) for q in r["requests"]] == [
        (e.prompt_len, e.max_new_tokens) for e in engine_reqs]

    sweep = tmp_path / "sweep"
    args = _parse(serve_bench, [*model, "--rates", "20,40", "--requests", "3", "--policy", "orca",
                                "--out-dir", str(sweep)])
    assert serve_bench.main(args) == 0
    files = sorted(sweep.glob("*.json"))
    assert [f.name for f in files] == ["tiny-rate20-orca.json", "tiny-rate40-orca.json"]
    for f, rate in zip(files, (20.0, 40.0)):
        rep = json.loads(f.read_text())
        _check_serve(rep, rate, "orca")
        assert rep["num_requests"] == 3

    png = tmp_path / "serve.png"
    assert plot.main(_parse(plot, [*(str(f) for f in files), str(at_once), "-o", str(png)])) == 0
    assert _is_png(png)
    runs = plot.load(files)
    assert plot.plot(runs, tmp_path / "r.png") == "rate"
    assert plot.latencies(runs)[1][0] == "itl_s"


def test_openai_api_measures_as_grpc_does(router: Stack, tiny_llama_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """`--api openai` against the router's own HTTP API: every request runs to its length, counted from the usage,
    and the results have the gRPC run's keys, each saying which API it measured."""
    common = ["--model", str(tiny_llama_dir), "--workload", "tiny", "--rate", "inf", "--no-progress",
              "--policy", "baton"]
    via_http = tmp_path / "openai.json"
    argv = ["--api", "openai", "--url", f"{router.http}/v1", *common, "--out", str(via_http)]
    assert serve_bench.main(_parse(serve_bench, argv)) == 0  # no --served-model: the first of /v1/models
    r = json.loads(via_http.read_text())
    _check_serve(r, None)
    served = httpx.get(f"{router.http}/v1/models").json()["data"][0]["id"]
    assert r["api"] == "openai" and r["url"] == router.http and r["served_model"] == served
    assert f"serves {served!r}" in capsys.readouterr().out

    via_grpc = tmp_path / "grpc.json"
    assert serve_bench.main(_parse(serve_bench, ["--url", router.grpc, *common, "--no-warmup",
                                                 "--out", str(via_grpc)])) == 0
    g = json.loads(via_grpc.read_text())
    assert g["api"] == "grpc" and g["served_model"] is None
    assert set(r) == set(g) and set(r["requests"][0]) == set(g["requests"][0])
    assert [(q["prompt_len"], q["max_new_tokens"], q["output_tokens"]) for q in r["requests"]] == [
        (q["prompt_len"], q["max_new_tokens"], q["output_tokens"]) for q in g["requests"]]  # the same requests
    assert r["output_tokens"] == g["output_tokens"]


def test_openai_api_wrong_model_reports_the_404(router: Stack, tiny_llama_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--api", "openai", "--url", router.http, "--served-model", "no-such-model", "--model",
            str(tiny_llama_dir), "--workload", "tiny", "--requests", "2", "--rate", "inf", "--no-progress"]
    assert serve_bench.main(_parse(serve_bench, base)) == 1  # the warm-up says so
    err = capsys.readouterr().err
    assert (f"the service at {router.http} failed its warm-up requests: HTTP_404: The model `no-such-model` "
            "does not exist." in err and "Traceback" not in err), err
    out = tmp_path / "404.json"
    assert serve_bench.main(_parse(serve_bench, [*base, "--no-warmup", "--out", str(out)])) == 1
    r = json.loads(out.read_text())
    assert r["requests_completed"] == 0 and r["errors"] == {"HTTP_404": 2}
    assert all(q["error"] == "HTTP_404" for q in r["requests"])
    assert "2 requests failed with HTTP_404: The model `no-such-model` does not exist." in capsys.readouterr().err


# ---- cost curves -----------------------------------------------------------------------------------------
def test_costs_tiny_run_and_plot(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "costs.json"
    args = _parse(costs, ["--model", str(tiny_llama_dir), "--device", "cpu", "--batches", "1,2", "--context", "16",
                          "--contexts", "8,16", "--batch", "2", "--splice-prompt", "8", "--prompts", "8,16",
                          "--steps", "2", "--repeats", "1", "--out", str(out)])
    assert costs.main(args) == 0
    r = json.loads(out.read_text())
    assert r["kind"] == "costs" and r["device"] == "cpu"
    assert [p["batch"] for p in r["decode_vs_batch"]["points"]] == [1, 2]
    assert [p["context"] for p in r["decode_vs_context"]["points"]] == [8, 16]
    assert [p["batch"] for p in r["splice_vs_batch"]["points"]] == [1, 2]
    kv = r["kv_shipping"]["points"]
    assert [p["prompt_tokens"] for p in kv] == [8, 16]
    assert [p["kv_bytes"] for p in kv] == [8 * r["kv_bytes_per_token"], 16 * r["kv_bytes_per_token"]]
    for p in r["decode_vs_batch"]["points"] + r["decode_vs_context"]["points"]:
        assert p["step_ms"] > 0 and p["tokens_per_s"] > 0
    for p in r["splice_vs_batch"]["points"]:
        assert 0 < p["splice_ms_mean"] <= p["splice_ms_max"]
    for p in kv:
        assert p["prefill_ms"] > 0 and p["serialize_ms"] > 0 and p["push_ms"] > 0
        assert p["ship_ms"] == pytest.approx(p["serialize_ms"] + p["push_ms"])

    png = tmp_path / "costs.png"
    assert plot.main(_parse(plot, [str(out), "-o", str(png)])) == 0
    assert _is_png(png)

    only_kv = tmp_path / "kv.json"
    args = _parse(costs, ["--model", str(tiny_llama_dir), "--device", "cpu", "--parts", "kv", "--prompts", "8",
                          "--repeats", "1", "--out", str(only_kv)])
    assert costs.main(args) == 0
    part = json.loads(only_kv.read_text())
    assert "kv_shipping" in part and "decode_vs_batch" not in part
    assert plot.main(_parse(plot, [str(only_kv), "-o", str(tmp_path / "kv.png")])) == 0  # missing curves: fine


def test_plot_refuses_costs_mixed_with_throughput(tmp_path: Path) -> None:
    c = tmp_path / "c.json"
    c.write_text(json.dumps({"kind": "costs", "model": "m"}))
    t = tmp_path / "t.json"
    pct = {"p50": 0.1, "p90": 0.2, "p99": 0.3}
    t.write_text(json.dumps({"policy": "baton", "workload": "tiny", "rate": None, "output_tokens_per_s": 1.0,
                             "ttft_s": pct, "tpot_s": pct, "e2e_s": pct}))
    assert plot.main(_parse(plot, [str(c), str(t), "-o", str(tmp_path / "x.png")])) == 2
    assert plot.main(_parse(plot, [str(c), "-o", str(tmp_path / "c.png")])) == 0


@pytest.mark.parametrize("api", ["grpc", "openai", "grpc-twice"])
def test_chat_conversations_carry_their_answers(router: Stack, tiny_llama_dir: Path, tokenizer: Any,
                                                tmp_path: Path, api: str) -> None:
    """Each turn's prompt is the conversation so far: the last prompt, the service's answer to it, and the next
    user turn; turns of one conversation go one after another. Over the OpenAI API the answers' ids come from
    return_token_ids; given several routers (here one named twice) the turns take turns among them."""
    out = tmp_path / "chat.json"
    url = {"grpc": router.grpc, "openai": router.http, "grpc-twice": f"{router.grpc},{router.grpc}"}[api]
    args = _parse(serve_bench, ["--api", api.removesuffix("-twice"), "--url", url, "--model", str(tiny_llama_dir),
                                "--workload", "chat",
                                "--requests", "3", "--rate", "20", "--prompt-min", "4", "--prompt-max", "8",
                                "--output-min", "2", "--output-max", "4", "--out", str(out), "--no-warmup"])
    assert serve_bench.main(args) == 0
    r = json.loads(out.read_text())
    assert r["workload"] == "chat" and r["conversations"] == 3 and r["requests_failed"] == 0
    spec = get_workload("chat", num_requests=3, rate=20.0, prompt_min=4, prompt_max=8, output_min=2, output_max=4)
    convs = draw_conversations(spec, tokenizer)
    assert r["num_requests"] == sum(len(c.turns) for c in convs)
    turns = iter(r["requests"])
    for c in convs:
        prompt_len = len(c.system)
        end = 0.0
        for user, answer in c.turns:
            q = next(turns)
            prompt_len += len(user)
            assert q["prompt_len"] == prompt_len and q["output_tokens"] == answer
            assert q["scheduled_s"] >= end - 0.01  # sent once the previous answer ended
            end = q["sent_s"] + q["e2e_s"]
            prompt_len += answer
