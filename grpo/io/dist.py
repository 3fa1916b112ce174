"""Process-level distributed setup: join the ``mlx.launch`` job, write on rank 0 only, fail fast.

``grpo train`` works unchanged under ``mlx.launch -n 2 --backend ring -- grpo train ...``:
:func:`init_distributed` joins the job the launcher described through the environment
(``MLX_HOSTFILE`` + ``MLX_RANK`` for ring, the MPI variables for mpi) and returns ``None``
when the process runs alone, so the single-process path launches no collective at all.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import mlx.core as mx

from grpo.core.distributed import Group, is_distributed, rank, world_size

T = TypeVar("T")

_BACKENDS = ("any", "ring", "mpi", "nccl", "jaccl")

# Exit status of a rank taken down by :func:`fail_fast`.
FAIL_FAST_EXIT_CODE = 1


def init_distributed(*, backend: str = "any") -> Group | None:
    """Join the distributed job this process was launched into.

    Args:
        backend: ``"any"`` (first available: mpi, ring, ...), or one of ``"ring"``,
            ``"mpi"``, ``"nccl"``, ``"jaccl"`` to insist on it (then failing to join raises).

    Returns:
        The global group when more than one process takes part, else ``None``.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"init_distributed: backend must be one of {_BACKENDS}, got {backend!r}")
    group = mx.distributed.init(strict=backend != "any", backend=backend)
    return group if group.size() > 1 else None


def is_main_process(group: Group | None) -> bool:
    """True on rank 0, the only rank that logs, prints progress and writes checkpoints."""
    return rank(group) == 0


def on_main(group: Group | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """``fn(*args, **kwargs)`` on rank 0; ``None`` without calling it on other ranks."""
    return fn(*args, **kwargs) if is_main_process(group) else None


def barrier(group: Group | None) -> None:
    """Block until every rank reaches this point (a one-element ``all_sum``)."""
    if is_distributed(group):
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))


def rank_prefix(group: Group | None) -> str:
    """``"[rank r/W] "`` for messages from a multi-process job, ``""`` otherwise."""
    return f"[rank {rank(group)}/{world_size(group)}] " if is_distributed(group) else ""


@contextlib.contextmanager
def fail_fast(group: Group | None) -> Iterator[None]:
    """Turn an exception on any rank into the end of the whole job instead of a hang.

    A rank that raised and unwound normally could run ``finally`` blocks or cleanup that
    issue their own collectives (a final checkpoint barrier, a metrics all-reduce); those
    would pair with whatever collective the healthy ranks are blocked in and hang or corrupt
    them. Here the failing rank prints its traceback (prefixed with its rank), flushes, and
    leaves with ``os._exit``, closing its sockets: the peers' pending collective then fails
    with "connection to a peer was lost" and ``mlx.launch`` terminates the rest of the job.

    With a single process (``group`` is ``None``) the exception propagates unchanged.
    """
    if not is_distributed(group):
        yield
        return
    try:
        yield
    except BaseException as exc:  # noqa: BLE001 -- also KeyboardInterrupt: still must not hang
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            raise
        prefix = rank_prefix(group)
        lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
        sys.stdout.flush()
        sys.stderr.write("".join(prefix + line for line in "".join(lines).splitlines(True)))
        sys.stderr.write(f"{prefix}aborting the distributed job: {type(exc).__name__}: {exc}\n")
        sys.stderr.flush()
        os._exit(FAIL_FAST_EXIT_CODE)
