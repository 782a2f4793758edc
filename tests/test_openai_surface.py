"""The OpenAI surface beyond plain text, through the whole stack (router, a prefill and a decode worker on the
tiny Llama, in this process), driven by the official `openai` client and by gRPC: logprobs in OpenAI's shapes
against transformers' own, echo and prompt scoring as evaluation harnesses send it, several prompts in one
request, penalties and biases; every prompt prefilled by the prefill worker (KV pushed) and, in the second
round, by the decode worker itself (local prefill)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import jsonschema
import openai
import pytest
from transformers import PreTrainedTokenizerBase

from baton.engine.models import LoadedModel
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc
from tests.support.inproc import Options, Stack, running_stack
from tests.support.oracle import LOGPROB_TOLERANCE, reference, reference_logprobs
from tests.test_sampling_controls import SCHEMAS

PROMPTS = [[5, 17, 300, 41, 9, 1200, 77], [901, 33, 4, 4, 18], [250, 251, 252, 253, 254, 255, 256, 257, 258]]


@pytest.fixture(scope="module", params=[0, 1 << 20], ids=["pushed-kv", "local-prefill"])
def stack(request: pytest.FixtureRequest, tokenizer: PreTrainedTokenizerBase) -> Iterator[Stack]:
    with running_stack(tokenizer, Options(local_prefill_tokens=request.param)) as s:
        yield s


@pytest.fixture
def client(stack: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=stack.http + "/v1", api_key="x", max_retries=0, timeout=60) as c:
        yield c


def near(a: float | None, b: float) -> bool:
    return a is not None and abs(a - b) < LOGPROB_TOLERANCE


def test_completion_logprobs_equal_transformers(stack: Stack, client: openai.OpenAI, tiny_llama: LoadedModel,
                                                tokenizer: PreTrainedTokenizerBase) -> None:
    prompt = PROMPTS[0]
    for stream in (False, True):
        if stream:
            chunks = list(client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=6, temperature=0,
                                                    logprobs=3, stream=True, extra_body={"ignore_eos": True}))
            parts = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
            tokens = [t for p in parts for t in p.tokens or []]
            lps = [x for p in parts for x in p.token_logprobs or []]
            tops = [x for p in parts for x in p.top_logprobs or []]
            offsets = [x for p in parts for x in p.text_offset or []]
        else:
            out = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=6, temperature=0,
                                            logprobs=3, extra_body={"ignore_eos": True})
            lp = out.choices[0].logprobs
            assert lp is not None
            tokens, lps, tops, offsets = lp.tokens or [], lp.token_logprobs or [], lp.top_logprobs or [], \
                lp.text_offset or []
        output = reference(tiny_llama, prompt, 6)
        dist = reference_logprobs(tiny_llama, prompt + output)
        assert len(tokens) == len(lps) == len(tops) == 6
        for i, tok in enumerate(output):
            d = dist[len(prompt) - 1 + i]
            assert near(lps[i], float(d[tok]))
            assert 3 <= len(tops[i]) <= 4  # the 3 most likely, and the chosen one always
            best = d.topk(3)
            for j in range(3):
                text = stack.router.token_texts.text(int(best.indices[j]))
                assert near(tops[i][text], float(best.values[j]))
        assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


def test_echo_scores_prompts_as_evaluation_harnesses_do(stack: Stack, tiny_llama: LoadedModel) -> None:
    """lm-evaluation-harness's local-completions loglikelihood request: token-id prompts in one request, echo,
    logprobs 1, max_tokens 1, temperature 0; it sums token_logprobs[ctxlen:-1] and checks greediness against
    top_logprobs. The same with max_tokens 0 (OpenAI's way to score without generating)."""
    contexts = [2, 3, 4]  # ctxlen of each prompt: the rest is the continuation scored
    for max_tokens in (1, 0):
        body = {"model": "tiny-llama", "prompt": PROMPTS, "echo": True, "logprobs": 1, "max_tokens": max_tokens,
                "temperature": 0, "seed": 1234}
        r = httpx.post(stack.http + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        out = r.json()
        choices = sorted(out["choices"], key=lambda c: c["index"])
        assert [c["index"] for c in choices] == [0, 1, 2]
        for choice, prompt, ctxlen in zip(choices, PROMPTS, contexts):
            lp = choice["logprobs"]
            assert len(lp["token_logprobs"]) == len(prompt) + max_tokens
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            end = len(prompt)  # the continuation: prompt[ctxlen:], whatever was generated after it
            score = sum(lp["token_logprobs"][ctxlen:end])
            greedy = all(tok == max(top.values())
                         for tok, top in zip(lp["token_logprobs"][ctxlen:end], lp["top_logprobs"][ctxlen:end]))
            dist = reference_logprobs(tiny_llama, prompt)
            want = sum(float(dist[i - 1, prompt[i]]) for i in range(ctxlen, len(prompt)))
            assert abs(score - want) < LOGPROB_TOLERANCE * len(prompt)
            assert greedy == all(int(dist[i - 1].argmax()) == prompt[i] for i in range(ctxlen, len(prompt)))
            if max_tokens == 0:  # the prompt alone, nothing generated
                assert choice["text"] == "".join(lp["tokens"]) and choice["finish_reason"] == "length"
        usage = out["usage"]
        assert usage["prompt_tokens"] == sum(map(len, PROMPTS)) and usage["completion_tokens"] == 3 * max_tokens


def test_several_prompts_stream_one_choice_each(client: openai.OpenAI, tiny_llama: LoadedModel) -> None:
    chunks = list(client.completions.create(model="tiny-llama", prompt=PROMPTS, max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    texts: dict[int, str] = {}
    finished = set()
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
            if ch.finish_reason:
                finished.add(ch.index)
    assert finished == {0, 1, 2}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 15
    for i, prompt in enumerate(PROMPTS):
        want = tiny_llama.tokenizer.decode(reference(tiny_llama, prompt, 5), skip_special_tokens=True)  # type: ignore[union-attr]
        assert texts[i] == want


def test_return_token_ids_gives_each_choices_tokens_as_vllm_does(stack: Stack, tiny_llama: LoadedModel) -> None:
    """vLLM's extension, which closed-loop benchmarks (the chat workload over --api openai) need: the answer's
    token ids, in every stream chunk as it goes and in the whole response, with the prompt's."""
    prompt = PROMPTS[0]
    want = reference(tiny_llama, prompt, 6)
    body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    whole = httpx.post(f"{stack.http}/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert whole["token_ids"] == want and whole["prompt_token_ids"] == prompt
    got: list[int] = []
    with httpx.stream("POST", f"{stack.http}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        chunks = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:") and "[DONE]" not in line]
    for i, c in enumerate(chunks):
        choice = c["choices"][0]
        got += choice.get("token_ids", [])
        assert ("prompt_token_ids" in choice) == (i == 0)
    assert got == want and chunks[0]["choices"][0]["prompt_token_ids"] == prompt
    chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    answer = httpx.post(f"{stack.http}/v1/chat/completions", json=chat, timeout=60).json()["choices"][0]
    prompt_ids = answer["prompt_token_ids"]
    assert answer["token_ids"] == reference(tiny_llama, prompt_ids, 4)


def test_chat_logprobs_parse_into_the_clients_types(stack: Stack, client: openai.OpenAI,
                                                    tiny_llama: LoadedModel) -> None:
    messages: Any = [{"role": "user", "content": "Name a colour."}]
    prompt = stack.router.encode_chat(messages)
    output = reference(tiny_llama, prompt, 5)
    dist = reference_logprobs(tiny_llama, prompt + output)
    whole = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=5, temperature=0,
                                           logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    assert whole.choices[0].logprobs is not None
    content = whole.choices[0].logprobs.content or []
    streamed = [e for c in client.chat.completions.create(
        model="tiny-llama", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2,
        stream=True, extra_body={"ignore_eos": True}) if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content or []]
    for entries in (content, streamed):
        assert len(entries) == 5
        for i, (e, tok) in enumerate(zip(entries, output)):
            d = dist[len(prompt) - 1 + i]
            assert near(e.logprob, float(d[tok]))
            assert bytes(e.bytes or []) == stack.router.token_texts.bytes(tok)
            assert [t.logprob for t in e.top_logprobs] == pytest.approx(d.topk(2).values.tolist(), abs=1e-4)


def test_penalties_and_biases_reach_the_workers(client: openai.OpenAI, tiny_llama: LoadedModel) -> None:
    out = client.completions.create(model="tiny-llama", prompt=PROMPTS[1], max_tokens=4, temperature=0,
                                    logit_bias={"42": 100}, extra_body={"ignore_eos": True})
    assert out.choices[0].text == tiny_llama.tokenizer.decode([42] * 4)  # type: ignore[union-attr]
    first = reference(tiny_llama, PROMPTS[1], 1)[0]
    held = client.completions.create(model="tiny-llama", prompt=PROMPTS[1], max_tokens=6, temperature=0,
                                     extra_body={"stop_token_ids": [first], "min_tokens": 3})
    assert held.usage is not None and held.usage.completion_tokens >= 3


# ---- gRPC ---------------------------------------------------------------------------------------------------
@pytest.fixture
def stub(stack: Stack) -> Iterator[baton_pb2_grpc.RouterStub]:
    with grpc.insecure_channel(stack.grpc) as ch:
        yield baton_pb2_grpc.RouterStub(ch)


def test_grpc_logprobs_and_prompt_logprobs(stub: baton_pb2_grpc.RouterStub, tiny_llama: LoadedModel) -> None:
    prompt = PROMPTS[2]
    params = pb.SamplingParameters(max_new_tokens=4, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    whole = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), parameters=params), timeout=60)
    streamed = list(stub.GenerateStream(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), parameters=params),
                                        timeout=60))
    dist = reference_logprobs(tiny_llama, prompt + list(whole.token_ids))
    for lps, plps in ((list(whole.logprobs), list(whole.prompt_logprobs)),
                      ([x for m in streamed for x in m.logprobs], [x for m in streamed for x in m.prompt_logprobs])):
        assert [x.chosen.token for x in lps] == list(whole.token_ids)
        for i, x in enumerate(lps):
            assert near(x.chosen.logprob, float(dist[len(prompt) - 1 + i, x.chosen.token]))
            assert len(x.top) == 2 and x.chosen.text
        assert [x.chosen.token for x in plps] == prompt[1:]
        for i, x in enumerate(plps):
            assert near(x.chosen.logprob, float(dist[i, prompt[i + 1]])) and len(x.top) == 1


