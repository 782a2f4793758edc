"""A worker's load: one type per role, and the one place where it becomes a proto message or a registry record
and back.

`DecodeLoad` and `PrefillLoad` are what a worker reports about itself (`occupancy()`), what its Occupancy RPC
answers (`to_proto`/`from_proto`, as `baton.v1.OccupancyResponse`) and what its heartbeat publishes in the
registry (`to_registry`/`from_registry`, a dict in `WorkerInfo.load`). Every field of each type is a field of
OccupancyResponse of the same name, so the conversions copy fields by name and no list of them is written anywhere
else: counts as ints, `prefix_blocks` as a list of strings.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any, TypeVar

from baton.v1 import baton_pb2 as pb


class Role(enum.Enum):
    DECODE = "decode"
    PREFILL = "prefill"


L = TypeVar("L", bound="_Load")


@dataclasses.dataclass(frozen=True)
class _Load:
    """The conversions, by field name, shared by both roles."""

    def to_proto(self, model_fingerprint: str) -> pb.OccupancyResponse:
        return pb.OccupancyResponse(model_fingerprint=model_fingerprint, **dataclasses.asdict(self))

    @classmethod
    def from_proto(cls: type[L], m: pb.OccupancyResponse) -> L:
        return cls(**{f.name: _typed(f, getattr(m, f.name)) for f in dataclasses.fields(cls)})

    def to_registry(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_registry(cls: type[L], record: Mapping[str, Any]) -> L:
        """Missing fields are 0 or empty (a record of an older worker); raises ValueError on a value of the
        wrong kind."""
        return cls(**{f.name: _typed(f, record.get(f.name, f.default)) for f in dataclasses.fields(cls)})


def _typed(f: dataclasses.Field[Any], value: Any) -> Any:
    if f.metadata.get("strings"):
        try:
            if isinstance(value, (str, bytes)):
                raise TypeError
            return tuple(str(x) for x in value)
        except TypeError:
            raise ValueError(f"{f.name}: expected a list of strings") from None
    return int(value)


@dataclasses.dataclass(frozen=True)
class DecodeLoad(_Load):
    """A decode worker's load. Every live request holds a row, whether its KV has arrived or not."""

    active_rows: int = 0  # live requests: reserved, queued for splicing, or running
    free_rows: int = 0  # rows that can still be reserved (0 while draining)
    kv_tokens_used: int = 0  # tokens whose KV the worker holds now (batch and queued payloads)
    kv_tokens_free: int = 0  # tokens that can still be promised: the budget minus every live request's worst case
    waiting: int = 0  # live requests not spliced yet (reserved or queued)
    completed: int = 0  # requests that finished (stop or length) since start
    kv_received: int = 0  # KV payloads accepted since start
    tokens_generated: int = 0  # tokens sampled since start
    # keys of the prompt blocks its prefix cache holds (baton/engine/prefix_cache.py), most recently used first
    prefix_blocks: tuple[str, ...] = dataclasses.field(default=(), metadata={"strings": True})


@dataclasses.dataclass(frozen=True)
class PrefillLoad(_Load):
    """A prefill worker's load."""

    waiting: int = 0  # prefills accepted and not done: queued or being computed
    running: int = 0  # of which being computed now
    completed: int = 0  # prefills computed and handed out since start

    @property
    def queued(self) -> int:
        """Waiting for the compute thread."""
        return self.waiting - self.running


Load = DecodeLoad | PrefillLoad
LOAD_TYPES: dict[Role, type[DecodeLoad] | type[PrefillLoad]] = {Role.DECODE: DecodeLoad, Role.PREFILL: PrefillLoad}
