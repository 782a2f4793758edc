"""Engine behaviour: KV payloads, splicing KV prefilled elsewhere, stopping rules, cancel, validation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import torch

from baton.engine.engine import Engine
from baton.engine.kv_payload import KVPayload
from baton.engine.models import LoadedModel
from baton.engine.request import FinishReason, Request, SamplingParams
from baton.engine.runner import ModelRunner
from baton.errors import InvalidRequestError, PayloadError
from baton.rpc.kv_transfer import payload_from_messages, payload_messages
from baton.v1 import baton_pb2 as pb
from tests.conftest import TINY_SPEC, make_tiny_llama


def drain(engine: Engine) -> None:
    for _ in range(1000):
        if not engine.has_work():
            return
        engine.step()
    raise AssertionError("engine did not finish")


def wire(payload: KVPayload) -> KVPayload:
    """The payload sent and received as a KV push carries it (header, chunks)."""

    async def messages() -> AsyncIterator[pb.PushKvRequest]:
        for m in payload_messages(payload, chunk_bytes=100):
            yield m

    return asyncio.run(payload_from_messages(messages()))


def test_the_tiny_spec_is_the_tiny_llama(tiny_llama: LoadedModel) -> None:
    assert tiny_llama.spec == TINY_SPEC


def test_payload_round_trip(tiny_llama: LoadedModel) -> None:
    payload = ModelRunner(tiny_llama).prefill(Request("x", [5, 6, 7, 8], SamplingParams()))
    back = wire(payload)
    assert torch.equal(back.kv, payload.kv)
    assert (back.request_id, back.model_fingerprint, back.prompt_ids, back.first_token) == (
        "x",
        tiny_llama.fingerprint,
        [5, 6, 7, 8],
        payload.first_token,
    )
    assert (back.num_layers, back.kv_heads, back.num_tokens, back.head_dim) == (2, 2, 4, 16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_payload_round_trip_half(dtype: torch.dtype) -> None:
    p = KVPayload("h", "fp", [1, 2], 3, torch.randn(2, 2, 1, 2, 4).to(dtype))
    assert torch.equal(wire(p).kv, p.kv)


def test_the_wire_form_refuses_damage(tiny_llama: LoadedModel) -> None:
    """What the removed binary form's damage test covered, on the one wire form left (kv_transfer)."""
    msgs = list(payload_messages(ModelRunner(tiny_llama).prefill(Request("x", [5, 6, 7], SamplingParams())),
                                 chunk_bytes=1000))

    def received(messages: list[pb.PushKvRequest]) -> KVPayload:
        async def gen() -> AsyncIterator[pb.PushKvRequest]:
            for m in messages:
                yield m

        return asyncio.run(payload_from_messages(gen()))

    def header(**changes: object) -> pb.PushKvRequest:
        h = pb.KvHeader()
        h.CopyFrom(msgs[0].header)
        for k, v in changes.items():
            setattr(h, k, v)
        return pb.PushKvRequest(header=h)

    with pytest.raises(PayloadError, match="dtype"):
        received([header(dtype="int8"), *msgs[1:]])
    with pytest.raises(PayloadError, match="total_bytes"):
        received([header(total_bytes=msgs[0].header.total_bytes - 1), *msgs[1:]])
    with pytest.raises(PayloadError, match="num_tokens"):
        received([header(num_tokens=4), *msgs[1:]])
    with pytest.raises(PayloadError, match="before the header"):
        received(msgs[1:])
    with pytest.raises(PayloadError, match="truncated"):
        received(msgs[:-1])
    assert torch.equal(received(msgs).kv, wire(received(msgs)).kv)


def test_kv_prefilled_elsewhere_is_spliced_exactly(tiny_llama: LoadedModel) -> None:
    """A second process's prefill (here: another runner, through the wire form) splices into a running batch."""
    params = SamplingParams(max_new_tokens=9, ignore_eos=True)
    alone = Engine(tiny_llama)
    ref = Request("a", [11, 12, 13, 14, 15], params)
    alone.add_request(ref)
    drain(alone)

    engine = Engine(tiny_llama, max_batch=4)
    engine.add_request(Request("running", list(range(100, 140)), params))
    engine.step()
    engine.step()
    req = Request("a", [11, 12, 13, 14, 15], params)
    engine.add_prefilled(req, wire(ModelRunner(tiny_llama).prefill(req)))
    drain(engine)
    assert req.output_ids == ref.output_ids
    assert engine.stats.idle_rows == 0 and engine.stats.splices == 2


def test_foreign_kv_is_refused(tiny_llama: LoadedModel) -> None:
    other = make_tiny_llama(seed=1)
    req = Request("f", [1, 2, 3], SamplingParams())
    payload = ModelRunner(other).prefill(req)
    with pytest.raises(PayloadError, match="model"):
        Engine(tiny_llama).add_prefilled(req, payload)


