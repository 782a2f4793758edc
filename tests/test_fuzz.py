"""Bad input never crashes anything and never affects other requests: generated junk (hypothesis, bounded and
derandomized) at every entry point of a whole stack running in this process (tests/support/inproc.py): the router's
HTTP API (JSON of every shape, raw bytes), its gRPC API (junk messages, raw bytes, other message types), and a
decode worker's PushKv and Decode. Every answer is a success or a refusal with the right status and shape; after
each run the stack holds nothing and still serves a normal request correctly."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerBase

from baton.engine.models import LoadedModel
from baton.engine.request import Request, SamplingParams
from baton.engine.runner import ModelRunner
from baton.rpc.kv_transfer import payload_messages
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc
from tests.support.inproc import Stack, running_stack

FUZZ = settings(max_examples=40, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROMPT = [5, 17, 300, 4000, 42]


@pytest.fixture(scope="module")
def stack(tokenizer: PreTrainedTokenizerBase) -> Iterator[Stack]:
    with running_stack(tokenizer) as s:
        yield s


@pytest.fixture(scope="module")
def expected(tiny_llama: LoadedModel) -> list[int]:
    """Greedy tokens of PROMPT from transformers' own generate() (the stack's models have the same weights)."""
    out = tiny_llama.model.generate(torch.tensor([PROMPT]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                    pad_token_id=0)
    return list(out[0, len(PROMPT):].tolist())


def still_serves(stack: Stack, expected: list[int], tokenizer: PreTrainedTokenizerBase) -> None:
    """Nothing is left behind by what came before, and a normal request gets the right answer on both APIs."""
    stack.wait_idle()
    with grpc.insecure_channel(stack.grpc) as ch:
        params = pb.SamplingParameters(max_new_tokens=6, ignore_eos=True)
        reply = baton_pb2_grpc.RouterStub(ch).Generate(
            pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), parameters=params), timeout=30)
    assert list(reply.token_ids) == expected
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{stack.http}/v1/completions", json=body, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == tokenizer.decode(expected,
                                                                                        skip_special_tokens=True)
    stack.wait_idle()


# ---- HTTP ------------------------------------------------------------------------------------------------
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=6)
VOCAB_IDS = st.integers(0, 49151)


def mostly(valid: st.SearchStrategy[Any], junk: st.SearchStrategy[Any] = JSON, one_in: int = 6) -> Any:
    """`valid`, but `junk` one time in `one_in`: a request has a few bad fields at most, so a good share of the
    requests are served and the checks past the first one are reached too."""
    return st.integers(1, one_in).flatmap(lambda i: junk if i == 1 else valid)


# Any token count, but no long generation: counts in (6, 2000) would only make the run slow.
COUNT = mostly(st.integers(1, 6), st.integers(-3, 0) | st.integers(2000, 2**70)
               | JSON.filter(lambda v: not (type(v) is int and 6 < v < 2000)))
SAMPLING = {
    "model": mostly(st.just("tiny-llama")),  # the in-process stack's model (junk: 400, or 404 for a name)
    "temperature": mostly(st.floats(0, 2), st.floats(-1, 200) | JSON),
    "top_p": mostly(st.floats(0.05, 1), st.floats(-0.5, 1.5) | JSON),
    "top_k": mostly(st.integers(-1, 50), st.integers(-2, 2**40) | JSON),
    "repetition_penalty": mostly(st.floats(0.5, 2), st.floats(-1, 20) | JSON),
    "seed": mostly(st.integers(0, 2**63 - 1), st.integers(-1, 2**65) | JSON),
    "stop": mostly(st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=3)),
    "stop_token_ids": mostly(st.lists(VOCAB_IDS, max_size=2), st.lists(st.integers(-1, 2**33), max_size=3) | JSON),
    "ignore_eos": mostly(st.booleans()),
    "stream": mostly(st.booleans()),
    "stream_options": mostly(st.fixed_dictionaries({"include_usage": mostly(st.booleans())})),
    "timeout": mostly(st.floats(5, 60), st.floats(-1, 0.05) | JSON),  # a short one ends the request: 504
    "n": mostly(st.just(1)),
    "logprobs": mostly(st.none()),
    "user": JSON,  # unknown fields are ignored, as OpenAI clients send many
}
COMPLETION = st.fixed_dictionaries(
    {"prompt": mostly(st.text(min_size=1, max_size=30) | st.lists(VOCAB_IDS, min_size=1, max_size=8),
                      JSON | st.lists(st.integers(-2, 2**33), max_size=8))},
    optional={"max_tokens": COUNT, **SAMPLING},
)
CONTENT = st.text(max_size=30) | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=9)}),
                                          max_size=2)
MESSAGE = st.fixed_dictionaries({"role": mostly(st.sampled_from(["user", "system", "assistant", "developer"])),
                                 "content": mostly(CONTENT)}, optional={"name": JSON})
CHAT = st.fixed_dictionaries(
    {"messages": mostly(st.lists(mostly(MESSAGE), min_size=1, max_size=3)),
     "max_tokens": COUNT.filter(lambda v: v is not None)},  # without one, chat generates ~1000 tokens
    optional=SAMPLING,
)
PATHS = st.sampled_from(["/v1/completions", "/v1/chat/completions"])
BODIES = st.one_of(st.tuples(st.just("/v1/completions"), COMPLETION), st.tuples(st.just("/v1/chat/completions"), CHAT),
                   st.tuples(PATHS, JSON))


def check_http(r: httpx.Response) -> None:
    """A success, or a refusal (400, 404 for a model not served, 413, or 504 for a timeout) in OpenAI's error
    shape; never a server error."""
    event(f"HTTP {r.status_code}")  # the spread of outcomes: pytest --hypothesis-show-statistics
    if r.status_code != 200:
        assert r.status_code in (400, 404, 413, 504), r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
        assert events[-1] == "[DONE]"
        for e in events[:-1]:
            error = json.loads(e).get("error")
            assert error is None or error["type"] == "timeout_error", e
    else:
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


@FUZZ
@given(path_body=BODIES)
def test_http_json_junk(stack: Stack, path_body: tuple[str, Any]) -> None:
    path, body = path_body
    content = json.dumps(body, allow_nan=True).encode()
    check_http(httpx.post(stack.http + path, content=content, headers={"Content-Type": "application/json"},
                          timeout=30))


@FUZZ
@given(path=PATHS,
       raw=st.binary(max_size=80) | st.builds(lambda a, b: a + b, st.sampled_from([b'{"prompt": "', b'{"messages": [']),
                                              st.binary(max_size=40)))
def test_http_raw_bytes(stack: Stack, path: str, raw: bytes) -> None:
    check_http(httpx.post(stack.http + path, content=raw, headers={"Content-Type": "application/json"}, timeout=30))


@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        ("/v1/completions", b'{"prompt": "\xff\xfe"}', None),  # invalid UTF-8
        ("/v1/completions", b'{"prompt": "\\ud800 x"}', "prompt"),  # a lone surrogate: valid JSON, not Unicode
        ("/v1/completions", b'{"prompt": "x", "stop": ["\\udfff"]}', "stop"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}',
         "messages"),
        ("/v1/completions", b'{"prompt": "x", "top_k": 4294967296}', "top_k"),
        ("/v1/completions", b'{"prompt": "x", "stop_token_ids": [49152]}', "stop_token_ids"),
        ("/v1/completions", b'{"prompt": "x", "timeout": 0}', "timeout"),
        ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', "temperature"),
        ("/v1/completions", b'{"prompt": "' + b"ab" * 30000 + b'"}', "prompt"),  # can never fit the context
    ],
)
def test_http_refusals_name_the_problem(stack: Stack, path: str, raw: bytes, param: str | None) -> None:
    r = httpx.post(stack.http + path, content=raw, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["message"]


def test_http_body_over_the_limit(stack: Stack) -> None:
    r = httpx.post(stack.http + "/v1/completions", content=b'{"prompt": "' + b"x" * (64 << 10) + b'"}', timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_http_after_the_junk(stack: Stack, expected: list[int], tokenizer: PreTrainedTokenizerBase) -> None:
    still_serves(stack, expected, tokenizer)


# ---- the router's gRPC API -------------------------------------------------------------------------------
OK_GRPC = (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED)
FLOAT32 = st.floats(width=32)  # NaN and infinities included


def _params(**kw: Any) -> pb.SamplingParameters:
    return pb.SamplingParameters(**{k: v for k, v in kw.items() if v is not None})


U32, U64 = st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)
PARAMS = st.builds(
    _params,
    max_new_tokens=mostly(st.none() | st.integers(1, 6), st.just(0) | st.integers(1025, 2**32 - 1), 20),
    temperature=mostly(st.none() | st.floats(0, 2, width=32), FLOAT32, 20),
    top_p=mostly(st.none() | st.floats(0.125, 1, width=32), FLOAT32, 20),
    repetition_penalty=mostly(st.none() | st.floats(0.5, 2, width=32), FLOAT32, 20),
    top_k=mostly(st.none() | st.integers(0, 50), U32, 20), seed=mostly(st.none() | st.integers(0, 2**63 - 1), U64, 20),
    stop=st.lists(mostly(st.text(min_size=1, max_size=4), st.just(""), 20), max_size=3),
    stop_token_ids=st.lists(mostly(VOCAB_IDS, U32, 20), max_size=3),
    ignore_eos=st.booleans(),
)


def _generate_request(request_id: str, prompt: str | list[int] | None, params: pb.SamplingParameters | None,
                      timeout: float) -> pb.GenerateRequest:
    req = pb.GenerateRequest(request_id=request_id, timeout=timeout)
    if params is not None:
        req.parameters.CopyFrom(params)
    if isinstance(prompt, str):
        req.text = prompt
    elif prompt is not None:
        req.token_ids.ids.extend(prompt)
    return req


GENERATE = st.builds(
    _generate_request,
    request_id=mostly(st.text(max_size=8), st.text(min_size=250, max_size=300)),
    prompt=mostly(st.text(min_size=1, max_size=40) | st.lists(VOCAB_IDS, min_size=1, max_size=10),
                  st.none() | st.just("") | st.lists(U32, max_size=10)),
    params=st.none() | PARAMS,
    timeout=mostly(st.just(0.0) | st.floats(5, 60), st.floats(-10, 1e-3) | st.floats(allow_nan=True)),
)
OTHER_MESSAGES = st.sampled_from([
    pb.PushKvRequest(header=pb.KvHeader(request_id="x", num_layers=3, dtype="float32")),
    pb.OccupancyResponse(active_rows=5, model_fingerprint="z", kv_tokens_free=2**40),
    pb.DecodeRequest(request=pb.WorkerRequest(request_id="d", prompt_ids=[1, 2]), kv_timeout_seconds=1.5),
    pb.KvChunk(layer=1, offset=7, data=b"\x00" * 9),
]).map(lambda m: m.SerializeToString())


@FUZZ
@given(request=GENERATE, streaming=st.booleans())
def test_grpc_junk_messages(stack: Stack, request: pb.GenerateRequest, streaming: bool) -> None:
    with grpc.insecure_channel(stack.grpc) as ch:
        stub = baton_pb2_grpc.RouterStub(ch)
        try:
            if streaming:
                messages = list(stub.GenerateStream(request, timeout=30))
                assert messages[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
            else:
                assert stub.Generate(request, timeout=30).finish_reason != pb.FINISH_REASON_UNSPECIFIED
            event("OK")
        except grpc.RpcError as e:
            event(e.code().name)
            assert e.code() in OK_GRPC, e
            assert e.details()


@FUZZ
@given(raw=st.binary(max_size=120) | OTHER_MESSAGES | GENERATE.map(lambda m: m.SerializeToString()[:-1]),
       method=st.sampled_from(["Generate", "GenerateStream"]))
def test_grpc_raw_bytes(stack: Stack, raw: bytes, method: str) -> None:
    with grpc.insecure_channel(stack.grpc) as ch:
        path = f"/baton.v1.Router/{method}"
        call = ch.unary_unary(path) if method == "Generate" else ch.unary_stream(path)
        try:
            result = call(raw, timeout=30)
            if method == "GenerateStream":
                list(result)
            event("OK")
        except grpc.RpcError as e:
            event(e.code().name)
            assert e.code() in (*OK_GRPC, grpc.StatusCode.NOT_FOUND), e  # bytes naming a model (field 6) not served


def test_grpc_message_over_the_limit(stack: Stack) -> None:
    with grpc.insecure_channel(stack.grpc) as ch, pytest.raises(grpc.RpcError) as e:
        baton_pb2_grpc.RouterStub(ch).Generate(pb.GenerateRequest(text="x" * (64 << 10)), timeout=30)
    assert e.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_grpc_after_the_junk(stack: Stack, expected: list[int], tokenizer: PreTrainedTokenizerBase) -> None:
    still_serves(stack, expected, tokenizer)


# ---- a decode worker's PushKv and Decode -----------------------------------------------------------------
HEADER = st.builds(
    pb.KvHeader, request_id=st.sampled_from(["", "ghost", "r" * 300]), model_fingerprint=st.text(max_size=8),
    num_layers=U32 | st.just(2), kv_heads=U32 | st.just(2), head_dim=U32 | st.just(16), num_tokens=U32 | st.just(3),
    dtype=st.sampled_from(["float32", "bfloat16", "int8", ""]), prompt_ids=st.lists(U32, max_size=4),
    first_token=U32, total_bytes=U64 | st.integers(0, 4096), crc32=U32,
)
CHUNK = st.builds(pb.KvChunk, layer=U32, offset=U64 | st.integers(0, 64), data=st.binary(max_size=64))
PUSH = st.lists(st.one_of(HEADER.map(lambda h: pb.PushKvRequest(header=h)),
                          CHUNK.map(lambda c: pb.PushKvRequest(chunk=c)), st.just(pb.PushKvRequest())), max_size=4)


@FUZZ
@given(messages=PUSH | st.lists(st.binary(max_size=40), max_size=3))
def test_push_kv_junk(stack: Stack, messages: list[Any]) -> None:
    with grpc.insecure_channel(stack.decode_address) as ch:
        push = ch.stream_unary("/baton.v1.DecodeWorker/PushKv",
                               request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString())
        with pytest.raises(grpc.RpcError) as e:  # no reservation waits for any of it
            push(iter(messages), timeout=30)
    event(f"{e.value.code().name}: {e.value.details()[:30]}")
    assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), e.value


WORKER_REQUEST = st.builds(
    pb.WorkerRequest, request_id=mostly(st.text(min_size=1, max_size=6), st.just("")),
    prompt_ids=mostly(st.lists(VOCAB_IDS, min_size=1, max_size=5), st.lists(U32, max_size=5)), parameters=PARAMS,
)


@settings(FUZZ, max_examples=15)
@given(request=WORKER_REQUEST, kv_timeout=mostly(st.floats(10, 60), st.floats(allow_nan=True)))
def test_decode_junk(stack: Stack, request: pb.WorkerRequest, kv_timeout: float) -> None:
    """A reservation nobody sends KV for ends with its call (here at the client's deadline)."""
    with grpc.insecure_channel(stack.decode_address) as ch:
        call = baton_pb2_grpc.DecodeWorkerStub(ch).Decode(
            pb.DecodeRequest(request=request, kv_timeout_seconds=kv_timeout), timeout=0.3)
        with pytest.raises(grpc.RpcError) as e:
            list(call)
    event(f"{e.value.code().name}: {e.value.details()[:30]}")
    refusals = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert e.value.code() in refusals, e.value


VICTIM = [11, 12, 13]


@pytest.fixture(scope="module")
def victim(tiny_llama: LoadedModel) -> tuple[list[pb.PushKvRequest], list[int]]:
    """A real KV push for request "victim" (prompt VICTIM), and the tokens a decode worker makes from it."""
    req = Request("victim", VICTIM, SamplingParams(max_new_tokens=4, ignore_eos=True))
    good = list(payload_messages(ModelRunner(tiny_llama).prefill(req), chunk_bytes=512))
    out = tiny_llama.model.generate(torch.tensor([VICTIM]), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                    pad_token_id=0)
    return good, out[0, len(VICTIM):].tolist()


@contextlib.contextmanager
def reservation(stack: Stack) -> Iterator[tuple[baton_pb2_grpc.DecodeWorkerStub, Any]]:
    """A decode row reserved for "victim", waiting for its KV: the stub, and the Decode call that streams it."""
    with grpc.insecure_channel(stack.decode_address) as ch:
        stub = baton_pb2_grpc.DecodeWorkerStub(ch)
        wr = pb.WorkerRequest(request_id="victim", prompt_ids=VICTIM,
                              parameters=pb.SamplingParameters(max_new_tokens=4, ignore_eos=True))
        call = stub.Decode(pb.DecodeRequest(request=wr, kv_timeout_seconds=30), timeout=60)
        assert not next(call).token_ids  # the reservation is confirmed
        try:
            yield stub, call
        finally:
            call.cancel()


HEADER_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "request_id": st.sampled_from(["", "ghost", "r" * 300]), "model_fingerprint": st.text(max_size=8),
    "num_layers": U32, "kv_heads": U32, "head_dim": U32, "num_tokens": U32,
    "dtype": st.sampled_from(["float16", "bfloat16", "int8", ""]), "prompt_ids": st.lists(U32, max_size=4),
    "first_token": U32 | VOCAB_IDS, "total_bytes": U64 | st.integers(0, 4096), "crc32": U32,
}
MUTATIONS = ["header field", "flip", "truncate", "extend", "offset", "layer", "split", "drop", "duplicate", "swap",
             "empty"]


