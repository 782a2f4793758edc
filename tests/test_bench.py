"""The benchmark harness: workloads, the six policy runners, result files, plots. Behaviour, not timings."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from baton.bench import engine_bench, plot
from baton.bench.baselines import POLICIES, run_policy
from baton.bench.workloads import WORKLOADS, corpus_text, draw, get_workload
from baton.engine.models import LoadedModel

PCT_KEYS = ("p50", "p90", "p99")


def _parse(module: Any, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def _check_report(r: dict[str, Any], policy: str, n: int) -> None:
    assert r["policy"] == policy
    assert r["workload"] == "tiny"
    assert isinstance(r["seed"], int)
    assert r["num_requests"] == n and len(r["requests"]) == n
    for key in ("output_tokens_per_s", "requests_per_s", "duration_s", "peak_rss_mb"):
        assert isinstance(r[key], float) and r[key] > 0, key
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        pct = r[key]
        assert set(PCT_KEYS) <= set(pct)
        assert all(isinstance(pct[q], float) and pct[q] >= 0 for q in PCT_KEYS), key
        assert pct["p50"] <= pct["p90"] <= pct["p99"]
    assert r["ttft_s"]["p50"] <= r["e2e_s"]["p99"]
    for key in ("idle_token_rows", "masked_kv_fraction"):
        assert r[key] is None or (isinstance(r[key], float) and 0.0 <= r[key] <= 1.0), key
    assert r["splice_ms_mean"] is None or r["splice_ms_mean"] >= 0
    for key in ("model", "device", "dtype", "date"):
        assert isinstance(r[key], str) and r[key]
    assert isinstance(r["max_batch"], int)
    assert isinstance(r["machine"]["cpu_count"], int) and isinstance(r["machine"]["platform"], str)
    for key in ("prompt_min", "prompt_max", "output_min", "output_max", "rate"):
        assert key in r
    # every request produced exactly what it asked for (EOS ignored), so all policies did the same work
    assert r["output_tokens"] == r["requested_output_tokens"]
    for q in r["requests"]:
        assert q["ttft_s"] <= q["e2e_s"]
    json.dumps(r)  # serialisable as is


# ---- workloads -------------------------------------------------------------------------------------------
def test_named_workloads_match_the_spec() -> None:
    mixed, poisson = WORKLOADS["mixed"], WORKLOADS["poisson"]
    assert (mixed.num_requests, mixed.prompt_min, mixed.prompt_max) == (64, 32, 384)
    assert (mixed.output_min, mixed.output_max, mixed.max_batch, mixed.rate) == (16, 192, 32, None)
    assert (poisson.prompt_min, poisson.prompt_max) == (32, 384)
    assert (poisson.output_min, poisson.output_max) == (16, 192)
    assert poisson.rate is not None and poisson.rate > 0
    assert len(corpus_text()) >= 30_000


def test_overrides() -> None:
    spec = get_workload("mixed", num_requests=5, prompt_max=40, rate=3.0, seed=7, max_batch=None)
    assert (spec.num_requests, spec.prompt_max, spec.rate, spec.seed, spec.max_batch) == (5, 40, 3.0, 7, 32)
    with pytest.raises(ValueError):
        get_workload("mixed", prompt_min=50, prompt_max=40)
    with pytest.raises(ValueError):
        get_workload("nope")


def test_seed_reproduces_the_workload(tokenizer: Any) -> None:
    spec = get_workload("mixed", num_requests=12)
    a, b = draw(spec, tokenizer), draw(spec, tokenizer)
    assert a == b
    c = draw(get_workload("mixed", num_requests=12, seed=1), tokenizer)
    assert [r.prompt_ids for r in a] != [r.prompt_ids for r in c]
    assert [r.max_new_tokens for r in a] != [r.max_new_tokens for r in c]
    for r in a:
        assert 32 <= r.prompt_len <= 384 and 16 <= r.max_new_tokens <= 192
        assert r.arrival_s == 0.0
    text = tokenizer.decode(list(a[0].prompt_ids))
    assert sum(ch.isalpha() for ch in text) > len(text) / 2  # cut from English text


def test_poisson_is_mixed_plus_arrivals(tokenizer: Any) -> None:
    mixed = draw(get_workload("mixed", num_requests=20, seed=3), tokenizer)
    poisson = draw(get_workload("poisson", num_requests=20, seed=3, rate=5.0), tokenizer)
    assert [(r.prompt_ids, r.max_new_tokens) for r in mixed] == [
        (r.prompt_ids, r.max_new_tokens) for r in poisson]
    arrivals = [r.arrival_s for r in poisson]
    assert all(t > 0 for t in arrivals) and arrivals == sorted(arrivals)
    faster = draw(get_workload("poisson", num_requests=20, seed=3, rate=50.0), tokenizer)
    assert faster[-1].arrival_s < poisson[-1].arrival_s


def test_without_tokenizer_prompts_are_random_ids() -> None:
    spec = get_workload("tiny", seed=4)
    a = draw(spec, None, vocab_size=100)
    assert a == draw(spec, None, vocab_size=100)
    assert all(0 <= t < 100 for r in a for t in r.prompt_ids)
    with pytest.raises(ValueError):
        draw(spec, None)


# ---- policies --------------------------------------------------------------------------------------------
def test_all_policies_on_tiny(tiny_llama: LoadedModel) -> None:
    spec = get_workload("tiny", num_requests=5)
    reports = engine_bench.run_bench(tiny_llama, spec, list(POLICIES))
    assert [r["policy"] for r in reports] == list(POLICIES)
    by = {r["policy"]: r for r in reports}
    for policy, r in by.items():
        _check_report(r, policy, 5)
    # every policy served the very same requests
    served = {json.dumps([(q["prompt_len"], q["output_tokens"]) for q in r["requests"]]) for r in reports}
    assert len(served) == 1
    # baton never computes a padded or finished row; the padded policies do (prompts of different lengths)
    assert by["baton"]["idle_token_rows"] == 0.0
    assert by["baton"]["splice_ms_mean"] is not None
    # orca's selective batching computes no padded token either, and splices nothing prefilled elsewhere
    assert by["orca"]["idle_token_rows"] == 0.0 and by["orca"]["splice_ms_mean"] is None
    for p in ("padded", "static", "hf-static"):
        assert by[p]["idle_token_rows"] > 0 and by[p]["masked_kv_fraction"] > 0
        assert by[p]["splice_ms_mean"] is None
    # static and hf-static run the same batches: the same counts of idle rows and masked pairs
    assert by["static"]["idle_token_rows"] == pytest.approx(by["hf-static"]["idle_token_rows"])
    assert by["static"]["masked_kv_fraction"] == pytest.approx(by["hf-static"]["masked_kv_fraction"])
    # hf-cb exposes no such counters: null, not a guess
    assert by["hf-cb"]["idle_token_rows"] is None and by["hf-cb"]["masked_kv_fraction"] is None
    # the model is left with baton's attention after the transformers baselines
    assert tiny_llama.model.config._attn_implementation == "baton"
    table = engine_bench.comparison_table(reports)
    assert all(p in table for p in POLICIES) and "1.00x" in table


def test_poisson_arrivals_served_in_full(tiny_llama: LoadedModel) -> None:
    """With Poisson arrivals each runner still serves every request in full, after it arrives."""
    reqs = draw(get_workload("tiny", num_requests=4, rate=200.0, seed=2), tiny_llama.tokenizer)
    for policy in POLICIES:
        res = run_policy(policy, tiny_llama, reqs, 2)
        assert [r.output_tokens for r in res.requests] == [r.max_new_tokens for r in reqs]
        assert [r.arrival_s for r in res.requests] == [r.arrival_s for r in reqs]
        assert all(0 <= r.ttft_s <= r.e2e_s for r in res.requests)
        assert res.duration_s >= reqs[-1].arrival_s


def test_unknown_policy() -> None:
    with pytest.raises(ValueError):
        run_policy("nope", None, [], 1)  # type: ignore[arg-type]


# ---- command line ----------------------------------------------------------------------------------------
def test_cli_writes_one_file_per_policy(tiny_llama_dir: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "res.json"
    model = ["--model", str(tiny_llama_dir), "--device", "cpu"]
    args = _parse(engine_bench, [*model, "--policy", "baton,static", "--workload", "tiny",
                                 "--num-requests", "3", "--seed", "5", "--out", str(out)])
    assert engine_bench.main(args) == 0
    printed = capsys.readouterr().out
    assert "baton" in printed and "static" in printed
    files = sorted(tmp_path.glob("res-*.json"))
    assert [f.name for f in files] == ["res-baton.json", "res-static.json"]
    for f in files:
        r = json.loads(f.read_text())
        _check_report(r, f.stem.split("-")[1], 3)
        assert r["seed"] == 5 and r["run_policies"] == ["baton", "static"]

    single = tmp_path / "one.json"
    args = _parse(engine_bench, [*model, "--policy", "orca", "--workload", "tiny", "--num-requests", "2",
                                 "--no-warmup", "--out", str(single)])
    assert engine_bench.main(args) == 0
    assert json.loads(single.read_text())["policy"] == "orca"


def test_cli_rejects_bad_input(tmp_path: Path) -> None:
    assert engine_bench.main(_parse(engine_bench, ["--policy", "baton,warp"])) == 2
    assert engine_bench.main(_parse(engine_bench, ["--policy", "baton,baton"])) == 2
    assert engine_bench.main(_parse(engine_bench, ["--prompt-min", "9", "--prompt-max", "3"])) == 2
    both = ["--out", str(tmp_path / "a.json"), "--out-dir", str(tmp_path)]
    assert engine_bench.main(_parse(engine_bench, both)) == 2


def test_output_paths(tmp_path: Path) -> None:
    reps = [{"policy": "baton", "workload": "poisson", "rate": 2.0}, {"policy": "orca", "workload": "poisson",
                                                                      "rate": 2.0}]
    assert engine_bench.output_paths(reps, None, tmp_path) == [tmp_path / "poisson-rate2-baton.json",
                                                              tmp_path / "poisson-rate2-orca.json"]
    assert engine_bench.output_paths(reps[:1], tmp_path / "x.json", None) == [tmp_path / "x.json"]
    assert engine_bench.output_paths(reps, None, None) == [None, None]


# ---- plots -----------------------------------------------------------------------------------------------
def _fake(policy: str, rate: float | None, tput: float) -> dict[str, Any]:
    pct = {"p50": 0.1, "p90": 0.2, "p99": 0.3}
    return {"policy": policy, "workload": "poisson" if rate else "mixed", "rate": rate,
            "output_tokens_per_s": tput, "requests_per_s": tput / 100, "ttft_s": pct, "tpot_s": pct,
            "e2e_s": pct, "model": "m",
            "num_requests": 8, "max_batch": 4, "device": "cpu"}


def _is_png(path: Path) -> bool:
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_bars(tmp_path: Path) -> None:
    files = []
    for i, policy in enumerate(("baton", "orca", "hf-cb")):
        f = tmp_path / f"{policy}.json"
        f.write_text(json.dumps(_fake(policy, None, 100.0 + i)))
        files.append(str(f))
    out = tmp_path / "plots" / "bars.png"
    assert plot.main(_parse(plot, [*files, "-o", str(out)])) == 0
    assert _is_png(out)
    assert plot.plot(plot.load([Path(f) for f in files]), tmp_path / "b.png") == "bars"


def test_plot_vs_rate(tmp_path: Path) -> None:
    runs = [_fake(p, rate, 50.0 * rate) for p in ("baton", "hf-cb") for rate in (0.5, 1.0, 2.0)]
    f = tmp_path / "sweep.json"
    f.write_text(json.dumps(runs))  # a list of results in one file is accepted too
    out = tmp_path / "rate.png"
    assert plot.main(_parse(plot, [str(f), "-o", str(out)])) == 0
    assert _is_png(out)
    assert plot.plot(runs, tmp_path / "r.png") == "rate"


def test_plot_real_results(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    reports = engine_bench.run_bench(tiny_llama, get_workload("tiny", num_requests=2), ["baton", "hf-static"],
                                     warmup=False)
    files = []
    for r in reports:
        f = tmp_path / f"{r['policy']}.json"
        f.write_text(json.dumps(r))
        files.append(str(f))
    out = tmp_path / "real.png"
    assert plot.main(_parse(plot, [*files, "-o", str(out)])) == 0
    assert _is_png(out)


def test_plot_rejects_non_results(tmp_path: Path) -> None:
    f = tmp_path / "x.json"
    f.write_text(json.dumps({"hello": 1}))
    assert plot.main(_parse(plot, [str(f), "-o", str(tmp_path / "x.png")])) == 2
