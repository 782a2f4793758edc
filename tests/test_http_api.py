"""The router's OpenAI-compatible HTTP API, served by uvicorn on a free port over a fake router core, and
driven by the official `openai` client and by raw HTTP."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import openai
import pytest
import uvicorn
from transformers import PreTrainedTokenizerBase

from baton.engine.request import FinishReason, SamplingParams
from baton.engine.spec import ModelSpec
from baton.errors import InvalidRequestError, Overloaded, Unavailable
from baton.serve import free_port
from services.router.core import chat_roles
from services.router.http_api import CHAT_DEFAULT_MAX_TOKENS, create_app
from services.router.served import ServedModels
from services.router.text import Delta, TokenTexts
from tests.conftest import TINY_SPEC
from tests.support.oracle import wait_for

ANSWER = " the quick brown fox jumps over the lazy dog."


@dataclass
class Call:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class FakeRouter:
    """The router core's API (services.router.core.Router) without workers: every prompt is answered with the
    tokens of ANSWER, then EOS (or ANSWER again with ignore_eos), one event per token, `delay` seconds apart.

    Knobs: `fail` is raised before the first event, `fail_after` after that many tokens. Records every call and
    the ids whose generator was closed before it finished (the client went away)."""

    tokenizer: PreTrainedTokenizerBase
    served: ServedModels = ServedModels(("fake-model", "m"))  # "m": an alias, the name most tests here give
    spec: ModelSpec = replace(TINY_SPEC, max_context=512)
    delay: float = 0.0
    fail: Exception | None = None
    fail_after: int | None = None
    calls: list[Call] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)

    def reset(self) -> None:
        self.delay, self.fail, self.fail_after = 0.0, None, None
        self.calls.clear()
        self.cancelled.clear()

    @property
    def token_texts(self) -> TokenTexts:
        return TokenTexts(self.tokenizer)

    def encode_prompt(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(chat_roles(messages), add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def answer_ids(self) -> list[int]:
        return list(self.tokenizer.encode(ANSWER))

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, timeout: float | None = None,
        n: int = 1,
    ) -> AsyncIterator[Delta]:
        self.calls.append(Call(request_id, prompt_ids, params))
        if self.fail is not None:
            raise self.fail
        if not prompt_ids:
            raise InvalidRequestError("prompt", "must not be empty")
        if len(prompt_ids) + params.max_new_tokens > self.spec.max_context:
            raise InvalidRequestError("max_new_tokens", "exceeds the context")
        answer, out, done = self.answer_ids(), list[int](), False
        try:
            while True:
                if self.delay:
                    await asyncio.sleep(self.delay)
                else:
                    await asyncio.sleep(0)
                if self.fail_after is not None and len(out) == self.fail_after:
                    raise RuntimeError("worker exploded")
                tok = answer[len(out) % len(answer)]
                before = self.tokenizer.decode(out)
                out.append(tok)
                text = self.tokenizer.decode(out)
                reason = None
                if len(out) >= params.max_new_tokens:
                    reason = FinishReason.LENGTH
                if len(out) == len(answer) and not params.ignore_eos:
                    reason = FinishReason.STOP
                if reason is None:
                    yield Delta([tok], text[len(before):])
                else:
                    done = True
                    yield Delta([tok], text[len(before):], reason, len(prompt_ids), len(out))
                    return
        finally:
            if not done:
                self.cancelled.append(request_id)




@dataclass
class Served:
    host: str
    port: int

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"


def serve(app: Any, **config: Any) -> Generator[Served, None, None]:
    """Run `app` with uvicorn in a background thread until the generator is closed (`config`: more of
    uvicorn.Config's settings)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                                           **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield Served("127.0.0.1", port)
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def fake(tokenizer: PreTrainedTokenizerBase) -> FakeRouter:
    return FakeRouter(tokenizer)


@pytest.fixture(scope="module")
def server(fake: FakeRouter) -> Iterator[Served]:
    yield from serve(create_app(fake, max_body_bytes=64 << 10))


@pytest.fixture
def router(fake: FakeRouter) -> Iterator[FakeRouter]:
    fake.reset()
    yield fake
    fake.reset()


@pytest.fixture
def client(server: Served) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=20) as c:
        yield c


