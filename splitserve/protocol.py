"""Conversions between the protobuf contract (splitserve.v1) and domain objects.

Torch-free: the router, the workers and the client SDK share it.
"""

from __future__ import annotations

from collections.abc import Iterable

from engine.outputs import TokenLogprobs
from engine.sampling_params import SamplingParams
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
    )
    if params.seed is not None:
        msg.seed = params.seed
    return msg


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
