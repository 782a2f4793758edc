"""KVSegment: a group of decode rows that share one pre-allocated KV slab and one column window.

Layout. `kv` is [layers, 2 (key, value), rows_cap, kv_heads, cols_cap, head_dim]; `valid` is [rows_cap, cols_cap].
Rows 0..n-1 are the active requests, in the order of `requests`. Each step writes every row's new key/value
at column `hi` and attention reads columns [lo, hi]. `valid[r, c]` says whether column c holds one of row r's
tokens; all other columns in the window are padding, masked out of attention.

Attention over cached keys does not depend on the order of columns (positions are baked into the keys by RoPE
or were added to the input for absolute-position models), so a newcomer's prompt can be written into any run
of columns that ends at `hi`. That is the whole splice: pad on the left by choosing where the newcomer starts,
mark its columns valid, give it its own position ids. Nothing already computed is moved.

A shared prefix (cascade attention): a segment may hold the KV of P leading tokens that all its rows' prompts
start with (`prefix_ids`, `prefix_kv`) once, outside the slab; its rows then hold only their tokens after those P in
the slab, and attention reads the prefix once per step for every row (attention._batched). Segments of one batch
whose rows start alike hold one prefix tensor between them (batch.py), read once for all of their rows. Decode
steps over long shared prompts (a system prompt, a few-shot preamble) are bound by reading the KV, so each row
reading its own copy of the same prefix is the cost this saves.

Invariant everything relies on: for every active row r, `valid[r, :lo]` and `valid[r, hi:]` are all False,
and `lens[r] == valid[r].sum()` is the number of tokens whose KV row r holds in the slab; its next position id is
`prefix_len + lens[r]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from baton.engine.request import Request
from baton.engine.slab_pool import SlabPool


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


# Room to grow: a slab gets this many columns past its longest row, up to COLS_HEADROOM (a relayout, which copies
# the live KV, comes at most every few hundred steps), and rows for half as many rows again as it holds. A slab
# whose rows have dwindled to a quarter of its capacity is relaid smaller. So the slabs hold at most about twice
# the live KV, whatever the churn (without these bounds a worker's slabs grew to 3-6x its live tokens).
COLS_HEADROOM = 256


def cols_for(tokens: int, q: int = 1) -> int:
    """Columns of a slab whose longest row holds `tokens`, with room for growth."""
    return round_up(tokens + min(tokens // 2, COLS_HEADROOM) + q + 16, 64)


def rows_for(rows: int, max_rows: int) -> int:
    """Row capacity of a slab holding `rows`, with room for growth."""
    return min(max_rows, max(1, rows + rows // 2 + 1))


@dataclass(frozen=True)
class RowKV:
    """A prefilled row's KV in parts along its tokens, each [layers, 2, kv_heads, n_i, head_dim]: on a decode worker
    that prefilled the prompt itself, the prefix-cache hit it ran over (a tensor the cache shares: read, never
    written) and the tokens computed after it. A splice copies from the parts straight into the slab, so the
    whole prompt's KV is never assembled only to be copied again. A lone tensor is one part."""

    parts: tuple[torch.Tensor, ...]

    @staticmethod
    def of(kv: torch.Tensor | RowKV) -> RowKV:
        return kv if isinstance(kv, RowKV) else RowKV((kv,))

    @property
    def tokens(self) -> int:
        return sum(int(p.shape[3]) for p in self.parts)

    def after(self, a: int) -> list[torch.Tensor]:
        """Views of the parts covering tokens [a, tokens), in order."""
        out = []
        for p in self.parts:
            n = int(p.shape[3])
            if a < n:
                out.append(p[:, :, :, a:] if a > 0 else p)
            a = max(0, a - n)
        return out

    def first(self, n: int) -> torch.Tensor:
        """Tokens [0, n): a view when the first part holds them, else the parts joined (a copy)."""
        if n <= int(self.parts[0].shape[3]):
            return self.parts[0][:, :, :, :n]
        return torch.cat(self.parts, dim=3)[:, :, :, :n]


