"""Runs an LLMEngine on a thread of its own, for the workers' gRPC servers.

The engine is single-threaded: only the loop thread touches it. Other threads hand it
work with submit(fn) (fn runs on the loop thread between steps and its result comes back
as a Future; an urgent fn also runs between two layers of a step's forward, so it need not
wait for the rest of a long step: see submit), and receive StepOutputs through per-request
sinks called on the loop thread (a sink must be quick: typically queue.put). Pollers (e.g.
KV transfers to watch) run every iteration; while any exist the loop wakes at least every
`poll_interval_s`. When the only unfinished requests are paced streams ahead of their
readers (engine.idle_until), the loop sleeps until the first of them resumes, or until a
command arrives, never spinning.

A step that raises (an out-of-memory forward, a bug) leaves the engine's state unknown: the
loop stops for good (`failure` holds the exception), runs its `on_failure` handler once (the
worker hands its requests back and leaves the cluster), fails the queued commands and every
later submit() with EngineStopped. It never goes on as if nothing happened, and it never
dies silently with its worker still looking healthy.

EngineLoop.build(make_engine) builds the engine on the loop's own thread. Workers use it:
OpenMP keeps a thread pool per thread that has run parallel torch ops, and with more pool
threads than cores libgomp stops spinning between parallel regions, so every op of a step
waits for a sleeping thread to wake. Measured (SmolLM2 bf16, 2 cores): a batch-1 decode step
takes 12 ms on the thread that loaded the model and 18-25 ms on another thread of the
same process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, TypeVar

from splitserve.common.outputs import StepOutput
from splitserve.common.step_time import StepTimeModel
from splitserve.engine.block_manager import PrefixEventLog
from splitserve.engine.kv_tier import TierStats
from splitserve.engine.llm_engine import LLMEngine

T = TypeVar("T")
Sink = Callable[[StepOutput], None]
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LoadSnapshot:
    """The engine's load as of the end of the last loop iteration (read by any thread)."""

    num_waiting: int = 0
    num_running: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    num_queued_tokens: int = 0
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0  # device and KV tier hits
    prefix_tier_hit_tokens: int = 0  # of those, loaded from the KV tier
    kv_tiers: Mapping[str, TierStats] = field(default_factory=dict)  # "host", "disk"
    step_model: StepTimeModel | None = None  # the engine's step times as fitted so far
    # When it was taken (wall clock): a report of it says nothing of what came after, for
    # as long as a step runs (the router counts what it sent since, router.worker_index).
    taken_at: float = field(default_factory=time.time)


class EngineStopped(RuntimeError):
    """The engine loop takes no more commands: it was stopped, or its engine failed (the
    failure is chained as the cause)."""


