"""`baton bench gpu --dry-run`: the prepared GPU run, end to end on the CPU (tiny shapes, a few requests), so that
it cannot fail on a GPU for a reason a CPU would have shown. Every part writes its JSON with the keys a reader
expects, part 1 finds the outputs exact; plus the pieces a dry run does not reach (a part skipped for a missing
package, named shapes at their real sizes). Behaviour, never timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from baton.bench import gpu_parts, local_service
from baton.bench.gpu_parts import ENGINE_POLICIES, Plan, run_part
from baton.bench.roofline import weight_bytes_per_step
from baton.bench.shapes import config, word_tokenizer
from tests.support.processes import ROOT

DRY_SHAPES = ("llama-3.2-1b (scaled down)", "llama-3-8b (scaled down)")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gpu-dry")
    done = subprocess.run([sys.executable, "-m", "baton.cli", "bench", "gpu", "--dry-run", "--out-dir", str(out),
                           "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return out


def _load(out: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / name).read_text())
    return data


def _part(out: Path, n: int) -> dict[str, Any]:
    data = _load(out, f"part{n}-{gpu_parts.PART_NAMES[n]}.json")
    assert data["part"] == n and data["status"] == "ok", data.get("error")
    assert data["dry_run"] is True and data["device"] == "cpu"
    assert isinstance(data["duration_s"], float) and data["timed_out"] is False and data["returncode"] == 0
    return data


def test_versions_come_first(dry_run: Path) -> None:
    v = _load(dry_run, "versions.json")
    for key in ("torch", "cuda", "cudnn", "transformers", "gpus", "python", "packages", "platform"):
        assert key in v, key
    assert v["packages"]["torch"] and v["packages"]["transformers"]
    log = (dry_run / "bench_gpu.log").read_text()
    assert log.index("versions: torch") < log.index("=== part 1")


def test_summary_names_every_part(dry_run: Path) -> None:
    s = _load(dry_run, "summary.json")
    assert s["status"] == "ok" and s["dry_run"] is True
    assert set(s["parts"]) == {"1", "2", "3", "4"}
    for n, p in s["parts"].items():
        assert p["status"] == "ok" and p["file"] == f"part{n}-{p['name']}.json"
        assert (dry_run / p["file"]).exists() and p["headline"]


def test_part1_outputs_are_exact(dry_run: Path) -> None:
    data = _part(dry_run, 1)
    assert data["headline"]["all_exact"] is True
    for model in ("tiny-llama", "tiny-gpt2", "llama-3.2-1b (scaled down)"):
        r = data["results"][model]
        assert r["status"] == "ok" and r["exact"] is True and r["dtype"] == "float32"
        assert set(r["policies"]) == {"baton", "orca", "padded"}
        for p in r["policies"].values():
            assert len(p["requests"]) == r["requests"] and all(q["exact"] for q in p["requests"])


def test_part2_runs_every_policy_on_both_shapes(dry_run: Path) -> None:
    data = _part(dry_run, 2)
    assert data["results"]["workload"]["name"] == "mixed"
    for shape in DRY_SHAPES:
        r = data["results"][shape]
        assert r["status"] == "ok" and r["skipped"] == [] and set(r["policies"]) == set(ENGINE_POLICIES)
        for policy, p in r["policies"].items():
            assert p["output_tokens_per_s"] > 0, policy
            for key in ("ttft_p50_s", "tpot_p50_ms", "e2e_p50_s", "idle_token_rows", "masked_kv_fraction"):
                assert key in p, key
        assert r["policies"]["baton"]["idle_token_rows"] == 0.0
        assert 0.0 <= r["policies"]["orca"]["masked_kv_fraction"] <= 1.0
        assert r["policies"]["hf-cb"]["idle_token_rows"] is None  # not observable there
        assert [rep["policy"] for rep in r["reports"]] == list(ENGINE_POLICIES)
        assert set(r["baton_over"]) == {"orca", "static", "hf-cb"}
        assert data["headline"][shape]["output_tokens_per_s"]["baton"] > 0


def test_part3_sets_each_step_against_its_memory_floor(dry_run: Path) -> None:
    data = _part(dry_run, 3)
    bw = data["results"]["bandwidth"]
    assert bw["best_gb_per_s"] >= bw["median_gb_per_s"] > 0
    for shape in DRY_SHAPES:
        r = data["results"][shape]
        assert r["status"] == "ok" and set(r["batches"]) == {"2", "4"}
        for b in r["batches"].values():
            for key in ("baton_step_ms", "bare_step_ms", "baton_over_bare_throughput", "weights_ms", "floor_ms",
                        "baton_over_floor", "bare_over_floor", "weight_bytes", "kv_bytes"):
                assert b[key] > 0, key
            assert b["floor_ms"] > b["weights_ms"]
        assert r["splice"]["splice_ms_mean"] > 0 and r["splice"]["step_ms_median"] > 0


def test_part4_serves_the_same_requests_as_the_engine(dry_run: Path) -> None:
    data = _part(dry_run, 4)
    r = data["results"]
    assert r["missing_modules"] == {}
    assert r["service"]["requests_completed"] == r["workload"]["num_requests"] and r["service"]["requests_failed"] == 0
    assert r["engine"]["output_tokens_per_s"] > 0 and r["service"]["output_tokens_per_s"] > 0
    assert r["service_over_engine"] > 0 and data["headline"]["completed"] == "6/6"
    engine, service = r["engine_report"], r["service_report"]
    assert engine["output_tokens"] == service["output_tokens"]  # the very same requests
    assert [q["prompt_len"] for q in engine["requests"]] == [q["prompt_len"] for q in service["requests"]]


# ---- what the dry run does not reach ----------------------------------------------------------------------
def test_a_missing_package_skips_the_service_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert local_service.missing_modules(("surely_not_a_module_xyz",), ()) == {
        "surely_not_a_module_xyz": "not installed"}
    monkeypatch.setattr(local_service, "missing_modules", lambda: {"redis": "not installed"})
    plan = Plan(tmp_path, True, "cpu", ["llama-3.2-1b"], "llama-3.2-1b")
    assert run_part(plan, 4) == 0
    data = json.loads(plan.part_path(4).read_text())
    assert data["status"] == "skipped" and "redis" in data["results"]["reason"]


def test_real_shapes_match_their_models() -> None:
    """The named shapes at full size, made on the meta device (no memory): their sizes and the bytes a step reads."""
    import torch
    from transformers import AutoModelForCausalLM

    params = {}
    for name in ("llama-3.2-1b", "llama-3-8b"):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config(name), dtype=torch.bfloat16)
        params[name] = sum(p.numel() for p in model.parameters())
        cfg = model.config
        assert (cfg.num_key_value_heads, cfg.vocab_size) == (8, 128256)
        # a step reads every weight but an untied input embedding
        untied = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
        assert weight_bytes_per_step(model) == 2 * (params[name] - untied)
    assert 1.2e9 < params["llama-3.2-1b"] < 1.3e9  # 1.24 B
    assert 7.9e9 < params["llama-3-8b"] < 8.1e9  # 8.03 B


def test_the_word_tokenizer_covers_the_vocabulary() -> None:
    tok = word_tokenizer(300, bos_token_id=1, eos_token_id=2)
    assert len(tok) == 300 and tok.eos_token_id == 2
    assert tok("<5> <299> <2> nonsense", add_special_tokens=False)["input_ids"] == [5, 299, 2, 0]
    assert tok.decode([7, 8, 299]) == "<7> <8> <299>"