class KVSegment:
    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        rows_cap: int = 4,
        cols_cap: int = 256,
        max_rows: int = 32,
        pool: SlabPool | None = None,
    ) -> None:
        self.prefix_ids: list[int] = []  # the shared prefix, once adopted (adopt_prefix)
        self.prefix_kv: torch.Tensor | None = None  # its KV: [layers, 2, kv_heads, len(prefix_ids), head_dim]
        self.shape = (num_layers, kv_heads, head_dim)
        self.dtype, self.device, self.max_rows = dtype, device, max_rows
        self.pool = pool or SlabPool(0)  # where slabs come from and go back to (the batch's: slab_pool.py)
        self.kv = self.pool.take((num_layers, 2, rows_cap, kv_heads, cols_cap, head_dim), dtype, device)
        self.valid = torch.zeros(rows_cap, cols_cap, dtype=torch.bool, device=device)
        self.requests: list[Request] = []
        self.lens: list[int] = []
        self.lo = 0
        self.hi = 0
        self.step_q = 0  # query length of the step in progress (0 between steps)
        self.step_mask: torch.Tensor | None = None  # [n, 1, q, window + q] for the step in progress
        self.step_bias: torch.Tensor | None = None  # the same as an additive mask (0 / -inf), with a shared prefix
        self.copied_bytes = 0  # KV bytes moved by compaction and growth (not by splicing newcomers)

    # ---- derived values ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.requests)

    @property
    def rows_cap(self) -> int:
        return int(self.kv.shape[2])

    @property
    def cols_cap(self) -> int:
        return int(self.kv.shape[4])

    @property
    def prefix_len(self) -> int:
        return len(self.prefix_ids)

    def shares(self, ids: Sequence[int]) -> bool:
        """Whether a row over `ids` can join: its ids start with this segment's prefix and go on after it."""
        p = self.prefix_len
        return p == 0 or (len(ids) > p and list(ids[:p]) == self.prefix_ids)

    @property
    def width(self) -> int:
        """Columns attended by every row: the window [lo, hi)."""
        return self.hi - self.lo

    @property
    def padding(self) -> int:
        """Masked positions in the current window, summed over rows."""
        return len(self) * self.width - sum(self.lens)

    @property
    def has_room(self) -> bool:
        return len(self) < self.max_rows

    def splice_cost(self, prompt_len: int) -> int:
        """Padding positions added (per step) if a prompt of this length joined this segment."""
        if prompt_len <= self.width:
            return self.width - prompt_len
        return len(self) * (prompt_len - self.width)

    # ---- splice / evict ---------------------------------------------------------------------------------
    def insert(self, req: Request, kv: torch.Tensor | RowKV | None, more: int = 0) -> None:
        """Add a row. kv: [layers, 2, kv_heads, tokens, head_dim] of an already prefilled prompt, or its parts
        (with a shared prefix, the whole prompt's: the prefix's tokens are dropped, the segment holds them), or
        None for a row whose prompt will be computed inside the next step (orca, static). `more`: rows that may
        join right after it (one splice of several): a slab that must grow makes room for them at once, instead of
        being copied again for each."""
        parts = [] if kv is None else RowKV.of(kv).after(self.prefix_len)  # the tokens the slab takes
        tokens = sum(int(p.shape[3]) for p in parts)
        assert not self.prefix_len or tokens > 0, "a shared-prefix row needs KV past the prefix"
        if not self.requests and tokens < self.cols_cap:
            self.lo = self.hi = tokens  # an empty segment starts over at the left of its slab
        if len(self) == self.rows_cap or tokens > self.hi:
            self._relayout(rows_cap=rows_for(len(self) + 1 + more, self.max_rows), min_hi=tokens)
        r, start = len(self), self.hi - tokens
        at = start
        for part in parts:
            self.kv[:, :, r, :, at : at + part.shape[3]] = part.to(self.device, self.dtype)
            at += int(part.shape[3])
        self.valid[r].zero_()
        self.valid[r, start : self.hi] = True
        self.lo = min(self.lo, start)
        self.requests.append(req)
        self.lens.append(tokens)

    def row_kv(self, r: int, start: int = 0) -> torch.Tensor:
        """A copy of row r's KV in position order from its token `start` on: [layers, 2, kv_heads, prefix_len +
        lens[r] - start, head_dim] (start = prefix_len: its own tokens alone, the shared prefix not copied)."""
        cols = self.valid[r, self.lo : self.hi].nonzero().squeeze(1) + self.lo
        own = self.kv[:, :, r, :, cols]
        if start >= self.prefix_len:
            return own[:, :, :, start - self.prefix_len :]
        assert self.prefix_kv is not None
        return torch.cat([self.prefix_kv[:, :, :, start:], own], dim=3)

    def remove(self, done: set[int]) -> None:
        """Drop the rows whose indices are in `done`: the last live row moves into each hole."""
        if not done:
            return
        keep = [r for r in range(len(self)) if r not in done]
        n_new = len(keep)
        movers = [r for r in keep if r >= n_new]  # live rows beyond the new end
        holes = [r for r in sorted(done) if r < n_new]
        for src, dst in zip(movers, holes):
            self.kv[:, :, dst, :, self.lo : self.hi] = self.kv[:, :, src, :, self.lo : self.hi]
            self.valid[dst] = self.valid[src]
            self.requests[dst], self.lens[dst] = self.requests[src], self.lens[src]
        del self.requests[n_new:], self.lens[n_new:]
        self._trim()
        if self.requests and self.rows_cap >= 8 and len(self) <= self.rows_cap // 4:
            self._relayout()  # most rows have left: a smaller slab

    def _trim(self) -> None:
        """Advance `lo` past leading columns that no live row uses."""
        if not self.requests:
            self.lo = self.hi = 0
            return
        used = self.valid[: len(self), self.lo : self.hi].any(0)
        self.lo += int(used.int().argmax())

    def adopt_prefix(self, prefix_ids: Sequence[int], prefix_kv: torch.Tensor) -> None:
        """Hold `prefix_ids`, which every row's tokens start with, once as the shared prefix, its KV `prefix_kv`
        ([layers, 2, kv_heads, P, head_dim], one tensor the batch's segments share and never write): the rows
        keep only their tokens after it (a relayout). An empty segment takes it before its first row."""
        assert not self.prefix_ids
        p = len(prefix_ids)
        assert all(n > p for n in self.lens), "each row keeps at least one token of its own"
        self.prefix_kv, self.prefix_ids = prefix_kv, list(prefix_ids)
        if self.requests:
            self._relayout(drop=p)

    def _relayout(self, rows_cap: int | None = None, min_hi: int = 0, q: int = 1, drop: int = 0) -> None:
        """Copy every row's tokens, right-aligned and without holes, into a new slab with room for growth (rows_cap
        rows; by default, room for as many rows again as half those it holds); less each row's first `drop`."""
        if drop:
            self.lens = [n - drop for n in self.lens]
        n = len(self)
        longest = max(self.lens, default=0)
        new_hi = max(longest, min_hi)
        cols_cap = cols_for(new_hi, q)
        rows_cap = rows_cap or rows_for(n, self.max_rows)
        layers, heads, dim = self.shape
        kv = self.pool.take((layers, 2, rows_cap, heads, cols_cap, dim), self.dtype, self.device)
        valid = torch.zeros(rows_cap, cols_cap, dtype=torch.bool, device=self.device)
        for r in range(n):
            cols = self.valid[r, self.lo : self.hi].nonzero().squeeze(1)[drop:] + self.lo
            length = self.lens[r]
            assert cols.numel() == length, "segment invariant broken: lens disagrees with valid"
            kv[:, :, r, :, new_hi - length : new_hi] = self.kv[:, :, r, :, cols]
            valid[r, new_hi - length : new_hi] = True
        self.copied_bytes += sum(self.lens) * layers * 2 * heads * dim * kv.element_size()
        self.pool.give(self.kv)
        self.kv, self.valid = kv, valid
        self.hi, self.lo = new_hi, new_hi - longest

    def release(self) -> None:
        """The batch drops this (empty) segment: its slab goes back to the pool."""
        assert not self.requests, "a segment is dropped only when its rows have left"
        self.pool.give(self.kv)
        self.kv = self.kv[:, :, :0]  # nothing views the pooled memory from here

    def compact(self) -> None:
        """Remove holes (masked columns inside the window) by re-aligning rows."""
        self._relayout()

    # ---- one forward step ---------------------------------------------------------------------------------
    def begin_step(self, new_valid: torch.Tensor | None = None, q: int = 1) -> tuple[int, int]:
        """Prepare columns [hi, hi+q) for this step's keys. new_valid: [n, q] bool, which of them are real tokens
        (None: all). Builds the attention mask [n, 1, q, width + q] shared by all layers.
        Returns (useful, attended): query-key pairs this step computes that count, and in all."""
        n = len(self)
        if self.hi + q > self.cols_cap:
            self._relayout(q=q)
        hi = self.hi
        if new_valid is None:
            self.valid[:n, hi : hi + q] = True
        else:
            self.valid[:n, hi : hi + q] = new_valid
        window = self.valid[:n, self.lo : hi + q]  # [n, width + q]
        attended = n * q * window.shape[1]
        if q == 1:
            mask = window[:, None, None, :]
            useful = sum(self.lens) + n
        else:
            mask = window[:, None, None, :].expand(n, 1, q, window.shape[1]).clone()
            causal = torch.ones(q, q, dtype=torch.bool, device=self.device).tril()
            mask[:, :, :, -q:] &= causal
            real_queries = new_valid if new_valid is not None else torch.ones(n, q, dtype=torch.bool)
            useful = int((mask[:, 0] & real_queries[:, :, None].to(mask.device)).sum())
            # padding queries attend to themselves so no softmax row is empty (their outputs are discarded)
            mask[:, :, :, -q:] |= torch.eye(q, dtype=torch.bool, device=self.device)
        self.step_q, self.step_mask = q, mask
        if self.prefix_kv is not None:  # attention._cascade's kernel takes it additive: built once per step
            bias = torch.zeros(mask.shape, dtype=self.dtype, device=self.device)
            self.step_bias = bias.masked_fill(~mask, -torch.inf)
        return useful, attended

    def attend_inputs(
        self, layer: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store this step's key/value [n, kv_heads, q, head_dim] for `layer`; return the window's keys and
        values [n, kv_heads, width + q, head_dim] and the mask."""
        n, q, hi = len(self), self.step_q, self.hi
        self.kv[layer, 0, :n, :, hi : hi + q] = key
        self.kv[layer, 1, :n, :, hi : hi + q] = value
        k = self.kv[layer, 0, :n, :, self.lo : hi + q]
        v = self.kv[layer, 1, :n, :, self.lo : hi + q]
        assert self.step_mask is not None, "attend_inputs outside a step"
        return k, v, self.step_mask

    def end_step(self, added: list[int] | None = None) -> None:
        """Close the step: the window now ends after the new columns. added[r]: real tokens row r gained."""
        q = self.step_q
        self.hi += q
        if added is None:
            self.lens = [n + q for n in self.lens]
        else:
            self.lens = [n + a for n, a in zip(self.lens, added)]
        self.step_q, self.step_mask, self.step_bias = 0, None, None