def test_stop_rules(tiny_llama: LoadedModel) -> None:
    engine = Engine(tiny_llama)
    probe = Request("probe", [7, 8, 9], SamplingParams(max_new_tokens=6, ignore_eos=True))
    engine.add_request(probe)
    drain(engine)
    third = probe.output_ids[2]
    by_token = Request("tok", [7, 8, 9], SamplingParams(max_new_tokens=6, stop_token_ids=(third,), ignore_eos=True))
    by_len = Request("len", [7, 8, 9], SamplingParams(max_new_tokens=2, ignore_eos=True))
    text = str(tiny_llama.tokenizer.decode(probe.output_ids[:4]))  # type: ignore[union-attr]
    stop = text[-3:] if text.strip() else None
    by_str = Request("str", [7, 8, 9], SamplingParams(max_new_tokens=6, ignore_eos=True, stop=(stop,) if stop else ()))
    for r in (by_token, by_len, by_str):
        engine.add_request(r)
    drain(engine)
    assert by_token.output_ids == probe.output_ids[: probe.output_ids.index(third) + 1]
    assert by_token.finish_reason is FinishReason.STOP
    assert by_len.output_ids == probe.output_ids[:2] and by_len.finish_reason is FinishReason.LENGTH
    if stop:
        assert (
            by_str.finish_reason is FinishReason.STOP and by_str.stop_text is not None and stop not in by_str.stop_text
        )


def test_eos_stops_unless_ignored(tiny_llama: LoadedModel) -> None:
    engine = Engine(tiny_llama)
    probe = Request("p", [3, 4], SamplingParams(max_new_tokens=3, ignore_eos=True))
    engine.add_request(probe)
    drain(engine)
    engine.eos_ids = frozenset({probe.output_ids[1]})
    r = Request("e", [3, 4], SamplingParams(max_new_tokens=3))
    engine.add_request(r)
    drain(engine)
    assert r.output_ids == probe.output_ids[:2] and r.finish_reason is FinishReason.STOP


@pytest.mark.parametrize("policy", ["baton", "orca", "padded", "static"])
def test_cancel_frees_the_row(tiny_llama: LoadedModel, policy: str) -> None:
    engine = Engine(tiny_llama, policy=policy, max_batch=2)
    keep = Request("keep", [1, 2, 3], SamplingParams(max_new_tokens=20, ignore_eos=True))
    gone = Request("gone", [4, 5, 6], SamplingParams(max_new_tokens=20, ignore_eos=True))
    queued = Request("queued", [7, 8], SamplingParams(max_new_tokens=20, ignore_eos=True))
    for r in (keep, gone, queued):
        engine.add_request(r)
    engine.step()
    engine.step()
    assert engine.cancel("gone") and engine.cancel("queued")
    assert gone.finish_reason is FinishReason.CANCELLED and queued.finish_reason is FinishReason.CANCELLED
    assert [r.id for r in engine.batch.requests] == ["keep"]
    assert not engine.waiting
    n = len(gone.output_ids)
    drain(engine)
    assert len(gone.output_ids) == n and len(keep.output_ids) == 20
    assert not engine.cancel("nope")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -3}, "top_k"),
        ({"seed": -1}, "seed"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"stop": ("",)}, "stop"),
        ({"temperature": float("nan")}, "temperature"),
        ({"max_new_tokens": True}, "max_new_tokens"),
    ],
)
def test_invalid_params_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert e.value.field == field and field in str(e.value)


def test_engine_refuses_what_it_cannot_serve(tiny_llama: LoadedModel) -> None:
    engine = Engine(tiny_llama)
    with pytest.raises(InvalidRequestError, match="context"):
        engine.add_request(Request("long", [1] * 1000, SamplingParams(max_new_tokens=100)))
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        engine.add_request(Request("oov", [10**6], SamplingParams()))
    with pytest.raises(InvalidRequestError, match="prompt"):
        Request("empty", [], SamplingParams())
    with pytest.raises(ValueError, match="policy"):
        Engine(tiny_llama, policy="fifo")


def test_duplicate_active_id_is_refused(tiny_llama: LoadedModel) -> None:
    engine = Engine(tiny_llama)
    engine.add_request(Request("dup", [1, 2], SamplingParams(max_new_tokens=2)))
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request(Request("dup", [3, 4], SamplingParams(max_new_tokens=6)))
    drain(engine)
    engine.add_request(Request("dup", [3, 4], SamplingParams(max_new_tokens=6)))  # finished ids may be reused


def test_cpu_linear_layers_run_packed_for_onednn() -> None:
    """On a CPU in float32 every nn.Linear runs through oneDNN with its weight packed at load (cpu_gemm.py);
    `aten` keeps PyTorch's F.linear. Same model identity, same logits up to the last bits."""
    from torch import nn
    from transformers import AutoModelForCausalLM

    from baton.bench import shapes
    from baton.engine.cpu_gemm import CpuGemm, PackedLinear

    packed = make_tiny_llama()
    torch.manual_seed(0)  # the same random weights as make_tiny_llama's (shapes.build)
    with torch.device("cpu"):
        raw = AutoModelForCausalLM.from_config(shapes.config("tiny-llama"), dtype=torch.float32)
    plain = LoadedModel(raw, None, "tiny-llama", cpu_gemm=CpuGemm.ATEN)
    linears = sum(type(m) is nn.Linear for m in plain.model.modules())
    assert linears > 0 and sum(isinstance(m, PackedLinear) for m in packed.model.modules()) == linears
    assert not any(type(m) is nn.Linear for m in packed.model.modules())
    assert packed.fingerprint == plain.fingerprint
    ids = torch.randint(3, 2000, (2, 37), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        a, b = packed.model(input_ids=ids).logits, plain.model(input_ids=ids).logits  # [2, 37, vocab]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert torch.equal(a.argmax(-1), b.argmax(-1))
