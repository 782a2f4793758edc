"""Conversions between engine types and baton.v1 protobuf messages."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from baton.engine.grammar import FormatKind, ResponseFormat
from baton.engine.logprobs import TokenLogprobs
from baton.engine.request import FinishReason, Request, SamplingParams
from baton.errors import InvalidRequestError
from baton.v1 import baton_pb2 as pb

_FINISH_TO_PB = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
}
_FINISH_FROM_PB = {v: k for k, v in _FINISH_TO_PB.items()}
_FORMAT_TO_PB = {FormatKind.JSON_OBJECT: pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT,
                 FormatKind.JSON_SCHEMA: pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA}
_FORMAT_FROM_PB = {v: k for k, v in _FORMAT_TO_PB.items()}


def finish_to_proto(reason: FinishReason | None) -> pb.FinishReason:
    return _FINISH_TO_PB[reason]


def finish_from_proto(value: int) -> FinishReason | None:
    return _FINISH_FROM_PB.get(value)  # type: ignore[call-overload]


def params_to_proto(p: SamplingParams) -> pb.SamplingParameters:
    m = pb.SamplingParameters(
        max_new_tokens=p.max_new_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        repetition_penalty=p.repetition_penalty,
        stop=list(p.stop),
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        logit_bias=dict(p.logit_bias),
        min_tokens=p.min_tokens,
    )
    if p.seed is not None:
        m.seed = p.seed
    if p.logprobs is not None:
        m.logprobs = p.logprobs
    if p.prompt_logprobs is not None:
        m.prompt_logprobs = p.prompt_logprobs
    if p.response_format is not None:
        m.response_format.CopyFrom(pb.ResponseFormat(type=_FORMAT_TO_PB[p.response_format.kind],
                                                     json_schema=p.response_format.schema))
    return m


def params_from_proto(m: pb.SamplingParameters) -> SamplingParams:
    """Unset optional fields take SamplingParams' defaults. Raises InvalidRequestError naming the field."""
    kwargs: dict[str, object] = {}
    for name in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "logprobs",
                 "prompt_logprobs"):
        if m.HasField(name):
            kwargs[name] = getattr(m, name)
    for name in ("temperature", "top_p", "repetition_penalty"):  # float32 on the wire: round to what was meant
        if name in kwargs:
            kwargs[name] = round(float(kwargs[name]), 6)  # type: ignore[arg-type]
    if m.seed >= 2**63:
        raise InvalidRequestError("seed", "must be 0 <= seed < 2**63")
    return SamplingParams(
        stop=tuple(m.stop), stop_token_ids=tuple(m.stop_token_ids), ignore_eos=m.ignore_eos,
        presence_penalty=_f32(m.presence_penalty), frequency_penalty=_f32(m.frequency_penalty),
        logit_bias=tuple(sorted((t, _f32(b)) for t, b in m.logit_bias.items())), min_tokens=m.min_tokens,
        response_format=format_from_proto(m.response_format) if m.HasField("response_format") else None,
        **kwargs,  # type: ignore[arg-type]
    )


def format_from_proto(m: pb.ResponseFormat) -> ResponseFormat | None:
    if m.type == pb.RESPONSE_FORMAT_TYPE_TEXT:
        if m.json_schema:
            raise InvalidRequestError("response_format", "a text format takes no json_schema")
        return None
    kind = _FORMAT_FROM_PB.get(m.type)
    if kind is None:
        raise InvalidRequestError("response_format", f"unknown type {m.type}")
    return ResponseFormat(kind, m.json_schema)


def _f32(x: float) -> float:
    """A float32 from the wire, rounded to what was meant."""
    return round(float(x), 6)


def logprobs_to_proto(lp: TokenLogprobs, texts: Callable[[int], str] | None = None) -> pb.TokenLogprobs:
    """With `texts` (the router), each token's text too."""
    def one(token: int, value: float) -> pb.Logprob:
        return pb.Logprob(token=token, logprob=value, text=texts(token) if texts else "")

    return pb.TokenLogprobs(chosen=one(lp.token, lp.logprob), top=[one(t, v) for t, v in lp.top])


def logprobs_from_proto(m: pb.TokenLogprobs) -> TokenLogprobs:
    return TokenLogprobs(m.chosen.token, m.chosen.logprob, tuple((t.token, t.logprob) for t in m.top))


def prompt_logprobs_to_proto(lps: Sequence[TokenLogprobs | None],
                             texts: Callable[[int], str] | None = None) -> list[pb.TokenLogprobs]:
    """Every position but the first (which has none); with `texts`, each token's text too."""
    return [logprobs_to_proto(lp, texts) for lp in lps[1:] if lp is not None]


def prompt_logprobs_from_proto(ms: Sequence[pb.TokenLogprobs]) -> list[TokenLogprobs | None] | None:
    """None when the message carries none: the request did not ask, or this message is not the first."""
    return [None, *(logprobs_from_proto(m) for m in ms)] if ms else None


def request_from_proto(m: pb.WorkerRequest) -> Request:
    """A WorkerRequest as an engine Request. Raises InvalidRequestError naming the field at fault."""
    if not m.request_id:
        raise InvalidRequestError("request_id", "required")
    return Request(m.request_id, list(m.prompt_ids), params_from_proto(m.parameters), output_ids=list(m.output_ids))
