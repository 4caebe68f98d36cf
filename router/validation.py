"""GenerateRequest -> a validated, tokenized request with fully resolved sampling params.

Every rejection is a ServiceError: INVALID_ARGUMENT with a message that names the bad
field, or NOT_FOUND for an unknown model. Pure (no I/O); the servicer runs it on a worker
thread because tokenizing a long prompt takes a while.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import jinja2

from splitserve.common import request_rules
from splitserve.common.convert.common import sampling_from_proto, sampling_to_proto
from splitserve.common.grpc_util import ServiceError
from splitserve.common.sampling_params import SamplingParams
from splitserve.common.stream_pace import check_stream_pace
from splitserve.common.structured_output import OutputKind
from splitserve.engine.block_hash import compute_block_hashes
from splitserve.router import tools
from splitserve.router.model import ServedModel
from splitserve.v1 import common_pb2, router_pb2


@dataclass(frozen=True)
class ValidatedRequest:
    request_id: str  # echoed to the client: its own id, or worker_request_id
    # Sent to the workers and keyed in the ledger: unique even when two clients reuse an id.
    worker_request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # resolved; stop strings included (the router applies them)
    worker_params: common_pb2.SamplingParams  # resolved; no stop strings (workers skip them)
    block_hashes: list[int]  # chained hashes of the prompt's full blocks
    # A resumed request: the prompt ends with this many tokens of its own output (already
    # sent to the client); the decode worker prefills it and skips their sampling draws.
    num_sampled: int = 0
    priority: int = 0  # scheduling class, lower first (GenerateRequest.priority)
    # A paced stream's delivery rate (GenerateRequest.stream_pace_tokens_per_s); 0: not paced.
    stream_pace_tokens_per_s: float = 0.0
    ttft_slo_ms: int = 0  # the TTFT SLO routing must meet (request's or router's); 0: none
    client: str = ""  # who sent it (its API key's name): fair share on the decode worker

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def _invalid(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _check(rule: Callable[..., None], *args: object) -> None:
    """Run a request_rules check; its ValueError becomes INVALID_ARGUMENT."""
    try:
        rule(*args)
    except ValueError as exc:
        raise _invalid(str(exc)) from None


def prompt_token_ids(request: router_pb2.GenerateRequest, model: ServedModel) -> list[int]:
    """The prompt's token ids, whichever of prompt / messages / token_ids it came as."""
    kind = request.WhichOneof("input")
    if kind is None:
        raise _invalid("no prompt: set one of prompt, messages or token_ids")
    if kind == "prompt":
        if not request.prompt:
            raise _invalid("prompt is empty")
        _check(request_rules.check_prompt_chars, len(request.prompt), model.max_model_len)
        ids = model.tokenizer.encode(request.prompt, add_special_tokens=True)
    elif kind == "messages":
        ids = _chat_prompt(request, model)
    else:
        ids = list(request.token_ids.token_ids)
        if not ids:
            raise _invalid("token_ids is empty")
        bad = [t for t in ids if t >= model.vocab_size]
        if bad:
            raise _invalid(
                f"token_ids {bad[:5]} outside the vocabulary (size {model.vocab_size})"
            )
    if not ids:
        raise _invalid("prompt tokenizes to no tokens")
    if len(ids) >= model.max_model_len:
        raise _invalid(
            f"prompt has {len(ids)} tokens but the model context holds {model.max_model_len} "
            "(prompt plus at least one generated token)"
        )
    return ids


def _chat_prompt(request: router_pb2.GenerateRequest, model: ServedModel) -> list[int]:
    """The conversation (and its tools) rendered with the model's chat template."""
    turns = request.messages.messages
    if not turns:
        raise _invalid("messages is empty")
    for i, m in enumerate(turns):
        _check(request_rules.check_role, f"messages[{i}].role", m.role)
    chars = sum(len(m.content) + sum(len(c.arguments) for c in m.tool_calls) for m in turns)
    chars += sum(len(t.parameters) + len(t.description) for t in request.tools)
    _check(request_rules.check_prompt_chars, chars, model.max_model_len)
    extra = {}
    if request.tools:
        if not tools.template_supports_tools(model.tokenizer.chat_template):
            raise _invalid(f"tools: {tools.NO_TOOLS_TEMPLATE}")
        _check(tools.check_tools, request.tools)
        extra["tools"] = tools.template_tools(list(request.tools))
    messages = [tools.template_message(m) for m in turns]
    try:
        return model.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                   **extra)
    except (jinja2.TemplateError, ValueError, TypeError) as exc:
        raise _invalid(f"cannot apply the model's chat template to messages: {exc}") from exc


