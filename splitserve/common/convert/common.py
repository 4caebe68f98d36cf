"""common.proto <-> domain objects: sampling parameters, logprobs, finish reasons, worker
roles, KV layouts.

Every proto <-> domain conversion of the project lives in `splitserve.common.convert`, one
module per .proto file, named `<thing>_to_proto` / `<thing>_from_proto`. Torch-free: the
router, the workers and the client SDK share it.
"""

from __future__ import annotations

from collections.abc import Iterable

from splitserve.common.cluster_types import WorkerRole
from splitserve.common.kv_layout import KVLayout
from splitserve.common.outputs import TokenLogprobs
from splitserve.common.sampling_params import SamplingParams
from splitserve.common.structured_output import OutputKind, StructuredOutput
from splitserve.v1 import common_pb2

# Defaults for the proto's optional fields (OpenAI's defaults).
DEFAULT_MAX_TOKENS = 16
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0

FINISH_REASONS = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
    "error": common_pb2.FINISH_REASON_ERROR,
}
FINISH_REASON_NAMES = {v: k for k, v in FINISH_REASONS.items()}


def sampling_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    """Validated SamplingParams (ValueError with a message on bad values)."""
    return SamplingParams(
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else DEFAULT_MAX_TOKENS,
        temperature=msg.temperature if msg.HasField("temperature") else DEFAULT_TEMPERATURE,
        top_p=msg.top_p if msg.HasField("top_p") else DEFAULT_TOP_P,
        top_k=msg.top_k,
        min_p=msg.min_p,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=tuple(msg.stop),
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        logprobs=msg.top_logprobs if msg.logprobs else None,
        skip_special_tokens=(
            msg.skip_special_tokens if msg.HasField("skip_special_tokens") else True
        ),
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        repetition_penalty=(
            msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0
        ),
        logit_bias=tuple(msg.logit_bias.items()),
        structured_output=structured_output_from_proto(msg.structured_output)
        if msg.HasField("structured_output") else None,
    )


def sampling_to_proto(params: SamplingParams, *, with_stop_strings: bool = True
                      ) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        stop=list(params.stop) if with_stop_strings else [],
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        logprobs=params.logprobs is not None,
        top_logprobs=params.logprobs or 0,
        skip_special_tokens=params.skip_special_tokens,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        logit_bias=dict(params.logit_bias),
    )
    if params.seed is not None:
        msg.seed = params.seed
    if params.repetition_penalty != 1.0:
        msg.repetition_penalty = params.repetition_penalty
    if params.structured_output is not None:
        msg.structured_output.CopyFrom(structured_output_to_proto(params.structured_output))
    return msg


_KIND_TO_PROTO: dict[OutputKind, common_pb2.StructuredOutputKind] = {
    OutputKind.JSON_SCHEMA: common_pb2.STRUCTURED_OUTPUT_KIND_JSON_SCHEMA,
    OutputKind.JSON_OBJECT: common_pb2.STRUCTURED_OUTPUT_KIND_JSON_OBJECT,
    OutputKind.REGEX: common_pb2.STRUCTURED_OUTPUT_KIND_REGEX,
    OutputKind.CHOICE: common_pb2.STRUCTURED_OUTPUT_KIND_CHOICE,
    OutputKind.GRAMMAR: common_pb2.STRUCTURED_OUTPUT_KIND_GRAMMAR,
}
_KIND_FROM_PROTO: dict[int, OutputKind] = {v: k for k, v in _KIND_TO_PROTO.items()}


def structured_output_to_proto(value: StructuredOutput) -> common_pb2.StructuredOutput:
    return common_pb2.StructuredOutput(kind=_KIND_TO_PROTO[value.kind], spec=value.spec)


def structured_output_from_proto(msg: common_pb2.StructuredOutput) -> StructuredOutput:
    kind = _KIND_FROM_PROTO.get(msg.kind)
    if kind is None:
        raise ValueError(f"structured_output.kind {msg.kind} is not a known kind")
    return StructuredOutput(kind, msg.spec)


def logprobs_to_proto(items: Iterable[TokenLogprobs]) -> list[common_pb2.TokenLogprob]:
    return [
        common_pb2.TokenLogprob(
            token_id=lp.token_id,
            logprob=lp.logprob,
            top_logprobs=[common_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
        )
        for lp in items
    ]


def logprobs_from_proto(items: Iterable[common_pb2.TokenLogprob]) -> list[TokenLogprobs]:
    return [
        TokenLogprobs(lp.token_id, lp.logprob, [(t.token_id, t.logprob) for t in lp.top_logprobs])
        for lp in items
    ]


_ROLE_TO_PROTO: dict[WorkerRole, common_pb2.WorkerRole] = {
    WorkerRole.PREFILL: common_pb2.WORKER_ROLE_PREFILL,
    WorkerRole.DECODE: common_pb2.WORKER_ROLE_DECODE,
    WorkerRole.BOTH: common_pb2.WORKER_ROLE_BOTH,
}
_ROLE_FROM_PROTO: dict[int, WorkerRole] = {v: k for k, v in _ROLE_TO_PROTO.items()}


def role_to_proto(role: WorkerRole | None) -> common_pb2.WorkerRole:
    """None (no filter) is WORKER_ROLE_UNSPECIFIED."""
    return common_pb2.WORKER_ROLE_UNSPECIFIED if role is None else _ROLE_TO_PROTO[role]


def role_from_proto(value: int) -> WorkerRole | None:
    """WORKER_ROLE_UNSPECIFIED is None; an unknown value raises ValueError."""
    if value == common_pb2.WORKER_ROLE_UNSPECIFIED:
        return None
    if value not in _ROLE_FROM_PROTO:
        raise ValueError(f"unknown WorkerRole {value}")
    return _ROLE_FROM_PROTO[value]


def layout_to_proto(layout: KVLayout) -> common_pb2.KVLayout:
    return common_pb2.KVLayout(
        num_layers=layout.num_layers,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        block_size=layout.block_size,
        dtype=layout.dtype,
        model_dtype=layout.model_dtype,
    )


def layout_from_proto(msg: common_pb2.KVLayout) -> KVLayout:
    """Validated KVLayout (ValueError with a message on bad values)."""
    return KVLayout(msg.num_layers, msg.num_kv_heads, msg.head_dim, msg.block_size, msg.dtype,
                    msg.model_dtype)
