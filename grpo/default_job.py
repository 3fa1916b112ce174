"""The embedded default job of ``grpo train``: a cached, warm-started tiny model and a task.

With no flags, ``grpo train`` builds a seeded tiny Llama model and character tokenizer
(:func:`grpo.io.tiny.build_tiny_model`), warm-starts it on generated examples of the
built-in ``reverse`` task (:mod:`grpo.warmstart`), caches it under the user's cache
directory, loads it through ``mlx_lm.load`` and trains it with GRPO on the same task with
its per-character exact-answer reward.

The cache lives in ``$MLX_GRPO_CACHE`` if set, else ``$XDG_CACHE_HOME/mlx-grpo``, else
``~/.cache/mlx-grpo``; each model is one directory named by everything that determines its
weights, written to a temporary directory and renamed into place (atomic: a killed or
concurrent build never leaves a half-written model behind).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import attrs

import grpo
from grpo.tasks import DEFAULT_TASK, get_task
from grpo.warmstart import WarmStartConfig

# Model and warm start of the default job. Measured on a shared 2-core Linux CPU: ~100
# supervised steps give a sampled (T=1) reward of ~0.3-0.4 on `reverse`, from which GRPO
# climbs by well over 0.25 within the default max_steps (see docs/architecture.md).
MODEL_SIZE = "test"
MODEL_SEED = 0
WARM_START = WarmStartConfig(steps=100, batch_size=32, learning_rate=5e-4, seed=0)

# GRPOConfig overrides of the default job (any of them can still be overridden by flags).
DEFAULT_TRAIN_ARGS: dict = {
    "use_lora": False,  # a 0.4M-parameter model: train every weight
    "learning_rate": 2e-4,
    "lr_scheduler_type": "constant",
    "num_generations": 8,
    "per_device_train_batch_size": 64,  # 8 prompts x 8 completions per step
    "max_completion_length": 8,
    "temperature": 1.0,
    "beta": 0.01,
    "max_steps": 400,
    "logging_steps": 10,
    "per_device_eval_batch_size": 64,  # eval chunks of 8 prompts x 8 completions
    "save_steps": 50,  # a failure or kill loses at most 50 steps
    "save_total_limit": 2,
    "seed": 0,
    "output_dir": "grpo_output",
}
DATASET_SIZE = 2000
DATASET_SEED = 0
EVAL_SEED = 7_777


def cache_root() -> Path:
    """``$MLX_GRPO_CACHE``, else ``$XDG_CACHE_HOME/mlx-grpo``, else ``~/.cache/mlx-grpo``."""
    explicit = os.environ.get("MLX_GRPO_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "mlx-grpo"


def model_key(
    *,
    task: str = DEFAULT_TASK,
    size: str = MODEL_SIZE,
    seed: int = MODEL_SEED,
    warm_start: WarmStartConfig = WARM_START,
) -> str:
    """Directory name naming everything the cached weights depend on.

    Besides the readable parts, a short hash of the model config and the task's definition
    makes a cache entry stale when either changes under the same package version.
    """
    from grpo.io.tiny import model_config

    t = get_task(task)
    spec = [model_config(size), t.verb, t.transform.__name__, t.min_len, t.max_len, t.alphabet]
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
    ws = warm_start
    return (
        f"v{grpo.__version__}-{task}-{size}-seed{seed}"
        f"-ws{ws.steps}x{ws.batch_size}-lr{ws.learning_rate:g}-s{ws.seed}-{digest}"
    )


def model_dir(
    cache_dir: str | Path | None = None,
    *,
    task: str = DEFAULT_TASK,
    size: str = MODEL_SIZE,
    seed: int = MODEL_SEED,
    warm_start: WarmStartConfig = WARM_START,
) -> Path:
    """Where :func:`ensure_model` keeps (or will build) this model; nothing is created."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return root / model_key(task=task, size=size, seed=seed, warm_start=warm_start)


def is_cached(path: str | Path) -> bool:
    """True when ``path`` (a :func:`model_dir`) holds a finished build."""
    return (Path(path) / "model.safetensors").exists()