class EngineLoop:
    def __init__(self, engine: LLMEngine, poll_interval_s: float = 0.002):
        self.engine = engine
        self.poll_interval_s = poll_interval_s
        self.load = LoadSnapshot(num_total_blocks=engine.num_blocks,
                                 num_free_blocks=engine.block_manager.num_free_blocks)
        self._commands: deque[tuple[Callable[[LLMEngine], Any], Future[Any]]] = deque()
        self._urgent: deque[tuple[Callable[[LLMEngine], Any], Future[Any]]] = deque()
        engine.between_layers = self._run_urgent
        self._sinks: dict[str, Sink] = {}
        self._pollers: dict[str, Callable[[], bool]] = {}  # key -> poll(); False removes it
        # Run after each step's outputs went to their sinks, and after commands: whatever
        # the sinks held back to send as one (a decode worker's output channels).
        self._output_flushes: list[Callable[[], None]] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._prefix_events = PrefixEventLog()  # guarded by _wake
        self._tier_events: dict[str, PrefixEventLog] = {}  # KV tier -> its log; by _wake
        self.steps = 0  # steps that ran something
        self.idle_steps = 0  # steps that found only paced streams sitting out
        self.generated_tokens = 0
        # finish reason -> requests that left the engine (metrics); written on the loop
        # thread, read by any thread through finished_counts().
        self._finished: dict[str, int] = {}
        self._finished_lock = threading.Lock()
        self._go = threading.Event()  # start() on a loop whose thread built its engine
        # The exception that stopped the loop (None: running, or stopped by stop()).
        self.failure: BaseException | None = None
        # Called once on the loop thread when a step fails, with the engine and the
        # exception, before the queued commands are failed (the worker's role sets it).
        self.on_failure: Callable[[LLMEngine, BaseException], None] | None = None

    @classmethod
    def build(cls, make_engine: Callable[[], LLMEngine], poll_interval_s: float = 0.002
              ) -> EngineLoop:
        """A loop whose engine `make_engine` builds on the loop's own thread (see the module
        docstring); the thread waits for start() (or stop()) before it steps. Exceptions of
        make_engine are raised here."""
        built: Future[EngineLoop] = Future()

        def main() -> None:
            try:
                loop = cls(make_engine(), poll_interval_s)
            except BaseException as exc:  # the caller sees it
                built.set_exception(exc)
                return
            loop._thread = threading.current_thread()
            built.set_result(loop)
            loop._go.wait()
            loop._run()

        threading.Thread(target=main, name="engine-loop", daemon=True).start()
        return built.result()

    # ---- called from any thread -----------------------------------------------------------
    def start(self) -> None:
        if self._thread.ident is not None:
            self._go.set()  # built on its own thread: that thread is waiting for this
        else:
            self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._go.set()  # a built loop never started: its thread ends now
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self.engine.grammars.close()  # the structured-output mask thread

    def submit(self, fn: Callable[[LLMEngine], T], urgent: bool = False) -> Future[T]:
        """Run fn(engine) on the loop thread between steps, in submission order. `urgent`:
        also between two layers of a running step's forward (where the engine runs layer
        hooks: not inside a CUDA graph), ahead of the queued commands that are not. Only
        for a fn that touches nothing the step in flight uses: the free blocks and the
        worker's own bookkeeping, never a scheduled sequence or the scheduler's queues
        (a decode worker reserving blocks for a remote prefill, which would otherwise wait
        for the rest of a decode step)."""
        future: Future[T] = Future()
        with self._wake:
            if self._stopping:
                future.set_exception(self._stopped_error())
                return future
            (self._urgent if urgent else self._commands).append((fn, future))
            self._wake.notify()
        return future

    def call(self, fn: Callable[[LLMEngine], T], timeout_s: float = 60.0,
             urgent: bool = False) -> T:
        """submit(fn) and its result. Past `timeout_s` a command the loop has not begun is
        withdrawn (TimeoutError; it never runs); one already running is waited for, so
        that whatever it did (blocks reserved, a request queued) reaches the caller, never
        an effect nobody will undo."""
        future = self.submit(fn, urgent)
        try:
            return future.result(timeout_s)
        except FutureTimeout:  # (the builtin TimeoutError from Python 3.11 on)
            if future.cancel():
                raise
            return future.result()

    def post(self, fn: Callable[[LLMEngine], object], what: str) -> None:
        """submit(fn) without waiting for it: for callbacks on a thread that must not block
        (gRPC's own, which serves every call of the server). A failure is logged, naming
        `what`; a stopped loop's refusal is not (nothing is left to do)."""
        def logged(future: Future[object]) -> None:
            exc = future.exception()
            if exc is not None and not isinstance(exc, EngineStopped):
                log.error("%s failed", what, exc_info=exc)

        self.submit(fn).add_done_callback(logged)

    def finished_counts(self) -> dict[str, int]:
        """Requests finished since start, by finish reason (monotonic)."""
        with self._finished_lock:
            return dict(self._finished)

    def drain_prefix_events(self) -> tuple[list[int], list[int]]:
        with self._wake:
            return self._prefix_events.drain()

    def drain_tier_events(self) -> dict[str, tuple[list[int], list[int]]]:
        """KV tier ("host", "disk") -> its net (stored, evicted) hashes since the last call."""
        with self._wake:
            return {tier: log.drain() for tier, log in self._tier_events.items()}

    # ---- called on the loop thread (from submitted functions) ------------------------------
    def set_sink(self, request_id: str, sink: Sink) -> None:
        self._sinks[request_id] = sink

    def drop_sink(self, request_id: str) -> None:
        self._sinks.pop(request_id, None)

    def count_finished(self, reason: str) -> None:
        """Count a request that ended without a StepOutput passing through dispatch()."""
        with self._finished_lock:
            self._finished[reason] = self._finished.get(reason, 0) + 1

    def add_output_flush(self, flush: Callable[[], None]) -> None:
        """Run `flush` after each step's outputs are dispatched (and after commands). Any
        thread: the list is replaced, never changed in place, so the engine thread's pass
        over it is not disturbed."""
        self._output_flushes = [*self._output_flushes, flush]

    def remove_output_flush(self, flush: Callable[[], None]) -> None:
        self._output_flushes = [f for f in self._output_flushes if f != flush]

    def add_poller(self, key: str, poll: Callable[[], bool]) -> None:
        self._pollers[key] = poll

    def remove_poller(self, key: str) -> None:
        self._pollers.pop(key, None)

    # ---- the loop ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._iterate()
        except Exception as exc:  # a step failed: the engine's state is unknown
            self._fail(exc)
            return
        self._flush_outputs()
        self._fail_pending_commands()

    def _iterate(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._commands or self._urgent
                           or self._has_work()):
                    self._wake.wait(self._wait_s())
                    if self._pollers:
                        break
                if self._stopping:
                    break
                commands = [*self._urgent, *self._commands]
                self._urgent.clear()
                self._commands.clear()
            for fn, future in commands:
                self._run_command(fn, future)
            self._run_pollers()
            self._flush_outputs()
            if self._has_work():
                self._step()
            self._publish_load()

    def _fail(self, exc: Exception) -> None:
        log.critical("the engine failed; it takes no more work: %r", exc, exc_info=exc)
        with self._wake:
            self.failure = exc
            self._stopping = True
        handler = self.on_failure
        if handler is not None:
            try:
                handler(self.engine, exc)
            except Exception:
                log.exception("the engine failure's handler failed")
        self._flush_outputs()
        self._fail_pending_commands()

    def _stopped_error(self) -> EngineStopped:
        if self.failure is None:
            return EngineStopped("engine loop is stopped")
        error = EngineStopped(f"the engine failed: {self.failure!r}")
        error.__cause__ = self.failure
        return error

    def _has_work(self) -> bool:
        """Unfinished requests, and not all of them paced streams sitting out."""
        if not self.engine.has_unfinished():
            return False
        idle_until = self.engine.idle_until
        return idle_until is None or time.monotonic() >= idle_until

    def _wait_s(self) -> float:
        """How long to sleep for want of work: until a poll is due, a paced stream
        resumes, or (nothing at all to do) half a second, a command waking it earlier."""
        wait_s = self.poll_interval_s if self._pollers else 0.5
        idle_until = self.engine.idle_until
        if idle_until is not None and self.engine.has_unfinished():
            wait_s = min(wait_s, max(0.0, idle_until - time.monotonic()))
        return wait_s

    @property
    def num_paced_requests(self) -> int:
        return self.engine.num_paced_requests  # (an int read: any thread)

    @property
    def num_paced_sit_outs(self) -> int:
        return self.engine.num_paced_sit_outs

    def _run_command(self, fn: Callable[[LLMEngine], Any], future: Future[Any]) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(self.engine))
        except BaseException as exc:  # the caller sees it; the loop goes on
            future.set_exception(exc)

    def _run_urgent(self) -> None:
        """The urgent commands submitted so far (the engine calls this between layers)."""
        if not self._urgent:  # the common case: one deque check per layer
            return
        with self._wake:
            urgent = list(self._urgent)
            self._urgent.clear()
        for fn, future in urgent:
            self._run_command(fn, future)

    def _run_pollers(self) -> None:
        for key, poll in list(self._pollers.items()):
            try:
                keep = poll()
            except Exception:
                log.exception("poller %s failed", key)
                keep = False
            if not keep:
                self._pollers.pop(key, None)

    def _step(self) -> None:
        outputs = self.engine.step()
        if self.engine.idle_until is None:
            self.steps += 1
        else:
            self.idle_steps += 1
        try:
            for out in outputs:
                self.generated_tokens += len(out.new_token_ids)
                self.dispatch(out)
        finally:
            self._flush_outputs()

    def _flush_outputs(self) -> None:
        for flush in self._output_flushes:
            try:
                flush()
            except Exception:
                log.exception("flushing a step's outputs failed")

    def dispatch(self, out: StepOutput) -> None:
        sink = self._sinks.get(out.request_id)
        if out.finished:
            self._sinks.pop(out.request_id, None)
            self.count_finished(out.finish_reason or "unknown")
        if sink is not None:
            sink(out)

    def _publish_load(self) -> None:
        engine = self.engine
        bm = engine.block_manager
        stored, evicted = bm.drain_events()
        if stored or evicted:
            with self._wake:
                self._prefix_events.merge(stored, evicted)
        tier = engine.kv_tier
        if tier is not None:
            for name, (stored, evicted) in tier.drain_events().items():
                if stored or evicted:
                    with self._wake:
                        self._tier_events.setdefault(name, PrefixEventLog()).merge(
                            stored, evicted)
        self.load = LoadSnapshot(
            num_waiting=engine.scheduler.num_waiting,
            num_running=engine.scheduler.num_running,
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_blocks,
            num_queued_tokens=engine.scheduler.num_queued_tokens(),
            prefix_queried_tokens=bm.stats.queries,
            prefix_hit_tokens=bm.stats.hits,
            prefix_tier_hit_tokens=bm.stats.tier_hits,
            kv_tiers=tier.snapshot() if tier is not None else {},
            step_model=engine.step_times.model(),
        )

    def _fail_pending_commands(self) -> None:
        with self._wake:
            commands = [*self._urgent, *self._commands]
            self._urgent.clear()
            self._commands.clear()
        for _, future in commands:
            if future.set_running_or_notify_cancel():
                future.set_exception(self._stopped_error())
