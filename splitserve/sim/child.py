"""A measuring child process that answers on its stdout, read with deadlines.

The profile's co-run loads (sim.corun) and the speed probe (sim.probe) each run an engine in
a process of their own and talk to it over pipes. A child that hangs (a stuck engine, a
deadlock) must not hang the profile or the sweep that waits on it: every read here has a
deadline, after which the child is killed and the read raises TimeoutError.
"""

from __future__ import annotations

import os
import select
import subprocess
import time


class AnsweringChild:
    """`argv` started with pipes on stdin and stdout (bytes); stderr is inherited."""

    def __init__(self, argv: list[str], what: str) -> None:
        self.what = what  # named in errors: "the speed probe"
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._pending = b""  # read from stdout, not yet handed out

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def _fill(self, deadline: float) -> bool:
        """Read what the child has written next, waiting until `deadline` (then the child
        is killed: TimeoutError); False at the end of its output."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            self.proc.kill()
            raise TimeoutError(f"{self.what} (pid {self.proc.pid}) did not answer in time; "
                               "killed")
        chunk = os.read(fd, 65536)
        self._pending += chunk
        return bool(chunk)

    def read_line(self, timeout_s: float) -> bytes:
        """The child's next line, newline included (b"" once its output has ended)."""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._pending:
            if not self._fill(deadline):
                return b""
        line, _, self._pending = self._pending.partition(b"\n")
        return line + b"\n"

    def read_bytes(self, n: int, timeout_s: float) -> bytes:
        """The child's next `n` bytes (fewer once its output has ended)."""
        deadline = time.monotonic() + timeout_s
        while len(self._pending) < n:
            if not self._fill(deadline):
                break
        out, self._pending = self._pending[:n], self._pending[n:]
        return out

    def close(self, wait_s: float = 30.0) -> None:
        """End its input (the child's loop ends there) and wait; killed after `wait_s`."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass  # it has exited already
        try:
            self.proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
