"""The one registry of SplitServe's environment variables (prefix ``SPLITSERVE_``).

Values are parsed when read, never cached at import, so tests can monkeypatch
``os.environ``. An unset or empty variable yields its default. Torch-free.

    from splitserve.common import envs
    envs.cache_dir()            # Path
    envs.get("SPLITSERVE_NUM_THREADS")
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

T = TypeVar("T")

PREFIX = "SPLITSERVE_"
_LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")


@dataclass(frozen=True)
class EnvVar(Generic[T]):
    """One variable: ``parser`` turns the raw string into a value; ``default`` is a
    factory (called at read time, so e.g. ``~`` expands against the current HOME)."""

    name: str
    parser: Callable[[str], T]
    default: Callable[[], T]
    doc: str

    def __post_init__(self) -> None:
        if not self.name.startswith(PREFIX):
            raise ValueError(f"environment variable {self.name!r} must start with {PREFIX!r}")

    def get(self) -> T:
        raw = os.environ.get(self.name, "").strip()
        if not raw:
            return self.default()
        try:
            return self.parser(raw)
        except ValueError as e:
            raise ValueError(f"invalid value for {self.name}={raw!r}: {e}") from None


def parse_path(raw: str) -> Path:
    return Path(raw).expanduser()


def parse_positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def parse_log_level(raw: str) -> str:
    level = raw.upper()
    if level not in _LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(_LOG_LEVELS)}")
    return level


def parse_bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be one of 1/0, true/false, yes/no, on/off")


def parse_march(raw: str) -> str:
    if not raw.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ValueError("must be a gcc -march name such as native or x86-64-v3")
    return raw


_VARS: tuple[EnvVar[Any], ...] = (
    EnvVar(
        "SPLITSERVE_CACHE",
        parse_path,
        lambda: Path("~/.cache/splitserve").expanduser(),
        "Root of SplitServe's on-disk cache (converted GGUF models live under models/).",
    ),
    EnvVar(
        "SPLITSERVE_NUM_THREADS",
        parse_positive_int,
        lambda: None,
        "torch intra-op threads for CPU workers; unset leaves torch's default.",
    ),
    EnvVar(
        "SPLITSERVE_LOG_LEVEL",
        parse_log_level,
        lambda: "INFO",
        "Log level of SplitServe's loggers (CRITICAL, ERROR, WARNING, INFO, DEBUG).",
    ),
    EnvVar(
        "SPLITSERVE_API_KEYS",
        str,
        lambda: "",
        "Client API keys of the router, comma-separated name:key entries (secret).",
    ),
    EnvVar(
        "SPLITSERVE_CLUSTER_TOKEN",
        str,
        lambda: "",
        "Shared secret of a deployment's router, workers and cluster-state server (secret).",
    ),
    EnvVar(
        "SPLITSERVE_TLS_DIR",
        str,
        lambda: "",
        "Folder with ca.crt, tls.crt, tls.key: mutual TLS on every gRPC connection (secret).",
    ),
    EnvVar(
        "SPLITSERVE_API_KEY",
        str,
        lambda: "",
        "The API key `splitserve generate` and `serve --demo` send (secret).",
    ),
    EnvVar(
        "SPLITSERVE_DISABLE_CPU_KERNELS",
        parse_bool,
        lambda: False,
        "1 skips the C++ CPU kernels (the torch reference ops run instead).",
    ),
    EnvVar(
        "SPLITSERVE_CPU_MARCH",
        parse_march,
        lambda: "native",
        "-march of the C++ CPU kernels' build (install time and first use); default native.",
    ),
    EnvVar(
        "SPLITSERVE_KERNEL_BUILD_TIMEOUT_S",
        parse_positive_int,
        lambda: 900,
        "Longest wait, in seconds, for another process building the C++ kernels.",
    ),
    EnvVar(
        "SPLITSERVE_STEP_TRACE",
        parse_path,
        lambda: None,
        "Folder where each engine appends one JSON line per step (engine.step_trace); unset: none.",
    ),
)

REGISTRY: dict[str, EnvVar[Any]] = {var.name: var for var in _VARS}


def get(name: str) -> Any:
    """The current value of a registered variable; KeyError for unknown names."""
    try:
        var = REGISTRY[name]
    except KeyError:
        raise KeyError(f"{name!r} is not a registered SplitServe environment variable") from None
    return var.get()


def register(var: EnvVar[Any]) -> EnvVar[Any]:
    """Add a variable (other modules may declare their own); names must be unique."""
    if var.name in REGISTRY:
        raise ValueError(f"{var.name} is already registered")
    REGISTRY[var.name] = var
    return var


def describe() -> list[tuple[str, str]]:
    """(name, doc) for every registered variable, for ``--help`` output and docs."""
    return [(var.name, var.doc) for var in REGISTRY.values()]


def cache_dir() -> Path:
    return get("SPLITSERVE_CACHE")  # type: ignore[no-any-return]


def num_threads() -> int | None:
    return get("SPLITSERVE_NUM_THREADS")  # type: ignore[no-any-return]


def cluster_token(given: str | None = None) -> str | None:
    """The deployment's cluster token: `given` if set, else SPLITSERVE_CLUSTER_TOKEN; None
    when neither is (no cluster authentication)."""
    return given or get("SPLITSERVE_CLUSTER_TOKEN") or None


def tls_dir(given: str | None = None) -> str | None:
    """The folder of this process's TLS files: `given` if set, else SPLITSERVE_TLS_DIR; None
    when neither is (plaintext gRPC)."""
    return given or get("SPLITSERVE_TLS_DIR") or None


def step_trace_dir() -> Path | None:
    return get("SPLITSERVE_STEP_TRACE")  # type: ignore[no-any-return]


def log_level() -> str:
    return get("SPLITSERVE_LOG_LEVEL")  # type: ignore[no-any-return]


def log_level_number() -> int:
    """``log_level()`` as a ``logging`` module constant."""
    return int(logging.getLevelName(log_level()))
