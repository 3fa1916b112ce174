"""One run per output directory: an exclusive OS lock on ``output_dir/.grpo.lock``.

A run takes the lock (``fcntl.flock``) before it touches the directory and keeps it until
it ends; the kernel drops it when the process exits in any way, SIGKILL included, so a lock
is never left stale. A second process asking for a held lock is refused at once with
:class:`grpo.errors.OutputDirInUse` naming the holder's pid (written into the lock file).

Within one process the lock is re-entrant (the CLI holds it around the trainer, which takes
it again), counted, and released when the last holder lets go.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from grpo.errors import ConfigError, OutputDirInUse

LOCK_NAME = ".grpo.lock"
# realpath of output_dir -> [file descriptor, holders in this process]
_HELD: dict[str, list[int]] = {}


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "pid unknown"


def _open(directory: Path) -> int:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        return os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        code = errno.errorcode.get(e.errno or 0, "")
        error = ConfigError(
            f"output_dir {directory} is not writable: {reason}" + (f" ({code})" if code else "")
        )
        error.hint = "choose a writable output_dir"
        raise error from e


def acquire(output_dir: str | Path) -> None:
    """Take ``output_dir``'s lock (creating the directory), or raise :class:`OutputDirInUse`.

    Raises:
        OutputDirInUse: another process holds it; the message names its pid.
        ConfigError: the directory or the lock file cannot be created.
    """
    directory = Path(output_dir)
    key = os.path.realpath(directory)
    if key in _HELD:
        _HELD[key][1] += 1
        return
    fd = _open(directory)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise OutputDirInUse(
            f"output_dir {directory} is in use by another run ({holder}); two runs in one "
            "output_dir would mix their checkpoints and logs"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = [fd, 1]


def release(output_dir: str | Path) -> None:
    """Let go of one hold on ``output_dir``'s lock; the last one unlocks it."""
    key = os.path.realpath(Path(output_dir))
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _HELD[key]
        os.close(held[0])  # closing the descriptor drops the flock


@contextlib.contextmanager
def hold(output_dir: str | Path, *, enabled: bool = True) -> Iterator[None]:
    """``acquire`` on entry and ``release`` on exit (``enabled=False``: do nothing)."""
    if not enabled:
        yield
        return
    acquire(output_dir)
    try:
        yield
    finally:
        release(output_dir)
