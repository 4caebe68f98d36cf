"""An inter-process exclusive lock on a file, with a bounded and announced wait.

`fcntl.flock` locks belong to the open file: the kernel releases them when the holder exits
or is killed, so a dead holder never blocks anyone (unlike a lock *file* whose existence is
the lock). Used around one-time work that several processes may start at once: converting
a model (engine/model_files.py) and building the C++ kernels (kernels/jit_build.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

_POLL_S = 0.1
_ANNOUNCE_EVERY_S = 5.0


class LockTimeout(TimeoutError):
    """Another process held the lock for longer than the caller would wait."""


@contextlib.contextmanager
def exclusive_lock(lock_path: Path, timeout_s: float, what: str,
                   hint: str = "") -> Iterator[None]:
    """Hold an exclusive flock on `lock_path` (created if missing) for the `with` body.

    Waits at most `timeout_s` for another holder, logging every few seconds that it waits
    for `what`; then raises LockTimeout naming the lock (and `hint`, what the user can do).
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        start = time.monotonic()
        next_note = start + _ANNOUNCE_EVERY_S
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                now = time.monotonic()
                if now - start >= timeout_s:
                    raise LockTimeout(
                        f"gave up after {timeout_s:.0f} s waiting for another process that is "
                        f"{what} (lock {lock_path}){'; ' + hint if hint else ''}"
                    ) from None
                if now >= next_note:
                    log.warning("waiting for another process that is %s (%.0f s so far)",
                                what, now - start)
                    next_note = now + _ANNOUNCE_EVERY_S
                time.sleep(_POLL_S)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
