"""The `baton` attention implementation: attention of a decode batch over its segmented KV slabs.

Registered with transformers' AttentionInterface, so any model that dispatches attention through it (Llama, Qwen,
Mistral, GPT-2, ...) works unchanged. When a forward call carries `baton_batch=<DecodeBatch>`, each layer writes
this step's keys/values into the batch's slabs and attends, segment by segment, over each segment's column window
with its mask (and, for segments holding a shared prefix, once over that prefix for all their rows); one query per
row on a CPU goes through Baton's own kernel where the model loaded it (`batch.decode_kernel`, cpu_attention.py),
else through SDPA. When it carries `baton_packed=[(start, end), ...]` (a packed prefill: several prompts end to end
in row 0), each prompt attends causally to itself alone; with `baton_past=[kv or None, ...]` as well, a prompt whose
first tokens were cached (prefix_cache.py) holds only its new tokens in row 0 and attends over its cached prefix's
KV ([layers, 2, kv_heads, cached, head_dim]) before them (the prompts after one cached prefix all in one call over
it). With both (a selective-batching iteration, selective.py), row 0 holds the prompts' spans and then one token per
row of the batch: the spans attend as a packed prefill, the tokens after them as a decode step. Without either (a
single prompt's prefill, `generate()`), this is plain SDPA.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

if TYPE_CHECKING:
    from baton.engine.batch import DecodeBatch

NAME = "baton"
BATCH_KWARG = "baton_batch"
PACKED_KWARG = "baton_packed"
PAST_KWARG = "baton_past"  # with PACKED_KWARG: per span, the KV of its cached prefix, or None
LAYER_HOOK_KWARG = "baton_layer_hook"  # called before each layer's attention of a decode step


def baton_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [rows, heads, q, head_dim]
    key: torch.Tensor,  # [rows, kv_heads, q, head_dim], this step's tokens only
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    batch: DecodeBatch | None = kwargs.pop(BATCH_KWARG, None)
    hook: Callable[[], None] | None = kwargs.pop(LAYER_HOOK_KWARG, None)
    if hook is not None:
        hook()
    spans: list[tuple[int, int]] | None = kwargs.pop(PACKED_KWARG, None)
    pasts: list[torch.Tensor | None] | None = kwargs.pop(PAST_KWARG, None)
    if spans is not None and batch is not None:  # selective batching: [1, *, spans..., one token per row, *]
        p = spans[-1][1]
        prompts = _packed(module, query[:, :, :p], key[:, :, :p], value[:, :, :p], spans, scaling,
                          pasts)  # [1, p, heads, d]
        # the rows' tokens: [1, *, rows, d] -> [rows, *, 1, d], one query per row, as in a decode step
        q, k, v = (t[0, :, p:].transpose(0, 1).unsqueeze(2) for t in (query, key, value))
        rows = _batched(module, batch, q, k, v, scaling)  # [rows, 1, heads, d]
        return torch.cat([prompts, rows.transpose(0, 1)], dim=1), None  # [1, p + rows, heads, d]
    if spans is not None:  # query/key/value: [1, heads or kv_heads, total, head_dim]
        return _packed(module, query, key, value, spans, scaling, pasts), None
    if batch is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    return _batched(module, batch, query, key, value, scaling), None


def _packed(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    spans: list[tuple[int, int]], scaling: float | None, pasts: list[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Packed prompts (query/key/value [1, heads or kv_heads, total, head_dim]), each attending causally to its
    own span alone, after its cached prefix when `pasts` gives one: [1, total, heads, head_dim]. The spans over
    the same cached prefix (one tensor: the prompts after one system prompt) attend over it in ONE call, its keys
    and values read once for all of them, merged with their own causal attention by log-sum-exps (_merge)."""
    outs: list[torch.Tensor | None] = []
    over: dict[int, list[int]] = {}  # by prefix tensor: the spans after it
    for i, (s, e) in enumerate(spans):
        past = pasts[i] if pasts is not None else None
        if past is None:
            q, k, v = query[:, :, s:e], key[:, :, s:e], value[:, :, s:e]
            outs.append(sdpa_attention_forward(module, q, k, v, None, scaling=scaling, is_causal=True)[0])
        else:
            outs.append(None)
            over.setdefault(id(past), []).append(i)
    if over:
        assert pasts is not None
        layer = int(module.layer_idx)  # type: ignore[arg-type]
        heads, d = query.shape[1], query.shape[3]
        rep = heads // key.shape[1]  # query heads per KV head (GQA)
        scale = scaling if scaling is not None else d**-0.5
        for members in over.values():
            past = pasts[members[0]]
            assert past is not None
            # each span over its own tokens, causally: out [1, heads, L, d], lse [1, heads, L]
            own = [_attend(query[:, :, s:e], key[:, :, s:e].repeat_interleave(rep, 1),
                           value[:, :, s:e].repeat_interleave(rep, 1), None, scale, causal=True)
                   for s, e in (spans[i] for i in members)]
            out, lse = torch.cat([o for o, _ in own], 2), torch.cat([x for _, x in own], 2)  # [1, heads, T(, d)]
            t = out.shape[2]
            # every span's queries over the prefix [2, kv_heads, P, d], the query heads of one KV head together
            qp = torch.cat([query[:, :, s:e] for s, e in (spans[i] for i in members)], 2)  # [1, heads, T, d]
            qp = qp.reshape(1, heads // rep, rep * t, d)  # [1, kv_heads, rep * T, d]
            shared, shared_lse = _attend(qp, past[layer][0].unsqueeze(0), past[layer][1].unsqueeze(0), None, scale)
            merged = _merge(out, lse, shared.reshape(1, heads, t, d), shared_lse.reshape(1, heads, t))
            merged = merged.transpose(1, 2)  # [1, T, heads, d]
            b = 0
            for i in members:
                n = spans[i][1] - spans[i][0]
                outs[i], b = merged[:, b : b + n], b + n
    done = [o for o in outs if o is not None]
    assert len(done) == len(outs)
    return done[0] if len(done) == 1 else torch.cat(done, dim=1)


def _batched(
    module: torch.nn.Module, batch: DecodeBatch, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    scaling: float | None,
) -> torch.Tensor:
    """A decode step's rows (query [rows, heads, q, head_dim], key/value [rows, kv_heads, q, head_dim]: this
    step's tokens only), segment by segment over each segment's window: [rows, q, heads, head_dim]. Rows of
    segments holding a shared prefix attend over their windows here, and over the prefix once for all the rows
    that hold the same one (_cascade)."""
    layer = int(module.layer_idx)  # type: ignore[arg-type]
    outs: list[torch.Tensor | None] = []
    # by prefix tensor: each segment's index, its queries [n, kv_heads, rep, d], window's output and log-sum-exp
    cascades: dict[int, list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    q, d = query.shape[2], query.shape[3]
    scale = scaling if scaling is not None else d**-0.5
    a = 0
    for i, seg in enumerate(batch.segments):
        rows = slice(a, a + len(seg))
        k, v, mask = seg.attend_inputs(layer, key[rows], value[rows])  # [n, kv_heads, width + q, head_dim]
        qh = query[rows].reshape(len(seg), k.shape[1], -1, d)  # [n, kv_heads, rep, d]: one KV head's queries
        # one query per row through Baton's CPU kernel where the model chose it (cpu_attention.py); mask [n, 1, 1,
        # W]: the window's valid columns. Its output [n, kv_heads, rep, d] and log-sum-exp [n, kv_heads, rep]
        window = (batch.decode_kernel(qh.contiguous(), k, v, mask[:, 0, 0], scale)
                  if batch.decode_kernel is not None and q == 1 else None)
        if seg.prefix_kv is None:
            if window is not None:
                outs.append(window[0].reshape(len(seg), 1, -1, d))
            else:
                out, _ = sdpa_attention_forward(module, query[rows], k, v, mask, scaling=scaling, is_causal=False)
                outs.append(out)  # [n, q, heads, head_dim]
        else:  # its window now, the prefix below
            assert q == 1, "a shared-prefix segment decodes one token per row"
            assert seg.step_bias is not None
            if window is None:
                window = _attend(qh, k, v, seg.step_bias, scale)
            outs.append(None)
            cascades.setdefault(id(seg.prefix_kv), []).append((i, qh, *window))
        a = rows.stop
    for members in cascades.values():
        prefix = batch.segments[members[0][0]].prefix_kv
        assert prefix is not None
        qh = torch.cat([m[1] for m in members])
        own, own_lse = torch.cat([m[2] for m in members]), torch.cat([m[3] for m in members])
        merged = _cascade(qh, own, own_lse, prefix[layer], scale)  # [rows of these segments, 1, heads, d]
        b = 0
        for i, qs, _, _ in members:
            outs[i], b = merged[b : b + len(qs)], b + len(qs)
    done = [o for o in outs if o is not None]
    assert len(done) == len(outs)
    return done[0] if len(done) == 1 else torch.cat(done)


def _cascade(qh: torch.Tensor, own: torch.Tensor, own_lse: torch.Tensor, prefix: torch.Tensor,
             scale: float) -> torch.Tensor:
    """Rows that share a prefix (segment.py, batch.py): each row's query has attended over its own window (own,
    own_lse: its output [n, kv_heads, rep, head_dim] and log-sum-exp [n, kv_heads, rep]); here every row's query
    attends over the shared prefix's KV in ONE call, the prefix's keys and values read once for all rows, and the
    two halves are merged by their log-sum-exps. qh [n, kv_heads, rep, head_dim] (the query heads of one KV head
    together, GQA), prefix [2, kv_heads, P, head_dim]; returns [n, 1, heads, head_dim]."""
    n, kv_heads, rep, d = qh.shape
    qp = qh.permute(1, 0, 2, 3).reshape(1, kv_heads, n * rep, d)  # every row's queries, per KV head
    shared, shared_lse = _attend(qp, prefix[0].unsqueeze(0), prefix[1].unsqueeze(0), None, scale)
    shared = shared.reshape(kv_heads, n, rep, d).permute(1, 0, 2, 3)  # [n, kv_heads, rep, d]
    shared_lse = shared_lse.reshape(kv_heads, n, rep).permute(1, 0, 2)
    return _merge(own, own_lse, shared, shared_lse).reshape(n, 1, kv_heads * rep, d)  # [n, 1, heads, d]


def _merge(a: torch.Tensor, a_lse: torch.Tensor, b: torch.Tensor, b_lse: torch.Tensor) -> torch.Tensor:
    """Attention over two disjoint sets of keys, merged into attention over both: outputs a, b [..., L, d] with
    their log-sum-exps [..., L] (the same query, the same shape) -> [..., L, d], each weighted by its share of
    the softmax's denominator."""
    top = torch.maximum(a_lse, b_lse)
    w_a, w_b = (a_lse - top).exp().unsqueeze(-1), (b_lse - top).exp().unsqueeze(-1)
    return ((a * w_a + b * w_b) / (w_a + w_b)).to(a.dtype)  # float32, as the log-sum-exps


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None,
            scale: float, causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of query [b, h, L, d] over key/value [b, h, S, d] (bias [b, 1, 1, S]: 0 to attend, -inf not;
    causal: query i sees keys 0..i, L == S) and its log-sum-exp [b, h, L]: on a CPU, PyTorch's flash kernel
    (which returns it); elsewhere in plain operations."""
    if query.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, causal,
                                                                               attn_mask=bias, scale=scale)
        return out, lse
    return _attend_plain(query, key, value, bias, scale, causal)


def _attend_plain(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None,
                  scale: float, causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """_attend in plain operations, for any device."""
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scale
    if bias is not None:
        scores = scores + bias
    if causal:
        ahead = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(ahead, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    return torch.matmul((scores - lse.unsqueeze(-1)).exp().to(value.dtype), value), lse


def install(model: PreTrainedModel) -> None:
    """Make `model` use the baton attention implementation."""
    AttentionInterface.register(NAME, baton_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)


def no_mask(rows: int, device: torch.device) -> torch.Tensor:
    """A placeholder 4D mask: transformers returns a 4D mask as is, so no mask is built for baton steps."""
    return torch.ones(rows, 1, 1, 1, dtype=torch.bool, device=device)
