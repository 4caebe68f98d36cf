"""splitserve.supervision's bookkeeping, without Ray (tests/service/test_service_ray.py runs
it on real actors): which workers a pass replaces, and a replacement that cannot start yet
tried again on the next pass. The actors' own answers are given by the test."""

from __future__ import annotations

from typing import Any

import pytest

from splitserve.supervision import WorkerSupervisor


class _Deployment:
    """What the supervisor uses of launcher.Deployment: workers(), remove_actor(),
    add_worker(); add_worker fails while `refuse` is above zero."""

    def __init__(self, roles: list[str]) -> None:
        self.actors: list[tuple[str, str]] = [(f"{r}-{i}", r) for i, r in enumerate(roles)]
        self.refuse = 0
        self.added = 0

    def workers(self) -> list[tuple[Any, str]]:
        return list(self.actors)

    def remove_actor(self, actor: Any) -> bool:
        for pair in self.actors:
            if pair[0] == actor:
                self.actors.remove(pair)
                return True
        return False

    def add_worker(self, role: str) -> str:
        if self.refuse:
            self.refuse -= 1
            raise RuntimeError("no room on the cluster")
        self.added += 1
        self.actors.append((f"{role}-new{self.added}", role))
        return f"127.0.0.1:{9000 + self.added}"


class _Supervisor(WorkerSupervisor):
    def __init__(self, deployment: _Deployment, problems: dict[str, str]) -> None:
        super().__init__(deployment, interval_s=60.0)  # type: ignore[arg-type]
        self.answers = problems
        self.stopped: list[str] = []

    def problems(self, actors: list[Any]) -> list[str | None]:
        return [self.answers.get(actor) for actor in actors]

    def _stop_actor(self, actor: Any) -> None:
        self.stopped.append(actor)


def test_a_pass_replaces_the_workers_that_failed_or_died_in_their_roles() -> None:
    deployment = _Deployment(["prefill", "decode", "decode"])
    supervisor = _Supervisor(deployment, {"decode-1": "failed", "prefill-0": "died"})
    supervisor.check()
    assert supervisor.stopped == ["prefill-0", "decode-1"]
    assert sorted(role for _, role in deployment.workers()) == ["decode", "decode", "prefill"]
    assert {a for a, _ in deployment.workers()} == {"decode-2", "prefill-new1", "decode-new2"}
    assert supervisor.replaced == {"prefill": 1, "decode": 1}
    supervisor.check()  # the healthy ones are left alone
    assert supervisor.replaced == {"prefill": 1, "decode": 1}


def test_a_replacement_that_cannot_start_is_tried_again_on_a_later_pass() -> None:
    deployment = _Deployment(["decode"])
    deployment.refuse = 1
    supervisor = _Supervisor(deployment, {"decode-0": "died"})
    supervisor.check()
    assert deployment.workers() == [] and supervisor.owed == {"prefill": 0, "decode": 1}
    supervisor.check()  # (a second try waits its second too)
    assert deployment.workers() == []
    supervisor._not_before["decode"] = 0.0
    supervisor.check()
    assert [role for _, role in deployment.workers()] == ["decode"]
    assert supervisor.owed["decode"] == 0 and supervisor.replaced["decode"] == 1


def test_a_worker_removed_by_someone_else_is_not_replaced_twice() -> None:
    deployment = _Deployment(["decode", "decode"])
    supervisor = _Supervisor(deployment, {"decode-0": "died"})
    deployment.remove_actor("decode-0")  # (remove_worker or shutdown got there first)
    deployment.actors.insert(0, ("decode-0", "decode"))  # still listed in this pass's copy
    deployment.remove_actor = lambda actor: False  # type: ignore[method-assign]
    supervisor.check()
    assert supervisor.stopped == [] and supervisor.replaced == {"prefill": 0, "decode": 0}


def test_replacements_of_a_role_that_keeps_failing_are_spaced_out() -> None:
    """An engine that fails at once would have its model reloaded on every pass: the
    second replacement in a row waits a second, the next two, and so on."""
    deployment = _Deployment(["decode"])
    supervisor = _Supervisor(deployment, {"decode-0": "died"})
    supervisor.check()  # the first: at once
    assert supervisor.replaced["decode"] == 1
    supervisor.answers["decode-new1"] = "failed"
    supervisor.check()
    assert supervisor.owed["decode"] == 1 and deployment.workers() == []  # not yet
    supervisor._not_before["decode"] = 0.0  # (its second passed)
    supervisor.check()
    assert supervisor.replaced["decode"] == 2 and supervisor.owed["decode"] == 0
    assert supervisor._backoff["decode"] == 2.0


def test_the_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval_s must be > 0"):
        WorkerSupervisor(_Deployment([]), interval_s=0)  # type: ignore[arg-type]
