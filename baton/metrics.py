"""Prometheus metrics of the three services, in one place: `RouterMetrics`, `PrefillMetrics` and `DecodeMetrics`.

Every instance has its own CollectorRegistry (never the global default one), so tests can run several workers
and routers in one process. The router serves its registry at /metrics on its HTTP port (`exposition`); the
workers, which have no HTTP server, serve theirs with prometheus_client's own server on --metrics-port
(`serve_metrics`). Names carry the `baton_` prefix, the service, and their unit (`_seconds`, `_bytes`, `_total`);
the standard `process_*` metrics come along.

Histograms and counters are fed where things happen; gauges of live state are either set by their owner on
its own thread (decode) or read at scrape time (router, prefill: `Gauge.set_function`).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server
from prometheus_client.exposition import choose_encoder

log = logging.getLogger(__name__)

DECODE_METRICS_PORT = 9061
PREFILL_METRICS_PORT = 9071

# seconds
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# requests
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class MetricsRegistry:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # the standard process_* metrics: CPU, memory, open files

    def _counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(name, doc, labels, registry=self.registry)

    def _gauge(self, name: str, doc: str) -> Gauge:
        return Gauge(name, doc, registry=self.registry)

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(name, doc, buckets=buckets, registry=self.registry)

    def value(self, name: str, **labels: str) -> float:
        """One sample's current value (0 when it has none yet), e.g. value("baton_prefill_requests_total",
        outcome="cancelled")."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The registry's samples and their content type: Prometheus' text format, or OpenMetrics if accepted."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class RouterMetrics(MetricsRegistry):
    """The client's view of every request, and where the router sent it."""

    def __init__(self) -> None:
        super().__init__()
        self.ttft = self._histogram(
            "baton_router_time_to_first_token_seconds", "from arrival at the router to the first token", LATENCY_BUCKETS
        )
        self.itl = self._histogram(
            "baton_router_inter_token_latency_seconds", "time between two output tokens of a request", TOKEN_BUCKETS
        )
        self.e2e = self._histogram(
            "baton_router_e2e_latency_seconds", "from arrival at the router to the last token", LATENCY_BUCKETS
        )
        self.queue = self._histogram(
            "baton_router_queue_time_seconds",
            "from arrival until a decode worker confirmed a row (the router's queue included)",
            LATENCY_BUCKETS,
        )
        self.running = self._gauge("baton_router_requests_running", "requests being served")
        self.waiting = self._gauge("baton_router_requests_waiting", "requests waiting for a decode worker with room")
        self.requests = self._counter(
            "baton_router_requests", "finished requests by outcome: stop, length, cancelled, error", ("outcome",)
        )
        self.prompt_tokens = self._counter("baton_router_prompt_tokens", "prompt tokens of requests served")
        self.generated_tokens = self._counter("baton_router_generated_tokens", "output tokens relayed to clients")
        self.choices = self._counter(
            "baton_router_worker_choices", "requests assigned to each worker", ("role", "worker")
        )
        self.recoveries = self._counter(
            "baton_router_recoveries",
            "failures repaired on other workers, by kind: resumed (after streamed tokens), restarted (before any), "
            "prefill_retry (a prefill moved to another prefill worker), gave_up (a request failed past max_retries)",
            ("kind",),
        )

    def track(self, *, running: Callable[[], float], waiting: Callable[[], float]) -> None:
        """Read the live gauges at scrape time (scrapes run on the router's event loop)."""
        self.running.set_function(running)
        self.waiting.set_function(waiting)

    def recovered(self, kind: str) -> None:
        self.recoveries.labels(kind=kind).inc()

    def chose(self, role: str, worker: str) -> None:
        self.choices.labels(role=role, worker=worker).inc()

    def tokens(self, n: int, gap_s: float | None) -> None:
        """n new tokens arrived in one message, gap_s after the previous ones (None: the request's first)."""
        self.generated_tokens.inc(n)
        if gap_s is not None and n > 0:
            for _ in range(n):  # tokens coalesced into one message share the gap
                self.itl.observe(gap_s / n)

    def finished(
        self, outcome: str, prompt_tokens: int, e2e_s: float, ttft_s: float | None, queue_s: float | None
    ) -> None:
        self.requests.labels(outcome=outcome).inc()
        self.prompt_tokens.inc(prompt_tokens)
        if outcome in ("stop", "length"):  # the latency of requests that ran to the end
            self.e2e.observe(e2e_s)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        if queue_s is not None:
            self.queue.observe(queue_s)


