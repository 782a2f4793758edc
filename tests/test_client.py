"""BatonClient, AsyncBatonClient and `baton generate`, against the router's real gRPC servicer
(services/router/grpc_api.py) over the fake router core of test_http_api, served in-process by a grpc.aio
server on its own event loop thread; then the clients and the HTTP API through the real router core, decode
and prefill workers on the tiny Llama, all in this process."""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import grpc
import openai
import pytest
from transformers import PreTrainedTokenizerBase

from baton.client import AsyncBatonClient, BatonClient, BatonError, Chunk, Completion
from baton.engine.grammar import ResponseFormat
from baton.engine.models import LoadedModel
from baton.engine.request import SamplingParams
from baton.errors import Overloaded, Reason
from baton.generate import add_arguments
from baton.generate import main as generate_main
from baton.rpc.server import create_server
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc
from services.router.grpc_api import router_service
from tests.support.inproc import Loop, Stack, running_stack
from tests.support.oracle import reference
from tests.test_http_api import ANSWER, FakeRouter, answer_text, free_port, wait_for


class GrpcThread:
    """The router's gRPC service over a fake core, served on a Loop."""

    def __init__(self, router: FakeRouter) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self.loop = Loop()
        self.server: grpc.aio.Server = self.loop.run(self._start(router), 10)

    async def _start(self, router: FakeRouter) -> grpc.aio.Server:
        server, _ = create_server([router_service(cast(Any, router))], self.address)
        await server.start()
        return server

    def stop(self) -> None:
        self.loop.run(self.server.stop(0), 10)
        self.loop.close()


@pytest.fixture(scope="module")
def fake(tokenizer: PreTrainedTokenizerBase) -> FakeRouter:
    return FakeRouter(tokenizer)


@pytest.fixture(scope="module")
def address(fake: FakeRouter) -> Iterator[str]:
    server = GrpcThread(fake)
    yield server.address
    server.stop()


@pytest.fixture
def router(fake: FakeRouter) -> Iterator[FakeRouter]:
    fake.reset()
    yield fake
    fake.reset()


@pytest.fixture
def client(address: str) -> Iterator[BatonClient]:
    with BatonClient(address, timeout=20) as c:
        yield c


# ---- BatonClient -----------------------------------------------------------------------------------------
def test_generate(client: BatonClient, router: FakeRouter) -> None:
    c = client.generate("Hello there", max_new_tokens=4, request_id="r-1")
    prompt_ids = router.encode_prompt("Hello there")
    assert c == Completion(answer_text(router, 4), router.answer_ids()[:4], "length", len(prompt_ids), 4, "r-1")
    (call,) = router.calls
    assert call.request_id == "r-1" and call.prompt_ids == prompt_ids


def test_token_ids_and_sampling(client: BatonClient, router: FakeRouter) -> None:
    c = client.generate([5, 6, 7], max_new_tokens=100, temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.1,
                        seed=11, stop="zzz", stop_token_ids=[9], ignore_eos=False)
    assert c.text == ANSWER and c.finish_reason == "stop" and c.prompt_tokens == 3
    (call,) = router.calls
    assert call.prompt_ids == [5, 6, 7] and call.request_id  # made up by the router
    assert call.params == SamplingParams(max_new_tokens=100, temperature=0.7, top_p=0.9, top_k=40,
                                         repetition_penalty=1.1, seed=11, stop=("zzz",), stop_token_ids=(9,))


def test_stream(client: BatonClient, router: FakeRouter) -> None:
    chunks = list(client.stream("Hi", max_new_tokens=100))
    assert "".join(c.text for c in chunks) == ANSWER
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    n = len(router.answer_ids())
    assert chunks[-1] == Chunk(chunks[-1].text, chunks[-1].token_ids, "stop", len(router.encode_prompt("Hi")), n)
    assert [t for c in chunks for t in c.token_ids] == router.answer_ids()


def test_leaving_a_stream_cancels(client: BatonClient, router: FakeRouter) -> None:
    router.delay = 0.02
    stream = client.stream("Hi", max_new_tokens=500, ignore_eos=True)
    assert next(stream).token_ids
    stream.close()  # what a `break` out of the loop does once the iterator is dropped
    wait_for(lambda: router.cancelled == [router.calls[0].request_id])


def test_local_validation(client: BatonClient, router: FakeRouter) -> None:
    with pytest.raises(BatonError, match="temperature") as e:
        client.generate("x", temperature=-1)
    assert e.value.code is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(BatonError, match="prompt"):
        client.stream([1, -2])
    with pytest.raises(TypeError):
        client.generate("x", nucleus=0.5)
    assert not router.calls


