"""``grpo eval`` and ``grpo generate``: the command-line side of :mod:`grpo.evaluate`.

Kept apart from :mod:`grpo.cli` (which owns flag parsing, :class:`grpo.cli.Run` and the
error conventions) so that each command's logic lives in one place.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import attrs

from grpo.cli import (
    EVAL_ROWS,
    Run,
    UsageError,
    _flag_type,
    _load_model,
    flag_overrides,
    make_config,
)


def eval_flags(ev: argparse.ArgumentParser) -> None:
    """The flags ``grpo eval`` adds to the common ones."""
    ev.add_argument(
        "--adapter_path",
        dest="adapter_paths",
        action="append",
        default=[],
        metavar="DIR",
        help="adapters to compare against --model (repeat for several; e.g. a grpo train "
        "output_dir or one of its checkpoints)",
    )
    ev.add_argument(
        "--run",
        metavar="OUTPUT_DIR",
        help="a grpo train output_dir: compare base, every checkpoint and the final weights "
        "with the run's saved settings (run_config.json); flags override them",
    )
    ev.add_argument(
        "--k", type=_flag_type("k", int), default=None, help="pass@k / mean@k budget (default n)"
    )
    ev.add_argument(
        "--pass_reward",
        metavar="NAME",
        help="reward function that decides correctness (default: answer_match, exact_match or "
        "unit_tests if used, else the first)",
    )
    ev.add_argument(
        "--pass_threshold",
        type=_flag_type("pass_threshold", float),
        default=1.0,
        help="a completion is correct when that reward is at least this (default 1.0)",
    )
    ev.add_argument(
        "--limit",
        type=_flag_type("limit", int),
        default=None,
        help=f"score only the first N prompts (default: all; {EVAL_ROWS} for a built-in task)",
    )


# -- grpo eval ------------------------------------------------------------------------------------


def _from_run(args: argparse.Namespace) -> tuple[argparse.Namespace, dict]:
    """``args`` with model, dataset and reward filled from the run's ``run_config.json``."""
    from grpo.evaluate import read_run_config

    if not Path(args.run).is_dir():
        raise UsageError(f"--run: no such directory: {args.run}")
    try:
        saved = read_run_config(args.run)
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise UsageError(f"--run {args.run}: {e}") from e
    ns = copy.copy(args)
    ns.model = args.model or saved.get("model")
    ns.reward = args.reward or saved.get("reward")
    ns.dataset = args.dataset or saved.get("eval_dataset") or saved.get("dataset")
    if ns.model is None:
        raise UsageError(f"--run {args.run}: the run saved no model; pass --model")
    return ns, saved


def _settings(args: argparse.Namespace):
    """``(Run, GRPOConfig, saved run settings or {})`` of an eval call."""
    saved: dict = {}
    if args.run:
        args, saved = _from_run(args)
    ns = copy.copy(args)
    ns.adapter_path = None
    run = Run(ns, command="eval")
    cfg = run.config
    if saved.get("config"):
        saved_cfg = {k: v for k, v in saved["config"].items() if k != "output_dir"}
        saved_cfg["output_dir"] = args.run
        cfg = make_config(saved_cfg, flag_overrides(args))
    return run, cfg, saved


def _candidates(args, run: Run, saved: dict):
    from grpo.evaluate import Candidate, run_candidates

    model = run.model_path()
    if args.run:
        found = run_candidates(args.run, model, saved.get("adapter_path"))
        if len(found) < 2:
            raise UsageError(f"--run {args.run}: no checkpoint or final weights to compare")
        return found
    for a in args.adapter_paths:
        if not Path(a).expanduser().is_dir():
            raise UsageError(f"--adapter_path: no such directory: {a}")
    found = [Candidate("base", model)]
    return found + [Candidate(Path(a).name or a, model, a) for a in args.adapter_paths]


def _eval_rows(args, run: Run, saved: dict) -> list:
    rows = run.rows(split="eval")
    split = saved.get("eval_split")
    if args.run and split and not args.dataset and not saved.get("eval_dataset") and not run.task:
        from grpo.evaluate import held_out_split

        rows = held_out_split(list(rows), split, seed=saved.get("split_seed", 0))[1]
    rows = list(rows)
    if args.limit is not None:
        if args.limit < 1:
            raise UsageError(f"--limit must be >= 1, got {args.limit}")
        rows = rows[: args.limit]
    return rows


