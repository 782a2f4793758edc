"""Where a prefill worker may push KV: only to decode workers it knows, from its --decode flags or from the
registry its routers read. A `decode_address` naming anything else is refused before any compute and before
anything is dialled, so a caller cannot make the worker connect to an arbitrary address, nor learn from its
errors what listens there.

Invariant: `check(address)` returns only for an address of the static list, or one the registry listed within
the last `forget_s` (a worker missing from one read, as while Redis comes back empty after a restart, stays
known for a while; pushing to a dead one fails on its own). An unknown address waits for a registry read that
starts after it came (at most `refresh_s` after the previous one, shared by every caller waiting), so a decode
worker a router has just seen there is known here too; reads go on every `refresh_s` for up to `patience_s` (one
heartbeat TTL) before the address is refused, so a worker restarted while Redis came back empty (its `_seen`
empty, the decode workers not yet re-registered) waits for their next heartbeat instead of refusing. Routers and
prefill workers must name a decode worker alike: by the address it registers (--advertise),
or by the same --decode strings.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from baton.errors import UnknownPeer
from baton.rpc.load import Role
from baton.rpc.registry import RedisRegistry

log = logging.getLogger(__name__)


class DecodeDirectory:
    def __init__(self, addresses: Sequence[str] = (), registry: RedisRegistry | None = None,
                 refresh_s: float = 0.5, forget_s: float = 60.0, patience_s: float = 0.0) -> None:
        self.static = frozenset(addresses)
        self.registry = registry
        self.refresh_s, self.forget_s, self.patience_s = refresh_s, forget_s, patience_s
        self._seen: dict[str, float] = {}  # address -> (monotonic) when the registry last listed it
        self._read_at = float("-inf")  # (monotonic) when the latest registry read started
        self._reading: asyncio.Future[None] | None = None  # the registry read in progress

    def _known(self, address: str) -> bool:
        if address in self.static:
            return True
        seen = self._seen.get(address)
        return seen is not None and time.monotonic() - seen < self.forget_s

    async def check(self, address: str) -> None:
        """Return when `address` is a known decode worker; else UnknownPeer (nothing is dialled)."""
        if self._known(address):
            return
        if self.registry is not None:
            came = asked = time.monotonic()
            while True:
                while self._read_at < asked:  # a read that started after `asked`
                    if self._reading is None:
                        await asyncio.sleep(max(0.0, self._read_at + self.refresh_s - time.monotonic()))
                        if self._reading is None and self._read_at < asked:
                            self._reading = asyncio.ensure_future(self._read())
                    if self._reading is not None:
                        await asyncio.shield(self._reading)
                if self._known(address):
                    return
                asked = time.monotonic()
                if asked - came >= self.patience_s:
                    break
        raise UnknownPeer("decode_address is not a decode worker this prefill worker knows (it pushes KV only to "
                          "the decode workers of its --decode flags or its registry)")

    async def _read(self) -> None:
        assert self.registry is not None
        self._read_at = time.monotonic()
        try:
            infos = await self.registry.workers(Role.DECODE.value)
            now = time.monotonic()
            self._seen.update((info.address, now) for info in infos)
        except Exception as e:  # noqa: BLE001 - Redis away: keep what was read before
            log.warning("registry %s unreadable: %s", self.registry.url, e)
        finally:
            self._reading = None

    async def close(self) -> None:
        if self.registry is not None:
            await self.registry.close()