def test_server_errors(client: BatonClient, router: FakeRouter) -> None:
    with pytest.raises(BatonError, match="max_new_tokens") as e:
        client.generate("x", max_new_tokens=10_000)  # over the fake's context
    assert e.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert (e.value.reason, e.value.field) == (Reason.INVALID_REQUEST, "max_new_tokens")
    router.fail = Overloaded("the queue is full", retry_after_s=1)
    with pytest.raises(BatonError, match="the queue is full") as e:
        list(client.stream("x"))
    assert e.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (e.value.reason, e.value.retry_after_s) == (Reason.OVERLOADED, 1.0)
    router.fail, router.fail_after = None, 2
    texts = []
    with pytest.raises(BatonError, match="worker exploded") as e:
        for chunk in client.stream("x", max_new_tokens=10):
            texts.append(chunk.text)
    assert e.value.code is grpc.StatusCode.INTERNAL and "".join(texts) == answer_text(router, 2)


def test_model_names(client: BatonClient, router: FakeRouter) -> None:
    assert client.generate("x", model="m", max_new_tokens=2).completion_tokens == 2  # a served alias
    assert client.generate("x", model="fake-model", max_new_tokens=2).completion_tokens == 2
    assert len(router.calls) == 2
    with pytest.raises(BatonError, match="The model `nope` does not exist") as e:
        client.generate("x", model="nope")
    assert (e.value.code, e.value.reason) == (grpc.StatusCode.NOT_FOUND, Reason.MODEL_NOT_FOUND)
    with pytest.raises(BatonError) as e:
        list(client.stream("x", model="nope"))
    assert (e.value.code, e.value.reason) == (grpc.StatusCode.NOT_FOUND, Reason.MODEL_NOT_FOUND)
    assert len(router.calls) == 2


def test_unreachable() -> None:
    with BatonClient(f"127.0.0.1:{free_port()}", timeout=10) as c, pytest.raises(BatonError) as e:
        c.generate("x")
    assert e.value.code is grpc.StatusCode.UNAVAILABLE


# ---- AsyncBatonClient ------------------------------------------------------------------------------------
def test_async_client(address: str, router: FakeRouter) -> None:
    async def go() -> None:
        async with AsyncBatonClient(address, timeout=20) as c:
            whole = await c.generate("Hi", max_new_tokens=6)
            assert whole.text == answer_text(router, 6) and whole.finish_reason == "length"
            chunks = [chunk async for chunk in c.stream("Hi", max_new_tokens=6)]
            assert "".join(ch.text for ch in chunks) == whole.text and chunks[-1].completion_tokens == 6
            with pytest.raises(BatonError) as e:
                await c.generate("x", max_new_tokens=10_000)
            assert e.value.code is grpc.StatusCode.INVALID_ARGUMENT
            router.delay = 0.02
            stream = c.stream("Hi", max_new_tokens=500, ignore_eos=True)
            async for _ in stream:
                break
            await stream.aclose()

    asyncio.run(go())
    wait_for(lambda: router.cancelled == [router.calls[-1].request_id])


# ---- baton generate --------------------------------------------------------------------------------------
def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-v", "--verbose", action="store_true")
    add_arguments(parser)
    return generate_main(parser.parse_args(argv))


@pytest.mark.parametrize("stream", [[], ["--stream"]])
def test_cli(address: str, router: FakeRouter, capsys: pytest.CaptureFixture[str], stream: list[str]) -> None:
    assert run_cli(["Hello", "--url", address, "--max-new-tokens", "5", "--seed", "3", *stream]) == 0
    assert capsys.readouterr().out == answer_text(router, 5) + "\n"
    assert router.calls[0].params == SamplingParams(max_new_tokens=5, seed=3)


