"""Engine: queues, admission and the iteration loop, under one of four scheduling policies.

- baton:  a newcomer is prefilled on its own and spliced into the running batch at an iteration boundary;
          finished rows leave at once. The batch never computes a padded token.
- orca:   iteration-level scheduling with selective batching (Orca, Yu et al., OSDI 2022): in one iteration
          the newcomers' whole prompts and one token of every running row run in ONE forward pass over a
          packed token sequence, with no padding in the non-attention layers and attention per request
          (selective.py). The newcomers' KV joins the batch at once, their first tokens sampled in that
          iteration; finished rows leave at once. Its cost: running rows wait through an iteration that
          holds the newcomers' prefill.
- padded: iteration-level scheduling without selective batching: a newcomer's prompt runs inside the batch's
          iteration, every running row padded to the newcomer's prompt length; finished rows leave at once.
- static: run-to-completion batches: a batch is formed, prefilled together (padded), and decoded until its
          last member finishes; finished rows keep being computed.

Under `baton`, `fuse_prefill` decides where the prompts this engine prefills itself (add_request) run: in a pass
of their own (the paper's BATON, the default), or inside the batch's iteration by selective batching, as under
`orca` (a decode worker does so for the short prompts a router sends it to prefill itself: one pass over the
weights instead of two). KV prefilled elsewhere (add_prefilled) is spliced either way.

The engine is transport-free: services drive it with add_request / add_prefilled / cancel / step.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from baton.engine.batch import SEGMENT_COST
from baton.engine.kv_payload import KVPayload
from baton.engine.logprobs import TokenLogprobs
from baton.engine.models import LoadedModel
from baton.engine.prefix_cache import BLOCK_TOKENS, PrefixCache
from baton.engine.request import FinishReason, Request, RequestStatus
from baton.engine.runner import PREFILL_TOKEN_BUDGET, ForwardPass, ModelRunner, pack_for_prefill
from baton.engine.sampler import sample, with_logprobs
from baton.engine.segment import RowKV
from baton.engine.selective import iterate
from baton.errors import InvalidRequestError, PayloadError


class Policy(enum.Enum):
    """The scheduling policy, above; what each one does is decided here, and only here."""

    BATON = "baton"
    ORCA = "orca"
    PADDED = "padded"
    STATIC = "static"

    @property
    def splices_prefilled_kv(self) -> bool:
        """Newcomers are prefilled apart from the batch and their KV spliced in (so KV prefilled elsewhere, a
        decode worker's, can be taken); the others run a newcomer's prompt inside the batch."""
        return self is Policy.BATON

    @property
    def selective_batching(self) -> bool:
        """Newcomers' prompts and the running rows' tokens share one packed forward pass, unpadded."""
        return self is Policy.ORCA

    @property
    def pads_prompts(self) -> bool:
        """A newcomer's prompt runs as a row of the batch's step, every row padded to it: one segment, the plain
        padded batch."""
        return self in (Policy.PADDED, Policy.STATIC)

    @property
    def joins_running_batch(self) -> bool:
        """Newcomers join at any iteration boundary; static waits for the batch to empty."""
        return self is not Policy.STATIC

    @property
    def evicts_at_once(self) -> bool:
        """A finished row leaves the batch at once; static computes it until the whole batch is done."""
        return self is not Policy.STATIC


POLICIES = tuple(p.value for p in Policy)


@dataclass
class EngineStats:
    steps: int = 0
    token_rows: int = 0  # token positions run through the model (decode batch and prefills)
    idle_rows: int = 0  # of which produced nothing: padding, finished rows
    attended_kv: int = 0  # query-key pairs computed by the decode batch's attention
    masked_kv: int = 0  # of which were padding
    splices: int = 0  # requests spliced into the decode batch
    splice_total_s: float = 0.0
    splice_max_s: float = 0.0
    # the latest splices' times (bounded: a worker runs for weeks); splices - len(...) older ones are gone
    recent_splice_s: deque[float] = field(default_factory=lambda: deque(maxlen=4096))
    prefill_s: float = 0.0
    decode_s: float = 0.0
    output_tokens: int = 0
    prefix_hit_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    prefix_miss_tokens: int = 0  # prompt tokens looked up there and computed
    prefix_cache_bytes: int = 0

    def record_splice(self, seconds: float) -> None:
        self.splices += 1
        self.splice_total_s += seconds
        self.splice_max_s = max(self.splice_max_s, seconds)
        self.recent_splice_s.append(seconds)

    @property
    def splice_mean_s(self) -> float | None:
        return self.splice_total_s / self.splices if self.splices else None

    @property
    def idle_fraction(self) -> float:
        return self.idle_rows / self.token_rows if self.token_rows else 0.0

    @property
    def masked_fraction(self) -> float:
        return self.masked_kv / self.attended_kv if self.attended_kv else 0.0


@dataclass
class StepOutput:
    tokens: list[tuple[Request, int]]  # each token sampled in this iteration, with its request
    finished: list[Request]


class Engine:
    def __init__(
        self,
        lm: LoadedModel,
        policy: str | Policy = "baton",
        max_batch: int = 32,
        max_segments: int = 8,
        segment_cost: int = SEGMENT_COST,
        compact_threshold: float = 0.1,
        fuse_prefill: bool = False,
        prefix_cache: PrefixCache | None = None,
        kv_reserve_bytes: int = 0,
    ) -> None:
        """kv_reserve_bytes: on a CPU, memory for the batch's KV slabs laid out now (slab_pool.py)."""
        if not isinstance(policy, Policy) and policy not in POLICIES:
            raise ValueError(f"policy: {policy!r} is not one of {POLICIES}")
        self.lm, self.policy = lm, Policy(policy)
        # baton: run local prompts inside the batch's iteration (selective batching), at most a prefill pass's
        # worth of tokens per iteration, instead of in a pass of their own (module docstring)
        self.fuse_prefill = fuse_prefill and self.policy.splices_prefilled_kv
        # with a prefix cache, prompts this engine prefills start from the KV of earlier ones, and a finished row's
        # KV (its prompt and output) stays there for the next turn of its conversation (prefix_cache.py)
        self.runner = ModelRunner(lm, prefix_cache)
        segments = 1 if self.policy.pads_prompts else max_segments
        self.batch = self.runner.new_batch(max_batch, segments, segment_cost, kv_reserve_bytes)
        self.compact_threshold = compact_threshold
        self.waiting: deque[Request] = deque()  # not prefilled yet, in arrival order
        self.prefilled: deque[tuple[Request, KVPayload]] = deque()  # waiting to be spliced
        # choices 1..n-1 of a prefilled request (add_prefilled's forks), by its id: spliced with it
        self.forks: dict[str, list[Request]] = {}
        self.stats = EngineStats()
        self.eos_ids = lm.eos_token_ids
        # run before each layer of a decode step: a decode worker that shares its cores yields them there
        self.layer_hook: Callable[[], None] | None = None
        self._cuda = lm.device.type == "cuda"

    # ---- intake ----------------------------------------------------------------------------------------
    def validate(self, req: Request, prompt_field: str = "prompt") -> None:
        """The model's limits (ModelSpec.check_request); Request and SamplingParams checked the rest. A request
        with a response_format gets its grammar's state here (Request.constrain)."""
        self.lm.spec.check_request(req.prompt_ids, req.params.max_new_tokens, req.output_ids,
                                   req.params.token_fields, prompt_field)
        req.constrain(self.lm.grammars)

    def held(self) -> list[Request]:
        """Every request the engine holds between steps: waiting, prefilled, in the batch, or a fork waiting to be
        spliced with its request."""
        held = list(self.waiting) + [r for r, _ in self.prefilled] + self.batch.requests
        return held + [f for forks in self.forks.values() for f in forks]

    def _check_new_id(self, req: Request) -> None:
        if req.id in {r.id for r in self.held()}:
            raise InvalidRequestError("id", f"request id {req.id!r} is already in use")

    def add_request(self, req: Request) -> None:
        """Queue a request whose prompt this engine prefills itself (at or after req.arrival_time)."""
        self.validate(req)
        if self.policy.pads_prompts and req.params.prompt_logprobs is not None:
            raise InvalidRequestError("prompt_logprobs", f"not computed under the {self.policy.value} policy")
        self._check_new_id(req)
        self.waiting.append(req)

    def add_prefilled(self, req: Request, payload: KVPayload, forks: Sequence[Request] = ()) -> None:
        """Queue a request prefilled elsewhere; it is spliced in at the next iteration boundary (baton only).
        A resumed request (output_ids already set) comes with the KV of its prompt and those tokens.

        `forks`: more choices of the same prompt (n > 1), from this one prefill. Each joins the batch with the
        prompt's KV less its last token, and feeds that token in its first step, which samples its first token
        (the prefill sampled the request's own): n rows from one prefill, each sampling on its own."""
        if not self.policy.splices_prefilled_kv:
            raise ValueError(f"policy {self.policy.value} cannot splice prefilled KV")
        self.validate(req)
        self._check_new_id(req)
        if payload.held_tokens:
            raise PayloadError(f"KV payload leaves out {payload.held_tokens} held tokens: complete it first "
                               "(KVPayload.with_held)")
        self.lm.spec.check_kv(payload.model_fingerprint, self.lm.fingerprint, payload.dims, payload.prompt_ids,
                              req.all_ids, payload.first_token)
        for fork in forks:
            self.validate(fork)
            self._check_new_id(fork)
            if fork.prompt_ids != req.prompt_ids or fork.output_ids or req.output_ids:
                raise InvalidRequestError("n", "the choices of a request share its prompt and start from nothing")
            fork.status = RequestStatus.PREFILLED
        if forks:
            self.forks[req.id] = list(forks)
        req.status = RequestStatus.PREFILLED
        self.prefilled.append((req, payload))

    @torch.inference_mode()
    def cancel(self, request_id: str) -> bool:
        """Stop a request wherever it is. Between steps, so its row leaves before the next one."""
        for req in self.waiting:
            if req.id == request_id:
                self.waiting.remove(req)
                req.finish(FinishReason.CANCELLED)
                return True
        for item in self.prefilled:
            if item[0].id == request_id:
                self.prefilled.remove(item)
                item[0].finish(FinishReason.CANCELLED)
                for fork in self.forks.pop(request_id, []):  # choices not yet spliced go with it
                    fork.finish(FinishReason.CANCELLED)
                return True
        for forks in self.forks.values():
            for fork in forks:
                if fork.id == request_id:
                    forks.remove(fork)
                    fork.finish(FinishReason.CANCELLED)
                    return True
        for req in self.batch.requests:
            if req.id == request_id:
                if not req.finished:
                    req.finish(FinishReason.CANCELLED)
                self.batch.evict({request_id})
                return True
        return False

    # ---- state -----------------------------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilled or len(self.batch))

    def next_arrival(self) -> float | None:
        return min((r.arrival_time for r in self.waiting), default=None)

    def _arrived(self, now: float) -> list[Request]:
        return [r for r in self.waiting if r.arrival_time <= now]

    # ---- one iteration ---------------------------------------------------------------------------------
    @torch.inference_mode()  # every tensor of the batch is made and changed here
    def step(self) -> StepOutput:
        out = StepOutput([], [])
        now = time.perf_counter()
        if self.policy.splices_prefilled_kv:
            self._admit_baton(now, out)
            if self.fuse_prefill:
                arrived = self._arrived(now)[: self.batch.free_rows]
                if arrived:  # the first packed run's worth: [at least one prompt, up to the token budget]
                    # of tokens to compute, a prompt whose prefix is cached counting only the rest; a prompt that
                    # shares its uncached start with an earlier one waits for the cache to hold it (compute_once)
                    split = self.runner.compute_once(arrived)
                    run = pack_for_prefill(split.uncached, PREFILL_TOKEN_BUDGET)[0]
                    self._iterate_selective([arrived[split.now[j]] for j in run], out)
                    return out
        elif self.policy.selective_batching:
            newcomers = self._arrived(now)[: self.batch.free_rows]
            if newcomers:
                self._iterate_selective(newcomers, out)
                return out
        elif self.policy.joins_running_batch or not len(self.batch):
            self._admit_unprefilled(self._arrived(now)[: self.batch.free_rows])
        if len(self.batch):
            self._decode(out)
        return out

    def _admit_baton(self, now: float, out: StepOutput) -> None:
        room = max(0, self.batch.free_rows - len(self.prefilled))
        # fused, the arrived prompts run in this iteration's pass instead (step)
        newcomers = [] if self.fuse_prefill else self._arrived(now)[:room]
        if newcomers:
            for req in newcomers:
                self.waiting.remove(req)
            t0 = time.perf_counter()
            payloads = self.runner.prefill_many(newcomers)  # packed, never padded: no idle rows
            self._sync()
            self.stats.prefill_s += time.perf_counter() - t0
            for req, payload in zip(newcomers, payloads):
                self.stats.token_rows += len(payload.prompt_ids)
                req.status = RequestStatus.PREFILLED
                self.prefilled.append((req, payload))
        items: list[tuple[Request, torch.Tensor]] = []
        while self.prefilled and len(items) + 1 + len(self.forks.get(self.prefilled[0][0].id, ())) \
                <= self.batch.free_rows:
            req, payload = self.prefilled.popleft()
            if self._emit_first(req, payload, out):
                items.append((req, payload.kv))
            for fork in self.forks.pop(req.id, []):  # kv less the last prompt token, which its first step feeds
                items.append((fork, payload.kv[:, :, :, :-1]))
        for item in sorted(items, key=lambda it: -int(it[1].shape[3])):
            t0 = time.perf_counter()
            self.batch.concatenate([item])
            self._sync()
            self.stats.record_splice(time.perf_counter() - t0)
            item[0].status = RequestStatus.RUNNING

    def _admit_unprefilled(self, reqs: list[Request]) -> None:
        for req in reqs:
            self.waiting.remove(req)
            req.status = RequestStatus.RUNNING
        if reqs:
            self.batch.add_unprefilled(reqs)

    def _iterate_selective(self, newcomers: list[Request], out: StepOutput) -> None:
        """One orca (or fused baton) iteration: the newcomers' prompts and a step of every row in one forward
        pass; then the newcomers' first tokens, the rows' next ones, and the newcomers' KV into the batch."""
        for req in newcomers:
            self.waiting.remove(req)
            req.status = RequestStatus.RUNNING
        t0 = time.perf_counter()
        reqs = self.batch.requests
        it = iterate(self.runner, self.batch, newcomers, self.layer_hook)
        tokens = sample(it.rows.logits, reqs, self.eos_ids, self.lm.grammars) if it.rows is not None else []
        lps = with_logprobs(it.rows.logits, reqs, tokens) if it.rows is not None else []
        self._sync()
        self.stats.token_rows += it.prompt_tokens
        if it.rows is not None:
            self._count(it.rows)
        else:
            self.stats.steps += 1
        self._emit_rows(reqs, tokens, lps, out)
        joining: list[tuple[Request, RowKV]] = []
        for i, (req, payload) in enumerate(zip(newcomers, it.payloads)):
            if self._emit_first(req, payload, out):
                joining.append((req, it.kv(i)))  # its cached prefix and new tokens, copied into the slab apart
        self._evict_finished(reqs)
        self.batch.concatenate(joining)  # their KV is the batch's now: they decode in the next iteration
        self._sync()
        self.stats.decode_s += time.perf_counter() - t0

    def _decode(self, out: StepOutput) -> None:
        t0 = time.perf_counter()
        res = self.runner.decode(self.batch, self.layer_hook)
        reqs = self.batch.requests
        tokens = sample(res.logits, reqs, self.eos_ids, self.lm.grammars)
        lps = with_logprobs(res.logits, reqs, tokens)
        self._sync()
        self.stats.decode_s += time.perf_counter() - t0
        self._count(res)
        self._emit_rows(reqs, tokens, lps, out)
        self._evict_finished(reqs)

    def _count(self, res: ForwardPass) -> None:
        s = self.stats
        s.steps += 1
        s.token_rows += res.inputs.rows
        s.idle_rows += res.inputs.idle_rows
        s.attended_kv += res.attended_kv
        s.masked_kv += res.attended_kv - res.useful_kv

    def _emit_rows(self, reqs: list[Request], tokens: list[int], lps: list[TokenLogprobs | None],
                   out: StepOutput) -> None:
        for req, tok, lp in zip(reqs, tokens, lps):
            if not req.finished:
                self._emit(req, tok, lp, out)
                if req.finished:
                    out.finished.append(req)

    def _evict_finished(self, reqs: list[Request]) -> None:
        if not self.policy.evicts_at_once and not all(r.finished for r in reqs):
            return  # run to completion: finished rows stay in the batch
        done = {r.id for r in reqs if r.finished}
        cache = self.runner.prefix_cache
        if cache is not None:
            for r in reqs:
                if r.finished and r.finish_reason is not FinishReason.CANCELLED:
                    # a shared prefix the cache holds already is not copied out again: only the row's own tokens
                    p = self.batch.shared_len(r)
                    start = p if p and p % BLOCK_TOKENS == 0 and cache.holds(r.all_ids, p) else 0
                    kv = self.batch.row_kv(r, start)  # [layers, 2, kv_heads, tokens - start, head_dim]
                    cache.insert(r.all_ids[: start + kv.shape[3]], kv, start)
            self.stats.prefix_hit_tokens = cache.stats.hit_tokens
            self.stats.prefix_miss_tokens = cache.stats.miss_tokens
            self.stats.prefix_cache_bytes = cache.bytes
        if done:
            self.batch.evict(done)
            self.batch.compact(self.compact_threshold)

    def _emit_first(self, req: Request, payload: KVPayload, out: StepOutput) -> bool:
        """Emit a newcomer's first token (from its prefill); whether it goes on to join the batch."""
        if payload.prompt_logprobs is not None:
            req.prompt_logprobs = payload.prompt_logprobs
        self._emit(req, payload.first_token, payload.first_logprobs, out)
        if req.finished:
            out.finished.append(req)
        return not req.finished

    def _emit(self, req: Request, token: int, lp: TokenLogprobs | None, out: StepOutput) -> None:
        if not req.output_ids:
            req.first_token_time = time.perf_counter()
        req.output_ids.append(token)
        if lp is not None:
            req.logprobs.append(lp)
        if req.constraint is not None:
            req.constraint.advance(token)
        self.stats.output_tokens += 1
        out.tokens.append((req, token))
        reason = self._finish_reason(req, token)
        if reason is not None:
            req.finish(reason)

    def may_end(self, req: Request, token: int) -> bool:
        """Whether `token`, as req's next output token, could end it (conservative: any stop string counts).
        Reads only the request and the model's limits: safe outside the decode loop."""
        p = req.params
        return bool(token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids) or p.stop
                    or p.response_format or len(req.output_ids) + 1 >= p.max_new_tokens)

    def _finish_reason(self, req: Request, token: int) -> FinishReason | None:
        p = req.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
            return FinishReason.STOP
        if req.constraint is not None and (req.constraint.complete or req.constraint.failed):
            return FinishReason.STOP  # the document is whole (or, a bug, the grammar broke: logged in advance)
        if p.stop and self.lm.tokenizer is not None:
            text = str(self.lm.tokenizer.decode(req.output_ids, skip_special_tokens=True))
            hits = [text.find(s) for s in p.stop if s in text]
            if hits:
                req.stop_text = text[: min(hits)]
                return FinishReason.STOP
        if len(req.output_ids) >= p.max_new_tokens:
            return FinishReason.LENGTH
        return None

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()

    # ---- convenience -----------------------------------------------------------------------------------
    def text(self, req: Request) -> str:
        """The output text: cut before the stop string if one ended the request."""
        if req.stop_text is not None:
            return req.stop_text
        tok = self.lm.tokenizer
        return str(tok.decode(req.output_ids, skip_special_tokens=True)) if tok is not None else ""

    def run_until_done(self, on_step: Callable[[StepOutput], None] | None = None) -> None:
        """Step until every queued request is finished, sleeping while nothing has arrived yet."""
        while self.has_work():
            if not len(self.batch) and not self.prefilled:
                nxt = self.next_arrival()
                if nxt is not None and nxt > time.perf_counter():
                    time.sleep(min(0.05, nxt - time.perf_counter()))
                    continue
            out = self.step()
            if on_step is not None:
                on_step(out)
