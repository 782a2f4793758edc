"""ModelRunner: the two kinds of forward pass, a request's own prefill and one step of a decode batch."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers import DynamicCache

from baton.engine import logprobs
from baton.engine.attention import BATCH_KWARG, LAYER_HOOK_KWARG, PACKED_KWARG, PAST_KWARG, no_mask
from baton.engine.batch import SEGMENT_COST, DecodeBatch, StepInputs
from baton.engine.kv_payload import KVPayload
from baton.engine.models import LoadedModel
from baton.engine.prefix_cache import BLOCK_TOKENS, PrefixCache, lookup_keys
from baton.engine.request import Request
from baton.engine.sampler import sample_row

PREFILL_TOKEN_BUDGET = 2048  # prompt tokens packed into one prefill forward pass
# a prompt waits a pass for another's uncached tokens to be cached when it then skips at least this many of them
SHARED_UNCACHED_BLOCKS = 2


class Split(NamedTuple):
    """ModelRunner.compute_once's answer: which prompts run now and which after them (indices, each in order)."""

    now: list[int]
    uncached: list[int]  # per prompt of `now`: the tokens its prefill computes, what a pass's token budget counts
    later: list[int]


def pack_for_prefill(lengths: Sequence[int], token_budget: int = PREFILL_TOKEN_BUDGET) -> list[list[int]]:
    """Split the indices of `lengths`, in order, into runs whose lengths sum to at most token_budget (a prompt
    longer than the budget runs alone). Every index appears in exactly one run."""
    runs: list[list[int]] = []
    total = 0
    for i, n in enumerate(lengths):
        if runs and total + n <= token_budget:
            runs[-1].append(i)
            total += n
        else:
            runs.append([i])
            total = n
    return runs


def logit_positions(reqs: Sequence[Request], spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[range]]:
    """The positions of a packed sequence whose logits a prefill keeps: each prompt's last, or every position of
    a prompt whose request asks for prompt_logprobs; and, per request, the rows of the kept logits that are its."""
    keep: list[int] = []
    rows: list[range] = []
    for req, (s, e) in zip(reqs, spans):
        first = len(keep)
        keep.extend(range(s, e) if req.params.prompt_logprobs is not None else (e - 1,))
        rows.append(range(first, len(keep)))
    return keep, rows


def prefill_payloads(lm: LoadedModel, reqs: Sequence[Request], spans: Sequence[tuple[int, int]],
                     logits: torch.Tensor, rows: Sequence[range], cache: DynamicCache,
                     pasts: Sequence[torch.Tensor | None] | None = None, join: bool = True) -> list[KVPayload]:
    """Each prefilled request's payload: its cached prefix's KV (pasts) and its span of the cache's KV, its first
    token sampled from its last kept row of `logits` ([kept, vocab], rows as logit_positions gives them), and the
    logprobs it asks for. join=False: a payload over a cached prefix leaves it out (held_tokens), for a caller
    that has the past at hand and splices the two parts (selective.py)."""
    payloads = []
    for i, (req, (s, e), r) in enumerate(zip(reqs, spans, rows)):
        # each layer: [1, kv_heads, total, head_dim] -> kv: [layers, 2, kv_heads, span, head_dim]
        kv = torch.stack([torch.stack((layer.keys[0, :, s:e], layer.values[0, :, s:e])) for layer in cache.layers])
        past = pasts[i] if pasts is not None else None
        if past is not None and join:
            kv = torch.cat([past, kv], dim=3)  # [layers, 2, kv_heads, prompt_len, head_dim]
        last = logits[r[-1]]  # [vocab]
        first = sample_row(last, req, lm.eos_token_ids, lm.grammars)
        held = 0 if past is None or join else int(past.shape[3])
        payload = KVPayload(req.id, lm.fingerprint, req.all_ids, first, kv, held_tokens=held)
        if req.params.logprobs is not None:
            payload.first_logprobs = logprobs.of_rows(last.unsqueeze(0), [first], [req.params.logprobs])[0]
        if req.params.prompt_logprobs is not None:
            payload.prompt_logprobs = logprobs.of_prompt(logits[r.start : r.stop], req.all_ids,
                                                         req.params.prompt_logprobs)
        payloads.append(payload)
    return payloads


