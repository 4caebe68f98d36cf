"""SilenceWatch: the decode stream's watchdog (one timer task per stream, not one per read).

The call is a stand-in for grpc's call object (cancel/done only); the probe stands in for
the health check; the WorkerDirectory is the router's own. The frozen-worker service test
(tests/service/test_resume.py) runs the same watch against real processes."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from splitserve.router import watch as watch_module
from splitserve.router.policy import WorkerView
from splitserve.router.watch import SilenceWatch, WorkerLost
from splitserve.router.workers import WorkerDirectory

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
