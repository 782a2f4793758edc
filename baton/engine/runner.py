"""ModelRunner: the two kinds of forward pass, a request's own prefill and one step of a decode batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from baton.engine.attention import BATCH_KWARG, no_mask
from baton.engine.batch import DecodeBatch, StepInputs
from baton.engine.kv_payload import KVPayload
from baton.engine.models import LoadedModel
from baton.engine.request import Request
from baton.engine.sampler import sample_row


@dataclass
class StepResult:
    logits: torch.Tensor  # [rows, vocab], the last position of each row
    inputs: StepInputs
    useful_kv: int  # query-key pairs that count
    attended_kv: int  # query-key pairs computed


class ModelRunner:
    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.model = lm.model

    def new_batch(self, max_rows: int, max_segments: int = 8, segment_cost: int = 32) -> DecodeBatch:
        pad = self.lm.config.pad_token_id
        return DecodeBatch(
            self.lm.num_layers,
            self.lm.kv_heads,
            self.lm.head_dim,
            self.lm.dtype,
            self.lm.device,
            max_rows=max_rows,
            max_segments=max_segments,
            segment_cost=segment_cost,
            pad_token_id=pad if isinstance(pad, int) else 0,
        )

    @torch.inference_mode()
    def prefill(self, req: Request) -> KVPayload:
        """Run one prompt alone; return its KV and its first token. A resumed request (output_ids already set)
        runs its prompt and those tokens, and its next token is sampled as the (len(output_ids)+1)-th."""
        ids = torch.tensor([req.all_ids], dtype=torch.long, device=self.lm.device)  # [1, tokens]
        cache = DynamicCache(config=self.lm.config)
        out = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        # each layer: [1, kv_heads, prompt_len, head_dim] -> kv: [layers, 2, kv_heads, prompt_len, head_dim]
        kv = torch.stack([torch.stack((layer.keys[0], layer.values[0])) for layer in cache.layers])
        first = sample_row(out.logits[0, -1], req)
        return KVPayload(req.id, self.lm.fingerprint, req.all_ids, first, kv)

    @torch.inference_mode()
    def decode(self, batch: DecodeBatch) -> StepResult:
        """One forward step of every row of the batch."""
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
            **{BATCH_KWARG: batch},
        )
        a = 0
        for seg in batch.segments:
            seg.end_step(inputs.added[a : a + len(seg)])
            a += len(seg)
        return StepResult(out.logits[:, -1], inputs, useful, attended)