@dataclass
class ForwardPass:
    logits: torch.Tensor  # [rows, vocab], the last position of each row
    inputs: StepInputs
    useful_kv: int  # query-key pairs that count
    attended_kv: int  # query-key pairs computed


class ModelRunner:
    def __init__(self, lm: LoadedModel, prefix_cache: PrefixCache | None = None) -> None:
        self.lm = lm
        self.model = lm.model
        # prompts' KV kept for the next prompts that start the same way (prefix_cache.py); None: none kept
        self.prefix_cache = prefix_cache

    def new_batch(self, max_rows: int, max_segments: int = 8, segment_cost: int = SEGMENT_COST,
                  reserve_bytes: int = 0) -> DecodeBatch:
        pad = self.lm.config.pad_token_id
        return DecodeBatch(
            *self.lm.spec.kv_dims,
            self.lm.dtype,
            self.lm.device,
            max_rows=max_rows,
            max_segments=max_segments,
            segment_cost=segment_cost,
            pad_token_id=pad if isinstance(pad, int) else 0,
            reserve_bytes=reserve_bytes,
            decode_kernel=self.lm.decode_kernel,
        )

    @torch.inference_mode()
    def prefill(self, req: Request) -> KVPayload:
        """Run one prompt alone; return its KV and its first token. A resumed request (output_ids already set)
        runs its prompt and those tokens, and its next token is sampled as the (len(output_ids)+1)-th."""
        return self.prefill_many([req])[0]

    @torch.inference_mode()
    def prefill_many(self, reqs: Sequence[Request], token_budget: int = PREFILL_TOKEN_BUDGET) -> list[KVPayload]:
        """Prefill several prompts, packed end to end into forward passes of at most token_budget tokens. No
        padding: each prompt keeps its own positions and attends to itself alone, so each result is that
        prompt's prefill; the packing only makes the matrix products larger (faster per token on a CPU). With a
        prefix cache, a prompt whose first blocks are cached runs only its other tokens, attending over them; in
        rounds (compute_once): a prompt sharing its uncached start with an earlier one runs in a round after it."""
        out: dict[int, KVPayload] = {}
        pending = list(range(len(reqs)))
        while pending:  # in rounds: a prompt that shares uncached tokens with an earlier one waits for its cache
            split = self.compute_once([reqs[i] for i in pending])
            ready, pending = [pending[i] for i in split.now], [pending[i] for i in split.later]
            cached = [self.cached(reqs[i]) for i in ready]
            done: list[KVPayload] = []
            for run in pack_for_prefill([len(reqs[i].all_ids) - c[0] for i, c in zip(ready, cached)], token_budget):
                done.extend(self._prefill_packed([reqs[ready[j]] for j in run], [cached[j] for j in run]))
            self.remember(done)
            out.update(zip(ready, done))
        return [out[i] for i in range(len(reqs))]

    def compute_once(self, reqs: Sequence[Request]) -> Split:
        """In-batch prefix sharing (SGLang's in-batch prefix caching): prompts that start with the same tokens
        past what the prefix cache holds (SHARED_UNCACHED_BLOCKS whole blocks or more) would each compute them in
        one pass; only the first of them runs now, the others after it, when the cache holds what it computed. A
        prompt waits only where its blocks up to the last it must find take at most half the cache (else they
        might not be kept, and waiting would only serialise the prompts). Also each prompt's uncached tokens (all
        of them for one asking for its prompt's logprobs, which `cached` finds nothing for). The first always
        runs now; without a prefix cache, all do."""
        if self.prefix_cache is None:
            return Split(list(range(len(reqs))), [len(r.all_ids) for r in reqs], [])
        split = Split([], [], [])
        computing: set[bytes] = set()  # the keys of the uncached blocks the prompts running now compute
        fits = self.prefix_cache.max_bytes // 2 // (BLOCK_TOKENS * self.lm.kv_bytes_per_token())  # blocks
        for i, req in enumerate(reqs):
            keys = lookup_keys(req.all_ids)
            whole = req.params.prompt_logprobs is not None
            cached = 0 if whole else self.prefix_cache.cached_blocks(keys)
            probe = cached + SHARED_UNCACHED_BLOCKS - 1  # its last block of the shared run that would pay
            if not whole and probe < min(len(keys), fits) and keys[probe] in computing:
                split.later.append(i)
            else:
                split.now.append(i)
                split.uncached.append(len(req.all_ids) - cached * BLOCK_TOKENS)
                computing.update(keys[cached:])
        return split

    def cached(self, req: Request) -> tuple[int, torch.Tensor | None]:
        """The tokens of the request's prompt found in the prefix cache and their KV (none when it asks for the
        prompt's logprobs: those need every position's logits)."""
        if self.prefix_cache is None or req.params.prompt_logprobs is not None:
            return 0, None
        return self.prefix_cache.lookup(req.all_ids)

    def remember(self, payloads: Sequence[KVPayload]) -> None:
        """Keep prefilled prompts' KV in the prefix cache, if there is one."""
        if self.prefix_cache is not None:
            for payload in payloads:  # a payload leaving out its cached prefix gives the blocks after it
                self.prefix_cache.insert(payload.prompt_ids, payload.kv, payload.held_tokens)

    def _prefill_packed(self, reqs: list[Request], cached: list[tuple[int, torch.Tensor | None]]) -> list[KVPayload]:
        dev = self.lm.device
        starts = [c[0] for c in cached]  # tokens of each prompt already cached: its span holds the rest
        lens = [len(r.all_ids) - p for r, p in zip(reqs, starts)]
        ends = list(itertools.accumulate(lens))
        spans = [(e - n, e) for e, n in zip(ends, lens)]
        ids = torch.tensor([[t for r, p in zip(reqs, starts) for t in r.all_ids[p:]]], dtype=torch.long,
                           device=dev)  # [1, total]
        cache = DynamicCache(config=self.lm.config)
        keep, rows = logit_positions(reqs, spans)
        pasts = [c[1] for c in cached]
        if len(reqs) == 1 and keep == [lens[0] - 1] and pasts[0] is None:
            out = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        else:
            positions = torch.cat([torch.arange(p, p + n, device=dev) for p, n in zip(starts, lens)]).unsqueeze(0)
            out = self.model(
                input_ids=ids,
                position_ids=positions,  # [1, total]
                attention_mask=no_mask(1, dev),  # the packed attention masks by spans; none is built
                cache=cache,
                use_cache=True,
                logits_to_keep=torch.tensor(keep, device=dev),
                **{PACKED_KWARG: spans, PAST_KWARG: pasts},
            )
        return prefill_payloads(self.lm, reqs, spans, out.logits[0], rows, cache, pasts)

    @torch.inference_mode()
    def decode(self, batch: DecodeBatch, layer_hook: Callable[[], None] | None = None) -> ForwardPass:
        """One forward step of every row of the batch; layer_hook, if given, runs before each layer's attention."""
        inputs = batch.step_inputs()
        q = inputs.input_ids.shape[1]
        useful = attended = 0
        a = 0
        for seg in batch.segments:
            nv = None if inputs.new_valid is None else inputs.new_valid[a : a + len(seg)]
            u, t = seg.begin_step(nv, q)
            useful, attended, a = useful + u, attended + t, a + len(seg)
        out = self.model(
            input_ids=inputs.input_ids,
            position_ids=inputs.position_ids,
            attention_mask=no_mask(len(batch), self.lm.device),
            use_cache=False,
            logits_to_keep=1,
            **{BATCH_KWARG: batch, LAYER_HOOK_KWARG: layer_hook},
        )
        a = 0
        for seg in batch.segments:
            seg.end_step(inputs.added[a : a + len(seg)])
            a += len(seg)
        return ForwardPass(out.logits[:, -1], inputs, useful, attended)
