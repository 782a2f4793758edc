"""vLLM's offline `LLM.generate` on a `baton run` input file, timed: the peer of `baton run` in
scripts/bench_peers.sh. Runs with vLLM's own Python (.cache/peers/vllm), never Baton's; reads the JSONL that
`baton bench requests` writes (`input_ids`, `max_new_tokens`, `ignore_eos`), greedy, and prints one JSON object:
output tokens, seconds of the generate call (the model loaded and warmed up before), tokens/s.

    VLLM_TARGET_DEVICE=cpu .cache/peers/vllm/bin/python scripts/vllm_offline.py MODEL_DIR mixed.jsonl --max-num-seqs 32
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("requests")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--out")
    args = p.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(args.requests) as f:
        reqs = [json.loads(line) for line in f if line.strip()]
    llm = LLM(args.model, dtype="float32", max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len)
    prompts = [TokensPrompt(prompt_token_ids=r["input_ids"]) for r in reqs]
    params = [SamplingParams(max_tokens=r["max_new_tokens"], ignore_eos=r.get("ignore_eos", False), temperature=0.0)
              for r in reqs]
    llm.generate(prompts[:2], [SamplingParams(max_tokens=4, temperature=0.0)] * 2, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    result = {"system": "vllm offline LLM.generate", "requests": len(reqs), "output_tokens": tokens,
              "seconds": seconds, "output_tokens_per_s": tokens / seconds,
              "token_ids": {r["id"]: list(o.outputs[0].token_ids) for r, o in zip(reqs, outs)}}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f)
    print(json.dumps({k: v for k, v in result.items() if k != "token_ids"}))


if __name__ == "__main__":
    main()