def _check_choices_spellable(params: SamplingParams, model: ServedModel) -> None:
    """A choice of structured output must be text the model's vocabulary can write: one
    with characters the tokenizer has no bytes for (its tokens read as U+FFFD) has no token
    path, and the grammar would refuse the only tokens its mask leaves."""
    spec = params.structured_output
    if spec is None or spec.kind is not OutputKind.CHOICE:
        return
    tokenizer = model.tokenizer
    for i, choice in enumerate(json.loads(spec.spec)):
        written = tokenizer.decode(tokenizer.encode(choice), skip_special_tokens=False)
        if written.count("\ufffd") > choice.count("\ufffd"):  # bytes the vocabulary lacks
            raise _invalid(f"invalid structured output: choice {i} ({choice[:40]!r}) cannot be "
                           f"written in this model's vocabulary (its tokens read "
                           f"{written[:40]!r})")


def resolve_sampling(
    msg: common_pb2.SamplingParams,
    prompt_len: int,
    model: ServedModel,
    default_max_tokens: int | None,
) -> SamplingParams:
    """Validated params with every optional field resolved (max_tokens, seed included)."""
    if msg.top_logprobs and not msg.logprobs:
        raise _invalid("invalid sampling_params: top_logprobs needs logprobs=true")
    room = model.max_model_len - prompt_len  # >= 1: prompt_token_ids checked it
    try:
        params = sampling_from_proto(msg)
    except ValueError as exc:
        raise _invalid(f"invalid sampling_params: {exc}") from exc
    if msg.HasField("max_tokens"):
        if msg.max_tokens > room:
            raise _invalid(
                f"prompt ({prompt_len} tokens) plus max_tokens ({msg.max_tokens}) exceeds the "
                f"model context of {model.max_model_len} tokens"
            )
        max_tokens = msg.max_tokens
    else:
        max_tokens = room if default_max_tokens is None else min(default_max_tokens, room)
    bad = [t for t in params.stop_token_ids if t >= model.vocab_size]
    if bad:
        raise _invalid(
            f"invalid sampling_params: stop_token_ids {bad[:5]} outside the vocabulary "
            f"(size {model.vocab_size})"
        )
    bad = [t for t, _ in params.logit_bias if t >= model.vocab_size]
    if bad:
        raise _invalid(
            f"invalid sampling_params: logit_bias token ids {bad[:5]} outside the vocabulary "
            f"(size {model.vocab_size})"
        )
    _check_choices_spellable(params, model)
    # An explicit seed makes the prefill and the decode worker draw from one stream.
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    return dataclasses.replace(params, max_tokens=max_tokens, seed=seed)


def validate_request(
    request: router_pb2.GenerateRequest,
    model: ServedModel,
    block_size: int,
    default_max_tokens: int | None = 16,
) -> ValidatedRequest:
    _check(request_rules.check_request_id, request.request_id)
    if len(request.model) > request_rules.MAX_MODEL_NAME_CHARS:
        raise ServiceError(grpc.StatusCode.NOT_FOUND,
                           f"no model has a name of {len(request.model)} characters")
    if request.model and request.model != model.model_id:
        raise ServiceError(
            grpc.StatusCode.NOT_FOUND,
            f"model {request.model!r} is not served here; available: [{model.model_id!r}]",
        )
    _check(check_stream_pace, request.stream_pace_tokens_per_s)
    ids = prompt_token_ids(request, model)
    params = resolve_sampling(request.sampling_params, len(ids), model, default_max_tokens)
    worker_request_id = uuid.uuid4().hex
    return ValidatedRequest(
        request_id=request.request_id or worker_request_id,
        worker_request_id=worker_request_id,
        prompt_token_ids=ids,
        params=params,
        worker_params=sampling_to_proto(params, with_stop_strings=False),
        block_hashes=compute_block_hashes(ids, block_size),
        priority=request.priority,
        stream_pace_tokens_per_s=request.stream_pace_tokens_per_s,
    )
