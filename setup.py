"""Builds the package's compiled parts: the C++ CPU kernels (kernels/csrc/) ahead of time, as
`splitserve.kernels._cpu_ops`, the router's latency-table scan (router/_route_table.c), as
`splitserve.router._route_table`, and the prefix index's device lookup
(cluster/_prefix_runs.c), as `splitserve.cluster._prefix_runs`.

Everything else about the package is in pyproject.toml. The extension is compiled against
the torch of the build environment, so it is built only when that torch is the one the
package will run with: `make setup` installs torch first and then the package with
`--no-build-isolation`. In an isolated build (a plain `pip install .`) torch is absent, the
build is skipped with a message, and the kernels are built on first use instead
(kernels/jit_build.py). SPLITSERVE_BUILD_CPU_KERNELS=0 skips the build;
SPLITSERVE_CPU_MARCH sets its -march (default native: the machine that builds is the
machine that runs, as with any source build).

The route-table scan and the prefix lookup are plain C against Python's own headers (no
torch), built in every build; both are optional: where one cannot be built, the build says so
and the package uses the Python it replaces (router/latency.py's numpy expression,
cluster/prefix_index.py's loop), which gives the same results.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from setuptools import Extension, setup

HERE = Path(__file__).resolve().parent


def _load_by_path(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu_kernel_build() -> dict[str, Any]:
    if os.environ.get("SPLITSERVE_BUILD_CPU_KERNELS", "1").lower() in ("0", "false", "no", "off"):
        print("splitserve: SPLITSERVE_BUILD_CPU_KERNELS=0, not building the C++ CPU kernels",
              file=sys.stderr)
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("splitserve: no torch in the build environment; the C++ CPU kernels will be "
              "built on first use (install with --no-build-isolation to build them now)",
              file=sys.stderr)
        return {}
    march = os.environ.get("SPLITSERVE_CPU_MARCH") or "native"
    # splitserve/kernels: a link to ../kernels in the repository, the folder itself in an sdist.
    kernels = HERE / "splitserve" / "kernels"
    spec = _load_by_path("_splitserve_build_spec", kernels / "build_spec.py")
    cflags, ldflags = spec.compile_flags(march, spec.source_digest(kernels / "csrc"))
    extension = CppExtension(
        "splitserve.kernels._cpu_ops",
        sources=[f"splitserve/kernels/csrc/{name}" for name in spec.SOURCE_NAMES],
        include_dirs=[str(kernels / "csrc")],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
    )
    print(f"splitserve: building the C++ CPU kernels (-march={march}) ...", file=sys.stderr)
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


def route_table_extension() -> Extension:
    # -ffp-contract=off: no fused multiply-add, so the scan's doubles are numpy's.
    return Extension("splitserve.router._route_table",
                     sources=["splitserve/router/_route_table.c"],
                     extra_compile_args=["-O2", "-ffp-contract=off"], optional=True)


def prefix_runs_extension() -> Extension:
    return Extension("splitserve.cluster._prefix_runs",
                     sources=["splitserve/cluster/_prefix_runs.c"],
                     extra_compile_args=["-O2"], optional=True)


def optional_builds(build_ext: type) -> type:
    """`build_ext` that goes on without an optional extension that failed to build, whatever
    the failure (torch's builder raises errors setuptools' own `optional` does not catch)."""

    class BuildExt(build_ext):  # type: ignore[misc, valid-type]
        def build_extension(self, ext: Extension) -> None:
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001 - any compiler failure
                if not ext.optional:
                    raise
                print(f"splitserve: could not build the optional {ext.name} ({e}); "
                      "the package uses its Python path instead", file=sys.stderr)

    return BuildExt


def build() -> dict[str, Any]:
    from setuptools.command.build_ext import build_ext

    kernels = cpu_kernel_build()
    chosen = kernels.get("cmdclass", {}).get("build_ext", build_ext)
    return {"ext_modules": [*kernels.get("ext_modules", []), route_table_extension(),
                            prefix_runs_extension()],
            "cmdclass": {"build_ext": optional_builds(chosen)}}


setup(**build())
