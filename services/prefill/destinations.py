"""Where a prefill worker may push KV: only to decode workers it knows, from its --decode flags or from the
registry its routers read. A `decode_address` naming anything else is refused before any compute and before
anything is dialled, so a caller cannot make the worker connect to an arbitrary address, nor learn from its
errors what listens there.

Invariant: `check(address)` returns only for an address that is a decode worker of this cluster right now (the
static list), or was in the registry at its latest read. An unknown address makes it read the registry again (at
most every `refresh_s`), so a decode worker a router has just seen there is known here too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from baton.errors import InvalidRequestError
from baton.rpc.load import Role
from baton.rpc.registry import RedisRegistry

log = logging.getLogger(__name__)


class DecodeDirectory:
    def __init__(self, addresses: Sequence[str] = (), registry: RedisRegistry | None = None,
                 refresh_s: float = 0.5) -> None:
        self.static = frozenset(addresses)
        self.registry = registry
        self.refresh_s = refresh_s
        self._registered: frozenset[str] = frozenset()
        self._read_at = float("-inf")  # (monotonic) of the latest registry read
        self._reading: asyncio.Future[None] | None = None  # the registry read in progress

    async def check(self, address: str) -> None:
        """Return when `address` is a known decode worker; else InvalidRequestError naming decode_address."""
        if address in self.static or address in self._registered:
            return
        if self.registry is not None:
            if self._reading is None and time.monotonic() - self._read_at >= self.refresh_s:
                self._reading = asyncio.ensure_future(self._read())
            if self._reading is not None:  # callers that arrive meanwhile wait for the same read
                await asyncio.shield(self._reading)
            if address in self._registered:
                return
        raise InvalidRequestError("decode_address", "not a decode worker this prefill worker knows (it pushes KV "
                                                    "only to the decode workers of its --decode flags or registry)")

    async def _read(self) -> None:
        assert self.registry is not None
        try:
            self._registered = frozenset(info.address for info in await self.registry.workers(Role.DECODE.value))
        except Exception as e:  # noqa: BLE001 - Redis away: keep what was last read
            log.warning("registry %s unreadable: %s", self.registry.url, e)
        finally:
            self._read_at = time.monotonic()
            self._reading = None

    async def close(self) -> None:
        if self.registry is not None:
            await self.registry.close()