def request(
    server: Served, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    """A raw HTTP call: (status, headers, JSON body or text)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=20)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read().decode()
        try:
            parsed: Any = json.loads(raw)
        except json.JSONDecodeError:
            parsed = raw
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, parsed
    finally:
        conn.close()


def answer_text(router: FakeRouter, n: int) -> str:
    ids = (router.answer_ids() * 3)[:n]
    return str(router.tokenizer.decode(ids))



# ---- the openai client, unchanged ----------------------------------------------------------------------
def test_models_and_health(server: Served, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["fake-model", "m"]
    assert request(server, "GET", "/health")[:3:2] == (200, {"status": "ok"})
    assert request(server, "HEAD", "/health")[0] == 200  # some health checkers send HEAD


def test_a_refusal_never_echoes_a_whole_input_back(server: Served, router: FakeRouter) -> None:
    bias = {str(t): 5 for t in range(2000)}
    err = error_of(server, "/v1/completions", {"model": "m", "prompt": "a", "logit_bias": bias})
    assert err["param"] == "logit_bias" and len(err["message"]) < 200
    err = error_of(server, "/v1/completions", {"model": "m", "prompt": "a", "x" * 5000: 1})
    assert len(err["message"]) < 200 and len(err["param"]) <= 60


def test_completion(client: openai.OpenAI, router: FakeRouter) -> None:
    r = client.completions.create(model="fake-model", prompt="Hello there", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.model == "fake-model" and r.id.startswith("cmpl-")
    assert r.choices[0].text == answer_text(router, 5)
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None
    prompt_len = len(router.encode_prompt("Hello there"))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt_len, 5, prompt_len + 5)
    (call,) = router.calls
    assert call.request_id == r.id and call.prompt_ids == router.encode_prompt("Hello there")


def test_completion_stream(client: openai.OpenAI, router: FakeRouter) -> None:
    chunks = list(client.completions.create(model="m", prompt="Hi", max_tokens=50, stream=True,
                                            stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ANSWER
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(router.answer_ids())


def test_chat(client: openai.OpenAI, router: FakeRouter) -> None:
    messages: Any = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    r = client.chat.completions.create(model="m", messages=messages, max_completion_tokens=4, seed=3)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == answer_text(router, 4)
    assert r.choices[0].finish_reason == "length"
    (call,) = router.calls
    assert call.prompt_ids == router.encode_chat(messages)
    assert call.params.max_new_tokens == 4 and call.params.seed == 3


def test_chat_stream(client: openai.OpenAI, router: FakeRouter) -> None:
    chunks = list(client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ANSWER
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)
    # no max_tokens: the rest of the context (up to CHAT_DEFAULT_MAX_TOKENS, more than the fake's context)
    (call,) = router.calls
    assert call.params.max_new_tokens == router.spec.max_context - len(call.prompt_ids)


def test_chat_default_max_tokens_is_capped(client: openai.OpenAI, router: FakeRouter) -> None:
    router.spec = replace(router.spec, max_context=4096)
    try:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    finally:
        router.spec = replace(router.spec, max_context=512)
    assert router.calls[0].params.max_new_tokens == CHAT_DEFAULT_MAX_TOKENS


def test_sampling_fields(client: openai.OpenAI, router: FakeRouter) -> None:
    client.completions.create(model="m", prompt="a", max_tokens=3, temperature=0.5, top_p=0.9, seed=7,
                              stop=["xyz", "abc"], user="u", n=1,
                              extra_body={"top_k": 20, "repetition_penalty": 1.2, "ignore_eos": True,
                                          "stop_token_ids": [5], "metadata": {"a": 1}, "store": False})
    client.completions.create(model="m", prompt="a", stop="xyz")
    first, second = (c.params for c in router.calls)
    assert first == SamplingParams(max_new_tokens=3, temperature=0.5, top_p=0.9, top_k=20, repetition_penalty=1.2,
                                   seed=7, stop=("xyz", "abc"), stop_token_ids=(5,), ignore_eos=True)
    # OpenAI's defaults, not the engine's: temperature 1, 16 tokens
    assert second == SamplingParams(max_new_tokens=16, temperature=1.0, stop=("xyz",))


@pytest.mark.parametrize("prompt", [[10, 20, 30], [[10, 20, 30]]])
def test_token_id_prompt(client: openai.OpenAI, router: FakeRouter, prompt: Any) -> None:
    r = client.completions.create(model="m", prompt=prompt, max_tokens=2)
    assert router.calls[0].prompt_ids == [10, 20, 30]
    assert r.usage is not None and r.usage.prompt_tokens == 3


# ---- refusals, in OpenAI's error shape -------------------------------------------------------------------
def error_of(server: Served, path: str, body: Any, status: int = 400) -> dict[str, Any]:
    code, _, parsed = request(server, "POST", path, body)
    assert code == status, parsed
    assert set(parsed) == {"error"} and set(parsed["error"]) == {"message", "type", "param", "code"}
    assert parsed["error"]["message"]
    return dict(parsed["error"])


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "a", "n": 0}, "n"),
        ({"prompt": "a", "n": 17}, "n"),
        ({"prompt": "a", "echo": "yes"}, "echo"),
        ({"prompt": "a", "logprobs": 21}, "logprobs"),
        ({"prompt": "a", "logprobs": -1}, "logprobs"),
        ({"prompt": "a", "logprobs": "5"}, "logprobs"),
        ({"prompt": "a", "best_of": 3}, "best_of"),
        ({"prompt": "a", "presence_penalty": 2.5}, "presence_penalty"),
        ({"prompt": "a", "frequency_penalty": -3}, "frequency_penalty"),
        ({"prompt": "a", "logit_bias": {"x": 1}}, "logit_bias"),
        ({"prompt": "a", "logit_bias": {"5": 101}}, "logit_bias"),
        ({"prompt": "a", "logit_bias": {"5": "up"}}, "logit_bias"),
        ({"prompt": "a", "logit_bias": [5]}, "logit_bias"),
        ({"prompt": "a", "min_tokens": 17}, "min_tokens"),
        ({"prompt": "a", "min_tokens": -1}, "min_tokens"),
        ({"prompt": ["a", ""]}, "prompt[1]"),
        ({"prompt": ["a", [1, -2]]}, "prompt[1]"),
        ({"prompt": ["a"] * 65}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, "x"]}, "prompt"),
        ({"prompt": [-1, 2]}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "a", "temperature": "hot"}, "temperature"),
        ({"prompt": "a", "temperature": 500}, "temperature"),
        ({"prompt": "a", "top_p": 0}, "top_p"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "a", "max_tokens": True}, "max_tokens"),
        ({"prompt": "a", "max_tokens": 100000}, "max_tokens"),
        ({"prompt": "a", "stop": [1]}, "stop"),
        ({"prompt": "a", "seed": -1}, "seed"),
        ({"prompt": "a", "stream": "yes"}, "stream"),
        ({"prompt": "a", "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
        ({"prompt": "a", "max_token": 5}, "max_token"),  # unknown fields are named, not ignored
    ],
)
def test_completion_refusals(server: Served, router: FakeRouter, body: dict[str, Any], param: str) -> None:
    err = error_of(server, "/v1/completions", {"model": "m", **body})
    assert err["param"] == param and err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "x"}, {"content": "y"}]}, "messages[1].role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
         "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": 1}, "logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "presence_penalty": -2.1}, "presence_penalty"),
        ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"1": -100.5}}, "logit_bias"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
        ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}}, "response_format"),
        ({"messages": [{"role": "user", "content": "x"}], "response_format": "json"}, "response_format"),
        ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}},
         "response_format"),
        ({"messages": [{"role": "user", "content": "x"}],
          "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}},
         "response_format"),
        ({"messages": [{"role": "user", "content": "x"}],
          "response_format": {"type": "json_object", "schema": {}}}, "response_format"),
        ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "max_completion_tokens"),
        ({"messages": [{"role": "user", "content": "x" * 3000}]}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "temprature": 0}, "temprature"),
    ],
)
def test_chat_refusals(server: Served, router: FakeRouter, body: dict[str, Any], param: str) -> None:
    err = error_of(server, "/v1/chat/completions", {"model": "m", **body})
    assert err["param"] == param


def test_harmless_fields_accepted(server: Served, router: FakeRouter) -> None:
    body = {"model": "m", "messages": [{"role": "developer", "content": "x", "name": "n"}], "max_tokens": 2, "n": 1,
            "logprobs": False, "user": "u", "store": False, "parallel_tool_calls": True, "tool_choice": "none",
            "response_format": {"type": "text"}, "frequency_penalty": 0, "stream": False}
    status, _, parsed = request(server, "POST", "/v1/chat/completions", body)
    assert status == 200, parsed
    assert router.calls[0].prompt_ids == router.encode_chat([{"role": "system", "content": "x"}])


def test_malformed_bodies(server: Served, router: FakeRouter) -> None:
    err = error_of(server, "/v1/completions", b'{"prompt": "a",')
    assert err["code"] == "invalid_json" and err["param"] is None
    assert error_of(server, "/v1/completions", b"[1, 2]")["param"] is None
    assert error_of(server, "/v1/completions", b"\xff\xfe")["type"] == "invalid_request_error"
    assert error_of(server, "/v1/nothing", {}, status=404)["type"] == "not_found_error"
    assert request(server, "GET", "/v1/completions")[0] == 405
    assert not router.calls


def test_body_limit(server: Served, router: FakeRouter) -> None:
    big = json.dumps({"model": "m", "prompt": "x" * (65 << 10)}).encode()
    err = error_of(server, "/v1/completions", big, status=413)
    assert err["code"] == "request_too_large"
    # no Content-Length: counted while reading
    conn = http.client.HTTPConnection(server.host, server.port, timeout=20)
    try:
        conn.request("POST", "/v1/completions", body=iter([big[:40000], big[40000:]]), encode_chunked=True,
                     headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
        resp = conn.getresponse()
        assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "request_too_large"
    finally:
        conn.close()
    assert not router.calls


# ---- served model names -------------------------------------------------------------------------------
def test_models_lists_every_served_name(server: Served) -> None:
    status, _, parsed = request(server, "GET", "/v1/models")
    assert status == 200 and parsed["object"] == "list"
    entry = {"object": "model", "created": 0, "owned_by": "baton", "max_model_len": 512}
    assert parsed["data"] == [{"id": "fake-model", **entry}, {"id": "m", **entry}]


def test_an_unknown_model_is_404_model_not_found(server: Served, client: openai.OpenAI, router: FakeRouter) -> None:
    messages: Any = [{"role": "user", "content": "x"}]
    for call in (lambda: client.completions.create(model="nope", prompt="a", max_tokens=2),
                 lambda: list(client.completions.create(model="nope", prompt="a", max_tokens=2, stream=True)),
                 lambda: client.chat.completions.create(model="nope", messages=messages, max_tokens=2),
                 lambda: list(client.chat.completions.create(model="nope", messages=messages, stream=True))):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert (e.value.status_code, e.value.code, e.value.param) == (404, "model_not_found", "model")
        assert isinstance(e.value.body, dict) and e.value.body["message"] == "The model `nope` does not exist."
    want = {"message": "The model `nope` does not exist.", "type": "invalid_request_error", "param": "model",
            "code": "model_not_found"}  # OpenAI's shape and code (vLLM's message)
    for path, body in (("/v1/completions", {"prompt": "a"}), ("/v1/chat/completions", {"messages": messages})):
        assert error_of(server, path, {"model": "nope", **body}, status=404) == want
        assert error_of(server, path, {"model": "Fake-Model", **body}, status=404)["code"] == "model_not_found"
    err = error_of(server, "/v1/completions", {"model": "x" * 5000 + "\n", "prompt": "a"}, status=404)
    assert len(err["message"]) < 100 and "\n" not in err["message"]  # a name is quoted cut short, on one line
    assert not router.calls


def test_every_served_name_and_none_are_served(server: Served, client: openai.OpenAI, router: FakeRouter) -> None:
    assert client.completions.create(model="m", prompt="a", max_tokens=2).model == "m"  # the name asked for
    chat = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert chat.model == "fake-model"
    chunks = list(client.completions.create(model="m", prompt="a", max_tokens=2, stream=True))
    assert chunks and {c.model for c in chunks} == {"m"}
    for body in ({"prompt": "a", "max_tokens": 2}, {"model": "", "prompt": "a", "max_tokens": 2}):
        status, _, parsed = request(server, "POST", "/v1/completions", body)  # no model: the model, first name
        assert status == 200 and parsed["model"] == "fake-model", parsed
    assert len(router.calls) == 5


# ---- errors from the core --------------------------------------------------------------------------------
def test_overloaded_is_429_with_retry_after(server: Served, client: openai.OpenAI, router: FakeRouter) -> None:
    router.fail = Overloaded("the queue is full", retry_after_s=2.5)
    status, headers, parsed = request(server, "POST", "/v1/completions", {"model": "m", "prompt": "a"})
    assert status == 429 and headers["retry-after"] == "3"
    assert parsed["error"]["type"] == "rate_limit_error" and "queue is full" in parsed["error"]["message"]
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True)


def test_unavailable_and_internal(server: Served, router: FakeRouter) -> None:
    router.fail = Unavailable("no decode worker is serving")
    assert error_of(server, "/v1/completions", {"prompt": "a"}, status=503)["message"] == "no decode worker is serving"
    router.fail = RuntimeError("boom")
    assert error_of(server, "/v1/completions", {"prompt": "a", "stream": True}, status=500)["type"] == "server_error"


def test_error_mid_stream(client: openai.OpenAI, router: FakeRouter) -> None:
    router.fail_after = 2
    texts = []
    with pytest.raises(openai.APIError, match="worker exploded"):
        for chunk in client.completions.create(model="m", prompt="a", max_tokens=10, stream=True):
            texts.append(chunk.choices[0].text)
    assert "".join(texts) == answer_text(router, 2)


# ---- a client that goes away cancels its request ---------------------------------------------------------
def test_disconnect_during_stream_cancels(server: Served, router: FakeRouter) -> None:
    router.delay = 0.05
    conn = http.client.HTTPConnection(server.host, server.port, timeout=20)
    body = {"model": "m", "prompt": "a", "max_tokens": 400, "ignore_eos": True, "stream": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type", "").startswith("text/event-stream")
    assert resp.readline().startswith(b"data: {")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_for(lambda: router.cancelled == [router.calls[0].request_id])


def test_disconnect_while_waiting_cancels(server: Served, router: FakeRouter) -> None:
    router.delay = 0.05
    conn = http.client.HTTPConnection(server.host, server.port, timeout=20)
    body = {"model": "m", "prompt": "a", "max_tokens": 400, "ignore_eos": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    wait_for(lambda: bool(router.calls))
    time.sleep(0.2)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_for(lambda: router.cancelled == [router.calls[0].request_id])


def test_raw_sse_format(server: Served, router: FakeRouter) -> None:
    status, headers, text = request(server, "POST", "/v1/chat/completions",
                                    {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["choices"][0]["delta"] == {}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == answer_text(router, 3)
