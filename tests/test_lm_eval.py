"""An evaluation harness against Baton as users point one at it: lm-evaluation-harness's own `local-completions`
model (LocalCompletionsAPI) scores loglikelihoods through /v1/completions (token-id prompts, echo, logprobs,
several prompts per request), and each item's score and greediness equal transformers' on the same tokens."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from lm_eval.api.instance import Instance
from lm_eval.models.openai_completions import LocalCompletionsAPI
from transformers import PreTrainedTokenizerBase

from baton.engine.models import LoadedModel
from baton.engine.models import smollm2_dir as tokenizer_dir
from tests.support.inproc import Stack, running_stack
from tests.support.oracle import LOGPROB_TOLERANCE, reference_logprobs

ITEMS = [  # (context, continuation), as a multiple-choice task asks them
    ("The capital of France is", " Paris"),
    ("The capital of France is", " Berlin"),
    ("2 + 2 =", " 4"),
    ("Water is made of hydrogen and", " oxygen atoms"),
    ("Once upon a", " time"),
]


@pytest.fixture(scope="module")
def stack(tokenizer: PreTrainedTokenizerBase) -> Iterator[Stack]:
    with running_stack(tokenizer) as s:
        yield s


def test_local_completions_loglikelihoods_equal_transformers(stack: Stack, tiny_llama: LoadedModel) -> None:
    lm = LocalCompletionsAPI(base_url=stack.http + "/v1/completions", model="tiny-llama",
                             tokenizer_backend="huggingface", tokenizer=str(tokenizer_dir()), tokenized_requests=True,
                             batch_size=3, num_concurrent=1, max_retries=1)
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=item, idx=i) for i, item in enumerate(ITEMS)]
    scores = lm.loglikelihood(requests, disable_tqdm=True)
    assert len(scores) == len(ITEMS)
    for (context, continuation), (score, greedy) in zip(ITEMS, scores):
        ctx, cont = lm._encode_pair(context, continuation)  # the tokens the harness sent
        dist = reference_logprobs(tiny_llama, ctx + cont)
        start = len(ctx)
        want = sum(float(dist[start + i - 1, t]) for i, t in enumerate(cont))
        want_greedy = all(int(dist[start + i - 1].argmax()) == t for i, t in enumerate(cont))
        assert abs(score - want) < LOGPROB_TOLERANCE * len(cont), (context, continuation)
        assert greedy == want_greedy
