"""Compare models on one eval set: pass@k, mean@k, greedy accuracy, length, truncation.

:func:`sample_model` draws ``n`` completions per prompt (and one greedy completion) from one
model and scores them; :func:`summarize` turns those per-prompt arrays into the metrics of
:mod:`grpo.core.metrics`, with a paired bootstrap interval against the first model.
Every model sees the same prompts in the same order and the same sampling keys (one key
per prompt chunk, split from ``seed``), so differences come from the weights alone.

A completion counts as *correct* when the ``pass_reward`` function scores it at least
``threshold`` (default: the first accuracy-style reward, ``answer_match``,
``exact_match`` or ``unit_tests``, else the first function; threshold 1.0).

Also here: the training run's saved settings (``run_config.json``) and the list of what
``grpo eval --run`` compares (base, every checkpoint, final), ``eval.json`` and
``eval.png``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import numpy as np

from grpo.core import metrics as M
from grpo.core.rollout import rollout
from grpo.core.score import reward_names, score
from grpo.io.data import PromptEncoder, decode_rollout
from grpo.io.plot import save_figure

RUN_CONFIG = "run_config.json"
EVAL_JSON = "eval.json"
EVAL_PNG = "eval.png"
ACCURACY_REWARDS = ("answer_match", "exact_match", "unit_tests")
SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_completion_length",
)  # fmt: skip


@attrs.frozen
class Candidate:
    """One model to evaluate: a base model, optionally with saved adapters."""

    name: str
    model: str
    adapter_path: str | None = None


@attrs.frozen
class Samples:
    """Per-prompt results of one model on ``B`` prompts with ``n`` samples each."""

    rewards: np.ndarray  # [B, n, F] float64, NaN where a function returned None
    lengths: np.ndarray  # [B, n] completion tokens
    truncated: np.ndarray  # [B, n] bool
    greedy_rewards: np.ndarray  # [B, F]
    names: tuple[str, ...]  # F reward-function names


def pass_index(names: Sequence[str], pass_reward: str | None) -> int:
    """Index of the function that judges correctness (see the module docstring)."""
    if pass_reward is not None:
        if pass_reward not in names:
            raise ValueError(f"--pass_reward {pass_reward!r} is not one of {list(names)}")
        return list(names).index(pass_reward)
    return next((i for i, n in enumerate(names) if n in ACCURACY_REWARDS), 0)


def prompt_encoder(model, tokenizer, cfg) -> PromptEncoder:
    """Render, tokenise and fit prompts as the trainer does (left-truncated to the budget)."""
    context = getattr(getattr(model, "args", None), "max_position_embeddings", None)
    return PromptEncoder(
        tokenizer,
        max_completion_length=cfg.max_completion_length,
        max_prompt_length=cfg.max_prompt_length,
        context_length=context,
        template_kwargs=cfg.chat_template_kwargs or {},
    )


def evaluate_rewards(
    params: Any,
    key: mx.array,
    rows: Sequence[dict],
    prompt_ids: Sequence[Sequence[int]],
    *,
    model: Any,
    tokenizer: Any,
    sampling: Any,
    reward_funcs: Sequence,
    columns: Sequence[str] = (),
    timeout: float | None = None,
):
    """Sample ``sampling.group_size`` completions per row and score them, as training does.

    The one sampling-and-scoring chain of ``GRPOTrainer.evaluate`` and ``grpo eval``: the
    rollout, the decoded completions, and the reward functions called with each row's
    ``prompt`` and ``columns`` repeated per completion.

    Returns:
        ``(rollout, scores, completion_ids, texts)``.
    """
    roll = rollout(params, key, list(prompt_ids), model=model, sampling=sampling)
    ids, texts = decode_rollout(roll, tokenizer)
    prompts, repeated = repeat_rows(rows, sampling.group_size, columns)
    scores = score(prompts, texts, ids, reward_funcs, columns=repeated, timeout=timeout)
    return roll, scores, ids, texts


def repeat_rows(rows: Sequence[dict], G: int, columns: Sequence[str]) -> tuple[list, dict]:
    """Each row's ``prompt`` and ``columns`` repeated ``G`` times (group-contiguous), as a
    generation batch lays them out: ``(prompts, {column: values})``."""
    prompts = [r["prompt"] for r in rows for _ in range(G)]
    return prompts, {c: [r.get(c) for r in rows for _ in range(G)] for c in columns}


def _roll_and_score(model, tokenizer, chunk, ids, key, sampling, reward_funcs, extra):
    G = sampling.group_size
    roll, scores, _, _ = evaluate_rewards(
        model.parameters(), key, chunk, ids, model=model, tokenizer=tokenizer,
        sampling=sampling, reward_funcs=reward_funcs, columns=extra,
    )  # fmt: skip
    lengths = np.array(roll.completion_lengths)
    F = len(reward_funcs)
    rewards = np.array(scores.rewards_per_func, dtype=np.float64).reshape(len(chunk), G, F)
    shape = (len(chunk), G)
    return rewards, lengths.reshape(shape), np.array(roll.is_truncated).reshape(shape)


def sample_model(
    model, tokenizer, rows: Sequence[dict], reward_funcs: Sequence, cfg, *, n: int, seed: int
) -> Samples:
    """Sample ``n`` completions and one greedy completion for every row, and score them.

    Sampling follows ``cfg`` (a ``GRPOConfig``: temperature, top-p/k, min-p, repetition
    penalty, ``max_completion_length``, chat template kwargs); prompts are chunked by
    ``per_device_eval_batch_size // n``. Same model, rows, ``n`` and ``seed`` give the
    same :class:`Samples`.
    """
    from grpo.io.data import eos_token_ids

    rows = list(rows)
    encoder = prompt_encoder(model, tokenizer, cfg)
    ids = [encoder(r["prompt"], row=i) for i, r in enumerate(rows)]
    base = cfg.to_sampling_config(eos_token_ids=eos_token_ids(tokenizer))
    sampled = attrs.evolve(base, group_size=n)
    greedy = attrs.evolve(base, group_size=1, temperature=0.0)
    extra = sorted({c for r in rows for c in r} - {"prompt"})
    B = max(1, cfg.per_device_eval_batch_size // n)
    key = mx.random.key(seed)
    parts: list[tuple] = []
    model.eval()
    for start in range(0, len(rows), B):
        chunk, chunk_ids = rows[start : start + B], ids[start : start + B]
        key, sub = mx.random.split(key)
        args = (chunk, chunk_ids, sub)
        r, L, t = _roll_and_score(model, tokenizer, *args, sampled, reward_funcs, extra)
        g, _, _ = _roll_and_score(model, tokenizer, *args, greedy, reward_funcs, extra)
        parts.append((r, L, t, g[:, 0]))
    cat = [np.concatenate(p, axis=0) for p in zip(*parts, strict=True)]
    return Samples(*cat, names=reward_names(reward_funcs))


def _weighted(rewards: np.ndarray, weights: Sequence[float] | None) -> np.ndarray:
    w = np.ones(rewards.shape[-1]) if weights is None else np.asarray(weights, dtype=np.float64)
    # A None reward ("not applicable") adds nothing, as in the trainer's nansum.
    return np.nansum(rewards * w, axis=-1)


def summarize(
    samples: Samples,
    *,
    k: int,
    pass_reward: str | None = None,
    threshold: float = 1.0,
    weights: Sequence[float] | None = None,
) -> dict[str, Any]:
    """The metrics of one model (plain floats) plus per-prompt arrays for the bootstrap."""
    f = pass_index(samples.names, pass_reward)
    correct = samples.rewards[..., f] >= threshold  # NaN compares False: not correct
    total = _weighted(samples.rewards, weights)
    n = correct.shape[1]
    out = {
        "reward": float(total.mean()),
        "rewards": {
            name: _nanmean(samples.rewards[..., i]) for i, name in enumerate(samples.names)
        },
        "pass_reward": samples.names[f],
        "pass@1": M.mean_pass_at_k(correct, 1),
        f"pass@{k}": M.mean_pass_at_k(correct, k),
        f"mean@{k}": M.mean_at_k(total, k),
        "greedy_accuracy": M.accuracy(samples.greedy_rewards[:, f] >= threshold),
        "mean_length": M.mean_length(samples.lengths),
        "truncation_rate": M.truncation_rate(samples.truncated),
        "prompts": int(correct.shape[0]),
        "samples_per_prompt": int(n),
    }
    per_prompt = {"pass@1": correct.mean(axis=1), "reward": total.mean(axis=1)}
    return {"metrics": out, "per_prompt": per_prompt}


def _nanmean(x: np.ndarray) -> float | None:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else None


def compare(summaries: list[dict], *, seed: int, confidence: float = 0.95) -> list[dict]:
    """Each model's metrics with ``vs_first``: bootstrap intervals of its difference from
    the first model in pass@1 and mean reward (``[estimate, low, high]``)."""
    first = summaries[0]["per_prompt"]
    out = []
    for i, s in enumerate(summaries):
        row = dict(s["metrics"])
        if i > 0:
            row["vs_first"] = {
                name: list(
                    M.paired_bootstrap(
                        first[name], s["per_prompt"][name], seed=seed, confidence=confidence
                    )
                )  # fmt: skip
                for name in ("pass@1", "reward")
            }
        out.append(row)
    return out


# -- the run's saved settings -------------------------------------------------------------------


def held_out_split(rows: Sequence, fraction: float, *, seed: int = 0) -> tuple[list, list]:
    """``(train, held_out)``: a seeded ``fraction`` of ``rows`` (at least one row) held out.

    The same rows, fraction and seed give the same split; row order is kept on both sides.
    """
    rows = list(rows)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"eval_split must be in (0, 1), got {fraction}")
    if len(rows) < 2:
        raise ValueError(f"eval_split needs at least 2 rows, got {len(rows)}")
    m = min(len(rows) - 1, max(1, round(fraction * len(rows))))
    held = set(np.random.default_rng(seed).permutation(len(rows))[:m].tolist())
    train = [r for i, r in enumerate(rows) if i not in held]
    return train, [r for i, r in enumerate(rows) if i in held]


def write_run_config(output_dir: str | Path, **values) -> Path:
    """``output_dir/run_config.json``: what ``grpo eval --run`` needs to rebuild the run."""
    path = Path(output_dir) / RUN_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values, indent=2, sort_keys=True, default=str))
    return path


def read_run_config(output_dir: str | Path) -> dict:
    """The saved settings of a run: ``run_config.json``, else the newest checkpoint's
    ``trainer_state.json`` config (then model, dataset and reward must come from flags)."""
    from grpo.io.checkpoint import TRAINER_STATE, list_checkpoints

    out = Path(output_dir)
    if (out / RUN_CONFIG).is_file():
        return json.loads((out / RUN_CONFIG).read_text())
    checkpoints = list_checkpoints(out)
    if checkpoints:
        state = json.loads((checkpoints[-1] / TRAINER_STATE).read_text())
        return {"config": state.get("config", {})}
    raise FileNotFoundError(f"{out} holds neither {RUN_CONFIG} nor a checkpoint")


def run_candidates(
    output_dir: str | Path, model: str, start_adapter: str | None
) -> list[Candidate]:
    """Base, every ``checkpoint-N`` (oldest first) and the final weights of a run."""
    from grpo.io.checkpoint import list_checkpoints

    out = Path(output_dir)
    found = [Candidate("base", model, start_adapter)]
    found += [Candidate(p.name, model, str(p)) for p in list_checkpoints(out)]
    if (out / "adapters.safetensors").is_file():
        found.append(Candidate("final", model, str(out)))
    return found


# -- reporting ----------------------------------------------------------------------------------


def _ci(row: dict, name: str) -> str:
    v = row.get("vs_first", {}).get(name)
    return "" if v is None else f"{v[0]:+.3f} [{v[1]:+.3f}, {v[2]:+.3f}]"


def format_table(names: Sequence[str], rows: Sequence[dict], *, k: int) -> str:
    """The terminal table: one line per model."""
    head = ["model", "reward", "pass@1", f"pass@{k}", f"mean@{k}", "greedy", "length", "trunc"]
    head += ["d pass@1 [95% CI]", "d reward [95% CI]"]
    lines = [head]
    for name, r in zip(names, rows, strict=True):
        lines.append(
            [name] + [f"{r[c]:.3f}" for c in ("reward", "pass@1", f"pass@{k}", f"mean@{k}",
                                              "greedy_accuracy")]
            + [f"{r['mean_length']:.1f}", f"{r['truncation_rate']:.2f}"]
            + [_ci(r, "pass@1"), _ci(r, "reward")]
        )  # fmt: skip
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def plot_eval(names: Sequence[str], rows: Sequence[dict], png_path: str | Path, *, k: int) -> Path:
    """Grouped bars: reward, pass@1, pass@k and greedy accuracy per model."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot's import
    import matplotlib.pyplot as plt

    keys = ["reward", "pass@1", f"pass@{k}", "greedy_accuracy"]
    x = np.arange(len(keys))
    width = 0.8 / max(1, len(rows))
    fig, ax = plt.subplots(figsize=(max(6.4, 1.2 * len(keys) * max(1, len(rows)) / 2), 4.0))
    for i, (name, r) in enumerate(zip(names, rows, strict=True)):
        values = [r[key] if math.isfinite(r[key]) else 0.0 for key in keys]
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=name)
    ax.set_xticks(x, keys)
    ax.set_ylabel("value")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title("grpo eval")
    return save_figure(fig, png_path)
