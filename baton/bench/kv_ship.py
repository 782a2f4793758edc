"""The cost of shipping one prompt's KV from a prefill worker to a decode worker, against its prefill.

Over the real path, on loopback in one process: a `DecodeWorker` behind its gRPC servicer (`decode_service`) on a
local port; for each prompt length, the prompt is prefilled (`ModelRunner.prefill`, timed), a row is reserved on
the worker, and the `KVPayload` is split into `PushKvRequest` messages (`kv_transfer.payload_messages`: header,
CRC-32, 2 MiB chunks: "serialize") and sent with `DecodeWorker.PushKv` ("push": the worker reassembles it,
checks length and CRC, checks it against the model and hands it to its reservation, where it waits to be spliced
at the next iteration boundary). The clock stops when PushKv returns; the splice and the request's one decode step
happen after, untimed. Client and server share one process and its cores, so on a machine with few cores this is
an upper bound of the time two processes would take.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

from baton.engine.kv_payload import KVPayload
from baton.engine.models import LoadedModel
from baton.engine.request import Request, SamplingParams
from baton.engine.runner import ModelRunner
from baton.rpc.kv_transfer import CHUNK_BYTES, payload_messages
from baton.rpc.server import channel, create_server
from baton.v1 import baton_pb2_grpc
from services.decode.server import decode_service
from services.decode.worker import DecodeWorker

TRANSPORT = "gRPC PushKv over loopback (client and decode worker in one process)"


def _sync(lm: LoadedModel) -> None:
    import torch

    if lm.device.type == "cuda":
        torch.cuda.synchronize()


def time_prefill(lm: LoadedModel, prompt: list[int], repeats: int) -> tuple[float, KVPayload]:
    """Median seconds of one prompt's prefill (after one untimed run), and its payload."""
    runner = ModelRunner(lm)
    times: list[float] = []
    payload: KVPayload | None = None
    for i in range(repeats + 1):
        req = Request(f"prefill{i}", prompt, SamplingParams(max_new_tokens=1, ignore_eos=True))
        t0 = time.perf_counter()
        payload = runner.prefill(req)
        _sync(lm)
        if i:
            times.append(time.perf_counter() - t0)
    assert payload is not None
    return statistics.median(times), payload


async def measure(lm: LoadedModel, prompt_lens: list[int], repeats: int, seed: int = 0) -> list[dict[str, Any]]:
    """One point per prompt length: KV bytes, prefill, serialize, push and their sum (ship), medians in ms."""
    from baton.serve import free_port

    worker = DecodeWorker(lm, "baton", max_batch=2, max_kv_tokens=2 * max(prompt_lens) + 16)
    worker.start()
    address = f"127.0.0.1:{free_port()}"
    server, _ = create_server([decode_service(worker)], address)
    await server.start()
    ch = channel(address)
    rng = random.Random(seed)
    vocab = int(lm.config.vocab_size)
    points = []
    try:
        stub = baton_pb2_grpc.DecodeWorkerStub(ch)
        for n in prompt_lens:
            prompt = [rng.randrange(vocab) for _ in range(n)]
            prefill_s, payload = time_prefill(lm, prompt, repeats)  # on this thread: its torch threads
            serialize, push = [], []
            for k in range(repeats + 1):  # the first is untimed
                rid = f"kv{n}-{k}"
                res = worker.reserve(Request(rid, prompt, SamplingParams(max_new_tokens=1, ignore_eos=True)))
                p = KVPayload(rid, payload.model_fingerprint, payload.prompt_ids, payload.first_token, payload.kv)
                t0 = time.perf_counter()
                messages = list(payload_messages(p))
                t1 = time.perf_counter()
                await stub.PushKv(iter(messages), timeout=120)
                t2 = time.perf_counter()
                async for _ in res.events():  # spliced and finished, outside the timed window
                    pass
                if k:
                    serialize.append(t1 - t0)
                    push.append(t2 - t1)
            ship = [a + b for a, b in zip(serialize, push)]
            med = statistics.median(ship)
            points.append({
                "prompt_tokens": n,
                "kv_bytes": payload.nbytes,
                "prefill_ms": 1e3 * prefill_s,
                "serialize_ms": 1e3 * statistics.median(serialize),
                "push_ms": 1e3 * statistics.median(push),
                "ship_ms": 1e3 * med,
                "ship_ms_max": 1e3 * max(ship),
                "ship_mb_per_s": payload.nbytes / 2**20 / med if med > 0 else None,
                "ship_over_prefill": med / prefill_s if prefill_s > 0 else None,
            })
    finally:
        await ch.close()
        await server.stop(None)
        await worker.close()
    return points


def describe() -> dict[str, Any]:
    return {"transport": TRANSPORT, "chunk_bytes": CHUNK_BYTES}