def run_eval(args: argparse.Namespace) -> int:
    from grpo import evaluate as E

    run, cfg, saved = _settings(args)
    reward_funcs = run.reward_funcs()
    rows = _eval_rows(args, run, saved)
    candidates = _candidates(args, run, saved)
    G = cfg.num_generations_eval or cfg.num_generations
    k = G if args.k is None else args.k
    if k < 1:
        raise UsageError(f"--k must be >= 1, got {k}")
    n = max(k, G)
    try:
        E.pass_index(E.reward_names(reward_funcs), args.pass_reward)
    except ValueError as e:
        raise UsageError(str(e)) from e
    print(f"eval: {len(rows)} prompts x {n} samples (+1 greedy), {len(candidates)} models")
    summaries = []
    for c in candidates:
        print(f"eval: {c.name} ({c.adapter_path or c.model})", flush=True)
        model, tokenizer = _load_model(
            c.model, c.adapter_path, trust_remote_code=cfg.trust_remote_code
        )
        samples = E.sample_model(model, tokenizer, rows, reward_funcs, cfg, n=n, seed=cfg.seed)
        summaries.append(
            E.summarize(samples, k=k, pass_reward=args.pass_reward,
                        threshold=args.pass_threshold, weights=cfg.reward_weights)
        )  # fmt: skip
        del model, tokenizer
    results = E.compare(summaries, seed=cfg.seed)
    names = [c.name for c in candidates]
    print(E.format_table(names, results, k=k))
    out = Path(args.run if args.run and "cfg_output_dir" not in vars(args) else cfg.output_dir)
    report = {
        "dataset": str(run.dataset),
        "reward": run.reward,
        "seed": cfg.seed,
        "k": k,
        "samples_per_prompt": n,
        "prompts": len(rows),
        "sampling": {f: getattr(cfg, f) for f in E.SAMPLING_FIELDS},
        "models": [
            {"name": c.name, "model": c.model, "adapter_path": c.adapter_path, **r}
            for c, r in zip(candidates, results, strict=True)
        ],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / E.EVAL_JSON).write_text(json.dumps(report, indent=2))
    png = E.plot_eval(names, results, out / E.EVAL_PNG, k=k)
    print(f"wrote {out / E.EVAL_JSON} and {png}")
    return 0


# -- grpo train: eval data, saved settings, the closing comparison -------------------------------


def train_eval_flags(train: argparse.ArgumentParser) -> None:
    """``--eval_dataset`` and ``--eval_split`` of ``grpo train``."""
    train.add_argument(
        "--eval_dataset",
        metavar="D",
        help="evaluate on this dataset (same formats as --dataset) when eval_strategy is "
        "steps/epoch or eval_on_start; the eval curve goes to metrics.jsonl and the plot",
    )
    train.add_argument(
        "--eval_split",
        type=_flag_type("eval_split", float),
        default=None,
        metavar="FRACTION",
        help="hold out this fraction of the training rows (seeded by --seed) as the eval set",
    )


def training_rows(args: argparse.Namespace, run: Run, rows):
    """``(train rows, eval rows or None)``: ``--eval_dataset``, a ``--eval_split`` of the
    training rows, or a built-in task's held-out set when evaluation is scheduled."""
    from grpo.io.data import load_prompts

    cfg = run.config
    wants_eval = cfg.eval_strategy != "no" or cfg.eval_on_start
    if args.eval_dataset and args.eval_split:
        raise UsageError("--eval_dataset and --eval_split are alternatives; pass one")
    if args.eval_dataset:
        try:
            return rows, load_prompts(args.eval_dataset)
        except (ValueError, TypeError, FileNotFoundError) as e:
            raise UsageError(f"--eval_dataset {args.eval_dataset}: {e}") from e
    if args.eval_split is not None:
        from grpo.evaluate import held_out_split

        if not hasattr(rows, "__len__"):
            raise UsageError("--eval_split needs a dataset of known length, not a stream")
        try:
            return held_out_split(list(rows), args.eval_split, seed=cfg.seed)
        except ValueError as e:
            raise UsageError(f"--eval_split: {e}") from e
    if wants_eval and run.task is not None:
        return rows, run.rows(split="eval")
    return rows, None


def save_run_config(args: argparse.Namespace, run: Run, model_path: str) -> Path:
    """``output_dir/run_config.json``, read back by ``grpo eval --run``."""
    from grpo.evaluate import write_run_config

    return write_run_config(
        run.config.output_dir,
        model=str(model_path),
        dataset=str(run.dataset),
        reward=run.reward,
        adapter_path=None if run.adapter_path is None else str(run.adapter_path),
        eval_dataset=getattr(args, "eval_dataset", None),
        eval_split=getattr(args, "eval_split", None),
        split_seed=run.config.seed,
        config=run.config.to_dict(),
    )