def test_grpc_chat_messages(stack: Stack, stub: baton_pb2_grpc.RouterStub, tiny_llama: LoadedModel) -> None:
    msgs = pb.ChatMessages(messages=[pb.ChatMessage(role="developer", content="Be brief."),
                                     pb.ChatMessage(role="user", content="Hi")])
    out = stub.Generate(pb.GenerateRequest(messages=msgs, parameters=pb.SamplingParameters(max_new_tokens=3,
                                                                                           ignore_eos=True)))
    prompt = stack.router.encode_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert list(out.token_ids) == reference(tiny_llama, prompt, 3)
    assert out.usage.prompt_tokens == len(prompt)


@pytest.mark.parametrize(("params", "field"), [
    (pb.SamplingParameters(logprobs=21), "logprobs"),
    (pb.SamplingParameters(prompt_logprobs=30), "prompt_logprobs"),
    (pb.SamplingParameters(presence_penalty=2.5), "presence_penalty"),
    (pb.SamplingParameters(frequency_penalty=-9), "frequency_penalty"),
    (pb.SamplingParameters(logit_bias={7: 250.0}), "logit_bias"),
    (pb.SamplingParameters(logit_bias={10**9: 1.0}), "logit_bias"),
    (pb.SamplingParameters(max_new_tokens=4, min_tokens=5), "min_tokens"),
])
def test_grpc_bad_fields_are_invalid_argument_naming_them(stub: baton_pb2_grpc.RouterStub,
                                                          params: pb.SamplingParameters, field: str) -> None:
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6]), parameters=params), timeout=30)
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT and field in (e.value.details() or "")
    ok = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6]),
                                          parameters=pb.SamplingParameters(max_new_tokens=2)), timeout=30)
    assert len(ok.token_ids) >= 1  # and it still serves


