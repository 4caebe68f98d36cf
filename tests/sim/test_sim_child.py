"""AnsweringChild (sim.child): the pipe reads of the profile's and sweep's measuring
children, with deadlines, on small stand-in children."""

from __future__ import annotations

import sys
import time

import pytest

from splitserve.sim.child import AnsweringChild


def _child(code: str) -> AnsweringChild:
    return AnsweringChild([sys.executable, "-c", code], "the stand-in")


def test_bytes_and_lines_come_whole_across_partial_writes_and_end_at_eof() -> None:
    child = _child("import sys, time\n"
                   "sys.stdout.write('r'); sys.stdout.flush(); time.sleep(0.2)\n"
                   "sys.stdout.write('ab'); sys.stdout.flush(); time.sleep(0.2)\n"
                   "sys.stdout.write('c\\nrest'); sys.stdout.flush()\n")
    try:
        assert child.read_bytes(1, 30) == b"r"
        assert child.read_line(30) == b"abc\n"
        assert child.read_line(30) == b""  # the output ended without a newline
        assert child.read_bytes(10, 30) == b"rest"
    finally:
        child.close()
    assert child.proc.returncode == 0


def test_a_silent_child_is_killed_at_the_deadline() -> None:
    child = _child("import time; time.sleep(60)")
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"the stand-in \(pid \d+\) did not answer in time"):
        child.read_bytes(1, 0.5)
    assert time.monotonic() - start < 10
    assert child.proc.wait(10) != 0
    child.close()


def test_it_echoes_what_it_is_sent_and_exits_when_its_input_ends() -> None:
    child = _child("import sys\nfor line in sys.stdin: print(line.strip().upper(), flush=True)")
    child.send(b"go\n")
    assert child.read_line(30) == b"GO\n"
    child.close()
    assert child.proc.returncode == 0


def test_close_kills_a_child_that_ignores_the_end_of_its_input() -> None:
    child = _child("import time; time.sleep(60)")
    start = time.monotonic()
    child.close(wait_s=0.5)
    assert child.proc.returncode is not None and time.monotonic() - start < 10
