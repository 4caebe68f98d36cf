"""The prefill worker: computes prompts and ships their KV to decode workers.

Life cycle of a request:
1. Prefill (gRPC, from the router) names the decode worker D, the blocks D reserved for the
   prompt and D's KV layout. The layout must equal ours; the blocks must cover the prompt.
2. The request joins the engine's queue with max_tokens=1: prompts are batched with chunked
   prefill and reuse this worker's prefix cache.
3. On the step that computes the prompt's last chunk, the layer hook starts the KV send
   and, as each layer finishes, packs that layer's blocks (prefix-cached ones included) into
   one buffer that a background thread sends to D while the next layers compute
   (WorkerOptions.kv_send "layer", and "auto" on a GPU). With "whole" ("auto" on CPU for
   short prompts) the hook packs every layer into one message once the last layer is
   computed: over gloo's TCP sockets a message per layer costs more CPU than its overlap
   saves for them.
4. The step samples the first token and the request finishes here: its blocks go back to
   the pool at once (full blocks stay in the prefix cache). That is safe because every
   layer was copied out before the step ended.
5. The RPC returns the first token once D has received every layer (or fails if the
   transfer fails or times out; the router then aborts the request on D).
Abort (or the caller going away) removes the request from the engine and fails its send.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from splitserve.cluster.store import ClusterStore
from splitserve.common.kv_layout import KVLayout, check_compatible
from splitserve.common.outputs import StepOutput, TokenLogprobs
from splitserve.common.sampling_params import SamplingParams
from splitserve.engine.engine_loop import EngineStopped
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.model import LayerHook
from splitserve.engine.scheduler import SchedulerOutput
from splitserve.kvtransfer.state import KVTransfer, TransferState
from splitserve.worker.core import WorkerCore
from splitserve.worker.runtime import WorkerOptions, WorkerRuntime

_NO_DEADLINE_S = 86400.0 * 365  # a caller's time left beyond this means "no deadline"


class PrefillError(Exception):
    """A prefill that could not complete; `code` is the gRPC status to report."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class PrefillJob:
    request_id: str
    dst_worker: str
    dst_block_ids: list[int]
    dst_endpoint: str | None = None  # D's published KV endpoint (where the pair meets)
    arrived_at: float = field(default_factory=time.monotonic)
    scheduled_at: float | None = None
    computed_at: float | None = None
    transfer: KVTransfer | None = None
    output: StepOutput | None = None
    error: PrefillError | None = None
    finished: threading.Event = field(default_factory=threading.Event)


# kv_send "auto" on CPU: a prompt's KV goes a layer at a time only where each layer's
# message is at least this big. Over gloo's TCP sockets each message costs the sending and
# the receiving process about a millisecond of CPU beside the prompt's compute; below this
# size that costs more than overlapping the transfer saves (measured on a 2-core host,
# SmolLM2-135M fp32, 1,536 bytes per token and layer: 64- and 256-token prompts 3-15%
# sooner whole; from 512 tokens on per layer as fast or up to 7% sooner; BENCHMARKS.md).
KV_LAYER_MESSAGE_MIN_BYTES = 512 * 1024


@dataclass(frozen=True, slots=True)
class PrefillResult:
    first_token_id: int
    first_token_logprob: TokenLogprobs | None
    num_cached_tokens: int
    queue_ms: float
    compute_ms: float
    kv_transfer_ms: float  # transfer time left exposed after the prompt's compute ended
    kv_transfer_bytes: int


