"""What issue 17's user did, with the real model: `baton serve --decode-workers 2 --prefill-workers 2` on the
embedded smollm2-135m, N concurrent streaming chat requests through the `openai` client (greedy), and one worker
SIGKILLed mid-generation. Prints one JSON line: how many requests completed, how many equal `generate()` on the
same templated prompt alone, and whether the killed worker came back and served.

    .venv/bin/python scripts/serve_chaos.py --kill decode-0      # or prefill-0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from baton.engine.models import resolve_model_path
from baton.serve import free_port

TOPICS = ["the sea", "a lighthouse", "bread", "winter", "a violin", "trains", "the moon", "coffee", "a garden",
          "rivers", "a library", "snow", "bees", "a bridge", "clocks", "maps", "the desert", "rain", "a market",
          "owls", "kites", "glass", "a harbour", "mountains"]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--kill", default="decode-0", help="the service to SIGKILL (decode-0, prefill-1, router, ...)")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--kill-after-chunks", type=int, default=200, help="stream chunks received in all before the kill")
    args = p.parse_args()
    model_dir = resolve_model_path("smollm2-135m")
    http_port, grpc_port = free_port(), free_port()
    log = Path(tempfile.mkdtemp(prefix="serve-chaos-")) / "serve.log"
    serve = subprocess.Popen([sys.executable, "-m", "baton.cli", "serve", "--decode-workers", "2", "--prefill-workers",
                              "2", "--http-port", str(http_port), "--grpc-port", str(grpc_port)],
                             stdout=log.open("wb"), stderr=subprocess.STDOUT,
                             env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        while "Ctrl-C stops everything" not in log.read_text():
            assert serve.poll() is None, log.read_text()[-2000:]
            time.sleep(0.5)
        pids = {n: int(pid) for n, pid in re.findall(r"([a-z]+-\d+|router) \S+ \(pid (\d+)\)", log.read_text())}
        messages = [[{"role": "user", "content": f"Write a short poem about {t}."}] for t in TOPICS[: args.requests]]
        texts = [""] * len(messages)
        errors: list[str | None] = [None] * len(messages)
        chunks = 0
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="-", max_retries=0,
                                    timeout=600)

        async def one(i: int) -> None:
            nonlocal chunks
            try:
                stream = await client.chat.completions.create(model="smollm2-135m", messages=messages[i],  # type: ignore[arg-type]
                                                              max_tokens=args.max_tokens, temperature=0, stream=True)
                async for c in stream:
                    chunks += 1
                    if c.choices:
                        texts[i] += c.choices[0].delta.content or ""
            except openai.APIError as e:
                errors[i] = f"{type(e).__name__}: {e}"

        async def killer() -> None:
            while chunks < args.kill_after_chunks:
                await asyncio.sleep(0.01)
            os.kill(pids[args.kill], signal.SIGKILL)

        start = time.monotonic()

        async def run() -> None:
            await asyncio.gather(killer(), *(one(i) for i in range(len(messages))))

        asyncio.run(run())
        seconds = time.monotonic() - start
        back = f"{args.kill} started again" in log.read_text()
        # the reference: generate() on each templated prompt alone, greedy, float32
        tok = AutoTokenizer.from_pretrained(model_dir)
        lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        exact = 0
        for i, msgs in enumerate(messages):
            prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
            with torch.no_grad():
                out = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_tokens,
                                  do_sample=False)
            exact += texts[i] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        recovered = sum('"recoveries": [' in line for line in log.read_text().splitlines())
        print(json.dumps({"killed": args.kill, "requests": len(messages), "completed": errors.count(None),
                          "equal_to_generate": exact, "recovered": recovered, "killed_service_back": back,
                          "seconds": round(seconds, 1), "errors": [e for e in errors if e][:3]}))
        return 0 if exact == len(messages) and back else 1
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(120)


if __name__ == "__main__":
    sys.exit(main())