class PrefillMetrics(MetricsRegistry):
    def __init__(self) -> None:
        super().__init__()
        self.running = self._gauge("baton_prefill_requests_running", "prefills being computed")
        self.waiting = self._gauge("baton_prefill_requests_waiting", "prefills queued for the compute thread")
        self.requests = self._counter(
            "baton_prefill_requests", "prefills ended, by outcome: completed, failed, cancelled", ("outcome",)
        )
        self.prompt_tokens = self._counter("baton_prefill_prompt_tokens", "prompt tokens prefilled")
        self.batch_size = self._histogram(
            "baton_prefill_batch_size", "requests taken by one iteration of the compute thread", BATCH_BUCKETS
        )
        self.compute = self._histogram(
            "baton_prefill_compute_seconds",
            "compute time of the forward pass that prefilled a request (several may be packed in one)",
            LATENCY_BUCKETS,
        )
        self.queue = self._histogram(
            "baton_prefill_queue_time_seconds", "from submission to the start of a prefill's compute", LATENCY_BUCKETS
        )
        self.busy = self._counter("baton_prefill_busy_seconds",
                                  "seconds the compute thread spent in forward passes, each pass counted once")
        self.kv_sent = self._counter("baton_prefill_kv_sent_bytes", "KV bytes accepted by decode workers")
        self.kv_transfer = self._histogram(
            "baton_prefill_kv_transfer_seconds", "time to push one prompt's KV to its decode worker", FAST_BUCKETS
        )
        self.push_failures = self._counter("baton_prefill_kv_push_failures", "KV pushes that failed")
        self.prefix_hit_tokens = self._counter("baton_prefill_prefix_hit_tokens",
                                               "prompt tokens whose KV came from the prefix cache (not computed)")
        self.prefix_miss_tokens = self._counter("baton_prefill_prefix_miss_tokens",
                                                "prompt tokens looked up in the prefix cache and computed")
        self.prefix_evictions = self._counter("baton_prefill_prefix_evicted_blocks",
                                              "prefix cache blocks evicted to stay within its budget")
        self.prefix_bytes = self._gauge("baton_prefill_prefix_cache_bytes", "bytes of KV the prefix cache holds")

    def track(self, *, running: Callable[[], float], waiting: Callable[[], float]) -> None:
        """Read the live gauges at scrape time (from the metrics server's thread: the callables must be thread-safe)."""
        self.running.set_function(running)
        self.waiting.set_function(waiting)

    def computed(self, prompt_tokens: int, queued_s: float, compute_s: float) -> None:
        self.requests.labels(outcome="completed").inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.queue.observe(queued_s)
        self.compute.observe(compute_s)

    def shipped(self, kv_bytes: int, transfer_s: float) -> None:
        self.kv_sent.inc(kv_bytes)
        self.kv_transfer.observe(transfer_s)


class EngineCounts(Protocol):
    """What DecodeMetrics reads of baton.engine.engine.EngineStats."""

    steps: int
    token_rows: int
    idle_rows: int
    attended_kv: int
    masked_kv: int
    splices: int
    recent_splice_s: deque[float]
    decode_s: float
    output_tokens: int
    prefix_hit_tokens: int
    prefix_miss_tokens: int
    prefix_cache_bytes: int


