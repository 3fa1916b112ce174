"""Score completions with TRL-style reward functions into ``rewards_per_func [N, F]``.

A reward function has TRL's signature::

    fn(prompts, completions, completion_ids, **kwargs) -> list[float | None]

called with keyword arguments only. ``kwargs`` holds every other dataset column (one value per
row, already repeated per generation so it lines up with ``completions``) plus ``trainer_state``,
``log_extra`` and ``log_metric``. A function receives all of them if it takes ``**kwargs``, and
otherwise only the names its signature lists, so ``def f(completions, answer)`` works too.
``None`` means "not applicable" and becomes NaN; the core ``advantages`` ignores it (nansum), and
a row where every function returned ``None`` gets advantage 0.

Pure Python and ``mx``: no tokenizer, no I/O. Decoding happens in the caller.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import math
import numbers
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import attrs
import mlx.core as mx
import numpy as np

from grpo.core.advantages import weighted_rewards
from grpo.core.numerics import nanmean, nanstd
from grpo.errors import RewardError

# Names score() supplies itself; any other required parameter must be a dataset column.
KNOWN_ARGUMENTS = frozenset(
    {"prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric"}
)
# Columns TRL never forwards as kwargs (they are passed as prompts/completions/completion_ids).
RESERVED_COLUMNS = frozenset({"prompt", "completion", "completion_ids"})
# Largest |reward| accepted. Rewards are float32, and a group's std squares differences of
# up to twice this size summed over the group: beyond ~1.8e19 that overflows, the std
# becomes inf and every advantage silently 0. 1e18 leaves room for groups of up to ~80.
MAX_ABS_REWARD = 1e18


@attrs.frozen
class RewardContext:
    """Training progress handed to reward functions as ``trainer_state``.

    Mirrors the fields of ``transformers.TrainerState`` that TRL reward functions read
    (``trainer_state.global_step``, ``.epoch``, ``.max_steps``), plus the generation budget so
    length-aware rewards need no extra configuration.
    """

    global_step: int = 0
    epoch: float = 0.0
    max_steps: int = 0
    max_completion_length: int | None = None

    @property
    def step(self) -> int:
        return self.global_step


class Scores(NamedTuple):
    """What :func:`score` returns."""

    rewards_per_func: mx.array  # [N, F] float32, NaN where a function returned None
    names: tuple[str, ...]  # F reward-function names, as used in metric keys
    metrics: dict[str, list[float]]  # values passed to ``log_metric(name, value)``
    extra: dict[str, list]  # columns passed to ``log_extra(column, values)``


def reward_name(fn: Callable) -> str:
    """Display name of a reward function (TRL's ``get_callable_name``): unwraps partials."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


def reward_names(reward_fns: Sequence[Callable]) -> tuple[str, ...]:
    """Names of ``reward_fns``; repeated names get ``_1``, ``_2`` ... so metric keys stay unique."""
    names = [reward_name(fn) for fn in reward_fns]
    seen: dict[str, int] = {}
    out = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        out.append(name if names.count(name) == 1 else f"{name}_{count}")
    return tuple(out)


def is_conversational(prompt: Any) -> bool:
    """True when ``prompt`` is a list of ``{"role": ..., "content": ...}`` messages (TRL's test)."""
    return (
        isinstance(prompt, (list, tuple))
        and len(prompt) > 0
        and isinstance(prompt[0], Mapping)
        and "role" in prompt[0]
    )


def as_completions(prompts: Sequence, texts: Sequence) -> list:
    """Completions as TRL passes them: ``[{"role": "assistant", "content": text}]`` lists for
    conversational prompts, plain strings otherwise. Already-wrapped completions pass through."""
    if not prompts or not is_conversational(prompts[0]):
        return list(texts)
    return [t if isinstance(t, list) else [{"role": "assistant", "content": t}] for t in texts]


def _parameters(fn: Callable) -> tuple[bool, set[str], set[str]]:
    """(takes **kwargs, names it accepts by keyword, names it requires)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: pass everything
        return True, set(), set()
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    by_name = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    required = {n for p in params if (n := p.name) in by_name and p.default is p.empty}
    return var_kw, by_name, required


def required_columns(fn: Callable) -> set[str]:
    """Dataset columns ``fn`` cannot run without: parameters without a default that
    :func:`score` does not supply itself."""
    return _parameters(fn)[2] - KNOWN_ARGUMENTS


def check_reward_fns(reward_fns: Sequence[Callable], column_names: Iterable[str]) -> None:
    """Fail early, before any generation, if a reward function needs a column the data lacks.

    Raises:
        RewardError: naming the function, the missing column(s) and the columns that exist.
    """
    if not reward_fns:
        raise RewardError("no reward functions given: pass at least one callable or name")
    columns = set(column_names) - RESERVED_COLUMNS
    for fn, name in zip(reward_fns, reward_names(reward_fns), strict=True):
        if not callable(fn):
            raise RewardError(
                f"reward function {fn!r} is not callable ({type(fn).__name__}); resolve names "
                "with grpo.rewards.resolve_reward_funcs first"
            )
        missing = sorted(required_columns(fn) - columns)
        if missing:
            note = (
                " ('prompt', 'completion' and 'completion_ids' arrive as prompts, completions and"
                " completion_ids)"
                if RESERVED_COLUMNS & set(missing)
                else ""
            )
            raise RewardError(
                f"reward function {name!r} requires column(s) {missing} that the dataset lacks; "
                f"dataset columns: {sorted(set(column_names))}{note}"
            )


def _kwargs_for(fn: Callable, kwargs: dict) -> dict:
    var_kw, by_name, _ = _parameters(fn)
    return kwargs if var_kw else {k: v for k, v in kwargs.items() if k in by_name}


def _as_float(value: Any, name: str, row: int) -> float:
    if value is None:
        return math.nan
    if hasattr(value, "item") and getattr(value, "size", 2) == 1:  # numpy / mx scalars
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise RewardError(
            f"reward function {name!r} returned a non-numeric value at row {row}: "
            f"{value!r} ({type(value).__name__}); return a float, or None for 'not applicable'"
        )
    out = float(value)
    if not math.isfinite(out):
        # Never zeroed silently: a NaN/inf reward is a bug in the function, not "not applicable".
        raise RewardError(
            f"reward function {name!r} returned {out} at row {row}; rewards must be finite "
            "(return None for 'not applicable')"
        )
    if abs(out) > MAX_ABS_REWARD:
        raise RewardError(
            f"reward function {name!r} returned {out:.6g} at row {row}, beyond the +-{MAX_ABS_REWARD:g} "
            "that float32 advantages can hold (larger rewards overflow float32 or its group "
            "std, and every advantage becomes 0); rescale the rewards"
        )
    return out


def _validate(output: Any, name: str, n: int) -> list[float]:
    if hasattr(output, "tolist") and not isinstance(output, list):  # numpy / mx arrays
        output = output.tolist()
    if isinstance(output, (str, bytes)) or not isinstance(output, Sequence):
        raise RewardError(
            f"reward function {name!r} returned {type(output).__name__} {output!r:.80}; "
            f"expected a list of {n} floats (one per completion)"
        )
    if len(output) != n:
        raise RewardError(
            f"reward function {name!r} returned {len(output)} rewards for {n} completions; "
            "it must return exactly one reward (or None) per completion"
        )
    return [_as_float(v, name, i) for i, v in enumerate(output)]


def _raised(name: str, n: int, e: BaseException) -> RewardError:
    return RewardError(
        f"reward function {name!r} raised {type(e).__name__} while scoring rows 0..{n - 1}: {e}"
    )


def _run_coroutine(coro):
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # Already inside an event loop (e.g. a notebook): run ours on a fresh thread.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _timed_out(name: str, n: int, timeout: float) -> RewardError:
    return RewardError(
        f"reward function {name!r} did not return within reward_timeout={timeout:g}s while "
        f"scoring rows 0..{n - 1}; it was abandoned (a hung call keeps running in a "
        "background thread)"
    )


async def _await_all(
    pending: list[tuple[int, str, Any]], n: int, timeout: float | None
) -> list[list[float]]:
    async def one(name, awaitable):
        try:
            output = await asyncio.wait_for(awaitable, timeout)
        except asyncio.TimeoutError:
            raise _timed_out(name, n, timeout) from None
        except Exception as e:
            raise _raised(name, n, e) from e
        return _validate(output, name, n)

    return await asyncio.gather(*(one(name, aw) for _, name, aw in pending))


def _call(fn: Callable, kwargs: dict, *, name: str, n: int, timeout: float | None) -> Any:
    """``fn(**kwargs)``; with ``timeout``, on a daemon thread that is abandoned when late
    (a Python thread cannot be killed, and a daemon one never blocks the process exit)."""
    if timeout is None:
        return fn(**kwargs)
    box: dict[str, Any] = {}

    def target():
        try:
            box["output"] = fn(**kwargs)
        except BaseException as e:  # handed to the caller's thread below
            box["error"] = e

    worker = threading.Thread(target=target, name=f"reward {name}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise _timed_out(name, n, timeout)
    if "error" in box:
        raise box["error"]
    return box["output"]


def _call_all(reward_fns, names, kwargs: dict, n: int, timeout: float | None = None):
    columns: list[list[float] | None] = [None] * len(reward_fns)
    pending = []
    for f, (fn, name) in enumerate(zip(reward_fns, names, strict=True)):
        try:
            output = _call(fn, _kwargs_for(fn, kwargs), name=name, n=n, timeout=timeout)
        except RewardError:
            raise
        except Exception as e:
            raise _raised(name, n, e) from e
        if inspect.isawaitable(output):  # async functions run together below
            pending.append((f, name, output))
        else:
            columns[f] = _validate(output, name, n)
    if pending:
        results = _run_coroutine(_await_all(pending, n, timeout))
        for (f, _, _), values in zip(pending, results, strict=True):
            columns[f] = values
    return columns


def _column_kwargs(columns: Mapping[str, Sequence] | None, n: int) -> dict[str, list]:
    out = {}
    for key, values in (columns or {}).items():
        if key in RESERVED_COLUMNS:
            continue
        if len(values) != n:
            raise RewardError(
                f"column {key!r} has {len(values)} values for {n} completions; "
                "repeat each prompt's columns once per generation"
            )
        out[key] = list(values)
    return out


def score(
    prompts: Sequence,
    completions: Sequence,
    completion_ids: Sequence[Sequence[int]],
    reward_fns: Sequence[Callable],
    *,
    columns: Mapping[str, Sequence] | None = None,
    context: Any = None,
    timeout: float | None = None,
) -> Scores:
    """Call every reward function on the ``N`` rows and stack the results.

    .. math::

        R_{nf} = r_f(\\text{prompt}_n, \\text{completion}_n, \\ldots), \\quad
        R_{nf} = \\text{NaN} \\text{ when } r_f \\text{ returns None}

    Args:
        prompts: ``N`` prompts (strings or message lists), group-contiguous.
        completions: ``N`` decoded completions (strings); wrapped as assistant messages when the
            prompts are conversational, exactly as TRL does.
        completion_ids: ``N`` lists of completion token ids (no padding).
        reward_fns: ``F`` callables (sync or async).
        columns: other dataset columns, each a sequence of ``N`` values.
        context: passed as ``trainer_state`` (default: a fresh :class:`RewardContext`).
        timeout: seconds each reward function may take (``None``: no limit).

    Returns:
        :class:`Scores` with ``rewards_per_func`` ``[N, F]`` float32 (NaN = None).

    Raises:
        RewardError: a missing column, a wrong-length / non-numeric / NaN / inf / too large
            (beyond :data:`MAX_ABS_REWARD`) output, an exception inside a function, or a call
            past ``timeout``; each names the function (and row when there is one).
    """
    n = len(prompts)
    if len(completions) != n or len(completion_ids) != n:
        raise RewardError(
            f"got {n} prompts, {len(completions)} completions and {len(completion_ids)} "
            "completion_ids; they must align row for row"
        )
    check_reward_fns(reward_fns, list(columns or {}))
    names = reward_names(reward_fns)
    metrics: dict[str, list[float]] = {}
    extra: dict[str, list] = {}
    kwargs = {
        **_column_kwargs(columns, n),
        "prompts": list(prompts),
        "completions": as_completions(prompts, completions),
        "completion_ids": [list(ids) for ids in completion_ids],
        "trainer_state": RewardContext() if context is None else context,
        "log_extra": lambda column, values: extra.setdefault(column, []).extend(values),
        "log_metric": lambda name, value: metrics.setdefault(name, []).append(float(value)),
    }
    values = _call_all(reward_fns, names, kwargs, n, timeout)
    rewards = np.asarray(values, dtype=np.float32).reshape(len(reward_fns), n).T
    return Scores(mx.array(rewards), names, metrics, extra)


def reward_weights(weights: Sequence[float] | None, num_funcs: int) -> mx.array:
    """Reward weights as a float32 ``[F]`` array (default 1 each), checked against ``F``."""
    if weights is None:
        return mx.ones((num_funcs,), dtype=mx.float32)
    w = np.asarray(list(weights), dtype=np.float64)
    if w.shape != (num_funcs,):
        raise ValueError(
            f"got {w.size} reward weights for {num_funcs} reward functions: {list(weights)}"
        )
    if not np.all(np.isfinite(w)):
        raise ValueError(f"reward weights must be finite, got {list(weights)}")
    return mx.array(w.astype(np.float32))


def reward_metrics(
    rewards_per_func: mx.array,
    weights: mx.array,
    is_std_zero: mx.array,
    *,
    names: Sequence[str],
) -> dict[str, float]:
    """TRL's reward metrics for one batch.

    ``rewards/<name>/mean`` and ``/std`` over the rows where the function applied; ``reward`` and
    ``reward_std`` of the weighted sum over scorable rows (``advantages.weighted_rewards``);
    ``frac_reward_zero_std`` the fraction of rows whose group (or batch) reward std is zero.
    A std over fewer than two values is NaN, as in TRL.

    Args:
        rewards_per_func: ``[N, F]`` from :func:`score`.
        weights: ``[F]`` reward weights.
        is_std_zero: ``[N]`` bool from the core ``advantages``.
        names: ``F`` reward-function names.

    Returns:
        ``{metric name: float}``.
    """
    N, F = rewards_per_func.shape
    if len(names) != F or weights.shape != (F,) or is_std_zero.shape != (N,):
        raise ValueError(
            f"reward_metrics: rewards_per_func {rewards_per_func.shape}, weights {weights.shape}, "
            f"is_std_zero {is_std_zero.shape} and {len(names)} names do not agree"
        )
    rewards = weighted_rewards(rewards_per_func, weights)
    stats = [nanmean(rewards_per_func, 0), nanstd(rewards_per_func, 0)]
    stats += [nanmean(rewards), nanstd(rewards), is_std_zero.astype(mx.float32).mean()]
    mx.eval(stats)
    means, stds, reward, reward_std, frac = (s.tolist() for s in stats)
    out = {}
    for name, mean, std in zip(names, means, stds, strict=True):
        out[f"rewards/{name}/mean"] = mean
        out[f"rewards/{name}/std"] = std
    out.update(reward=reward, reward_std=reward_std, frac_reward_zero_std=frac)
    return out