def mutate(messages: list[pb.PushKvRequest], data: st.DataObject) -> list[pb.PushKvRequest]:
    """One random change to a KV push: a header field, the bytes of a chunk, or the order of the messages."""
    out = [pb.PushKvRequest() for _ in messages]
    for copy, m in zip(out, messages):
        copy.CopyFrom(m)
    kind = data.draw(st.sampled_from(MUTATIONS))
    headers = [i for i, m in enumerate(out) if m.HasField("header")]
    chunks = [i for i, m in enumerate(out) if m.HasField("chunk") and m.chunk.data]
    pick = (lambda idx: out[data.draw(st.sampled_from(idx))]) if out else None
    if kind == "header field" and headers and pick:
        name = data.draw(st.sampled_from(sorted(HEADER_FIELDS)))
        h = pick(headers).header
        value = data.draw(HEADER_FIELDS[name])
        if name == "prompt_ids":
            del h.prompt_ids[:]
            h.prompt_ids.extend(value)
        else:
            setattr(h, name, value)
    elif kind in ("flip", "truncate", "extend", "offset", "layer", "split") and chunks and pick:
        i = data.draw(st.sampled_from(chunks))
        c = out[i].chunk
        at = data.draw(st.integers(0, len(c.data) - 1))
        if kind == "flip":
            c.data = c.data[:at] + bytes([c.data[at] ^ data.draw(st.integers(1, 255))]) + c.data[at + 1:]
        elif kind == "truncate":
            c.data = c.data[:at]
        elif kind == "extend":
            c.data += data.draw(st.binary(min_size=1, max_size=16))
        elif kind == "offset":
            c.offset = data.draw(U64 | st.integers(0, 4096))
        elif kind == "layer":
            c.layer = data.draw(U32)  # informative only: accepted
        else:  # split in two: still a good push
            rest = pb.PushKvRequest(chunk=pb.KvChunk(layer=c.layer, offset=c.offset + at, data=c.data[at:]))
            c.data = c.data[:at]
            out.insert(i + 1, rest)
    elif kind == "drop" and out:
        out.pop(data.draw(st.integers(0, len(out) - 1)))
    elif kind == "duplicate" and out:
        out.insert(data.draw(st.integers(0, len(out))), out[data.draw(st.integers(0, len(out) - 1))])
    elif kind == "swap" and len(out) > 1:
        i, j = data.draw(st.integers(0, len(out) - 1)), data.draw(st.integers(0, len(out) - 1))
        out[i], out[j] = out[j], out[i]
    elif kind == "empty":
        out.insert(data.draw(st.integers(0, len(out))), pb.PushKvRequest())
    return out


