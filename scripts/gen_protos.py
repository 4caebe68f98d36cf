"""(Re)generate the committed gRPC stubs in splitserve/v1/ from proto/splitserve/v1/*.proto.

    python scripts/gen_protos.py           # rewrite splitserve/v1/*_pb2*.py(i)
    python scripts/gen_protos.py --check   # exit 1 if the committed stubs are stale

Stubs are generated with ``-Iproto`` so the generated imports read
``from splitserve.v1 import common_pb2``. The output is byte-for-byte reproducible for a
given grpcio-tools version; tests/test_protos.py compares it with the committed files.
"""

from __future__ import annotations

import argparse
import ast
import importlib.resources
import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"
PACKAGE_DIR = Path("splitserve") / "v1"  # relative to both PROTO_ROOT and the output root
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    """The .proto sources, relative to PROTO_ROOT, sorted."""
    return sorted(p.relative_to(PROTO_ROOT) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))


def expected_outputs() -> list[Path]:
    """Generated files (relative to an output root) the sources produce, sorted."""
    return sorted(
        p.parent / (p.stem + suffix) for p in proto_files() for suffix in GENERATED_SUFFIXES
    )


def _protoc(*out_args: str) -> None:
    """Run protoc (from grpcio-tools, a dev dependency) on every source."""
    from grpc_tools import protoc

    well_known = importlib.resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        *out_args,
        *(str(p) for p in proto_files()),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}: {' '.join(args)}")


def generate(out_root: Path) -> list[Path]:
    """Write the stubs of every source under ``out_root/splitserve/v1``.

    Returns the generated paths relative to out_root.
    """
    (out_root / PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    _protoc(f"--python_out={out_root}", f"--pyi_out={out_root}", f"--grpc_python_out={out_root}")
    return expected_outputs()


def descriptor_set() -> bytes:
    """A serialized FileDescriptorSet of the sources, comments included (source info)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "descriptors.pb"
        _protoc(f"--descriptor_set_out={out}", "--include_source_info")
        return out.read_bytes()


def committed_outputs() -> list[Path]:
    """Generated-looking files present in the repository's splitserve/v1, relative, sorted."""
    found = (REPO_ROOT / PACKAGE_DIR).iterdir()
    return sorted(p.relative_to(REPO_ROOT) for p in found if p.name.endswith(GENERATED_SUFFIXES))


def stale_files() -> list[str]:
    """Describe every committed stub that differs from a fresh generation; [] when in sync."""
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        fresh_root = Path(tmp)
        fresh = generate(fresh_root)
        for rel in fresh:
            committed = REPO_ROOT / rel
            if not committed.exists():
                problems.append(f"missing: {rel}")
            elif committed.read_bytes() != (fresh_root / rel).read_bytes():
                problems.append(f"differs: {rel}")
    problems += [f"no source: {rel}" for rel in committed_outputs() if rel not in fresh]
    return problems


_SERIALIZED_RE = re.compile(rb"AddSerializedFile\((b'.*?')\)", re.DOTALL)


def serialized_descriptor(pb2_source: bytes) -> bytes:
    """The serialized FileDescriptorProto embedded in a generated *_pb2.py file.

    Comparing these (parsed) is independent of the protoc version that wrote the file.
    """
    match = _SERIALIZED_RE.search(pb2_source)
    if match is None:
        raise ValueError("no AddSerializedFile(...) call in generated source")
    value = ast.literal_eval(match.group(1).decode("ascii"))
    assert isinstance(value, bytes)
    return value


def write_into_repo() -> list[Path]:
    """Regenerate the committed stubs in place, deleting stubs whose source is gone."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        for rel in committed_outputs():
            if rel not in fresh:
                (REPO_ROOT / rel).unlink()
        for rel in fresh:
            shutil.copyfile(Path(tmp) / rel, REPO_ROOT / rel)
    return fresh


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="report stale stubs instead of writing them"
    )
    args = parser.parse_args(argv)
    if args.check:
        problems = stale_files()
        for line in problems:
            print(line)
        if problems:
            print("stubs are stale: run python scripts/gen_protos.py", file=sys.stderr)
        return 1 if problems else 0
    for rel in write_into_repo():
        print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