def _build(path: Path, *, task: str, size: str, seed: int, warm_start: WarmStartConfig, log):
    import mlx.core as mx
    import mlx_lm
    from mlx.utils import tree_flatten

    from grpo.io.tiny import build_tiny_model
    from grpo.warmstart import warm_start as run_warm_start

    build_tiny_model(path, size=size, seed=seed)
    if warm_start.steps == 0:
        return
    model, tokenizer = mlx_lm.load(str(path))
    log(
        f"warm start: {warm_start.steps} supervised steps on generated examples of the "
        f"{task!r} task (batch {warm_start.batch_size}, Adam lr {warm_start.learning_rate:g}) "
        "so that GRPO starts from a non-zero reward"
    )
    losses = run_warm_start(model, tokenizer, get_task(task), config=warm_start, log=log)
    log(f"warm start: done, final loss {losses[-1]:.3f}")
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})


def ensure_model(
    cache_dir: str | Path | None = None,
    *,
    task: str = DEFAULT_TASK,
    size: str = MODEL_SIZE,
    seed: int = MODEL_SEED,
    warm_start: WarmStartConfig = WARM_START,
    log: Callable[[str], None] = print,
) -> Path:
    """The cached warm-started model directory, building it first if it is not there.

    Args:
        cache_dir: root of the cache (default :func:`cache_root`).
        task: built-in task the warm start trains on.
        size: :func:`grpo.io.tiny.build_tiny_model` size.
        seed: weight seed of the tiny model.
        warm_start: supervised warm-start settings (``steps=0`` skips it).
        log: where progress lines go.

    Returns:
        A directory loadable by ``mlx_lm.load``.
    """
    get_task(task)  # fail on an unknown task before building anything
    final = model_dir(cache_dir, task=task, size=size, seed=seed, warm_start=warm_start)
    return build_cached(
        final,
        lambda tmp: _build(tmp, task=task, size=size, seed=seed, warm_start=warm_start, log=log),
        what=f"a seeded tiny model (size={size!r}, seed={seed})",
        log=log,
    )


def build_cached(
    final: Path, build: Callable[[Path], object], *, what: str, log: Callable[[str], None]
) -> Path:
    """``final`` if already cached, else ``build(tmp)`` in a temporary sibling renamed to
    ``final`` at the end, so a reader never sees a half-built model."""
    if is_cached(final):
        log(f"model: cached warm-started tiny model {final}")
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    log(f"model: building {what} in {final}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(tmp)
        try:
            tmp.rename(final)
        except OSError:
            # Another process finished the same build first; its copy is identical.
            if not is_cached(final):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def default_dataset(
    task: str = DEFAULT_TASK, *, n: int = DATASET_SIZE, seed: int = DATASET_SEED
) -> list[dict[str, str]]:
    """Training rows of the default job (seeded; disjoint seed from the warm start's stream)."""
    from grpo.tasks import make_dataset

    return make_dataset(task, n, seed=seed + 1_000_003)


def default_eval_dataset(task: str = DEFAULT_TASK, *, n: int = 64) -> list[dict[str, str]]:
    """The task's held-out eval set: ``n`` seeded rows whose prompts never occur in
    :func:`default_dataset` (nor repeat), so base-vs-trained numbers measure generalisation."""
    from grpo.tasks import held_out_dataset

    seen = {row["prompt"] for row in default_dataset(task)}
    return held_out_dataset(task, n, seed=EVAL_SEED, exclude=seen)


def default_config(**overrides):
    """:class:`grpo.config.GRPOConfig` of the default job, with ``overrides`` applied."""
    from grpo.config import GRPOConfig

    return GRPOConfig(**{**DEFAULT_TRAIN_ARGS, **overrides})


def evolve_warm_start(**changes) -> WarmStartConfig:
    """The default warm start with ``changes`` (e.g. ``steps=0``)."""
    return attrs.evolve(WARM_START, **changes)
