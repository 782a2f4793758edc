"""Conversions between engine types and baton.v1 protobuf messages."""

from __future__ import annotations

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
    )
    if p.seed is not None:
        m.seed = p.seed
    return m


def params_from_proto(m: pb.SamplingParameters) -> SamplingParams:
    """Unset optional fields take SamplingParams' defaults. Raises InvalidRequestError naming the field."""
    kwargs: dict[str, object] = {}
    for name in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed"):
        if m.HasField(name):
            kwargs[name] = getattr(m, name)
    for name in ("temperature", "top_p", "repetition_penalty"):  # float32 on the wire: round to what was meant
        if name in kwargs:
            kwargs[name] = round(float(kwargs[name]), 6)  # type: ignore[arg-type]
    if m.seed >= 2**63:
        raise InvalidRequestError("seed", "must be 0 <= seed < 2**63")
    return SamplingParams(
        stop=tuple(m.stop), stop_token_ids=tuple(m.stop_token_ids), ignore_eos=m.ignore_eos, **kwargs  # type: ignore[arg-type]
    )


def request_from_proto(m: pb.WorkerRequest) -> Request:
    """A WorkerRequest as an engine Request. Raises InvalidRequestError naming the field at fault."""
    if not m.request_id:
        raise InvalidRequestError("request_id", "required")
    return Request(m.request_id, list(m.prompt_ids), params_from_proto(m.parameters), output_ids=list(m.output_ids))
