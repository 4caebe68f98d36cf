"""kernels.jit_build: builds on first use never wait forever on a builder that died, waits on a
live one are bounded and announced, and the cache is keyed by sources and path.

The extension built here is a tiny pybind11 module (seconds to compile), not the real
kernels: what is under test is the locking and keying around torch's cpp_extension.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from splitserve.common.file_lock import LockTimeout, exclusive_lock
from splitserve.kernels import cpu_ext, jit_build
from splitserve.kernels.build_spec import CSRC, SOURCE_NAMES, source_digest

TINY_SOURCE = """
#include <pybind11/pybind11.h>
int answer() { return 42; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", &answer); }
"""

# Builds the tiny extension into ROOT; prints the answer.
BUILDER = """
import logging, sys
from pathlib import Path
from splitserve.kernels import jit_build
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
root, src = Path(sys.argv[1]), Path(sys.argv[2])
module = jit_build.load_or_build("tiny_ext", [src], [], ["-O0"], [], timeout_s=float(sys.argv[3]),
                                 root=root)
print(module.answer())
"""

# Holds the build lock of DIR until killed.
HOLDER = """
import sys, time
from pathlib import Path
from splitserve.common.file_lock import exclusive_lock
with exclusive_lock(Path(sys.argv[1]), 60, "testing"):
    print("held", flush=True)
    time.sleep(600)
"""


def _python(code: str, *args: str, **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code, *args], text=True,  # type: ignore[call-overload]
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, Path]:
    src = tmp_path / "src" / "tiny.cpp"
    src.parent.mkdir()
    src.write_text(TINY_SOURCE)
    return tmp_path / "ext", src


def _build_dir(root: Path, src: Path) -> Path:
    return root / f"tiny_ext_{jit_build.build_key([src], ['-O0', '|'])}"


def test_a_builder_killed_mid_build_does_not_block_the_next(tiny: tuple[Path, Path]) -> None:
    root, src = tiny
    first = _python(BUILDER, str(root), str(src), "60")
    baton = _build_dir(root, src) / "lock"  # torch's lock file, taken while it builds
    deadline = time.monotonic() + 60
    while not baton.exists():
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "the first builder never started building"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    assert baton.exists()  # what torch's own waiters would wait on forever

    second = subprocess.run([sys.executable, "-c", BUILDER, str(root), str(src), "60"],
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "42"
    assert "stale build lock" in second.stderr


def test_a_live_builder_is_waited_for_within_the_bound(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    holder = _python(HOLDER, str(lock))
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(LockTimeout, match="gave up after 1 s waiting for another process"):
            with exclusive_lock(lock, 1.0, "testing"):
                pass
        assert time.monotonic() - started < 5
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    with exclusive_lock(lock, 1.0, "testing"):  # the kernel released the dead holder's lock
        pass


def test_build_key_follows_sources_flags_and_folder(tmp_path: Path) -> None:
    a, b = tmp_path / "a" / "x.cpp", tmp_path / "b" / "x.cpp"
    for path in (a, b):
        path.parent.mkdir()
        path.write_text(TINY_SOURCE)
    key = jit_build.build_key([a], ["-O3"])
    assert key == jit_build.build_key([a], ["-O3"])
    assert key != jit_build.build_key([a], ["-O2"])
    assert key != jit_build.build_key([b], ["-O3"])  # another checkout: its own build
    a.write_text(TINY_SOURCE + "// edit\n")
    assert key != jit_build.build_key([a], ["-O3"])


def test_source_digest_covers_headers(tmp_path: Path) -> None:
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    for name in SOURCE_NAMES:
        (csrc / name).write_text(name)
    (csrc / "ops.h").write_text("// a")
    before = source_digest(csrc)
    (csrc / "ops.h").write_text("// b")
    assert source_digest(csrc) != before
    assert len(source_digest(CSRC)) == 16


def test_the_installed_kernels_match_these_sources() -> None:
    """`make setup` builds the kernels at install time from these very sources (it rebuilds
    when they change); a serving process then loads them without compiling."""
    try:
        module = importlib.import_module(cpu_ext.AOT_MODULE)
    except ImportError:
        pytest.skip("no ahead-of-time build here (installed without --no-build-isolation)")
    assert module.source_digest == source_digest(), "stale build: run make setup"
    assert cpu_ext.load_ahead_of_time() is module


def test_disabled_kernels_load_nothing() -> None:
    code = textwrap.dedent("""
        from splitserve.kernels import cpu_ext
        print(cpu_ext.load())
    """)
    env = {**os.environ, "SPLITSERVE_DISABLE_CPU_KERNELS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120, check=True)
    assert out.stdout.strip() == "None"


def test_a_portable_build_target_is_checked_against_this_cpu() -> None:
    """An install-time build for x86-64-v4 (the Docker image's) must not be loaded on a CPU
    without AVX-512: it would die on an illegal instruction."""
    avx2_only = "processor : 0\nflags : fpu sse sse4_2 popcnt ssse3 avx avx2 fma bmi2 movbe\n"
    assert cpu_ext.missing_cpu_flags("x86-64-v4", avx2_only) == [
        "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"]
    assert cpu_ext.missing_cpu_flags("x86-64-v3", avx2_only) == []
    assert cpu_ext.missing_cpu_flags("native", "flags : fpu\n") == []
    assert cpu_ext.missing_cpu_flags("x86-64-v3", "flags : fpu sse\n") == [
        "avx2", "fma", "bmi2", "movbe"]
