"""The proto is the contract: committed stubs match proto/, and the sources follow STYLE rule 7."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import descriptor_pb2

REPO_ROOT = Path(__file__).resolve().parent.parent
STUB_NAMES = ("common", "router", "worker", "cluster")


def _load_gen_protos() -> ModuleType:
    path = REPO_ROOT / "scripts" / "gen_protos.py"
    spec = importlib.util.spec_from_file_location("gen_protos", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen_protos = _load_gen_protos()


def _committed_generator_versions() -> tuple[str, str]:
    """(protobuf, grpcio) versions that wrote the committed stubs, read from their headers."""
    pb2 = (REPO_ROOT / "splitserve/v1/common_pb2.py").read_text()
    grpc_stub = (REPO_ROOT / "splitserve/v1/worker_pb2_grpc.py").read_text()
    pb_match = re.search(r"^# Protobuf Python Version: (\S+)$", pb2, re.MULTILINE)
    grpc_match = re.search(r"^GRPC_GENERATED_VERSION = '(\S+)'$", grpc_stub, re.MULTILINE)
    assert pb_match and grpc_match, "committed stubs lack their generator version headers"
    return pb_match.group(1), grpc_match.group(1)


def test_every_source_has_committed_stubs() -> None:
    expected = [str(p) for p in gen_protos.expected_outputs()]
    committed = [str(p) for p in gen_protos.committed_outputs()]
    assert committed == expected
    assert [p.stem for p in gen_protos.proto_files()] == sorted(STUB_NAMES)


def test_committed_descriptors_match_sources(tmp_path: Path) -> None:
    """Version-independent check: the descriptors embedded in the stubs equal fresh ones."""
    gen_protos.generate(tmp_path)
    for name in STUB_NAMES:
        rel = Path("splitserve/v1") / f"{name}_pb2.py"
        fresh = descriptor_pb2.FileDescriptorProto.FromString(
            gen_protos.serialized_descriptor((tmp_path / rel).read_bytes())
        )
        committed = descriptor_pb2.FileDescriptorProto.FromString(
            gen_protos.serialized_descriptor((REPO_ROOT / rel).read_bytes())
        )
        assert committed == fresh, f"{rel} is stale: run python scripts/gen_protos.py"


def test_committed_stubs_match_byte_for_byte() -> None:
    tools_version = importlib.metadata.version("grpcio-tools")
    _, grpc_generated = _committed_generator_versions()
    if tools_version != grpc_generated:
        pytest.skip(
            f"grpcio-tools {tools_version} installed, stubs written by {grpc_generated}: "
            "byte-for-byte output differs across versions (descriptors are still checked)"
        )
    assert gen_protos.stale_files() == []


def test_stub_imports_do_not_pull_torch() -> None:
    modules = [f"splitserve.v1.{n}_pb2" for n in STUB_NAMES]
    modules += [f"splitserve.v1.{n}_pb2_grpc" for n in STUB_NAMES]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_generated_imports_are_package_qualified() -> None:
    source = (REPO_ROOT / "splitserve/v1/worker_pb2.py").read_text()
    assert "from splitserve.v1 import common_pb2" in source


# ---- STYLE rule 7, checked on the sources ----------------------------------------------


def _files() -> list[descriptor_pb2.FileDescriptorProto]:
    fds = descriptor_pb2.FileDescriptorSet.FromString(gen_protos.descriptor_set())
    return [f for f in fds.file if f.name.startswith("splitserve/")]


def _comments(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    return {
        tuple(loc.path): loc.leading_comments + loc.trailing_comments
        for loc in file.source_code_info.location
    }


# FileDescriptorProto field numbers used in source-info paths.
_MESSAGE, _ENUM, _SERVICE = 4, 5, 6
_FIELD, _NESTED, _ENUM_VALUE, _METHOD = 2, 3, 2, 2


def _undocumented(file: descriptor_pb2.FileDescriptorProto) -> list[str]:
    comments = _comments(file)
    missing: list[str] = []

    def need(path: tuple[int, ...], what: str) -> None:
        if not comments.get(path, "").strip():
            missing.append(f"{file.name}: {what}")

    def walk_enum(enum: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...]) -> None:
        need(path, enum.name)
        for i, value in enumerate(enum.value):
            need((*path, _ENUM_VALUE, i), value.name)

    def walk_message(msg: descriptor_pb2.DescriptorProto, path: tuple[int, ...]) -> None:
        need(path, msg.name)
        for i, field in enumerate(msg.field):
            need((*path, _FIELD, i), f"{msg.name}.{field.name}")
        for i, nested in enumerate(msg.nested_type):
            if not nested.options.map_entry:
                walk_message(nested, (*path, _NESTED, i))

    for i, msg in enumerate(file.message_type):
        walk_message(msg, (_MESSAGE, i))
    for i, enum in enumerate(file.enum_type):
        walk_enum(enum, (_ENUM, i))
    for i, service in enumerate(file.service):
        need((_SERVICE, i), service.name)
        for j, method in enumerate(service.method):
            need((_SERVICE, i, _METHOD, j), f"{service.name}.{method.name}")
    return missing


def test_every_rpc_message_field_and_enum_value_is_commented() -> None:
    missing = [m for f in _files() for m in _undocumented(f)]
    assert missing == []


def test_package_and_enum_conventions() -> None:
    for file in _files():
        assert file.package == "splitserve.v1"
        assert file.syntax == "proto3"
        for enum in file.enum_type:
            prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
            assert enum.value[0].number == 0
            assert enum.value[0].name == prefix + "UNSPECIFIED"
            assert all(v.name.startswith(prefix) for v in enum.value), enum.name


def test_one_request_and_one_response_message_per_rpc() -> None:
    used: list[str] = []
    for file in _files():
        for service in file.service:
            for method in service.method:
                used += [method.input_type, method.output_type]
                assert method.input_type.endswith("Request"), method.name
                assert method.output_type.endswith("Response"), method.name
    duplicates = sorted({t for t in used if used.count(t) > 1})
    assert duplicates == []


def test_durations_and_sizes_carry_units() -> None:
    """Every double is a duration, timestamp or probability; its name says which unit."""
    allowed = re.compile(r"(_ms|_unix_s)$")
    offenders = [
        f"{msg.name}.{field.name}"
        for file in _files()
        for msg in file.message_type
        for field in msg.field
        if field.type == descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE
        and not allowed.search(field.name)
    ]
    assert offenders == []
    byte_fields = [
        f.name for file in _files() for m in file.message_type for f in m.field if "byte" in f.name
    ]
    assert byte_fields and all(name.endswith("_bytes") for name in byte_fields)


def test_sampling_params_round_trip_keeps_presence() -> None:
    from splitserve.v1 import common_pb2, router_pb2

    request = router_pb2.GenerateRequest(
        request_id="r1",
        token_ids=router_pb2.TokenIds(token_ids=[1, 2, 3]),
        sampling_params=common_pb2.SamplingParams(temperature=0.0, stop=["\n\n"], seed=7),
    )
    decoded = router_pb2.GenerateRequest.FromString(request.SerializeToString())
    assert decoded.WhichOneof("input") == "token_ids"
    assert list(decoded.token_ids.token_ids) == [1, 2, 3]
    # temperature explicitly 0 (greedy) is distinguishable from "unset" (default 1.0)
    assert decoded.sampling_params.HasField("temperature")
    assert decoded.sampling_params.temperature == 0.0
    assert not decoded.sampling_params.HasField("top_p")
    assert decoded.sampling_params.seed == 7
