"""router.proto <-> the client-side objects: sampling keyword arguments, prompts and chat
messages into a GenerateRequest; GenerateResponse / ModelInfo / Usage / RequestTimings into
`splitserve.common.results`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from splitserve.common.convert.common import (
    FINISH_REASON_NAMES,
    logprobs_from_proto,
    sampling_to_proto,
)
from splitserve.common.results import Chunk, ModelInfo, Timings, Usage
from splitserve.common.sampling_params import SamplingParams
from splitserve.v1 import common_pb2, router_pb2

# Keyword arguments generate/chat/stream accept as sampling parameters.
SAMPLING_KWARGS = frozenset(f.name for f in dataclasses.fields(SamplingParams)) - {"extra"}
# SamplingParams fields that are `optional` in the proto: sent only when the caller passed
# them, so the router applies its own defaults to the rest (e.g. max_tokens).
_OPTIONAL_PROTO_FIELDS = ("max_tokens", "temperature", "top_p", "seed", "skip_special_tokens")
_TIMING_FIELDS = tuple(f.name for f in dataclasses.fields(Timings))


def usage_from_proto(msg: common_pb2.Usage) -> Usage:
    return Usage(msg.prompt_tokens, msg.completion_tokens, msg.cached_tokens)


def timings_from_proto(msg: common_pb2.RequestTimings) -> Timings:
    return Timings(**{name: getattr(msg, name) for name in _TIMING_FIELDS})


def chunk_from_proto(msg: router_pb2.GenerateResponse) -> Chunk:
    reason = msg.finish_reason
    return Chunk(
        token_ids=list(msg.token_ids),
        text=msg.text,
        finish_reason=FINISH_REASON_NAMES.get(reason, "error") if reason else None,
        usage=usage_from_proto(msg.usage) if msg.HasField("usage") else None,
        timings=timings_from_proto(msg.timings) if msg.HasField("timings") else None,
        logprobs=logprobs_from_proto(msg.logprobs),
        request_id=msg.request_id,
        stop_string=msg.stop_string,
        error_message=msg.error_message,
    )


def model_from_proto(msg: router_pb2.ModelInfo) -> ModelInfo:
    return ModelInfo(msg.id, msg.max_model_len, msg.block_size, msg.num_prefill_workers,
                     msg.num_decode_workers)


def sampling_kwargs_to_proto(sampling: Mapping[str, Any]) -> common_pb2.SamplingParams:
    """Validate sampling kwargs with SamplingParams and convert them, leaving the proto's
    optional fields the caller did not pass unset. TypeError for unknown names, ValueError
    for bad values."""
    unknown = sorted(set(sampling) - SAMPLING_KWARGS)
    if unknown:
        raise TypeError(f"unknown sampling argument(s) {unknown}; "
                        f"expected some of {sorted(SAMPLING_KWARGS)}")
    try:
        msg = sampling_to_proto(SamplingParams(**sampling))
    except (TypeError, ValueError, OverflowError) as err:  # wrong types, proto ranges
        raise ValueError(f"invalid sampling parameters: {err}") from err
    for name in _OPTIONAL_PROTO_FIELDS:
        if name not in sampling:
            msg.ClearField(name)
    return msg


def _chat_messages(messages: Any) -> router_pb2.ChatMessages:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError("chat messages must be a list of {'role': ..., 'content': ...} dicts")
    turns = []
    for i, m in enumerate(messages):
        if (not isinstance(m, Mapping) or set(m) != {"role", "content"}
                or not all(isinstance(m[k], str) for k in ("role", "content"))):
            raise ValueError(f"chat message {i} must be a dict with exactly the string keys "
                             f"'role' and 'content', got {m!r}")
        turns.append(router_pb2.ChatMessage(role=m["role"], content=m["content"]))
    return router_pb2.ChatMessages(messages=turns)


def generate_request_to_proto(prompt_or_messages: Any, *, chat: bool, sampling: Mapping[str, Any],
                  request_id: str, model: str) -> router_pb2.GenerateRequest:
    """The GenerateRequest for a text prompt, a token-id prompt or (chat=True) messages."""
    params = sampling_kwargs_to_proto(sampling)
    request = router_pb2.GenerateRequest(request_id=request_id, sampling_params=params,
                                         model=model)
    if chat:
        request.messages.CopyFrom(_chat_messages(prompt_or_messages))
    elif isinstance(prompt_or_messages, str):
        request.prompt = prompt_or_messages
    elif isinstance(prompt_or_messages, Sequence) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt_or_messages):
        try:
            request.token_ids.token_ids.extend(prompt_or_messages)
        except ValueError as err:  # negative or > uint32
            raise ValueError(f"invalid prompt token ids: {err}") from err
        request.token_ids.SetInParent()  # an empty list is still the token_ids form
    else:
        raise TypeError("prompt must be a str or a list of token ids (pass chat=True for "
                        f"messages), got {type(prompt_or_messages).__name__}")
    return request
