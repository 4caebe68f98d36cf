"""splitserve.launcher.init_ray: a local head whose node timed out during startup gets one
more start; any other failure, or a second time-out, is raised. stop_ray (or a failed start)
puts back the RAY_* variables and the cluster flag init_ray changed."""

from __future__ import annotations

import os
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
        os.environ["RAY_CLIENT_MODE"] = "0"  # as ray.init does
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
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_CLIENT_MODE", "")
    monkeypatch.delenv("RAY_CLIENT_MODE")
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


def _ray_state() -> tuple[dict[str, str], bool]:
    from ray._private import ray_constants

    return ({k: v for k, v in os.environ.items() if k.startswith("RAY_")},
            ray_constants.ENABLE_RAY_CLUSTER)


def test_stop_ray_puts_back_what_init_ray_changed(fake_ray: Any) -> None:
    fake = fake_ray([])
    before = _ray_state()
    assert before[0]["RAY_AUTH_MODE"] == "token" and "RAY_CLIENT_MODE" not in before[0]
    assert launcher.init_ray(None, num_cpus=2) is True
    variables, cluster_enabled = _ray_state()
    assert variables["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0" and not cluster_enabled
    assert variables["RAY_CLIENT_MODE"] == "0"
    os.environ["RAY_AUTH_MODE"] = "changed"
    launcher.stop_ray()
    assert fake.calls == ["init", "shutdown"]
    assert _ray_state() == before
    launcher.stop_ray()  # a second stop (or one without a local head) changes nothing
    assert _ray_state() == before


def test_a_failed_start_puts_back_what_it_changed(fake_ray: Any) -> None:
    before = _ray_state()
    fake_ray([ValueError("bad num_cpus")])
    with pytest.raises(ValueError):
        launcher.init_ray(None, num_cpus=2)
    assert _ray_state() == before
