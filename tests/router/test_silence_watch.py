"""SilenceWatch: the decode stream's watchdog (one timer task per stream, not one per read).

The call is a stand-in for grpc's call object (cancel/done only); the probe stands in for
the health check; the WorkerDirectory is the router's own. The frozen-worker service test
(tests/service/test_resume.py) runs the same watch against real processes."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from splitserve.router import output_channel as router_oc
from splitserve.router import watch as watch_module
from splitserve.router.output_channel import Mailbox
from splitserve.router.policy import WorkerView
from splitserve.router.request import _watch_admit_stream
from splitserve.router.watch import SilenceWatch, WorkerLost
from splitserve.router.workers import WorkerDirectory
from splitserve.v1 import worker_pb2

WORKER = WorkerView("decode-x", address="10.0.0.9:1")


class _Call:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> bool:
        self.cancelled = True
        return True

    def done(self) -> bool:
        return self.cancelled


def _failing_probe(counter: list[int]):
    async def probe() -> None:
        counter.append(1)
        raise grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(),
                                   grpc.aio.Metadata(), "probe timed out")
    return probe


@pytest.fixture(autouse=True)
def _fast_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch_module, "STALL_PROBE_S", 0.05)
    monkeypatch.setattr(watch_module, "PROBE_TIMEOUT_S", 0.02)


def _directory() -> WorkerDirectory:
    return WorkerDirectory(None, "m", 16, refresh_s=1.0)  # type: ignore[arg-type]


def test_a_silent_worker_is_lost_after_two_failed_probes() -> None:
    async def main() -> tuple[WorkerLost | None, bool, int]:
        call, probes = _Call(), []
        watch = SilenceWatch(call, "decode", WORKER, _failing_probe(probes), _directory())
        await asyncio.sleep(0.4)
        watch.stop()
        return watch.lost, call.cancelled, len(probes)

    lost, cancelled, probes = asyncio.run(main())
    assert lost is not None and cancelled and probes == 2
    assert lost.role == "decode" and lost.worker is WORKER and not lost.planned
    assert lost.code == grpc.StatusCode.UNAVAILABLE
    assert "2 health probes failed" in lost.message and "DEADLINE_EXCEEDED" in lost.message


def test_failed_probes_of_a_worker_that_answers_other_calls_are_forgiven() -> None:
    async def main() -> tuple[WorkerLost | None, bool, int]:
        call, probes, directory = _Call(), [], _directory()
        watch = SilenceWatch(call, "decode", WORKER, _failing_probe(probes), directory)
        for _ in range(40):  # another request's stream on the same worker gets answers
            directory.heard_from(WORKER)
            await asyncio.sleep(0.01)
        watch.stop()
        return watch.lost, call.cancelled, len(probes)

    lost, cancelled, probes = asyncio.run(main())
    assert probes >= 2  # it did probe: this stream was quiet
    assert lost is None and not cancelled


def test_a_stream_that_gets_messages_is_never_probed() -> None:
    async def main() -> tuple[WorkerLost | None, int, bool]:
        call, probes = _Call(), []
        watch = SilenceWatch(call, "decode", WORKER, _failing_probe(probes), _directory())
        for _ in range(40):
            watch.heard()
            await asyncio.sleep(0.01)
        watch.stop()
        await asyncio.sleep(0)  # let the cancellation land
        return watch.lost, len(probes), watch._task.cancelled()

    lost, probes, stopped = asyncio.run(main())
    assert lost is None and probes == 0 and stopped


class _EndedStream(_Call):
    """An Admit stream that D ended with OK (its outputs went over the output channel)."""

    async def read(self) -> object:
        self.cancelled = True  # (done)
        return grpc.aio.EOF


async def _healthy() -> None:
    return None


def test_a_last_output_that_never_comes_over_the_channel_loses_the_worker(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """D ended the Admit stream after putting the last output on its channel; if that output
    never arrives (a channel that died without closing), the request's read fails with
    WorkerLost after LAST_OUTPUT_WAIT_S instead of waiting for ever."""
    monkeypatch.setattr(router_oc, "LAST_OUTPUT_WAIT_S", 0.1)

    async def main() -> None:
        call, mailbox = _EndedStream(), Mailbox()
        watch = SilenceWatch(call, "decode", WORKER, _healthy, _directory())
        task = asyncio.get_running_loop().create_task(
            _watch_admit_stream(call, mailbox, watch, WORKER, WORKER.worker_id))
        mailbox.put(worker_pb2.DecodeOutput(token_ids=[1]))  # outputs already here come first
        assert (await mailbox.get()).token_ids == [1]
        with pytest.raises(WorkerLost) as caught:
            await asyncio.wait_for(mailbox.get(), 5)
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert "did not come over the output channel" in caught.value.message
        await task
        watch.stop()

    asyncio.run(main())


def test_a_last_output_that_comes_in_time_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(router_oc, "LAST_OUTPUT_WAIT_S", 0.3)

    async def main() -> None:
        call, mailbox = _EndedStream(), Mailbox()
        watch = SilenceWatch(call, "decode", WORKER, _healthy, _directory())
        task = asyncio.get_running_loop().create_task(
            _watch_admit_stream(call, mailbox, watch, WORKER, WORKER.worker_id))
        await asyncio.sleep(0.05)  # the EOF came first, the output a moment later
        mailbox.put(worker_pb2.DecodeOutput(token_ids=[7], finish_reason=1))
        assert (await mailbox.get()).token_ids == [7]
        task.cancel()  # the request leaves with its last output
        await asyncio.sleep(0.4)
        assert task.cancelled()
        watch.stop()

    asyncio.run(main())
