"""How the C++ CPU kernels are built, in one place for both builds: the ahead-of-time one
(setup.py, at install) and the one on first use (kernels/cpu_ext.py via jit_build): their
sources, compiler flags, and the digest that identifies a build.

Standard library only: setup.py loads this file by path (the package is not importable
while it is being built).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CSRC = Path(__file__).resolve().with_name("csrc")
SOURCE_NAMES = ("bindings.cpp", "paged_decode_cpu.cpp", "fused_ops_cpu.cpp", "gemm_cpu.cpp",
                "decode_layer_cpu.cpp")


def source_digest(csrc: Path = CSRC) -> str:
    """16 hex digits over the names and bytes of every .cpp and .h file in `csrc`."""
    digest = hashlib.sha256()
    for path in sorted([*csrc.glob("*.cpp"), *csrc.glob("*.h")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def compile_flags(march: str, digest: str) -> tuple[list[str], list[str]]:
    """(cflags, ldflags). `digest` is source_digest() of the sources being built; the
    extension reports it as `source_digest` (kernels/csrc/bindings.cpp)."""
    return (["-O3", f"-march={march}", "-fopenmp", f"-DSPLITSERVE_SOURCE_DIGEST_RAW={digest}"],
            ["-fopenmp"])
