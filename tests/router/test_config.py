"""RouterConfig validation."""

from __future__ import annotations

import pytest

from splitserve.router.config import RouterConfig


def test_defaults() -> None:
    c = RouterConfig()
    assert (c.model, c.host, c.port, c.max_inflight, c.max_queued) == (
        "smollm2-135m", "127.0.0.1", 0, 256, 256)
    assert (c.prefill_policy, c.local_prefill_threshold, c.block_size) == ("kv_aware", 32, 16)
    assert (c.request_timeout_s, c.cluster_url, c.default_max_tokens) == (None, None, 16)
    assert c.embedded_cluster and c.bind_address == "127.0.0.1:0"
    assert not RouterConfig(cluster_url="redis://localhost:6379/0").embedded_cluster


@pytest.mark.parametrize(("fields", "message"), [
    ({"model": ""}, "model must not be empty"),
    ({"port": 70000}, "port must be in [0, 65535], got 70000"),
    ({"max_inflight": -1}, "max_inflight and max_queued must be >= 0, got -1, 256"),
    ({"prefill_policy": "random"}, "prefill_policy must be one of ('kv_aware', 'round_robin', "
                                   "'least_loaded'), got 'random'"),
    ({"local_prefill_threshold": -1}, "local_prefill_threshold must be >= 0, got -1"),
    ({"local_prefix_fraction": 0.0}, "local_prefix_fraction must be in (0, 1], got 0.0"),
    ({"block_size": 0}, "block_size must be >= 1, got 0"),
    ({"prefill_timeout_ms": -5}, "prefill_timeout_ms must be >= 0, got -5"),
    ({"request_timeout_s": 0.0}, "request_timeout_s must be > 0, got 0.0"),
    ({"worker_refresh_s": -1.0}, "worker_refresh_s must be >= 0, got -1.0"),
    ({"max_model_len": 1}, "max_model_len must be >= 2, got 1"),
    ({"default_max_tokens": 0}, "default_max_tokens must be >= 1, got 0"),
    ({"max_admit_attempts": 0}, "max_admit_attempts must be >= 1, got 0"),
])
def test_invalid_values(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        RouterConfig(**fields)  # type: ignore[arg-type]
    assert str(info.value) == message
