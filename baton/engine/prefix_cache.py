"""A prefix cache: the KV of prompts already computed, kept in blocks of BLOCK_TOKENS tokens, so that a prompt that
starts like an earlier one computes only its new tokens (ModelRunner.prefill_many, attending over the cached
prefix: attention.py's packed path with a past).

Keys: block i of a prompt is keyed by a hash of block i-1's key and its own tokens (vLLM's chained block hashes),
so one key names the whole prefix up to the block's end, and a lookup walks a new prompt block by block to the
longest run of whole blocks it shares with what was cached.

Invariants kept here:
- the cache holds whole prefixes only: a block is evicted only when no cached block extends it (a chain's tail
  first), least recently used first, so every cached block's parent is cached;
- the bytes held never exceed `max_bytes` after an insert (blocks of one prompt that do not fit are not kept);
- a lookup never returns a whole prompt: at least its last token is left to compute (its logits give the first
  output token).
A lookup returns a tensor no one writes: the cached blocks joined, a copy, kept as well for the next lookup that
finds the same chain (the prompts after one long system prompt all do), its bytes counted in the budget and given
up first when room is needed; eviction only drops references, so it never touches KV in use. A worker's compute
loop uses the cache; a decode worker's event loop also takes the blocks a KV push left out (`held`, kv_payload.py's
held tokens): a lock keeps each call whole.

Shapes: kv [layers, 2, kv_heads, tokens, head_dim], as KVPayload.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

BLOCK_TOKENS = 16
DEFAULT_MAX_BYTES = 512 << 20  # each worker's --prefix-cache-bytes: for smollm2-135m in float32, ~11,000 tokens
PREFIX_CACHE_HELP = ("bytes of prompts' KV kept so that prompts starting the same way compute only their new tokens "
                     "(least recently used first out; 0: off)")


def block_keys(ids: Sequence[int], blocks: int) -> list[bytes]:
    """The chained keys of the first `blocks` whole blocks of `ids`."""
    keys: list[bytes] = []
    parent = b""
    for b in range(blocks):
        tokens = array("I", ids[b * BLOCK_TOKENS : (b + 1) * BLOCK_TOKENS]).tobytes()
        parent = hashlib.blake2b(parent + tokens, digest_size=16).digest()
        keys.append(parent)
    return keys


def lookup_keys(ids: Sequence[int]) -> list[bytes]:
    """The keys of the blocks a lookup of `ids` may find: its whole blocks short of its last token."""
    return block_keys(ids, (len(ids) - 1) // BLOCK_TOKENS)


@dataclass
class _Block:
    parent: bytes | None
    kv: torch.Tensor  # [layers, 2, kv_heads, BLOCK_TOKENS, head_dim]
    children: int = 0

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


@dataclass
class CacheStats:
    hit_tokens: int = 0  # prompt tokens whose KV came from the cache
    miss_tokens: int = 0  # prompt tokens computed
    evicted_blocks: int = 0


class PrefixCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()  # least recently used first
        self.bytes = 0
        self.stats = CacheStats()
        self.version = 0  # changes whenever the set of cached blocks does (what a worker publishes: keys())
        self._lock = threading.Lock()
        self._joined: tuple[bytes, torch.Tensor] | None = None  # the last chain a lookup joined: its last key, KV

    def __len__(self) -> int:
        return len(self._blocks)

    def keys(self, limit: int = 4096) -> tuple[str, ...]:
        """The keys of the cached blocks (hex), most recently used first, at most `limit`: what a decode worker
        publishes so that routers send a conversation where its history is (services/router/scheduler.py)."""
        with self._lock:
            return tuple(k.hex() for k in itertools.islice(reversed(self._blocks), limit))

    def lookup(self, ids: Sequence[int]) -> tuple[int, torch.Tensor | None]:
        """The longest cached prefix of `ids` in whole blocks, leaving at least one token: (its length, a copy of
        its KV [layers, 2, kv_heads, length, head_dim]), or (0, None). Counts the hit and the tokens left."""
        with self._lock:
            keys = lookup_keys(ids)
            found = self._chain(keys)
            n = len(found) * BLOCK_TOKENS
            self.stats.hit_tokens += n
            self.stats.miss_tokens += len(ids) - n
            return (n, self._join(keys[len(found) - 1], found)) if found else (0, None)

    def _join(self, last: bytes, found: list[_Block]) -> torch.Tensor:
        """The KV of a chain of blocks (`last` its last key) in one tensor [layers, 2, kv_heads, tokens, head_dim]:
        the one joined last time when it is the same chain, else a new one, kept in its place if it fits."""
        if self._joined is not None and self._joined[0] == last:
            return self._joined[1]
        self._drop_joined()
        kv = torch.cat([b.kv for b in found], dim=3)
        nbytes = kv.numel() * kv.element_size()
        # kept, older blocks making room for it, where it and its chain take at most half the budget (a duplicate
        # must not crowd out the blocks of a small cache); the chain's blocks were just marked used and each but
        # the last has a child, so only other blocks are evicted for it (_make_room)
        if sum(b.nbytes for b in found) + nbytes <= self.max_bytes // 2 and self._make_room(nbytes, keep=last):
            self._joined, self.bytes = (last, kv), self.bytes + nbytes
        return kv

    def _drop_joined(self) -> None:
        if self._joined is not None:
            kv = self._joined[1]
            self.bytes -= kv.numel() * kv.element_size()
            self._joined = None

    def cached_blocks(self, keys: Sequence[bytes]) -> int:
        """How many leading blocks of the chain `keys` (block_keys; lookup_keys(ids): what `lookup` would find)
        are cached, with no copy made, no block marked used and nothing counted."""
        with self._lock:
            return len(self._chain(keys, touch=False))

    def holds(self, ids: Sequence[int], tokens: int) -> bool:
        """Whether the first `tokens` tokens of `ids` (whole blocks) are all cached."""
        if tokens % BLOCK_TOKENS:
            return False
        with self._lock:
            return all(k in self._blocks for k in block_keys(ids, tokens // BLOCK_TOKENS))

    def held(self, ids: Sequence[int], tokens: int) -> torch.Tensor | None:
        """A copy of the KV of the first `tokens` tokens of `ids` (whole blocks) [layers, 2, kv_heads, tokens,
        head_dim], or None unless every one of their blocks is cached. Not counted as a hit: a prefill worker
        computed them (or found them in its own cache), only their shipping was saved."""
        with self._lock:
            if tokens % BLOCK_TOKENS or tokens >= len(ids):
                return None
            found = self._chain(block_keys(ids, tokens // BLOCK_TOKENS))
            if len(found) * BLOCK_TOKENS != tokens:
                return None
            return torch.cat([b.kv for b in found], dim=3) if found else None

    def _chain(self, keys: Sequence[bytes], touch: bool = True) -> list[_Block]:
        """The cached blocks of the chain `keys` (block_keys), up to the first one not cached; each marked used
        (evicted last) unless `touch` is False."""
        found: list[_Block] = []
        for key in keys:
            block = self._blocks.get(key)
            if block is None:
                break
            if touch:
                self._blocks.move_to_end(key)
            found.append(block)
        return found

    def insert(self, ids: Sequence[int], kv: torch.Tensor, start: int = 0) -> None:
        """Keep the whole blocks of a computed prompt not cached yet (kv [layers, 2, kv_heads, tokens, head_dim]:
        the KV of ids[start:], `start` a whole number of blocks), evicting least recently used tails to stay within
        max_bytes. A block before `start` that is not cached ends the insert: the cache holds whole prefixes only."""
        if self.max_bytes <= 0:
            return
        with self._lock:
            self._insert(ids, kv, start)

    def _insert(self, ids: Sequence[int], kv: torch.Tensor, start: int) -> None:
        assert start % BLOCK_TOKENS == 0, "kv starts at a block boundary"
        parent: bytes | None = None
        for b, key in enumerate(block_keys(ids, min(len(ids), start + kv.shape[3]) // BLOCK_TOKENS)):
            at = b * BLOCK_TOKENS - start  # the block's first token in kv
            if key in self._blocks:
                self._blocks.move_to_end(key)
            elif at < 0:
                return  # its KV is not given, and no later block may be kept without it
            else:
                block = _Block(parent, kv[:, :, :, at : at + BLOCK_TOKENS].clone())
                if not self._make_room(block.nbytes, keep=parent):
                    return  # the rest of this prompt does not fit
                self._blocks[key] = block
                self.bytes += block.nbytes
                self.version += 1
                if parent is not None:
                    self._blocks[parent].children += 1
            parent = key

    def _make_room(self, nbytes: int, keep: bytes | None) -> bool:
        """Evict least recently used tails (never `keep`, the block about to be extended) until `nbytes` fit. The
        chain joined last (_join) goes with its last block, or when nothing else is left to evict: as recently
        used as the chain's last lookup, it stays while older blocks go (with a full cache, dropping it first had
        every prompt after one system prompt join its own copy again)."""
        while self.bytes + nbytes > self.max_bytes:
            victim = next((k for k, b in self._blocks.items() if b.children == 0 and k != keep), None)
            if self._joined is not None and victim in (None, self._joined[0]):
                self._drop_joined()
                continue
            if victim is None:
                return False
            block = self._blocks.pop(victim)
            self.bytes -= block.nbytes
            self.version += 1
            self.stats.evicted_blocks += 1
            if block.parent is not None and block.parent in self._blocks:
                self._blocks[block.parent].children -= 1
        return True