def test_grpc_bad_chat_messages(stub: baton_pb2_grpc.RouterStub) -> None:
    for msgs, field in ((pb.ChatMessages(), "messages"),
                        (pb.ChatMessages(messages=[pb.ChatMessage(role="wizard", content="x")]), "messages[0].role")):
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(pb.GenerateRequest(messages=msgs), timeout=30)
        assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT and field in (e.value.details() or "")


def test_http_bad_logit_bias_token_is_400(stack: Stack) -> None:
    r = httpx.post(stack.http + "/v1/completions", json={"model": "tiny-llama", "prompt": [5, 6],
                                                         "logit_bias": {str(10**9): 1}}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"


# ---- structured output ------------------------------------------------------------------------------------
def test_fifty_json_schema_requests_over_five_schemas_all_validate(stack: Stack) -> None:
    """Concurrent, so constrained rows of different schemas (and free rows) share the decode batch."""

    async def run() -> list[tuple[int, dict[str, Any]]]:
        room = asyncio.Semaphore(12)  # within the router's queue of 16 (Options.max_queue)
        async with openai.AsyncOpenAI(base_url=stack.http + "/v1", api_key="x", max_retries=0, timeout=120) as c:
            async def one(i: int) -> tuple[int, dict[str, Any]]:
                async with room:
                    return await ask(c, i)

            async def ask(c: openai.AsyncOpenAI, i: int) -> tuple[int, dict[str, Any]]:
                schema = SCHEMAS[i % len(SCHEMAS)]
                if i % 10 == 9:  # a free row in the same batch
                    await c.completions.create(model="tiny-llama", prompt=[5, 6, i], max_tokens=8)
                    return i, {}
                out = await c.chat.completions.create(
                    model="tiny-llama", messages=[{"role": "user", "content": f"Reply in JSON, number {i}."}],
                    max_tokens=60, temperature=0.7, seed=i, stream=i % 2 == 0,
                    response_format={"type": "json_schema", "json_schema": {"name": f"s{i % 5}", "schema": schema}},
                )
                if i % 2 == 0:
                    text = "".join([ch.choices[0].delta.content or "" async for ch in out  # type: ignore[union-attr]
                                    if ch.choices])
                else:
                    text = out.choices[0].message.content or ""  # type: ignore[union-attr]
                return i, {"text": text}

            return list(await asyncio.gather(*(one(i) for i in range(55))))

    results = asyncio.run(run())
    checked = 0
    for i, got in results:
        if got:
            jsonschema.validate(json.loads(got["text"]), SCHEMAS[i % len(SCHEMAS)])
            checked += 1
    assert checked >= 50


def test_json_object_over_grpc(stub: baton_pb2_grpc.RouterStub) -> None:
    fmt = pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT)
    out = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]), parameters=pb.SamplingParameters(
        max_new_tokens=200, temperature=0.5, seed=3, response_format=fmt)), timeout=60)
    if out.finish_reason == pb.FINISH_REASON_STOP:
        assert isinstance(json.loads(out.text), dict)
    else:  # cut by max_new_tokens: still the start of an object
        assert out.text.startswith("{")