def test_cli_errors(address: str, router: FakeRouter, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["Hello", "--url", address, "--temperature", "-2"]) == 1
    assert "invalid request: temperature" in capsys.readouterr().err
    assert run_cli(["Hello", "--url", address, "--model-name", "nope"]) == 1
    assert "unknown model" in capsys.readouterr().err
    assert run_cli(["Hello", "--url", address, "--model-name", "m", "--max-new-tokens", "2"]) == 0
    port = free_port()
    assert run_cli(["Hello", "--url", f"127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach Baton at 127.0.0.1:{port}" in err and "baton serve" in err


@pytest.mark.parametrize("stream", [[], ["--stream"]])
def test_cli_chat(address: str, router: FakeRouter, capsys: pytest.CaptureFixture[str], stream: list[str]) -> None:
    assert run_cli(["-v", "Hi!", "--chat", "--url", address, "--max-new-tokens", "3", *stream]) == 0
    out = capsys.readouterr()
    assert out.out == answer_text(router, 3) + "\n" and "3 completion tokens" in out.err
    assert router.calls[0].prompt_ids == router.encode_chat([{"role": "user", "content": "Hi!"}])
    router.reset()
    assert run_cli(["Hi!", "--chat", "--url", address, "--max-new-tokens", "0", *stream]) == 1
    assert "invalid request: max_new_tokens" in capsys.readouterr().err
    assert run_cli(["Hi!", "--chat", "--url", address, "--model-name", "nope", *stream]) == 1
    assert "unknown model" in capsys.readouterr().err and not router.calls
    assert run_cli(["Hi!", "--chat", "--url", f"127.0.0.1:{free_port()}"]) == 1
    assert "cannot reach Baton" in capsys.readouterr().err


def test_cli_controls_reach_the_router(address: str, router: FakeRouter, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    schema = tmp_path / "s.json"
    schema.write_text('{"type": "object", "properties": {"a": {"type": "integer"}}}')
    assert run_cli(["Hi", "--url", address, "--json-schema", str(schema), "--presence-penalty", "0.5",
                    "--min-tokens", "2", "--logprobs", "2", "--max-new-tokens", "4"]) == 0
    p = router.calls[0].params
    assert p.response_format == ResponseFormat.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}})
    assert (p.presence_penalty, p.min_tokens, p.logprobs) == (0.5, 2, 2)
    schema.write_text('{"type": "wat"}')
    assert run_cli(["Hi", "--url", address, "--json-schema", str(schema)]) == 1
    assert "invalid request: response_format" in capsys.readouterr().err


# ---- the real router core, workers and model, all in this process --------------------------------------------
@pytest.fixture(scope="module")
def stack(tokenizer: PreTrainedTokenizerBase) -> Iterator[Stack]:
    """Decode and prefill workers on the tiny Llama, the real router core, its gRPC and HTTP APIs, on one event
    loop (tests/support/inproc.py)."""
    with running_stack(tokenizer) as s:
        yield s



def test_real_stack(stack: Stack, tiny_llama: LoadedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    prompt = "The quick brown fox"
    want = reference(tiny_llama, list(tokenizer.encode(prompt)), 8)
    want_text = tokenizer.decode(want, skip_special_tokens=True)
    with BatonClient(stack.grpc, timeout=60) as c:
        done = c.generate(prompt, max_new_tokens=8, ignore_eos=True)
        assert done.token_ids == want and done.text == want_text and done.finish_reason == "length"
        chunks = list(c.stream(prompt, max_new_tokens=8, ignore_eos=True))
        assert [t for ch in chunks for t in ch.token_ids] == want and "".join(ch.text for ch in chunks) == want_text

    with openai.OpenAI(base_url=f"{stack.http}/v1", api_key="x", max_retries=0, timeout=60) as oa:
        assert oa.models.list().data[0].id == "tiny-llama"
        r = oa.completions.create(model="tiny-llama", prompt=prompt, max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
        assert r.choices[0].text == want_text and r.usage is not None and r.usage.completion_tokens == 8
        messages: Any = [{"role": "user", "content": "Hi"}]
        chat_ids = list(tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                       tokenize=False), add_special_tokens=False))
        want_chat = tokenizer.decode(reference(tiny_llama, chat_ids, 6), skip_special_tokens=True)
        stream = oa.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=6, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
        assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == want_chat
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            oa.completions.create(model="tiny-llama", prompt=prompt, max_tokens=5000)
        with pytest.raises(openai.NotFoundError) as e:  # the router serves "tiny-llama" alone
            oa.completions.create(model="nope", prompt=prompt, max_tokens=5)
        assert e.value.code == "model_not_found"
    with grpc.insecure_channel(stack.grpc) as ch, pytest.raises(grpc.RpcError) as rpc:
        baton_pb2_grpc.RouterStub(ch).Generate(pb.GenerateRequest(text=prompt, model="nope"), timeout=60)
    assert rpc.value.code() is grpc.StatusCode.NOT_FOUND and "`nope`" in (rpc.value.details() or "")
    with BatonClient(stack.grpc, timeout=60) as c:
        assert c.generate(prompt, model="tiny-llama", max_new_tokens=8, ignore_eos=True).token_ids == want

    # an HTTP client that goes away frees its decode row
    url = urlsplit(stack.http)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=60)
    body = {"prompt": prompt, "max_tokens": 900, "ignore_eos": True, "stream": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: {")

    def active_rows() -> int:
        return stack.loop.call(lambda: stack.decode.occupancy().active_rows)

    assert active_rows() == 1
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_for(lambda: active_rows() == 0, timeout=20)
