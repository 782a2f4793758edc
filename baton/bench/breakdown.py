"""Where requests' time goes through the service, from the services' own metrics: `baton bench serve --metrics
URL ...` scrapes each /metrics endpoint (router, prefill and decode workers; `baton serve` prints them) before and
after a run, and reports what the run added to each timing histogram (count, total seconds, mean) and to the
counters of work done. Several workers of one role are summed.

Reading it: the router's stages are the client's view (queue, TTFT, e2e). A prefill worker's busy seconds and a
decode worker's step seconds are machine time; where they share the cores (`baton serve` on a CPU) a decode step
includes the time it yielded to prefills, so the two overlap and must not be added. KV transfer and receive run
on the workers' event loops, beside the compute threads.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

# (histogram, what one observation times), in a request's order through the services
STAGES: tuple[tuple[str, str], ...] = (
    ("baton_router_queue_time_seconds", "router: waiting until a decode worker confirmed a row"),
    ("baton_prefill_queue_time_seconds", "prefill worker: queued before its forward pass"),
    ("baton_prefill_compute_seconds", "prefill worker: the forward pass it was packed in"),
    ("baton_prefill_kv_transfer_seconds", "prefill worker: pushing its KV (serialize, gRPC)"),
    ("baton_decode_kv_receive_seconds", "decode worker: receiving one KV push"),
    ("baton_decode_kv_wait_seconds", "decode worker: from the reserved row to the KV"),
    ("baton_decode_queue_time_seconds", "decode worker: from the KV (or hand-in) to the first token"),
    ("baton_decode_splice_seconds", "decode worker: splicing one request's KV into the batch"),
    ("baton_decode_step_seconds", "decode worker: one iteration of the batch"),
    ("baton_router_time_to_first_token_seconds", "router: arrival to first token"),
    ("baton_router_e2e_latency_seconds", "router: arrival to last token"),
)
# counters of work done: (name, unit)
COUNTERS: tuple[tuple[str, str], ...] = (
    ("baton_prefill_busy_seconds_total", "s"),
    ("baton_prefill_prompt_tokens_total", "tokens"),
    ("baton_decode_local_prefill_tokens_total", "tokens"),
    ("baton_decode_local_prefills_total", "requests"),
    ("baton_decode_kv_received_bytes_total", "bytes"),
    ("baton_decode_kv_held_bytes_total", "bytes"),  # left out of pushes: the decode worker's cache held them
    ("baton_decode_kv_held_evicted_total", "pushes"),
    ("baton_decode_tokens_generated_total", "tokens"),
    # the prefix caches (prefix_cache.py): prompt tokens found there (not computed) and looked up but computed
    ("baton_prefill_prefix_hit_tokens_total", "tokens"),
    ("baton_prefill_prefix_miss_tokens_total", "tokens"),
    ("baton_decode_prefix_hit_tokens_total", "tokens"),
    ("baton_decode_prefix_miss_tokens_total", "tokens"),
)


@dataclass
class Snapshot:
    values: dict[str, float]  # sample name -> value, summed over the endpoints and labels
    cpu_s: dict[str, float]  # endpoint -> its process's CPU seconds (process_cpu_seconds_total)


def scrape(urls: list[str], timeout_s: float = 10.0) -> Snapshot:
    """The histograms' _sum and _count and the counters above, summed over every endpoint."""
    wanted = {f"{h}_{part}" for h, _ in STAGES for part in ("sum", "count")} | {c for c, _ in COUNTERS}
    values: dict[str, float] = {}
    cpu_s: dict[str, float] = {}
    for url in urls:
        text = httpx.get(url, timeout=timeout_s).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in wanted:
                    values[sample.name] = values.get(sample.name, 0.0) + float(sample.value)
                elif sample.name == "process_cpu_seconds_total":
                    cpu_s[url] = float(sample.value)
    return Snapshot(values, cpu_s)


def difference(before: Snapshot, after: Snapshot) -> dict[str, dict[str, float]]:
    """What the run added: per stage {count, total_s, mean_s}, per counter {value}, and under "cpu_s" each
    endpoint's process CPU seconds (all its threads: compute, event loop, gRPC); absent ones left out."""
    out: dict[str, dict[str, float]] = {}
    for name, _ in STAGES:
        count = after.values.get(f"{name}_count", 0.0) - before.values.get(f"{name}_count", 0.0)
        total = after.values.get(f"{name}_sum", 0.0) - before.values.get(f"{name}_sum", 0.0)
        if count > 0:
            out[name] = {"count": count, "total_s": total, "mean_s": total / count}
    for name, _ in COUNTERS:
        if name in after.values:
            out[name] = {"value": after.values[name] - before.values.get(name, 0.0)}
    cpu = {url: s - before.cpu_s.get(url, 0.0) for url, s in after.cpu_s.items()}
    if cpu:
        out["cpu_s"] = cpu
    return out


def table(breakdown: dict[str, dict[str, float]]) -> str:
    """The breakdown as a Markdown table, in the order of a request's path."""
    lines = ["| stage | what one observation times | count | total (s) | mean (ms) |",
             "| --- | --- | ---: | ---: | ---: |"]
    for name, doc in STAGES:
        if name in breakdown:
            b = breakdown[name]
            lines.append(f"| `{name}` | {doc} | {b['count']:.0f} | {b['total_s']:.1f} | {b['mean_s'] * 1000:.1f} |")
    for name, unit in COUNTERS:
        if name in breakdown:
            lines.append(f"| `{name}` | {unit} | | {breakdown[name]['value']:.6g} | |")
    for url, seconds in breakdown.get("cpu_s", {}).items():
        lines.append(f"| CPU seconds | the process behind {url} | | {seconds:.1f} | |")
    return "\n".join(lines)
