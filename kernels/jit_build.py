"""Build a C++ torch extension on first use, safely: the fallback when no ahead-of-time build
(`pip install` / `make setup`, see setup.py) is importable.

torch's `cpp_extension.load` guards its build directory with a lock *file* (a "baton") that
a killed builder leaves behind; every later build then waits on it forever. Here every
builder first takes an `fcntl.flock` on a file of our own beside the build directory
(`splitserve.common.file_lock`). The kernel releases that lock when its holder dies, so:

- a live builder makes the others wait, each wait bounded (`timeout_s`, then LockTimeout)
  and announced on the log every few seconds;
- whoever holds our lock knows that no live builder is working, so a baton left in the build
  directory is stale and is removed before torch looks at it.

The build directory is keyed by a hash of the sources, the compiler flags, the torch and
Python versions and the source folder's path, so two checkouts (or two versions) on one
machine never rebuild each other's cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from splitserve.common.file_lock import exclusive_lock

log = logging.getLogger(__name__)


def build_key(sources: Sequence[Path], flags: Sequence[str]) -> str:
    """16 hex digits over every input that changes the binary, and the sources' folder."""
    import torch

    digest = hashlib.sha256()
    for part in (torch.__version__, sys.version, *flags):
        digest.update(part.encode() + b"\0")
    for path in sources:
        digest.update(str(path.resolve().parent).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def extensions_root() -> Path:
    """torch's extensions cache (TORCH_EXTENSIONS_DIR, else its per-user default)."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def load_or_build(name: str, sources: Sequence[Path], include_dirs: Sequence[Path],
                  cflags: Sequence[str], ldflags: Sequence[str], *, timeout_s: float,
                  root: Path | None = None) -> ModuleType:
    """Import the extension `name` from its keyed build directory, building it if needed.

    Raises whatever the compiler or the loader raises, or RuntimeError on a lock timeout.
    """
    from torch.utils.cpp_extension import load as load_extension

    key = build_key(sources, [*cflags, "|", *ldflags])
    build_dir = (root or extensions_root()) / f"{name}_{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    # pip's ninja lives beside the interpreter, which may not be on PATH.
    bin_dir = os.path.dirname(sys.executable)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    with exclusive_lock(build_dir.with_suffix(".lock"), timeout_s,
                        f"building the C++ extension {name}",
                        "raise SPLITSERVE_KERNEL_BUILD_TIMEOUT_S or stop that process"):
        baton = build_dir / "lock"
        if baton.exists():
            log.warning("removing a stale build lock left by a killed builder: %s", baton)
            baton.unlink()
        if not any(build_dir.glob(f"{name}*.so")):
            log.warning("building the C++ extension %s in %s (once per source change; "
                        "about a minute on 2 cores) ...", name, build_dir)
        started = time.monotonic()
        module = load_extension(
            name=name,
            sources=[str(p) for p in sources],
            extra_include_paths=[str(p) for p in include_dirs],
            extra_cflags=list(cflags),
            extra_ldflags=list(ldflags),
            build_directory=str(build_dir),
            verbose=False,
        )
        log.info("C++ extension %s ready (%.1f s)", name, time.monotonic() - started)
        return module
