"""splitserve.launcher.init_ray: a local head whose node timed out during startup gets one
more start; any other failure, or a second time-out, is raised."""

from __future__ import annotations

from typing import Any

import pytest

from splitserve import launcher

TIMED_OUT = Exception("The current node timed out during startup. This could happen "
                      "because some of the raylet failed to startup or the GCS has become "
                      "overloaded.")


class _FakeRay:
    """Stands in for the ray module's init/shutdown (a third-party library, not ours)."""

    def __init__(self, failures: list[BaseException]) -> None:
        self.failures = failures
        self.calls: list[str] = []

    def is_initialized(self) -> bool:
        return False

    def init(self, **kwargs: Any) -> None:
        self.calls.append("init")
        if self.failures:
            raise self.failures.pop(0)

    def shutdown(self) -> None:
        self.calls.append("shutdown")


@pytest.fixture
def fake_ray(monkeypatch: pytest.MonkeyPatch) -> Any:
    import ray
    from ray._private import ray_constants

    # init_ray sets these for the Ray processes it starts: put them back afterwards.
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "")
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", ray_constants.ENABLE_RAY_CLUSTER)

    def install(failures: list[BaseException]) -> _FakeRay:
        fake = _FakeRay(failures)
        for name in ("is_initialized", "init", "shutdown"):
            monkeypatch.setattr(ray, name, getattr(fake, name))
        return fake

    return install


def test_a_node_that_timed_out_is_started_again(fake_ray: Any) -> None:
    fake = fake_ray([TIMED_OUT])
    assert launcher.init_ray(None, num_cpus=2) is True
    assert fake.calls == ["init", "shutdown", "init"]


def test_a_second_time_out_and_other_errors_are_raised(fake_ray: Any) -> None:
    fake = fake_ray([TIMED_OUT, TIMED_OUT])
    with pytest.raises(Exception, match="timed out during startup"):
        launcher.init_ray(None, num_cpus=2)
    assert fake.calls == ["init", "shutdown", "init"]
    fake = fake_ray([ValueError("bad num_cpus")])
    with pytest.raises(ValueError, match="bad num_cpus"):
        launcher.init_ray(None, num_cpus=2)
    assert fake.calls == ["init"]