class DecodeMetrics(MetricsRegistry):
    def __init__(self) -> None:
        super().__init__()
        g = self._gauge
        self.running = g("baton_decode_requests_running", "requests in the decode batch")
        self.waiting = g("baton_decode_requests_waiting", "requests holding a row but not spliced yet")
        self.rows_used = g("baton_decode_batch_rows_used", "rows of the decode batch taken (reserved or running)")
        self.rows_free = g("baton_decode_batch_rows_free", "rows of the decode batch that can still be reserved")
        self.kv_used = g("baton_decode_kv_tokens_used", "tokens whose KV the worker holds")
        self.kv_free = g("baton_decode_kv_tokens_free", "KV tokens the worker can still promise")
        self.reserved = g("baton_decode_requests_reserved", "rows reserved for requests whose KV has not arrived")
        self.kv_reserved = g("baton_decode_kv_tokens_reserved",
                             "KV tokens promised to live requests beyond those held (used + reserved + free = budget)")
        self.idle_ratio = g("baton_decode_idle_token_rows_ratio", "token rows computed for nothing, since start")
        self.masked_ratio = g("baton_decode_masked_kv_ratio", "attended KV positions that were padding, since start")
        c = self._counter
        self.requests = c("baton_decode_requests", "requests ended, by outcome", ("outcome",))
        self.tokens = c("baton_decode_tokens_generated", "tokens sampled")
        self.token_rows = c("baton_decode_token_rows", "token rows run through the model")
        self.idle_rows = c("baton_decode_idle_token_rows", "token rows that produced nothing (padding, finished)")
        self.attended_kv = c("baton_decode_attended_kv", "query-key pairs computed by the batch's attention")
        self.masked_kv = c("baton_decode_masked_kv", "query-key pairs that were padding")
        self.kv_received = c("baton_decode_kv_received_bytes", "KV bytes received from prefill workers")
        self.kv_refused = c("baton_decode_kv_refused", "KV pushes refused (unknown request, corrupt or foreign KV)")
        self.kv_held_bytes = c("baton_decode_kv_held_bytes",
                               "KV bytes pushes left out because the prefix cache here held them (not shipped)")
        self.kv_held_evicted = c("baton_decode_kv_held_evicted",
                                 "KV pushes refused: they left out blocks the prefix cache here no longer held")
        self.local_prefills = c("baton_decode_local_prefills", "requests prefilled here (prefill_here), not pushed")
        self.local_prefill_tokens = c("baton_decode_local_prefill_tokens", "prompt tokens prefilled here")
        self.prefix_hit_tokens = c("baton_decode_prefix_hit_tokens",
                                   "prompt tokens prefilled here whose KV came from the prefix cache (not computed)")
        self.prefix_miss_tokens = c("baton_decode_prefix_miss_tokens",
                                    "prompt tokens prefilled here, looked up in the prefix cache and computed")
        self.prefix_bytes = g("baton_decode_prefix_cache_bytes", "bytes of KV the prefix cache holds")
        self.slab_bytes = g("baton_decode_kv_slab_bytes",
                            "bytes held for the batch's KV: its slabs (rows' tokens, padding, room to grow), "
                            "shared prefixes and the slabs kept for reuse (slab_pool.py)")
        h = self._histogram
        self.step = h("baton_decode_step_seconds", "one iteration of the decode batch", FAST_BUCKETS)
        self.splice = h("baton_decode_splice_seconds", "splicing one request's KV into the batch", FAST_BUCKETS)
        self.kv_receive = h("baton_decode_kv_receive_seconds", "receiving one prompt's KV", FAST_BUCKETS)
        self.kv_wait = h("baton_decode_kv_wait_seconds", "from a reservation to its KV's arrival", LATENCY_BUCKETS)
        self.queue = h(
            "baton_decode_queue_time_seconds",
            "from a request's KV arrival (or hand-in, when prefilled here) to its first token", LATENCY_BUCKETS
        )
        self._seen: dict[str, float] = {}
        self._splices_seen = 0
        self._lock = threading.Lock()

    def occupancy(self, running: int, waiting: int, reserved: int, rows_free: int, kv_used: int, kv_reserved: int,
                  kv_free: int) -> None:
        """`waiting` counts the `reserved` rows (no KV yet) and those whose KV waits for the next splice."""
        self.running.set(running)
        self.waiting.set(waiting)
        self.reserved.set(reserved)
        self.rows_used.set(running + waiting)
        self.rows_free.set(rows_free)
        self.kv_used.set(kv_used)
        self.kv_reserved.set(kv_reserved)
        self.kv_free.set(kv_free)

    def engine(self, stats: EngineCounts) -> None:
        """Fold in what the engine counted since the last call (called by the decode loop after each step)."""
        with self._lock:
            for name, counter in (
                ("token_rows", self.token_rows),
                ("idle_rows", self.idle_rows),
                ("attended_kv", self.attended_kv),
                ("masked_kv", self.masked_kv),
                ("output_tokens", self.tokens),
                ("prefix_hit_tokens", self.prefix_hit_tokens),
                ("prefix_miss_tokens", self.prefix_miss_tokens),
            ):
                value = float(getattr(stats, name))
                delta = value - self._seen.get(name, 0.0)
                if delta > 0:
                    counter.inc(delta)
                self._seen[name] = value
            steps, decode_s = stats.steps, stats.decode_s
            if steps == self._seen.get("steps", 0) + 1:  # one step since the last call: its time is the delta
                self.step.observe(decode_s - self._seen.get("decode_s", 0.0))
            self._seen["steps"], self._seen["decode_s"] = steps, decode_s
            new = min(stats.splices - self._splices_seen, len(stats.recent_splice_s))
            for s in list(stats.recent_splice_s)[-new:] if new > 0 else []:
                self.splice.observe(s)
            self._splices_seen = stats.splices
            self.prefix_bytes.set(stats.prefix_cache_bytes)
            if stats.token_rows:
                self.idle_ratio.set(stats.idle_rows / stats.token_rows)
            if stats.attended_kv:
                self.masked_ratio.set(stats.masked_kv / stats.attended_kv)


class MetricsServer:
    """prometheus_client's HTTP server for one registry, in a daemon thread."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port = int(self.server.server_port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_metrics(metrics: MetricsRegistry, host: str, port: int) -> MetricsServer | None:
    """Serve /metrics on host:port (port 0: not at all). A port already taken is logged, not fatal: the worker
    still serves requests."""
    if not port:
        return None
    try:
        server = MetricsServer(metrics.registry, host, port)
    except OSError as e:
        log.error("cannot serve metrics on %s:%d: %s; running without /metrics", host, port, e)
        return None
    log.info("metrics on http://%s:%d/metrics", host, server.port)
    return server