def closing_comparison(trainer, run: Run, model_path: str, *, n: int = 4) -> str:
    """One line: base vs trained pass@1 and mean reward on the task's held-out set."""
    from grpo import evaluate as E

    cfg = run.config
    rows = list(run.rows(split="eval"))
    reward_funcs = trainer.reward_funcs
    base, tokenizer = _load_model(
        model_path, run.adapter_path, trust_remote_code=cfg.trust_remote_code
    )
    summaries = [
        E.summarize(
            E.sample_model(m, tokenizer, rows, reward_funcs, cfg, n=n, seed=cfg.seed),
            k=1,
            weights=cfg.reward_weights,
        )  # fmt: skip
        for m in (base, trainer.model)
    ]
    (b, t) = E.compare(summaries, seed=cfg.seed)
    d = t["vs_first"]["pass@1"]
    return (
        f"eval on {len(rows)} held-out prompts x {n} samples: pass@1 {b['pass@1']:.3f} (base) "
        f"-> {t['pass@1']:.3f} (trained), {d[0]:+.3f} [95% CI {d[1]:+.3f}, {d[2]:+.3f}]; "
        f"mean reward {b['reward']:.3f} -> {t['reward']:.3f}"
    )


# -- grpo generate -------------------------------------------------------------------------------


def generate_flags(gen: argparse.ArgumentParser) -> None:
    """The flags of ``grpo generate`` besides the GRPOConfig ones."""
    gen.add_argument("--model", help="mlx-lm model directory or hub id (default: the tiny model)")
    gen.add_argument("--adapter_path", metavar="DIR", help="adapters to load on top of --model")
    source = gen.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="one prompt (a user message when a chat template exists)")
    source.add_argument("--dataset", help="sample for the first --limit prompts of a dataset")
    gen.add_argument(
        "--limit", type=_flag_type("limit", int), default=3, help="dataset prompts (default 3)"
    )
    gen.add_argument(
        "--raw", action="store_true", help="send --prompt as plain text, without the chat template"
    )
    gen.add_argument("--greedy", action="store_true", help="argmax decoding (temperature 0)")
    gen.add_argument("--config", metavar="YAML", help="YAML file of GRPOConfig fields")
    gen.add_argument(
        "--warm_start_steps", type=_flag_type("warm_start_steps", int), default=None,
        help=argparse.SUPPRESS,
    )  # fmt: skip


def _generate_prompts(args: argparse.Namespace, run: Run, tokenizer) -> list:
    from grpo.io.data import _hf_tokenizer

    if args.prompt is not None:
        templated = getattr(_hf_tokenizer(tokenizer), "chat_template", None) or getattr(
            tokenizer, "has_chat_template", False
        )
        if templated and not args.raw:
            return [[{"role": "user", "content": args.prompt}]]
        return [args.prompt]
    if args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    rows = run.rows(split="eval" if run.task else "train")
    return [row["prompt"] for _, row in zip(range(args.limit), rows, strict=False)]


def _mlx_lm_sampling(sampling, context: int):
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    sampler = make_sampler(
        temp=sampling.temperature,
        top_p=sampling.top_p if sampling.top_p < 1.0 else 0.0,
        min_p=sampling.min_p,
        top_k=sampling.top_k,
    )
    penalty = sampling.repetition_penalty
    # The training sampler penalises every prompt and completion token; so does this window.
    processors = make_logits_processors(
        repetition_penalty=None if penalty == 1.0 else penalty, repetition_context_size=context
    )
    return sampler, processors


def run_generate(args: argparse.Namespace) -> int:
    import mlx.core as mx
    import mlx_lm

    from grpo.io.data import eos_token_ids

    ns = copy.copy(args)
    ns.reward = "exact_match" if args.dataset else None
    run = Run(ns, command="eval")
    cfg = run.config
    model, tokenizer = _load_model(
        run.model_path(log=lambda m: None), run.adapter_path,
        trust_remote_code=cfg.trust_remote_code,
    )  # fmt: skip
    from grpo.evaluate import prompt_encoder

    encoder = prompt_encoder(model, tokenizer, cfg)
    sampling = cfg.to_sampling_config(eos_token_ids=eos_token_ids(tokenizer))
    if args.greedy:
        sampling = attrs.evolve(sampling, temperature=0.0)
    mx.random.seed(cfg.seed)  # the CLI owns the global RNG; mlx-lm's samplers draw from it
    for i, prompt in enumerate(_generate_prompts(args, run, tokenizer)):
        ids = encoder(prompt, row=i)
        if args.prompt is None:
            print(f"--- prompt {i}: {prompt!r}")
        sampler, processors = _mlx_lm_sampling(sampling, len(ids) + cfg.max_completion_length)
        last = None
        for last in mlx_lm.stream_generate(
            model, tokenizer, ids, max_tokens=cfg.max_completion_length,
            sampler=sampler, logits_processors=processors,
        ):  # fmt: skip
            print(last.text, end="", flush=True)
        print()
        if last is not None:
            print(
                f"[{last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s, "
                f"finish: {last.finish_reason}]",
                flush=True,
            )
    return 0
