"""DecodeBatch: the running batch of a decode engine, and the BATON splice and eviction.

The batch is a list of KVSegments (see segment.py). Rows are the concatenation of the segments' rows, in
order; the model runs on all of them at once, and attention runs per segment over its window (and once over
each shared prefix for all the segments holding it). Segments keep rows of similar
length together, so the padding each row attends over stays small even when prompt lengths differ widely.

Contract (as TGI's batches): `concatenate` splices prefilled requests in, `evict` removes finished ones (TGI's
`filter` names the rows to keep instead), `len()` is the number of rows computed by the next step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from baton.engine.cpu_attention import DecodeKernel
from baton.engine.prefix_cache import BLOCK_TOKENS
from baton.engine.request import Request
from baton.engine.segment import KVSegment, RowKV, cols_for
from baton.engine.slab_pool import CPU_POOL_BYTES, SlabPool

# Segments hold their rows' common prefix once (segment.py) when it is SHARED_MIN_TOKENS long or more and reading
# it once instead of per row saves SHARED_MIN_SAVING token reads per step or more: below that, the second
# attention call and the merge cost more than they save (chat's 300-token system prompt over 2-3 rows made steps
# ~10% slower; 32 rows over a 1,024-token prefix, 1.65x faster). The rows counted are those of every segment that
# would hold it: one prefix tensor serves them all (_share_prefix).
SHARED_MIN_TOKENS = 64
SHARED_MIN_SAVING = 2048

# Padding positions per step worth paying to keep a row out of a new segment (the default `segment_cost`). A
# segment costs one more attention call per layer per step: ~100 us on a 2-core CPU for smollm2-135m, about the
# time to read ~900 padded positions of its KV (1.5 KB per token and layer). With 32, `chat`'s rows of different
# lengths spread one per segment at small batches (8 rows, 8 calls per layer: a step 89 ms, 80 ms in one
# segment); through `baton serve`, 512 against 32: `shared-prefix` 160 against 151-154 tok/s, `chat` 122 against
# 119-120; 2048: wider relayouts when a long row joins (TPOT p99 over 1 s). docs/benchmarks.md, machine J.
SEGMENT_COST = 512


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [rows, q]
    position_ids: torch.Tensor  # [rows, q]
    new_valid: torch.Tensor | None  # [rows, q] bool, which query tokens are real; None: all (q == 1)
    added: list[int]  # real tokens each row gains in this step
    idle_rows: int  # token rows computed that produce nothing (padding, finished rows)
    rows: int  # token rows computed in all (rows * q)


class DecodeBatch:
    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        max_rows: int = 32,
        max_segments: int = 8,
        segment_cost: int = SEGMENT_COST,
        pad_token_id: int = 0,
        reserve_bytes: int = 0,
        decode_kernel: DecodeKernel | None = None,
    ) -> None:
        """max_segments: 1 gives the plain padded batch of the paper; more let rows of different lengths attend
        over separate windows. segment_cost: padding positions (per step) worth paying to avoid a new segment.
        reserve_bytes: on a CPU, slab memory laid out (and written) now rather than at the steps that need it.
        decode_kernel: Baton's CPU kernel for steps of one query per row (cpu_attention.py); None: SDPA."""
        assert max_rows >= 1 and max_segments >= 1
        self.kv_shape = (num_layers, kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.max_rows, self.max_segments, self.segment_cost = max_rows, max_segments, segment_cost
        self.pad_token_id = pad_token_id
        self.segments: list[KVSegment] = []
        self.decode_kernel = decode_kernel
        # the slabs segments let go, kept for their next ones (slab_pool.py); CUDA's allocator keeps its own
        cpu = torch.device(device).type == "cpu"
        self.pool = SlabPool(CPU_POOL_BYTES if cpu else 0)
        if cpu and reserve_bytes > 0:
            self.pool.reserve(reserve_bytes, dtype, device)

    # ---- derived values ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(len(s) for s in self.segments)

    @property
    def requests(self) -> list[Request]:
        return [r for s in self.segments for r in s.requests]

    @property
    def free_rows(self) -> int:
        return self.max_rows - len(self)

    @property
    def kv_tokens(self) -> int:
        """Tokens whose KV the batch holds: every row's, a shared prefix once."""
        return sum(sum(s.lens) for s in self.segments) + sum(len(ids) for ids, _ in self.shared_prefixes())

    @property
    def allocated_bytes(self) -> int:
        """Bytes held for KV: the segments' slabs (rows' tokens, padding, room to grow), shared prefixes, and
        the slabs kept for reuse (the pool)."""
        slabs = sum(s.kv.numel() * s.kv.element_size() for s in self.segments)
        return slabs + sum(kv.numel() * kv.element_size() for _, kv in self.shared_prefixes()) + self.pool.bytes

    @property
    def padding(self) -> int:
        return sum(s.padding for s in self.segments)

    @property
    def copied_bytes(self) -> int:
        return sum(s.copied_bytes for s in self.segments)

    def _new_segment(self, first_prompt_len: int = 0) -> KVSegment:
        """A segment sized for its first row: one row, room for the prompt and growth."""
        cols = max(64, cols_for(first_prompt_len))
        seg = KVSegment(*self.kv_shape, self.dtype, self.device, rows_cap=1, cols_cap=cols, max_rows=self.max_rows,
                        pool=self.pool)
        self.segments.append(seg)
        return seg

    # ---- splice / evict --------------------------------------------------------------------------------
    def concatenate(self, items: Iterable[tuple[Request, torch.Tensor | RowKV]]) -> None:
        """Splice prefilled requests in. Each kv: [layers, 2, kv_heads, prompt_len, head_dim], or in parts (RowKV).
        The longest go first, so that shorter ones can fit under their windows."""
        rows = sorted(((req, RowKV.of(kv)) for req, kv in items), key=lambda it: -it[1].tokens)
        ids = [req.all_ids[: kv.tokens] for req, kv in rows]
        for i, (req, kv) in enumerate(rows):
            assert self.free_rows > 0, "splice into a full batch"
            self._place(ids[i], kv, ids[i + 1 :]).insert(req, kv, more=len(rows) - 1 - i)

    def _place(self, ids: Sequence[int], kv: RowKV, coming: Sequence[Sequence[int]] = ()) -> KVSegment:
        """The segment that adds the least padding among those the row can join (its ids start with their shared
        prefix), counting its tokens after that prefix; a new one when that costs more than `segment_cost`, or
        when none can take the row (even past `max_segments`: its ids start with none of their prefixes). The
        segment then holds a prefix the row shares with others, if one pays (_share_prefix; `coming`: the ids
        of the rows spliced after it in the same call)."""
        def cost(seg: KVSegment) -> int:
            return seg.splice_cost(len(ids) - seg.prefix_len)

        best = min((s for s in self.segments if s.shares(ids)), key=cost, default=None)
        if best is None or (cost(best) > self.segment_cost and len(self.segments) < self.max_segments):
            held = self._held_prefix(ids)
            best = self._new_segment(len(ids) - (len(held[0]) if held else 0))
            if held:
                best.adopt_prefix(*held)
        return best if best.prefix_len else self._share_prefix(ids, kv, best, coming)

    def _held_prefix(self, ids: Sequence[int], seg: KVSegment | None = None) -> tuple[list[int], torch.Tensor] | None:
        """The longest shared prefix the batch holds already that `ids` and every row of `seg` start with (each
        keeping a token of its own after it)."""
        for prefix_ids, prefix_kv in sorted(self.shared_prefixes(), key=lambda pk: -len(pk[0])):
            p = len(prefix_ids)
            if len(ids) > p and list(ids[:p]) == prefix_ids and (seg is None or all(
                    n > p and r.all_ids[:p] == prefix_ids for r, n in zip(seg.requests, seg.lens))):
                return prefix_ids, prefix_kv
        return None

    def _share_prefix(self, ids: Sequence[int], kv: RowKV, seg: KVSegment,
                      coming: Sequence[Sequence[int]] = ()) -> KVSegment:
        """Let `seg` (no shared prefix yet; `ids`/`kv` the row about to join it) hold a prefix once:
        1. one the batch holds already that the row and seg's rows start with (its reads are paid for already); or
        2. a new one the row shares with every row of some segments holding none (chat's system prompt over rows
           spread across segments by length), taken by all of them, the length and segments that save the most
           reads (length times the rows that will hold it: those already there, and those `coming` in the same
           splice that start with it), when that reaches SHARED_MIN_SAVING. So a splice of many prompts after one
           cached system prompt holds it once from its first row on, instead of giving every row a slab as wide
           as the whole prompt first.
        The longest prefix that could be is checked to pay before any prompt is compared, and a comparison stops
        at the first row that shares too little. Returns the segment the row joins: `seg`, or, for a new one that
        takes a new prefix, one sized for the row's tokens after it."""
        held = self._held_prefix(ids, seg)
        if held:
            seg.adopt_prefix(*held)
            return seg
        bare = [s for s in self.segments if not s.prefix_len and len(s)]
        longest = max([max(s.lens) for s in bare] + [len(c) for c in coming], default=0)
        if (min(len(ids), longest) - 1) * (sum(map(len, bare)) + len(coming)) < SHARED_MIN_SAVING:
            return seg
        commons = [(self._common(ids, [r.all_ids for r in s.requests], min(s.lens)), s) for s in bare]
        later = [self._common(ids, [c], len(c)) for c in coming]  # per row to come: the whole blocks it shares
        saving = {c: c * (sum(len(s) for d, s in commons if d >= c) + sum(d >= c for d in later))
                  for c in {c for c, _ in commons} | set(later) if c}
        p = max(saving, key=lambda c: saving[c], default=0)
        if not p or saving[p] < SHARED_MIN_SAVING:
            return seg
        prefix_kv = kv.first(p).to(self.device, self.dtype, copy=True)  # [layers, 2, kv_heads, P, head_dim]
        for d, s in commons:
            if d >= p:
                s.adopt_prefix(ids[:p], prefix_kv)
        if not seg.prefix_len:  # seg's rows do not share it, or seg is new: the row joins a segment that holds it
            if len(seg):
                return seg  # (the rows to come find the prefix held: _held_prefix)
            self.segments.remove(seg)
            seg.release()
            seg = self._new_segment(len(ids) - p)
            seg.adopt_prefix(ids[:p], prefix_kv)
        return seg

    def shared_prefixes(self) -> list[tuple[list[int], torch.Tensor]]:
        """The distinct shared prefixes the segments hold (several segments may hold one): ids and KV."""
        held: dict[int, tuple[list[int], torch.Tensor]] = {}
        for s in self.segments:
            if s.prefix_kv is not None:
                held.setdefault(id(s.prefix_kv), (s.prefix_ids, s.prefix_kv))
        return list(held.values())

    @staticmethod
    def _common(ids: Sequence[int], rows: Sequence[Sequence[int]], limit: int | None = None) -> int:
        """The longest prefix, in whole BLOCK_TOKENS blocks, short of `ids`' last token (and of `limit`), that
        `ids` shares with every one of `rows` (their ids); 0 when under SHARED_MIN_TOKENS (or no rows)."""
        end = len(ids) - 1 if limit is None else min(len(ids) - 1, limit - 1)
        if not rows or end < SHARED_MIN_TOKENS:
            return 0
        head = list(ids[:SHARED_MIN_TOKENS])  # a row that differs here shares too little: no tensors built for it
        if any(list(r[:SHARED_MIN_TOKENS]) != head for r in rows):
            return 0
        new = torch.tensor(ids[:end], dtype=torch.long)
        common = end
        for r in rows:
            other = torch.tensor(r[:common], dtype=torch.long)
            n = min(common, len(other))
            differ = (new[:n] != other[:n]).nonzero()
            common = int(differ[0]) if len(differ) else n
            if common < SHARED_MIN_TOKENS:
                return 0
        common -= common % BLOCK_TOKENS
        return common if common >= SHARED_MIN_TOKENS else 0

    def add_unprefilled(self, reqs: Iterable[Request]) -> None:
        """Rows whose prompts run inside the next step (orca, static). Uses one segment."""
        seg = self.segments[0] if self.segments else self._new_segment()
        for req in reqs:
            assert self.free_rows > 0, "add to a full batch"
            seg.insert(req, None)

    def row_kv(self, req: Request, start: int = 0) -> torch.Tensor:
        """A copy of a row's KV from its token `start` on: [layers, 2, kv_heads, tokens - start, head_dim] (its
        tokens but the last sampled)."""
        seg, i = self._row(req)
        return seg.row_kv(i, start)

    def shared_len(self, req: Request) -> int:
        """The first tokens of a row whose KV its segment holds as a shared prefix (0: none)."""
        return self._row(req)[0].prefix_len

    def _row(self, req: Request) -> tuple[KVSegment, int]:
        for seg in self.segments:
            for i, r in enumerate(seg.requests):
                if r is req:
                    return seg, i
        raise KeyError(req.id)

    def evict(self, done: set[str]) -> None:
        """Evict the requests whose ids are in `done` (the ids given leave, unlike TGI's `filter`, which keeps
        them), and drop emptied segments."""
        for seg in self.segments:
            seg.remove({i for i, r in enumerate(seg.requests) if r.id in done})
            if not len(seg):
                seg.release()
        self.segments = [s for s in self.segments if len(s)]

    def compact(self, threshold: float) -> None:
        """Re-align the rows of any segment whose holes (padding a re-alignment removes) exceed `threshold`
        of its window."""
        for seg in self.segments:
            n = len(seg)
            holes = n * (seg.width - max(seg.lens)) if n else 0
            if n and holes > threshold * n * seg.width:
                seg.compact()

    # ---- step ------------------------------------------------------------------------------------------
    def step_inputs(self) -> StepInputs:
        """Inputs of the next forward step. A row whose prompt has not run yet (orca, static) feeds its whole
        prompt; the others feed their last token. With any such row, every row is left-padded to the longest."""
        reqs = self.requests
        lens = [n for s in self.segments for n in s.lens]
        prefix = [s.prefix_len for s in self.segments for _ in s.lens]
        feeds: list[list[int]] = []
        starts: list[int] = []
        idle = 0
        for req, n, p in zip(reqs, lens, prefix):
            if n == 0:  # prompt not computed yet (with the tokens a resumed request already has)
                feeds.append(req.all_ids)
            else:  # its last token: an output's, or, for a choice forked from a prefill, the prompt's last
                feeds.append([req.all_ids[-1]])
                idle += req.finished  # static batches keep computing finished rows
            starts.append(p + n)
        q = max(len(f) for f in feeds)
        if q == 1:
            ids = torch.tensor(feeds, dtype=torch.long)
            pos = torch.tensor(starts, dtype=torch.long).unsqueeze(1)
            return StepInputs(
                ids.to(self.device), pos.to(self.device), None, [1] * len(reqs), idle, len(reqs)
            )
        ids = torch.full((len(reqs), q), self.pad_token_id, dtype=torch.long)
        pos = torch.zeros((len(reqs), q), dtype=torch.long)
        valid = torch.zeros((len(reqs), q), dtype=torch.bool)
        for r, (f, s) in enumerate(zip(feeds, starts)):
            ids[r, q - len(f) :] = torch.tensor(f)
            pos[r, q - len(f) :] = torch.arange(s, s + len(f))
            valid[r, q - len(f) :] = True
        idle += len(reqs) * q - sum(len(f) for f in feeds)
        return StepInputs(
            ids.to(self.device),
            pos.to(self.device),
            valid.to(self.device),
            [len(f) for f in feeds],
            idle,
            len(reqs) * q,
        )