class PrefillWorker(WorkerRuntime):
    role = "prefill"
    # A Prefill refused while draining makes the router resume the request elsewhere and
    # leave this worker's address out for a while (the new role's too): after leaving the
    # cluster in a role switch, keep taking prefills until every router's view (refreshed
    # every 0.25 s by default) has dropped this role.
    switch_grace_s = 1.0

    def __init__(self, options: WorkerOptions, store: ClusterStore | None = None,
                 core: WorkerCore | None = None) -> None:
        super().__init__(options, store, core)
        self._jobs: dict[str, PrefillJob] = {}  # touched on the engine thread only
        self.engine.layer_hook_builder = self._layer_hook

    def _register(self, server: grpc.Server) -> list[str]:
        from splitserve.prefill_worker.servicer import add_prefill_servicer

        return add_prefill_servicer(server, self)

    # ---- called from RPC threads ----------------------------------------------------------
    def prefill(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        dst_worker: str,
        dst_block_ids: list[int],
        layout: KVLayout,
        timeout_s: float | None = None,
        num_sampled: int = 0,  # the prompt ends with this much of the request's own output
        dst_endpoint: str | None = None,
        priority: int = 0,  # scheduling class, lower first
        on_admitted: Callable[[], None] | None = None,  # called once the prompt is queued
    ) -> PrefillResult:
        if self.draining.is_set():
            raise PrefillError(grpc.StatusCode.UNAVAILABLE, f"{self.worker_id} is draining")
        try:
            check_compatible(self.layout, layout)
        except ValueError as exc:
            raise PrefillError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from exc
        needed = self.engine.block_manager.blocks_needed(len(prompt_token_ids))
        if len(dst_block_ids) != needed:
            raise PrefillError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(dst_block_ids)} decode blocks for a {len(prompt_token_ids)}-token prompt; "
                f"need {needed} (block_size {self.engine.block_size})",
            )
        # One token, sampled with the request's own parameters; stop strings are the router's.
        first_only = dataclasses.replace(params, max_tokens=1, ignore_eos=True, stop=(),
                                         stop_token_ids=())
        job = PrefillJob(request_id, dst_worker, list(dst_block_ids), dst_endpoint or None)
        try:
            self.loop.call(lambda e: self._add(e, job, prompt_token_ids, first_only, num_sampled,
                                               priority))
        except ValueError as exc:
            raise PrefillError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        except EngineStopped as exc:  # its engine failed, or it is stopping
            raise PrefillError(grpc.StatusCode.UNAVAILABLE,
                               f"{self.worker_id} takes no more work: {exc}") from exc
        if on_admitted is not None:  # every load snapshot from now on shows the prompt
            on_admitted()
        if not timeout_s or timeout_s > _NO_DEADLINE_S:
            # No deadline: gRPC's time_remaining() is then ~1e18 s, too long for a wait.
            timeout_s = self.options.kv_timeout_s * 2
        return self._await(job, timeout_s)

    def in_flight(self) -> int:
        """Prefills still computing here (not counting the engine's other requests: during
        a role switch the next role shares the engine)."""
        return len(self._jobs)

    def fail_in_flight(self, engine: LLMEngine, reason: str) -> int:
        """Every prefill still computing here fails with UNAVAILABLE (its send, if begun,
        aborted); the router resumes those requests with another prefill worker. A prefill
        already computed whose KV is still on its way is left to its transfer."""
        jobs = list(self._jobs.values())
        self._jobs.clear()
        for job in jobs:
            self.loop.drop_sink(job.request_id)
            self.kv.abort(job.request_id, reason)
            job.error = PrefillError(grpc.StatusCode.UNAVAILABLE, reason)
            job.finished.set()
        return len(jobs)

    # ---- a role switch (worker.flip) ------------------------------------------------------
    def abort_in_flight(self) -> int:
        """After a drain that ran out of time: abort every prefill still here (their
        callers see ABORTED and move on); how many."""
        def on_loop(engine: LLMEngine) -> int:
            ids = list(self._jobs)
            for request_id in ids:
                self._abort(engine, request_id)
            return len(ids)

        return self.loop.call(on_loop)

    def release(self) -> None:
        super().release()
        if self.engine.layer_hook_builder == self._layer_hook:  # (no step runs: drained)
            self.engine.layer_hook_builder = None

    # ---- on the engine thread -------------------------------------------------------------
    def _add(self, engine: LLMEngine, job: PrefillJob, prompt: list[int], params: SamplingParams,
             num_sampled: int, priority: int) -> None:
        if job.request_id in self._jobs:
            raise ValueError(f"request {job.request_id!r} is already being prefilled here")
        engine.add_request(prompt, params, job.request_id, num_sampled, priority)
        self._jobs[job.request_id] = job
        self.loop.set_sink(job.request_id, lambda out: self._on_output(job, out))

    def _on_output(self, job: PrefillJob, out: StepOutput) -> None:
        job.output = out
        job.computed_at = time.monotonic()
        self._jobs.pop(job.request_id, None)
        job.finished.set()

    def _abort(self, engine: LLMEngine, request_id: str) -> bool:
        job = self._jobs.pop(request_id, None)
        found = engine.abort(request_id)
        if found:
            self.loop.count_finished("abort")
        self.loop.drop_sink(request_id)
        self.kv.abort(request_id, "aborted by the router")
        if job is not None:
            job.error = PrefillError(grpc.StatusCode.ABORTED, f"request {request_id} aborted")
            job.finished.set()
        return found or job is not None

    def _layer_hook(self, plan: SchedulerOutput) -> LayerHook | None:
        now = time.monotonic()
        sending: list[PrefillJob] = []
        for item in plan.scheduled:
            job = self._jobs.get(item.seq.request_id)
            if job is None:
                continue
            if job.scheduled_at is None:
                job.scheduled_at = now
            if item.completes and job.transfer is None:
                src = item.seq.block_table[: len(job.dst_block_ids)]
                try:
                    job.transfer = self.kv.start_send(
                        job.request_id, job.dst_worker, src, job.dst_block_ids,
                        peer_endpoint=job.dst_endpoint,
                    )
                except ValueError as exc:
                    job.error = PrefillError(grpc.StatusCode.INTERNAL, f"KV send: {exc}")
                    continue
                sending.append(job)
        if not sending:
            return None
        caches = self.engine.runner.kv_caches
        last = len(caches) - 1
        per_layer: list[PrefillJob] = []
        whole: list[PrefillJob] = []
        for job in sending:
            (per_layer if self._sends_per_layer(len(job.dst_block_ids)) else whole).append(job)

        def send(layer: int) -> None:
            k_cache, v_cache = caches[layer]
            for job in per_layer:
                if job.transfer is not None:
                    self.kv.send_layer(job.transfer, layer, k_cache, v_cache)
            if layer == last and whole:
                k_caches, v_caches = [k for k, _ in caches], [v for _, v in caches]
                for job in whole:
                    if job.transfer is not None:
                        self.kv.send_all_layers(job.transfer, k_caches, v_caches)

        return send

    def _sends_per_layer(self, num_blocks: int) -> bool:
        """WorkerOptions.kv_send for a prompt of `num_blocks` KV blocks ("auto": per layer on a
        GPU; on CPU only where each layer's message reaches KV_LAYER_MESSAGE_MIN_BYTES)."""
        mode = self.options.kv_send
        if mode == "auto":
            if self.engine.runner.device.type != "cpu":
                return True
            return num_blocks * self.layout.bytes_per_block_per_layer >= KV_LAYER_MESSAGE_MIN_BYTES
        return mode == "layer"

    # ---- waiting for the result (RPC thread) ----------------------------------------------
    def _await(self, job: PrefillJob, timeout_s: float) -> PrefillResult:
        deadline = time.monotonic() + timeout_s
        if not job.finished.wait(timeout_s):
            self.abort(job.request_id)
            raise PrefillError(grpc.StatusCode.DEADLINE_EXCEEDED, "prefill timed out")
        if job.error is not None:
            raise job.error
        transfer = job.transfer
        assert job.output is not None and transfer is not None
        if not transfer.wait(deadline - time.monotonic()).finished:
            self.kv.abort(job.request_id, "prefill deadline")
        if transfer.poll() is not TransferState.DONE:
            raise PrefillError(
                grpc.StatusCode.INTERNAL, f"KV transfer to {job.dst_worker} failed: {transfer.error}"
            )
        done_at = time.monotonic()
        assert job.scheduled_at is not None and job.computed_at is not None
        out = job.output
        return PrefillResult(
            first_token_id=out.new_token_ids[0],
            first_token_logprob=out.new_logprobs[0] if out.new_logprobs else None,
            num_cached_tokens=out.num_cached_tokens,
            queue_ms=(job.scheduled_at - job.arrived_at) * 1000.0,
            compute_ms=(job.computed_at - job.scheduled_at) * 1000.0,
            kv_transfer_ms=max(0.0, done_at - job.computed_at) * 1000.0,
            kv_transfer_bytes=transfer.bytes,
        )
