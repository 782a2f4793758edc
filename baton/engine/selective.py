"""Selective batching (Orca, Yu et al., OSDI 2022): one iteration of the `orca` policy as ONE forward pass.

The newcomers' whole prompts and one token of every running row of the batch are flattened into a single token
sequence, row 0 of the forward call, with no padding anywhere:

    [ prompt 0 | prompt 1 | ... | prompt k-1 | row 0's token | row 1's token | ... | row n-1's token ]
      spans[0]   spans[1]         spans[k-1]   p = spans[-1][1]                        p + n = total

Every layer but attention (embeddings, projections, MLPs, norms; the LM head on the kept positions only) runs on
the [1, total] sequence as on one, so each token is computed exactly once. Attention is split per request by
the same code as the other forward passes (attention.py, given both the packed spans and the batch): each
prompt attends causally to its own span, as in a packed prefill; each row's token attends over that row's own
KV in the batch's segments, where its key/value are written, as in a decode step. Position ids are each
token's own: 0..len-1 within a prompt, the row's length for a row's token (RoPE or absolute embeddings alike).

Invariant kept here: after `iterate`, each newcomer's prompt KV and first token are in its payload, ready to be
spliced into the batch (the engine does so at once, so the newcomer decodes in the next iteration), and every
running row's KV has grown by exactly its one token, as after ModelRunner.decode. The batch must hold prefilled
rows only (no row whose prompt is still to run: those belong to the padded policies).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from baton.engine.attention import BATCH_KWARG, LAYER_HOOK_KWARG, PACKED_KWARG, PAST_KWARG, no_mask
from baton.engine.batch import DecodeBatch
from baton.engine.kv_payload import KVPayload
from baton.engine.request import Request
from baton.engine.runner import ForwardPass, ModelRunner, logit_positions, prefill_payloads
from baton.engine.segment import RowKV


@dataclass
class Iteration:
    # each newcomer's prompt KV and first token, in the order given; over a cached prefix, its KV leaves it out
    # (held_tokens): kv(i) gives both parts
    payloads: list[KVPayload]
    rows: ForwardPass | None  # the running rows' step (logits [rows, vocab]); None when the batch was empty
    prompt_tokens: int  # newcomers' tokens run in this pass
    pasts: list[torch.Tensor | None]  # each newcomer's prefix-cache hit (shared with the cache: never written)

    def kv(self, i: int) -> RowKV:
        """Newcomer i's whole prompt KV, in parts: its cached prefix, then what this pass computed."""
        past = self.pasts[i]
        return RowKV((self.payloads[i].kv,) if past is None else (past, self.payloads[i].kv))


@torch.inference_mode()
def iterate(
    runner: ModelRunner,
    batch: DecodeBatch,
    newcomers: Sequence[Request],
    layer_hook: Callable[[], None] | None = None,
) -> Iteration:
    """Run one selective-batching iteration: the newcomers' prompts (at least one) and a step of every row of
    `batch`, in one forward pass. The newcomers are not added to the batch here."""
    assert newcomers, "a selective iteration without newcomers is a plain decode step (ModelRunner.decode)"
    dev = runner.lm.device
    cached = [runner.cached(r) for r in newcomers]  # each prompt's first tokens found in the prefix cache
    starts = [c[0] for c in cached]
    lens = [len(r.all_ids) - s for r, s in zip(newcomers, starts)]  # a resumed request runs the tokens it has too
    ends = list(itertools.accumulate(lens))
    spans = [(e - n, e) for e, n in zip(ends, lens)]
    p, n = ends[-1], len(batch)
    ids = torch.tensor([t for r, s in zip(newcomers, starts) for t in r.all_ids[s:]], dtype=torch.long,
                       device=dev)  # [p]
    pos = torch.cat([torch.arange(s, s + k, device=dev) for s, k in zip(starts, lens)])  # [p]
    keep, prompt_rows = logit_positions(newcomers, spans)  # each prompt's last position (or all, for logprobs)
    k = len(keep)
    pasts = [c[1] for c in cached]
    kwargs: dict[str, Any] = {PACKED_KWARG: spans, PAST_KWARG: pasts, LAYER_HOOK_KWARG: layer_hook}
    inputs = None
    useful = attended = 0
    if n:
        inputs = batch.step_inputs()  # input_ids, position_ids: [n, 1], each row's last token at its position
        assert inputs.input_ids.shape[1] == 1, "selective batching: every row of the batch must be prefilled"
        ids = torch.cat([ids, inputs.input_ids[:, 0]])  # [p + n]
        pos = torch.cat([pos, inputs.position_ids[:, 0]])  # [p + n]
        keep += range(p, p + n)  # each row's token
        for seg in batch.segments:
            u, t = seg.begin_step(None, 1)  # column hi of every row takes this step's key/value
            useful, attended = useful + u, attended + t
        kwargs[BATCH_KWARG] = batch
    cache = DynamicCache(config=runner.lm.config)  # collects every token's KV; the newcomers' spans are kept
    out = runner.model(
        input_ids=ids.unsqueeze(0),  # [1, p + n]
        position_ids=pos.unsqueeze(0),  # [1, p + n]
        attention_mask=no_mask(1, dev),  # attention masks by spans and segments; none is built
        cache=cache,
        use_cache=True,
        logits_to_keep=torch.tensor(keep, device=dev),
        **kwargs,
    )
    for seg in batch.segments:
        seg.end_step()  # every row gained its one token
    logits = out.logits[0]  # [k + n, vocab]: the prompts' kept positions, then each row's token
    payloads = prefill_payloads(runner.lm, newcomers, spans, logits, prompt_rows, cache, pasts, join=False)
    runner.remember(payloads)
    rows = None if inputs is None else ForwardPass(logits[k:], inputs, useful, attended)
    return Iteration(payloads, rows, p, pasts)
