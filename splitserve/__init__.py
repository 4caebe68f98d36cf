"""SplitServe: disaggregated prefill/decode LLM serving.

Exports are lazy (module ``__getattr__``) so that ``import splitserve.v1`` (generated stubs)
and ``import splitserve.client`` never pull in torch; ``from splitserve import LLM`` still works.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY_EXPORTS: dict[str, str] = {
    "LLM": "splitserve.llm",
    "SamplingParams": "splitserve.common.sampling_params",
    "RequestOutput": "splitserve.common.outputs",
    "EngineConfig": "splitserve.engine.config",
    "Client": "splitserve.client",
    "AsyncClient": "splitserve.client",
}

__all__ = sorted(_LAZY_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _LAZY_EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'splitserve' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