@pytest.mark.parametrize("fmt", [
    pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema="{not json"),
    pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema='{"type": "wat"}'),
    pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT, json_schema='{"type": "object"}'),
    pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_TEXT, json_schema='{"type": "object"}'),
    pb.ResponseFormat(type=7),  # type: ignore[arg-type]
])
def test_grpc_bad_response_format(stub: baton_pb2_grpc.RouterStub, fmt: pb.ResponseFormat) -> None:
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6]),
                                         parameters=pb.SamplingParameters(response_format=fmt)), timeout=30)
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "response_format" in (e.value.details() or "")


# ---- several choices ----------------------------------------------------------------------------------------
def test_n_choices_come_from_one_prefill_and_a_seed_fixes_them(stack: Stack, client: openai.OpenAI,
                                                               tiny_llama: LoadedModel) -> None:
    def ask() -> list[str]:
        out = client.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=6, n=4, temperature=1.0,
                                        seed=99, extra_body={"ignore_eos": True})
        assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
        assert out.usage is not None and out.usage.prompt_tokens == len(PROMPTS[0])
        assert out.usage.completion_tokens == 24
        return [c.text for c in sorted(out.choices, key=lambda c: c.index)]

    def prefilled() -> tuple[float, float, float]:  # the metrics that count prefills, on both workers
        return (stack.prefill.metrics.value("baton_prefill_requests_total", outcome="completed"),
                stack.prefill.metrics.value("baton_prefill_prompt_tokens_total"),
                stack.decode.metrics.value("baton_decode_local_prefills_total"))

    before = stack.loop.call(prefilled)
    alone = ask()
    after = stack.loop.call(prefilled)
    assert [a - b for a, b in zip(after, before)] == [1, len(PROMPTS[0]), 0]  # one prefill for the four choices
    assert len(set(alone)) > 1  # each choice sampled on its own

    async def crowded() -> list[str]:  # the same request while others share the decode batch
        async with openai.AsyncOpenAI(base_url=stack.http + "/v1", api_key="x", max_retries=0, timeout=60) as c:
            others = [c.completions.create(model="tiny-llama", prompt=p, max_tokens=12, temperature=0.5,
                                           extra_body={"ignore_eos": True}) for p in PROMPTS[1:]]
            mine = c.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=6, n=4, temperature=1.0,
                                        seed=99, extra_body={"ignore_eos": True})
            *_, out = await asyncio.gather(*others, mine)
            return [ch.text for ch in sorted(out.choices, key=lambda ch: ch.index)]

    assert asyncio.run(crowded()) == alone


