"""The package's shape: one import name, a layered package, names that resolve here.

The layer order below is the one README's module map describes. A module may import its own
unit (the first name under `splitserve.`) and any unit of a lower layer; units that share a
layer are independent of each other, except the entry points at the top.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "splitserve"

# Bottom to top.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("v1",),  # generated stubs
    ("common",),  # envs, shared types, proto conversion, gRPC helpers, metrics exposition
    ("kernels",),
    ("engine", "kvtransfer", "cluster"),
    ("worker",),  # the runtime both worker roles share
    ("prefill_worker", "decode_worker", "router"),
    ("client",),  # the SDK (splitserve.client and its private splitserve._client_common)
    # entry points (and the simulator on them, the Ray driver's supervisor of its workers)
    ("cli", "launcher", "scaling", "supervision", "llm", "bench", "sim"),
)
ENTRY_LAYER = len(LAYERS) - 1
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
# Modules that belong to another unit (the SDK's private half).
UNIT_OF = {"_client_common": "client"}
# The card's folders, reached through symlinks in splitserve/; and engine/cluster, which
# moved inside. None of these may be imported as a top-level name.
OLD_TOP_LEVEL = ("engine", "kernels", "router", "cluster", "kvtransfer", "prefill_worker",
                 "decode_worker")
CARD_FOLDERS = ("kernels", "router", "kvtransfer", "prefill_worker", "decode_worker")


def _modules() -> dict[str, Path]:
    """splitserve.* module name -> file, walking through the symlinked card folders."""
    found: dict[str, Path] = {}
    for folder, dirs, files in os.walk(PACKAGE, followlinks=True):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        rel = Path(folder).relative_to(PACKAGE)
        for name in files:
            if name.endswith(".py"):
                parts = ["splitserve", *rel.parts]
                if name != "__init__.py":
                    parts.append(name[:-3])
                found[".".join(parts)] = Path(folder) / name
    return found


def _imported_names(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import, lazy and TYPE_CHECKING ones included,
    plus importlib.import_module("...") with a constant name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            # `from splitserve import engine` imports the unit `engine`.
            if target == "splitserve":
                out += [(node.lineno, f"splitserve.{alias.name}") for alias in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            out.append((node.lineno, node.args[0].value))
    return out


def _unit(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "splitserve":
        return None
    return UNIT_OF.get(parts[1], parts[1])


def test_every_unit_is_placed_in_a_layer() -> None:
    units = {_unit(m) for m in _modules()} - {None}
    assert units - set(RANK) == set(), "add new units to LAYERS (and README's module map)"


def test_no_import_points_upward_or_sideways() -> None:
    bad = []
    for module, path in sorted(_modules().items()):
        source_unit = _unit(module)
        if source_unit is None:  # splitserve/__init__.py: lazy exports for users
            continue
        for line, target in _imported_names(module, path):
            target_unit = _unit(target)
            if target_unit is None or target_unit == source_unit:
                continue
            src, dst = RANK[source_unit], RANK.get(target_unit)
            if dst is None:
                continue  # a name under splitserve that is not a unit (e.g. __version__)
            if dst > src or (dst == src and src != ENTRY_LAYER):
                bad.append(f"{path.relative_to(REPO)}:{line}: {module} ({source_unit}, "
                           f"layer {src}) imports {target} ({target_unit}, layer {dst})")
    assert bad == []


def test_the_layering_check_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    path = tmp_path / "x.py"
    path.write_text("def f():\n    from ..router import server\n"
                    "    importlib.import_module('splitserve.cli')\n")
    names = [name for _, name in _imported_names("splitserve.engine.x", path)]
    assert names == ["splitserve.router", "splitserve.cli"]


def test_no_module_imports_an_old_top_level_name() -> None:
    roots = [REPO / "tests", REPO / "benchmarks", REPO / "scripts", REPO / "deploy"]
    files = list(_modules().values())
    for root in roots:
        files += root.rglob("*.py")
    bad = [f"{path.relative_to(REPO)}:{line}: {name}"
           for path in files for line, name in _imported_names("x", path)
           if name.split(".")[0] in OLD_TOP_LEVEL]
    assert bad == []


def test_card_folders_are_namespace_folders_reached_through_splitserve() -> None:
    for name in CARD_FOLDERS:
        assert not (REPO / name / "__init__.py").exists(), name
        link = PACKAGE / name
        assert link.is_symlink() and os.readlink(link) == f"../{name}", name
    for name in ("engine", "cluster"):  # not card folders: they moved inside
        assert not (REPO / name).exists()


def test_unit_names_resolve_inside_this_repository() -> None:
    for unit in RANK:
        spec = importlib.util.find_spec(f"splitserve.{unit}")
        assert spec is not None, unit
        where = spec.origin if spec.origin not in (None, "namespace") else \
            next(iter(spec.submodule_search_locations or []))
        assert Path(where).resolve().is_relative_to(REPO), (unit, where)


def test_repo_root_does_not_shadow_other_packages() -> None:
    """From the repository root (on sys.path first, as for `python -c` and pytest), a
    top-level name such as `kernels` is not ours: Hugging Face's `kernels` (which
    transformers >= 5.25 imports at start) must win."""
    code = ("import importlib.util, json\n"
            f"names = {list(OLD_TOP_LEVEL)!r}\n"
            "specs = {n: importlib.util.find_spec(n) for n in names}\n"
            "print(json.dumps({n: (s.origin if s else None) for n, s in specs.items()}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=True)

    def ours(origin: str) -> bool:
        path = Path(origin).resolve()
        return path.is_relative_to(REPO) and not path.is_relative_to(REPO / ".venv")

    # None: not importable, or only as a namespace portion, which loses to any real package.
    found = json.loads(out.stdout)
    assert [name for name, origin in found.items() if origin and ours(origin)] == []
    if importlib.util.find_spec("kernels") is None:
        pytest.skip("Hugging Face's kernels package is not installed")
    assert found["kernels"] is not None and not ours(found["kernels"])
    import transformers.integrations.hub_kernels  # noqa: F401  (imports `kernels`)


def _copy_source(dst: Path) -> None:
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "*.so",
                                    "__pycache__", ".pytest_cache", ".mypy_cache",
                                    ".ruff_cache", ".hypothesis", "results")
    shutil.copytree(REPO, dst, symlinks=True, ignore=ignore)


@pytest.mark.slow
def test_wheel_installs_only_splitserve(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _copy_source(src)
    env = {**os.environ, "SPLITSERVE_BUILD_CPU_KERNELS": "0"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   env=env, check=True, capture_output=True, timeout=600)
    [wheel] = (tmp_path / "dist").glob("splitserve-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        [top_level] = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert archive.read(top_level).decode().split() == ["splitserve"]
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"splitserve"}
    for needed in ("splitserve/router/server.py", "splitserve/kernels/csrc/bindings.cpp",
                   "splitserve/prefill_worker/worker.py", "splitserve/common/envs.py",
                   "splitserve/v1/router_pb2.py"):
        assert needed in names, needed
