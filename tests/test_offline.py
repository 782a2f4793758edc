"""`baton run`: a JSONL file of requests through the engine, on the tiny random Llama."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest

import baton.cli
from baton.engine.engine import Engine
from baton.engine.models import LoadedModel
from baton.engine.request import Request
from tests.support.oracle import reference

OUTPUT_KEYS = {"id", "text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens", "ttft_s",
               "e2e_s"}


def run(tmp_path: Path, model: Path, lines: list[Any], *flags: str) -> list[dict[str, Any]]:
    """`baton run` on `lines` (objects are written as JSON, strings as they are); the output lines."""
    src, dst = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    src.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    argv = ["run", "--input", str(src), "--output", str(dst), "--model", str(model), "--device", "cpu"]
    assert baton.cli.main([*argv, *flags]) == 0
    return [json.loads(line) for line in dst.read_text().splitlines()]



@pytest.mark.parametrize("policy", ["baton", "baton-fused", "orca", "padded", "static"])
def test_mixed_requests(tmp_path: Path, tiny_llama_dir: Path, tiny_llama: LoadedModel, policy: str) -> None:
    lines: list[dict[str, Any]] = [
        {"id": "p", "prompt": "The capital of France is", "max_new_tokens": 5},
        {"id": "m", "messages": [{"role": "user", "content": "Hello!"}], "max_new_tokens": 3},
        {"id": "a", "input_ids": [5, 17, 300, 4000, 12], "max_new_tokens": 9, "ignore_eos": True},
        {"id": "b", "input_ids": list(range(100, 140)), "max_new_tokens": 6, "ignore_eos": True},
        {"id": "s", "input_ids": [7, 8, 9], "max_new_tokens": 4, "temperature": 0.8, "top_p": 0.9, "seed": 3},
    ]
    fused = ["--fuse-prefill"] if policy.endswith("-fused") else []
    out = run(tmp_path, tiny_llama_dir, lines, "--policy", policy.removesuffix("-fused"), "--max-batch", "3", *fused)
    assert [o["id"] for o in out] == ["p", "m", "a", "b", "s"]
    tok = tiny_llama.tokenizer
    assert tok is not None
    for o, line in zip(out, lines, strict=True):
        assert set(o) == OUTPUT_KEYS
        assert o["completion_tokens"] == len(o["token_ids"]) <= line["max_new_tokens"]
        assert o["finish_reason"] in ("stop", "length")
        assert 0 <= o["ttft_s"] <= o["e2e_s"]
        assert o["text"] == tok.decode(o["token_ids"], skip_special_tokens=True)
    assert out[0]["prompt_tokens"] == len(tok.encode("The capital of France is"))
    chat = tok.apply_chat_template(lines[1]["messages"], add_generation_prompt=True, tokenize=False)
    assert out[1]["prompt_tokens"] == len(tok.encode(chat, add_special_tokens=False))
    for o, line in zip(out[2:4], lines[2:4], strict=True):
        assert o["finish_reason"] == "length"
        assert o["prompt_tokens"] == len(line["input_ids"])
        assert o["token_ids"] == reference(tiny_llama, line["input_ids"], line["max_new_tokens"])


def test_a_workload_exported_by_bench_requests_runs_exactly(tmp_path: Path, tiny_llama_dir: Path,
                                                            tiny_llama: LoadedModel) -> None:
    """`baton bench requests` writes a named workload as `baton run` input (the requests vLLM's offline runner
    is timed on, scripts/vllm_offline.py); `baton run` serves it, each output equal to generate() alone."""
    src = tmp_path / "tiny.jsonl"
    assert baton.cli.main(["bench", "requests", "--workload", "tiny", "--model", str(tiny_llama_dir),
                           "--out", str(src)]) == 0
    lines = [json.loads(line) for line in src.read_text().splitlines()]
    assert len(lines) == 6 and all(set(x) == {"id", "input_ids", "max_new_tokens", "ignore_eos"} for x in lines)
    out = run(tmp_path, tiny_llama_dir, lines, "--max-batch", "4", "--fuse-prefill")
    for o, line in zip(out, lines, strict=True):
        assert o["token_ids"] == reference(tiny_llama, line["input_ids"], line["max_new_tokens"])


def test_bad_lines_are_reported_and_the_rest_run(tmp_path: Path, tiny_llama_dir: Path) -> None:
    cases: list[tuple[Any, Any, str | None]] = [  # (line, id in the error, field)
        ("{not json", None, None),
        ([1, 2], None, None),
        ({"prompt": "x"}, None, "id"),
        ({"id": 7, "prompt": "x"}, 7, "id"),
        ({"id": "e1", "prompt": "x", "input_ids": [1]}, "e1", "input_ids"),
        ({"id": "e2"}, "e2", "prompt"),
        ({"id": "e3", "prompt": "x", "colour": "red"}, "e3", "colour"),
        ({"id": "e4", "prompt": "x", "temperature": "hot"}, "e4", "temperature"),
        ({"id": "e5", "prompt": "x", "max_new_tokens": 0}, "e5", "max_new_tokens"),
        ({"id": "e6", "input_ids": [1, 2], "max_new_tokens": 5000}, "e6", "max_new_tokens"),  # context: 1024
        ({"id": "e7", "input_ids": [99999]}, "e7", "input_ids"),  # outside the vocabulary
        ({"id": "e8", "input_ids": [1, -1]}, "e8", "input_ids"),
        ({"id": "e9", "input_ids": []}, "e9", "input_ids"),
        ({"id": "e10", "prompt": "x", "stop": 5}, "e10", "stop"),
        ({"id": "e11", "prompt": "x", "stop_token_ids": [1.5]}, "e11", "stop_token_ids"),
        ({"id": "e12", "prompt": "x", "arrival_s": -1}, "e12", "arrival_s"),
        ({"id": "e13", "messages": "hi"}, "e13", "messages"),
        ({"id": "e14", "prompt": ""}, "e14", "prompt"),
        ({"id": "ok1", "prompt": "x", "max_new_tokens": 2}, "ok1", "id"),  # a duplicate of the first line
    ]
    good = [{"id": "ok1", "input_ids": [3, 4, 5], "max_new_tokens": 2},
            {"id": "ok2", "prompt": "hello", "max_new_tokens": 2}]
    lines = [good[0], *(c[0] for c in cases[:5]), "", *(c[0] for c in cases[5:]), good[1]]
    out = run(tmp_path, tiny_llama_dir, lines)
    assert len(out) == len(cases) + 2  # the blank line gives no output
    assert set(out[0]) == set(out[-1]) == OUTPUT_KEYS
    assert [out[0]["id"], out[-1]["id"]] == ["ok1", "ok2"]
    numbers = [n for n in range(2, len(lines)) if n != 7]  # 1-based; line 7 is the blank one
    for o, (_, rid, field), number in zip(out[1:-1], cases, numbers, strict=True):
        assert set(o) == {"id", "error"}
        assert o["id"] == rid
        assert o["error"]["line"] == number
        assert o["error"]["field"] == field, o
        assert o["error"]["message"]


@pytest.mark.parametrize("policy", ["baton", "static"])
def test_arrival_is_honoured(tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch,
                             policy: str) -> None:
    added: list[Request] = []
    add = Engine.add_request

    def spy(engine: Engine, req: Request) -> None:
        added.append(req)
        add(engine, req)

    monkeypatch.setattr(Engine, "add_request", spy)
    lines = [{"id": "late", "input_ids": [4, 5, 6], "max_new_tokens": 2, "arrival_s": 0.3},
             {"id": "now", "input_ids": [7, 8], "max_new_tokens": 2}]
    out = run(tmp_path, tiny_llama_dir, lines, "--policy", policy)
    assert [o["id"] for o in out] == ["late", "now"]
    reqs = {r.id: r for r in added}
    start = reqs["now"].arrival_time
    late = reqs["late"]
    assert late.arrival_time == pytest.approx(start + 0.3)
    assert late.first_token_time is not None and late.first_token_time - start >= 0.3
    assert out[0]["ttft_s"] == pytest.approx(late.first_token_time - late.arrival_time, abs=1e-5)
    now = reqs["now"]
    assert now.first_token_time is not None and now.first_token_time < late.first_token_time


def test_stop_strings_truncate(tmp_path: Path, tiny_llama_dir: Path) -> None:
    base = {"input_ids": [11, 12, 13, 14], "max_new_tokens": 24, "ignore_eos": True}
    (full,) = run(tmp_path, tiny_llama_dir, [{"id": "full", **base}])
    text = full["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = text.find(stop)
    assert stop.strip() and cut > 0
    out = run(tmp_path, tiny_llama_dir, [{"id": "one", **base, "stop": stop},
                                         {"id": "list", **base, "stop": ["\x00never", stop]}])
    for o in out:
        assert o["finish_reason"] == "stop"
        assert o["text"] == text[:cut]
        assert o["token_ids"] == full["token_ids"][: o["completion_tokens"]]
        assert o["completion_tokens"] < full["completion_tokens"]


def test_stdin_to_stdout(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture[str]) -> None:
    lines = ['{"id": "x", "prompt": "caf\u00e9 \u2028 ok", "max_new_tokens": 2}', "{oops"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("\n".join(lines).encode())))
    argv = ["run", "--input", "-", "--output", "-", "--model", str(tiny_llama_dir), "--device", "cpu"]
    assert baton.cli.main(argv) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert out[0]["id"] == "x" and out[0]["completion_tokens"] == 2
    assert out[1] == {"id": None, "error": {"line": 2, "field": None, "message": out[1]["error"]["message"]}}
