"""Process-level distributed setup: join the ``mlx.launch`` job, write on rank 0 only, fail fast.

``grpo train`` works unchanged under ``mlx.launch -n 2 --backend ring -- grpo train ...``:
:func:`init_distributed` joins the job the launcher described through the environment
(``MLX_HOSTFILE`` + ``MLX_RANK`` for ring, the MPI variables for mpi) and returns ``None``
when the process runs alone, so the single-process path launches no collective at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from grpo.core.distributed import Group, all_max, all_min, is_distributed, rank, world_size

T = TypeVar("T")

_BACKENDS = ("any", "ring", "mpi", "nccl", "jaccl")

# Exit status of a rank taken down by :func:`fail_fast`.
FAIL_FAST_EXIT_CODE = 1


# Set by mlx.launch for every backend (MLX_RANK) and by mpirun (Open MPI, MPICH / PMIx).
_LAUNCHER_ENV = ("MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")


def launched() -> bool:
    """True when a launcher (``mlx.launch``, ``mpirun``) started this process."""
    return any(name in os.environ for name in _LAUNCHER_ENV)


def init_distributed(*, backend: str = "any") -> Group | None:
    """Join the distributed job this process was launched into.

    Args:
        backend: ``"any"``: join with the first available backend (mpi, ring, ...) if a
            launcher started this process, else stay alone without touching
            ``mx.distributed``; or one of ``"ring"``, ``"mpi"``, ``"nccl"``, ``"jaccl"`` to
            insist on it (failing to join then raises).

    Returns:
        The global group when more than one process takes part, else ``None``.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"init_distributed: backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "any" and not launched():
        return None
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


def assert_in_sync(tree: Any, *, group: Group | None, what: str = "parameters") -> None:
    """Raise on every rank if ``tree`` (same structure everywhere) differs across ranks.

    Compares one float32 sum per leaf, so it costs one small collective pair even for a full
    model; call it after initialisation (every rank must start from the same weights, e.g.
    the same LoRA init key) or in tests after training.
    """
    flat = tree_flatten(tree)
    if not is_distributed(group) or not flat:
        return
    sums = mx.stack([v.astype(mx.float32).sum() for _, v in flat])
    spread = all_max(sums, group=group) - all_min(sums, group=group)
    bad = [name for (name, _), s in zip(flat, spread.tolist(), strict=True) if s != 0]
    if bad:
        raise RuntimeError(
            f"{rank_prefix(group)}{what} differ across ranks in {len(bad)} of {len(flat)} "
            f"arrays (first: {bad[0]!r}); every rank must start from the same weights"
        )


def main_only(group: Group | None, factory: Callable[..., T], *args: Any, **kwargs: Any) -> T | Any:
    """``factory(*args, **kwargs)`` on rank 0; elsewhere an object whose every method is a no-op.

    For writers (metrics files, progress bars, trackers): other ranks get the same
    interface and write nothing, e.g. ``writer = main_only(group, MetricsWriter, out_dir)``.
    """
    return factory(*args, **kwargs) if is_main_process(group) else Discard()


class Discard:
    """Null object: any attribute is a function that accepts anything and returns ``None``."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return _discard


def _discard(*args: Any, **kwargs: Any) -> None:
    return None


def gather_json(obj: Any, *, group: Group | None) -> list[Any]:
    """Every rank's JSON-serialisable ``obj``, in rank order (``[obj]`` alone).

    E.g. each rank's sampler position, so rank 0 can save all of them in one checkpoint.
    Two ``all_gather`` calls (lengths, then the padded UTF-8 bytes).
    """
    if not is_distributed(group):
        return [obj]
    data = json.dumps(obj).encode()
    lengths = mx.distributed.all_gather(mx.array([len(data)], dtype=mx.int32), group=group)
    lengths = lengths.tolist()
    padded = data + b" " * (max(lengths) - len(data))
    buf = mx.distributed.all_gather(mx.array(list(padded), dtype=mx.uint8), group=group)
    rows = np.array(buf, dtype=np.uint8).reshape(len(lengths), max(lengths))
    return [json.loads(bytes(row[:n])) for row, n in zip(rows, lengths, strict=True)]


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