def test_several_prompts_with_several_choices_stream(client: openai.OpenAI, tiny_llama: LoadedModel) -> None:
    chunks = list(client.completions.create(model="tiny-llama", prompt=PROMPTS[:2], max_tokens=4, n=2,
                                            temperature=0, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    texts: dict[int, str] = {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
    decode = tiny_llama.tokenizer.decode  # type: ignore[union-attr]
    greedy = [decode(reference(tiny_llama, p, 4), skip_special_tokens=True) for p in PROMPTS[:2]]
    assert texts == {0: greedy[0], 1: greedy[0], 2: greedy[1], 3: greedy[1]}  # greedy: choices agree
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16


def test_chat_n_choices(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=5, n=3, temperature=1.0, seed=5, logprobs=True)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    for c in out.choices:
        assert c.logprobs is not None and len(c.logprobs.content or []) == 5


def test_grpc_n_choices_and_echo(stub: baton_pb2_grpc.RouterStub, tiny_llama: LoadedModel) -> None:
    req = pb.GenerateRequest(text="Once upon a", n=3, echo=True, parameters=pb.SamplingParameters(
        max_new_tokens=4, temperature=1.0, seed=8, ignore_eos=True, logprobs=0))
    whole = stub.Generate(req, timeout=60)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert all(c.text.startswith("Once upon a") and len(c.token_ids) == 4 and len(c.logprobs) == 4
               for c in whole.choices)
    assert whole.usage.completion_tokens == 12 and whole.text == whole.choices[0].text
    streamed = list(stub.GenerateStream(req, timeout=60))
    by_index: dict[int, list[int]] = {}
    for m in streamed:
        by_index.setdefault(m.index, []).extend(m.token_ids)
    assert by_index == {c.index: list(c.token_ids) for c in whole.choices}  # seeded: the same choices
    assert streamed[-1].usage.completion_tokens == 12
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(pb.GenerateRequest(text="x", n=17), timeout=30)
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "n" in (e.value.details() or "")


@pytest.mark.parametrize(("path", "extra", "param"), [
    ("completions", {"logprobs": 21}, "logprobs"),
    ("completions", {"logprobs": "2"}, "logprobs"),
    ("completions", {"echo": 1}, "echo"),
    ("completions", {"max_tokens": 0}, "max_tokens"),  # 0 only with echo
    ("completions", {"n": 0}, "n"),
    ("completions", {"n": "2"}, "n"),
    ("completions", {"presence_penalty": 9}, "presence_penalty"),
    ("completions", {"frequency_penalty": "x"}, "frequency_penalty"),
    ("completions", {"logit_bias": {"7": 100.5}}, "logit_bias"),
    ("completions", {"logit_bias": {"seven": 1}}, "logit_bias"),
    ("completions", {"min_tokens": 99}, "min_tokens"),  # more than max_tokens
    ("completions", {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 3}}}},
     "response_format"),
    ("chat/completions", {"top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
    ("chat/completions", {"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ("chat/completions", {"logprobs": "yes"}, "logprobs"),
    ("chat/completions", {"n": 99}, "n"),
    ("chat/completions", {"response_format": {"type": "json_object", "json_schema": {}}}, "response_format"),
    ("chat/completions", {"min_tokens": -1}, "min_tokens"),
])
def test_http_bad_inputs_are_400_naming_the_field_and_it_still_serves(stack: Stack, path: str,
                                                                      extra: dict[str, Any], param: str) -> None:
    body: dict[str, Any] = {"model": "tiny-llama", "max_tokens": 4}
    body |= {"prompt": [5, 6, 7]} if path == "completions" else {"messages": [{"role": "user", "content": "x"}]}
    r = httpx.post(f"{stack.http}/v1/{path}", json=body | extra, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    ok = httpx.post(f"{stack.http}/v1/{path}", json=body, timeout=60)
    assert ok.status_code == 200, ok.text


def test_the_python_client_carries_choices_echo_chat_and_formats(stack: Stack, tiny_llama: LoadedModel) -> None:
    from baton.client import BatonClient

    with BatonClient(stack.grpc, timeout=60) as c:
        out = c.generate("Once upon a", n=2, echo=True, max_new_tokens=3, temperature=1.0, seed=4, logprobs=1,
                         ignore_eos=True)
        assert [ch.index for ch in out.choices] == [0, 1]
        assert all(ch.text.startswith("Once upon a") and len(ch.logprobs) == 3 for ch in out.choices)
        chunks = list(c.stream("Once upon a", n=2, max_new_tokens=3, temperature=1.0, seed=4, ignore_eos=True))
        assert {ch.index for ch in chunks} == {0, 1} and chunks[-1].completion_tokens == 6
        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                  "additionalProperties": False}
        j = c.generate([{"role": "user", "content": "ok?"}], max_new_tokens=20, presence_penalty=0.5,
                       logit_bias={5: -1.0}, response_format={"type": "json_schema",
                                                              "json_schema": {"name": "ok", "schema": schema}})
        jsonschema.validate(json.loads(j.text), schema)
