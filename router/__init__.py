"""SplitServe router: the gRPC front door that admits, routes and relays requests.

Torch-free by rule (a test checks it). Exports are lazy so that `router.policy` and
`router.config` import without grpc:

    from router import RouterConfig, start_router
    router = start_router(RouterConfig(model="smollm2-135m"))
    router.address, router.cluster_url   # "127.0.0.1:PORT", "grpc://127.0.0.1:PORT"
    router.stop()
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it
_LAZY_EXPORTS: dict[str, str] = {
    "RouterConfig": "router.config",
    "RouterServer": "router.server",
    "RunningRouter": "router.server",
    "start_router": "router.server",
}

__all__ = sorted(_LAZY_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _LAZY_EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'router' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
