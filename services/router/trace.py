"""One request's trace through the router: where it went, its latencies and recoveries, logged as one JSON
line (and fed to the router's metrics) when it ends."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from baton.metrics import RouterMetrics

log = logging.getLogger("services.router.core")  # the request log keeps its logger name


@dataclass
class Trace:
    """What the request log line says about one request."""

    id: str  # the client's
    start: float
    prompt_tokens: int
    worker_id: str = ""  # the id workers know it by (never the client's: a client cannot name another's request)
    decode: str | None = None
    prefill: str | None = None
    prefilled_by_decode: bool = False  # the decode worker ran the prompt in its batch (prefill_here)
    completion_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    queue_s: float | None = None  # until a decode worker confirmed a row
    finish_reason: str | None = None
    error: str | None = None
    recoveries: list[str] = field(default_factory=list)  # what failed, each time another attempt took over

    def tokens(self, n: int, metrics: RouterMetrics) -> None:
        """n new tokens arrived in one message."""
        if not n:
            return
        now = time.perf_counter()
        self.completion_tokens += n
        metrics.tokens(n, None if self.last_token_at is None else now - self.last_token_at)
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now

    @property
    def outcome(self) -> str:
        if self.finish_reason is not None:
            return self.finish_reason
        return "cancelled" if self.error == "cancelled" else "error"

    def log(self, metrics: RouterMetrics) -> None:
        """One JSON line for the request, and its latencies in the metrics."""
        e2e = time.perf_counter() - self.start
        ttft = None if self.first_token_at is None else self.first_token_at - self.start
        line: dict[str, Any] = {
            "request_id": self.id,
            "worker_request_id": self.worker_id,
            "decode_worker": self.decode,
            "prefill_worker": self.prefill,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason,
            "ttft_s": None if ttft is None else round(ttft, 4),
            "e2e_s": round(e2e, 4),
            "queue_s": None if self.queue_s is None else round(self.queue_s, 4),
        }
        if self.prefilled_by_decode:
            line["prefilled_by_decode"] = True
        if self.error is not None:
            line["error"] = self.error
        if self.recoveries:
            line["recoveries"] = self.recoveries
        log.info("%s", json.dumps(line), extra={"fields": line})
        metrics.finished(self.outcome, self.prompt_tokens, e2e, ttft, self.queue_s)


