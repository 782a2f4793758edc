"""Logging for every `baton` command: text lines by default, or one JSON object per line with --log-json
(BATON_LOG_JSON=1), for log collectors.

Per-request lines pass `extra={"request_id": ...}` so the request id is a field of its own in JSON; the router's
line for each finished request passes `extra={"fields": {...}}`, which become the JSON object's own fields
(in text mode the message is that same object, dumped).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        else:
            out["msg"] = record.getMessage()
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            out.setdefault("request_id", request_id)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(verbose: bool = False, json_lines: bool = False) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
