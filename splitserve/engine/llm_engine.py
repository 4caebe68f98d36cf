"""The engine: a scheduler, a block manager and a model runner behind a step-level API.

Life cycle of a request: add_request validates and queues a Sequence; each step() the
scheduler picks prompt chunks and decodes within the token budget, the runner computes them
and samples for every sequence whose tokens are all computed (a request under a grammar
only among the tokens its matcher allows, engine.grammar); the StopChecker turns tokens
into text and decides when it finishes, as does a grammar that is complete; a finished or
aborted request's blocks go back to the pool at once (its full blocks stay in the prefix
cache until evicted). A paced request (stream_pace_tokens_per_s) sits out the steps in
which it is too far ahead of its reader (engine/pacing.py); when nothing else can run,
step() returns nothing and `idle_until` says when to step again.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from splitserve.common.outputs import StepOutput, TokenLogprobs
from splitserve.common.sampling_params import SamplingParams
from splitserve.common.step_time import StepTimeFit
from splitserve.engine import step_trace
from splitserve.engine.block_manager import BlockManager
from splitserve.engine.config import EngineConfig
from splitserve.engine.grammar import GrammarCompiler, StepMasks
from splitserve.engine.kv_tier import build_kv_tier
from splitserve.engine.model import LayerHook, ModelArch
from splitserve.engine.model_files import resolve_model
from splitserve.engine.model_runner import ModelRunner
from splitserve.engine.pacing import PaceClock, buffer_tokens
from splitserve.engine.sampler import skip_sample_draw
from splitserve.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from splitserve.engine.sequence import Sequence, SequenceStatus
from splitserve.engine.stop_checker import StopChecker
from splitserve.engine.tokenizer import Tokenizer


@dataclass(slots=True)
class RequestState:
    seq: Sequence
    stop_checker: StopChecker
    generator: torch.Generator | None
    logprobs: list[TokenLogprobs]
    grammar: Any = None  # an llguidance matcher when the request has structured output


@dataclass(frozen=True, slots=True)
class DetachedRequest:
    """A request taken out of the engine with its KV (see LLMEngine.detach)."""

    token_ids: list[int]  # prompt + output so far
    num_computed_tokens: int  # the leading tokens whose KV the blocks hold
    block_ids: list[int]  # exactly the blocks that hold them, in order


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.model_dir = resolve_model(config.model)
        self.tokenizer = Tokenizer.from_dir(self.model_dir)
        self.arch = ModelArch.from_model_dir(self.model_dir)
        self.runner = ModelRunner(config, self.arch, self.model_dir)
        self.block_size = config.block_size
        self.num_blocks = self.runner.num_blocks
        model_len = config.max_model_len or self.arch.max_position_embeddings
        # A sequence must always fit in the pool on its own, or preemption could not help it.
        self.max_model_len = min(model_len, self.arch.max_position_embeddings,
                                 self.num_blocks * self.block_size)
        self.kv_tier = build_kv_tier(config, self.runner.kv_pool, str(self.model_dir))
        self.block_manager = BlockManager(
            self.num_blocks, self.block_size, config.enable_prefix_caching, self.kv_tier
        )
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                            fair_share=config.fair_share,
                            priority_aging_s=config.priority_aging_s,
                            client_weights=config.client_weights),
            self.block_manager,
        )
        self.requests: dict[str, RequestState] = {}
        self.grammars = GrammarCompiler(self.tokenizer, self.arch.vocab_size)
        # Step times by what the step held: the worker publishes the fit (routing).
        self.step_times = StepTimeFit(self.config.max_num_batched_tokens)
        self.step_trace = step_trace.from_env()  # SPLITSERVE_STEP_TRACE: a line per step
        self._seed_rng = torch.Generator().manual_seed(config.seed)
        # Set by a prefill worker: builds the per-layer hook for a step (streams KV out).
        self.layer_hook_builder: Callable[[SchedulerOutput], LayerHook | None] | None = None
        # Called after every layer of a step's forward (not in a CUDA graph, which runs
        # no hooks): the engine loop runs urgent commands there (EngineLoop.submit).
        self.between_layers: Callable[[], None] | None = None
        # Set by step(): nothing ran because every runnable sequence is paced and ahead of
        # its reader; the time the first of them resumes. Cleared by any new request,
        # abort or detach (they change what can run).
        self.idle_until: float | None = None
        self.num_paced_requests = 0  # paced requests added since start
        self.num_paced_sit_outs = 0  # (sequence, step) pairs a paced sequence sat out

    # ---- requests ------------------------------------------------------------------------
    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if not prompt_token_ids:
            raise ValueError("prompt is empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt_token_ids)} tokens but the context holds "
                f"{self.max_model_len} (prompt plus at least one generated token)"
            )
        vocab = self.arch.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"unknown token ids {bad[:5]} (vocabulary size {vocab})")
        if any(t >= vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids outside the vocabulary (size {vocab})")

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        num_sampled: int = 0,
        priority: int = 0,
        stream_pace_tokens_per_s: float = 0.0,
        client: str = "",
    ) -> str:
        """Queue a request; a string prompt is tokenized without a chat template.

        `num_sampled`: the prompt's last tokens are this request's own output, sampled
        before (a request resumed after its first worker died); a seeded generator skips
        their draws so the continuation is the one an uninterrupted run samples.
        `priority`: the scheduling class, lower first (see Scheduler).
        `stream_pace_tokens_per_s`: a paced stream's delivery rate (0: not paced).
        `client`: who sent it, for fair share across clients (engine/fair_share.py)."""
        params = params or SamplingParams()
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = [int(t) for t in prompt]
        self.validate_prompt(token_ids, params)
        if not 0 <= num_sampled < len(token_ids):
            raise ValueError(f"num_sampled={num_sampled} must be in [0, prompt length)")
        seq = Sequence(request_id, token_ids, params, num_prior_outputs=num_sampled,
                       priority=priority, pace=self._pace(stream_pace_tokens_per_s),
                       client=client)
        self.requests[request_id] = self._new_state(seq, num_sampled)
        self.scheduler.add(seq)
        self.idle_until = None
        return request_id

    def add_prefilled_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        first_token_id: int,
        params: SamplingParams,
        block_ids: list[int],
        num_sampled: int = 1,
        priority: int = 0,
        stream_pace_tokens_per_s: float = 0.0,
        client: str = "",
    ) -> StepOutput | None:
        """Join the running batch with a prompt whose KV another worker computed into
        `block_ids` (already allocated from this engine's pool, see reserve_blocks).

        The first token was sampled by the prefill worker; it is checked for a stop here.
        `num_sampled`: draws the request's generator skips, that first token's included
        (more for a resumed request whose prompt ends with its earlier output).
        Returns a finished StepOutput when that token already ends the request (its blocks
        are freed; e.g. it completes the request's grammar), else None and the request
        decodes from the next step on. Either way the first token is not in an output: the
        caller has it (the router relayed it from the prefill worker's answer).
        """
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.validate_prompt(prompt_token_ids, params)
        if len(block_ids) != self.block_manager.blocks_needed(len(prompt_token_ids)):
            raise ValueError("block_ids must cover exactly the prompt")
        if not 1 <= num_sampled <= len(prompt_token_ids) + 1:
            raise ValueError(f"num_sampled={num_sampled} must be in [1, prompt length + 1]")
        seq = Sequence(request_id, list(prompt_token_ids), params,
                       num_prior_outputs=num_sampled - 1,  # the first token is one of them
                       priority=priority, pace=self._pace(stream_pace_tokens_per_s),
                       client=client)
        seq.block_table = list(block_ids)
        seq.num_computed_tokens = len(prompt_token_ids)
        state = self._new_state(seq, num_sampled=num_sampled)
        self.requests[request_id] = state
        self.scheduler.add_running(seq)  # (counted among its client's sequences)
        self.idle_until = None
        output = self._process_token(seq, first_token_id, None)  # starts a pace's clock
        if not output.finished:
            self.block_manager.cache_full_blocks(seq)
            return None
        return dataclasses.replace(output, new_token_ids=[], new_text="", new_logprobs=[])

    def _pace(self, tokens_per_s: float) -> PaceClock | None:
        if tokens_per_s == 0:
            return None
        if not 0 < tokens_per_s < float("inf"):
            raise ValueError(f"stream_pace_tokens_per_s must be >= 0, got {tokens_per_s}")
        self.num_paced_requests += 1
        return PaceClock(tokens_per_s,
                         buffer_tokens(tokens_per_s, self.config.stream_pace_buffer_s))

    def reserve_blocks(self, num_tokens: int) -> list[int] | None:
        """Blocks for `num_tokens` incoming KV slots, outside any sequence (None if short)."""
        return self.block_manager.allocate_blocks(self.block_manager.blocks_needed(num_tokens))

    def release_blocks(self, block_ids: list[int]) -> None:
        self.block_manager.free_blocks(block_ids)

    def _new_state(self, seq: Sequence, num_sampled: int = 0) -> RequestState:
        """`num_sampled`: tokens of this request another worker already sampled; a seeded
        generator skips their draws so the stream continues exactly as in one engine."""
        params = seq.params
        generator = None
        if not params.greedy:
            seed = params.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,), generator=self._seed_rng))
            generator = torch.Generator(device=self.runner.device).manual_seed(seed)
            for _ in range(num_sampled):
                skip_sample_draw(generator, self.arch.vocab_size)
        grammar = None
        if params.structured_output is not None:
            # The prompt's last tokens that are this request's earlier output (a resumed
            # request) move the grammar on; the prefill worker's first token follows.
            earlier = seq.penalized_output_ids
            grammar = self.grammars.new_matcher(params.structured_output, earlier)
        checker = StopChecker(
            self.tokenizer,
            seq.prompt_token_ids,
            params,
            self.tokenizer.eos_token_ids,
            self.max_model_len,
        )
        return RequestState(seq, checker, generator, [], grammar)

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks. Returns False if it is unknown or finished."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return False
        self._finish(state.seq, "abort")
        self.idle_until = None  # its blocks may let a waiting request in
        return True

    def detach(self, request_id: str) -> DetachedRequest | None:
        """Take a running request out of the engine with its KV kept: for live migration.

        Only a request between steps whose every token but the last (sampled, not yet fed)
        has its KV computed can move; None (nothing changed) for any other or an unknown
        id. The caller owns the returned blocks and frees them with release_blocks()."""
        state = self.requests.get(request_id)
        if state is None:
            return None
        seq = state.seq
        if (seq.status is not SequenceStatus.RUNNING or seq.num_output_tokens == 0
                or seq.num_computed_tokens != seq.num_tokens - 1):
            return None
        del self.requests[request_id]
        self.scheduler.detach(seq)
        self.idle_until = None
        seq.finish_reason = "abort"
        seq.status = SequenceStatus.FINISHED
        n = self.block_manager.blocks_needed(seq.num_computed_tokens)
        blocks, seq.block_table = seq.block_table, []
        if len(blocks) > n:  # a slot reserved for the next token: not part of the KV
            self.block_manager.free_blocks(blocks[n:])
            blocks = blocks[:n]
        return DetachedRequest(list(seq.token_ids), seq.num_computed_tokens, blocks)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self.scheduler.remove(seq)
        seq.status = SequenceStatus.FINISHED

    # ---- the step ------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        plan = self.scheduler.schedule()
        self.num_paced_sit_outs += plan.num_sat_out
        if plan.is_empty:
            self.idle_until = plan.resume_time
            return []
        self.idle_until = None
        hook = self.layer_hook_builder(plan) if self.layer_hook_builder else None
        if self.between_layers is not None and self.runner.graphs is None:
            hook = _then(hook, self.between_layers)
        masks = self._start_masks(plan)
        prompt_tokens = sum(item.num_tokens for item in plan.scheduled if item.seq.is_prefilling)
        trace = self.step_trace
        wall_start = time.time() if trace is not None else 0.0
        started = time.perf_counter()
        sampled, result = self.runner.execute(plan.scheduled, self._generator_of, hook, masks)
        seconds = time.perf_counter() - started
        self.step_times.observe(seconds, len(plan.scheduled), prompt_tokens)
        if trace is not None:
            decoding = [item.seq for item in plan.scheduled if not item.seq.is_prefilling]
            trace.record(wall_start, seconds, len(plan.scheduled), prompt_tokens, len(decoding),
                         sum(seq.num_computed_tokens for seq in decoding))
        for item in plan.scheduled:
            item.seq.num_computed_tokens += item.num_tokens
            if item.seq.first_scheduled_time is None:
                item.seq.first_scheduled_time = time.monotonic()
            self.block_manager.cache_full_blocks(item.seq)
        outputs = []
        for item, token_id, logprob in zip(sampled, result.token_ids, result.logprobs, strict=True):
            outputs.append(self._process_token(item.seq, token_id, logprob))
        return outputs

    def _start_masks(self, plan: SchedulerOutput) -> StepMasks | None:
        """Begin filling the grammar masks of this step's constrained samplers (they are
        ready by the time the forward pass has produced logits)."""
        constrained = []
        for item in plan.scheduled:
            if item.completes:
                grammar = self.requests[item.seq.request_id].grammar
                if grammar is not None:
                    constrained.append((item.seq, grammar))
        return self.grammars.start_masks(constrained) if constrained else None

    def _generator_of(self, seq: Sequence) -> torch.Generator | None:
        return self.requests[seq.request_id].generator

    def _process_token(
        self, seq: Sequence, token_id: int, logprob: TokenLogprobs | None
    ) -> StepOutput:
        state = self.requests[seq.request_id]
        seq.append_token(token_id)
        if seq.pace is not None:
            seq.pace.on_token(time.monotonic())
        if logprob is not None:
            state.logprobs.append(logprob)
        grammar_end = (_grammar_finish(state.grammar, token_id)
                       if state.grammar is not None else None)
        delta, reason = state.stop_checker.add(token_id, grammar_end)
        if reason is not None:
            self._finish(seq, reason)
            del self.requests[seq.request_id]
        return StepOutput(
            request_id=seq.request_id,
            new_token_ids=[token_id],
            new_text=delta,
            finished=reason is not None,
            finish_reason=reason,
            new_logprobs=[logprob] if logprob is not None else [],
            num_cached_tokens=seq.num_cached_tokens,
            error=(f"token {token_id} does not follow the request's grammar (sampled "
                   "without its mask)" if reason == "error" else ""),
        )


def _grammar_finish(matcher: Any, token_id: int) -> str | None:
    """Feed a sampled token to the request's grammar: "stop" once the grammar is complete
    (no token can extend it: the output is whole without an EOS), "error" if the token is
    refused (never for a masked sample; a peer that sampled unmasked would cause it)."""
    if not matcher.consume_token(token_id):
        return "error"
    return "stop" if matcher.is_stopped() else None


def _then(hook: LayerHook | None, after: Callable[[], None]) -> LayerHook:
    """A layer hook that runs `hook` (if any), then `after`."""
    if hook is None:
        return lambda _layer: after()

    def both(layer: int) -> None:
        hook(layer)
        after()

    return both