@FUZZ
@given(data=st.data())
def test_mutated_kv_for_a_reservation(stack: Stack, victim: tuple[list[pb.PushKvRequest], list[int]],
                                      data: st.DataObject) -> None:
    """A damaged push is refused and the reservation waits on for its real KV; one the changes left whole (a chunk
    split in two, say) is accepted. Either way the request then decodes."""
    good, expected = victim
    messages = good
    for _ in range(data.draw(st.integers(1, 3))):
        messages = mutate(messages, data)
    with reservation(stack) as (stub, call):
        try:
            stub.PushKv(iter(messages), timeout=30)
            accepted = True
        except grpc.RpcError as e:
            event(f"{e.code().name}: {e.details()[:24]}")
            assert e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), e
            accepted = False
            assert stub.PushKv(iter(good), timeout=30).received_bytes > 0
        tokens = [t for m in call for t in m.token_ids]
    if accepted:
        event("accepted")
        first = next(m.header.first_token for m in messages if m.HasField("header"))
        assert len(tokens) == 4 and tokens[0] == first
    else:
        assert tokens == expected
    stack.wait_idle()


def test_bad_kv_for_a_reservation_is_refused_and_the_reservation_survives(
    stack: Stack, victim: tuple[list[pb.PushKvRequest], list[int]]
) -> None:
    good, expected = victim
    header, data = good[0].header, b"".join(m.chunk.data for m in good[1:])

    def with_header(**changes: Any) -> list[pb.PushKvRequest]:
        h = pb.KvHeader()
        h.CopyFrom(header)
        for k, v in changes.items():
            if k == "prompt_ids":
                del h.prompt_ids[:]
                h.prompt_ids.extend(v)
            else:
                setattr(h, k, v)
        return [pb.PushKvRequest(header=h), *good[1:]]

    bad = {
        "fingerprint": with_header(model_fingerprint="0" * 64),
        "layers": with_header(num_layers=header.num_layers + 1),
        "dtype name": with_header(dtype="int8"),
        "dtype size": with_header(dtype="float16"),
        "prompt": with_header(prompt_ids=[7, 7, 7]),
        "num_tokens": with_header(num_tokens=header.num_tokens + 1),
        "first token": with_header(first_token=2**32 - 1),
        "checksum": [good[0], pb.PushKvRequest(chunk=pb.KvChunk(data=bytes([data[0] ^ 1]) + data[1:]))],
        "truncated": [good[0], pb.PushKvRequest(chunk=pb.KvChunk(data=data[:-4]))],
        "too long": [good[0], pb.PushKvRequest(chunk=pb.KvChunk(data=data + b"\0" * 4))],
        "two headers": [good[0], *good],
        "no header": good[1:],
    }
    with reservation(stack) as (stub, call):
        for name, messages in bad.items():
            with pytest.raises(grpc.RpcError) as e:
                stub.PushKv(iter(messages), timeout=30)
            assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (name, e.value)
        assert stub.PushKv(iter(good), timeout=30).received_bytes > 0
        assert [t for m in call for t in m.token_ids] == expected


def test_workers_after_the_junk(stack: Stack, expected: list[int], tokenizer: PreTrainedTokenizerBase) -> None:
    still_serves(stack, expected, tokenizer)
