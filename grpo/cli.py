"""The ``grpo`` command line: ``grpo train`` and ``grpo eval``.

``grpo train`` with no flags runs the embedded default job (:mod:`grpo.io.default_job`): a
cached, warm-started tiny model learns the built-in ``reverse`` task by GRPO and writes
``metrics.jsonl`` and ``reward_curve.png`` to ``grpo_output/``. Every
:class:`grpo.config.GRPOConfig` field is a flag (``--learning_rate 1e-5``) and a key of the
``--config`` YAML file; flags override the file, which overrides the defaults.

Every error prints one line (the problem, where the last good state was saved if it was,
and a hint) and no traceback unless ``--debug`` is given. Exit codes: 2 for bad input found
before training (unknown flag or YAML key, bad value, missing file, invalid combination of
settings, an output directory in use or holding another run, a checkpoint that does not fit),
1 for a failure during training (a reward function raising, a non-finite loss, a full disk),
130 / 143 for SIGINT / SIGTERM (first signal: saved at a safe point; second: at once).

``grpo train`` also runs unchanged under ``mlx.launch -n 2 --backend ring -- grpo train ...``
(docs/distributed.md): every rank trains its own prompt shard with
``per_device_train_batch_size`` completions per micro-batch (per rank, as in TRL); rank 0
alone builds the default model, prints, and writes the output directory; a rank that fails
prints its error prefixed ``[rank r/W]`` and exits at once with its usual exit code, so
``mlx.launch`` stops the others.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import sys
import time
import traceback
import types
import typing
from pathlib import Path
from typing import Any

import grpo

# YAML keys of --config besides the GRPOConfig fields.
RUN_KEYS = ("model", "dataset", "reward", "adapter_path")
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".yaml", ".yml", ".txt")
EVAL_ROWS = 64


class UsageError(Exception):
    """A problem with the command line or its files: one line, exit code 2."""


def _first_line(e: BaseException) -> str:
    """The first line of ``e``'s message, or its type name when the message is empty."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        if message.startswith("unrecognized arguments:"):
            message = _unknown_flags(self, message.split(":", 1)[1].split())
        elif message.startswith("argument ") and ": invalid value " in message:
            message = message.split(": ", 1)[1]  # our converter's message names the flag
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _unknown_flags(parser: argparse.ArgumentParser, words: list[str]) -> str:
    flags = [w for w in words if w.startswith("-")] or words
    known = [o for a in parser._actions for o in a.option_strings]
    hint = difflib.get_close_matches(flags[0].split("=")[0], known, n=1)
    more = f"; did you mean {hint[0]}?" if hint else ""
    return f"unknown option{'s' if len(flags) > 1 else ''} {' '.join(flags)}{more}"


# -- GRPOConfig fields as typed flags -------------------------------------------------------

# One line per GRPOConfig field for `grpo train --help` and docs/api.md (a test checks that
# every field has one).
FIELD_HELP: dict[str, str] = {
    "use_lora": "Train LoRA adapters (mlx-lm `linear_to_lora_layers`) instead of every weight.",
    "lora_rank": "LoRA rank `r`.",
    "lora_alpha": "LoRA alpha; the adapter scale is `lora_alpha / lora_rank`.",
    "lora_dropout": "Dropout on the LoRA input (0 keeps rollout, reference and policy forwards identical).",
    "lora_num_layers": "Adapt only the last N transformer layers (`None`: all).",
    "lora_target_modules": "Module names to adapt (`None`: mlx-lm's defaults for the architecture).",
    "quantize_bits": "Quantise the frozen base model at load (QLoRA); needs `use_lora=True`.",
    "quantize_group_size": "Group size of that quantisation (32, 64 or 128).",
    "trust_remote_code": "Allow models and tokenizers that ship custom code.",
    "adapter_path": "Continue training the mlx-lm LoRA adapters in this directory.",
    "router_aux_loss_coef": "MoE load-balancing loss weight (TRL); must be None or 0: mlx-lm models "
    "expose no router logits.",
    "gradient_checkpointing": "Recompute each transformer block in the backward pass (less memory, ~1/3 more compute).",
    "max_memory_gb": "Memory budget of an update step (GB): the model is measured and the micro-batch (with gradient accumulation making up the rest) and LM-head chunk that fit are chosen; a run that cannot fit is refused, naming what it needs (`None`: no budget).",
    "max_prompt_length": "Prompts longer than this keep their last tokens (`None`: no limit).",
    "shuffle_dataset": "Shuffle the training prompts (seeded by `seed`).",
    "pad_to_multiple_of": "Pad prompt/completion lengths to a multiple of this (`None`: next power of two).",
    "num_generations": "`G`, completions sampled per prompt (>= 2).",
    "max_completion_length": "Maximum completion tokens; longer completions are truncated.",
    "generation_batch_size": "Completions per generation batch (default `per_device_train_batch_size * steps_per_generation`).",
    "steps_per_generation": "Micro-batches per generation batch (default `gradient_accumulation_steps`).",
    "temperature": "Sampling temperature; log-probs are taken at the same temperature.",
    "top_p": "Nucleus sampling mass (1.0 = off).",
    "top_k": "Keep the k most likely tokens (0 = off).",
    "min_p": "Drop tokens below `min_p` times the top probability (`None` = off).",
    "repetition_penalty": "CTRL repetition penalty over prompt and completion (1.0 = off).",
    "max_tool_calling_iterations": "Most rounds of tool calls per completion (`None`: until the budget is spent).",
    "tool_call_format": "Tool-call format: hermes, llama3 or mistral (`None`: detected from the chat template).",
    "beta": "KL coefficient against the reference model (0 = no reference, no KL term).",
    "num_iterations": "Passes over each generation batch (`mu` in the GRPO paper).",
    "epsilon": "Lower clip of the importance ratio, `1 - epsilon`.",
    "epsilon_high": "Upper clip `1 + epsilon_high` (`None`: `epsilon`; DAPO uses 0.28). For `cispo` the ratio cap.",
    "delta": "Two-sided clipping: upper bound on the unclipped ratio (`None` = off; must be > 1).",
    "importance_sampling_level": "`token` ratios, or `sequence` (GSPO) ratios.",
    "reward_weights": "Weight of each reward function (`None`: all 1).",
    "reward_timeout": "Seconds a reward function call may take before the step fails with a RewardError naming it (`None`: no limit).",
    "multi_objective_aggregation": "`sum_then_normalize` (GRPO) or `normalize_then_sum` (GDPO).",
    "scale_rewards": "Divide advantages by the `group` std, the `batch` std, or not at all (`none`, Dr. GRPO).",
    "loss_type": "Loss normalisation / surrogate: grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo.",
    "mask_truncated_completions": "Exclude completions that hit `max_completion_length` from the loss (DAPO).",
    "top_entropy_quantile": "Train only on the top fraction of tokens by entropy (1.0 = all).",
    "use_bias_correction_kl": "Multiply the k3 KL by the importance ratio.",
    "off_policy_mask_threshold": "Drop negative-advantage sequences whose policy drifted more than this (`None` = off).",
    "entropy_coef": "Coefficient of an entropy bonus (0 = off).",
    "sapo_temperature_neg": "SAPO gate temperature for non-positive advantages.",
    "sapo_temperature_pos": "SAPO gate temperature for positive advantages.",
    "vespo_k_pos": "VESPO Gamma-weight shape for positive advantages.",
    "vespo_lambda_pos": "VESPO Gamma-weight rate for positive advantages.",
    "vespo_k_neg": "VESPO Gamma-weight shape for negative advantages.",
    "vespo_lambda_neg": "VESPO Gamma-weight rate for negative advantages.",
    "learning_rate": "Peak learning rate.",
    "lr_scheduler_type": "transformers' schedule: linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup, inverse_sqrt, cosine_with_min_lr, cosine_warmup_with_min_lr, warmup_stable_decay.",
    "lr_scheduler_kwargs": "The schedule's extra arguments as a JSON object, e.g. '{\"min_lr_rate\": 0.1}'.",
    "warmup_ratio": "Fraction of steps for linear warmup, rounded up (used when `warmup_steps` is 0).",
    "warmup_steps": "Steps of linear warmup; a value below 1 is a fraction of the run (transformers 5).",
    "weight_decay": "Weight decay (decoupled for AdamW); biases and norm weights never decay, as in transformers.",
    "optim": "transformers' optimizer name: adamw_torch (= torch AdamW, bias-corrected), adamw_torch_fused, adamw_hf, adamw_8bit (float32 states), adam, sgd, adafactor.",
    "optim_args": "Extra optimizer arguments 'k=v,k=v' (sgd: momentum, dampening, nesterov).",
    "adam_beta1": "Adam beta1.",
    "adam_beta2": "Adam beta2.",
    "adam_epsilon": "Adam epsilon.",
    "max_grad_norm": "Clip the global gradient norm to this, as torch's clip_grad_norm_ (0 = off); `grad_norm` logs the norm before clipping.",
    "per_device_train_batch_size": "Completions (rows) per micro-batch, on each rank under mlx.launch (as in TRL).",
    "gradient_accumulation_steps": "Micro-batches per optimizer step.",
    "max_steps": "Optimizer steps to run (-1: derive from `num_train_epochs`).",
    "num_train_epochs": "Epochs over the prompts when `max_steps` is -1.",
    "seed": "Seeds LoRA init, prompt order and sampling.",
    "output_dir": "Where metrics, checkpoints and the trained weights go.",
    "logging_steps": "Write a `metrics.jsonl` record every N optimizer steps (a value below 1 is a fraction of the run).",
    "save_steps": "Checkpoint every N optimizer steps, at generation-batch boundaries (a value below 1 is a fraction of the run).",
    "overwrite_output_dir": "Delete another run's checkpoints, metrics and weights in `output_dir` before the first save (without it, such a directory is refused).",
    "save_total_limit": "Keep at most N checkpoints (`None`: all).",
    "eval_steps": "With `eval_strategy=steps`, evaluate every N steps (a value below 1 is a fraction of the run; `None`: `logging_steps`).",
    "per_device_eval_batch_size": "Completions per evaluation chunk.",
    "num_generations_eval": "Completions per prompt at evaluation (`None`: `num_generations`).",
    "log_completions": "Print a table of prompts, completions, rewards and advantages at each log.",
    "num_completions_to_print": "Rows of that table (`None`: all).",
    "disable_tqdm": "Hide the progress bar.",
    "report_to": "Accepted for TRL compatibility; metrics always go to `metrics.jsonl`.",
    "bf16": "Compute in bfloat16: float weights are cast at load (`None`, the default, keeps the checkpoint's dtype; TRL defaults to bf16 autocast).",
    "fp16": "Compute in float16: float weights are cast at load.",
    "model_init_kwargs": "TRL's model kwargs as JSON; `dtype`/`torch_dtype` casts the weights at load, other keys are ignored with a warning.",
    "disable_dropout": "Turn off dropout (LoRA dropout included) so every forward is deterministic.",
    "chat_template_kwargs": "Extra arguments to the tokenizer's chat template as JSON, e.g. '{\"enable_thinking\": false}'.",
    "generation_kwargs": "Sampling overrides as JSON (top_p, top_k, min_p, repetition_penalty), as TRL passes them to generation.",
    "logging_strategy": "`steps` (every `logging_steps`), `epoch` or `no`, as in transformers.",
    "logging_first_step": "Also log after the first optimizer step.",
    "save_strategy": "`steps` (every `save_steps`), `epoch` or `no` (no checkpoints), as in transformers.",
    "eval_strategy": "`no`, `steps` (every `eval_steps`, default `logging_steps`) or `epoch`, as in transformers.",
    "eval_on_start": "Evaluate once before the first step (needs an eval dataset).",
    "data_seed": "Seed of the prompt order (`None`: `seed`).",
    "remove_unused_columns": "Accepted (TRL default False): every dataset column reaches the reward functions.",
    "sync_ref_model": "TR-DPO: every `ref_model_sync_steps` steps mix the policy into the reference (full fine-tune, beta > 0).",
    "ref_model_mixup_alpha": "TR-DPO mix `ref = (1 - alpha) ref + alpha policy`.",
    "ref_model_sync_steps": "Steps between TR-DPO reference syncs.",
    "use_adaptive_entropy": "Adapt the entropy-bonus coefficient each step towards `entropy_target` (TRL's controller).",
    "entropy_coef_min": "Lower bound of the adaptive entropy coefficient.",
    "entropy_coef_max": "Upper bound of the adaptive entropy coefficient.",
    "entropy_coef_delta": "Change of the adaptive entropy coefficient per step.",
    "entropy_target": "Mean entropy at or below which the adaptive controller raises the bonus.",
}


def _metadata_help() -> dict[str, str]:
    import attrs

    from grpo.config import GRPOConfig

    out = {}
    for f in attrs.fields(GRPOConfig):
        if f.metadata.get("ignored"):
            out[f.name] = f"TRL/transformers field, no effect on MLX: {f.metadata['ignored']}."
        elif f.metadata.get("script"):
            out[f.name] = "Read by a training script, not by the trainer (as in transformers)."
    return out


FIELD_HELP.update(_metadata_help())


def config_fields() -> list[tuple[str, Any, Any]]:
    """``(name, type, default)`` of every :class:`GRPOConfig` field, in declaration order."""
    import attrs

    from grpo.config import GRPOConfig

    hints = typing.get_type_hints(GRPOConfig)
    return [(f.name, hints[f.name], f.default) for f in attrs.fields(GRPOConfig)]


def _split_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return inner[0], len(inner) < len(args)
    return tp, False


def parse_bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _scalar(tp: Any, text: str) -> Any:
    if tp is bool:
        return parse_bool(text)
    try:
        if tp is int:
            return int(str(text).strip())
        if tp is float:
            return float(str(text).strip())
    except ValueError:
        raise ValueError(f"expected {'an integer' if tp is int else 'a number'}") from None
    return str(text)


def convert(tp: Any, value: Any) -> Any:
    """``value`` (a command-line string or a YAML value) as the field type ``tp``.

    Raises ``ValueError`` with a short reason when it does not fit.
    """
    base, optional = _split_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ValueError("None is not allowed here")
    if base is dict:
        return _mapping(value)
    if typing.get_origin(base) is tuple:
        item = typing.get_args(base)[0]
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"expected a list, got {value!r}")
        return tuple(convert(item, v) for v in items if not (isinstance(v, str) and not v.strip()))
    if isinstance(value, str):
        return _scalar(base, value)
    # A YAML scalar that already has a type: check it fits instead of silently coercing.
    if base is bool and not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    if base is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"expected an integer, got {value!r}")
    if base is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"expected a number, got {value!r}")
    if base is str and not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return float(value) if base is float else value


def _mapping(value: Any) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError("expected a JSON object such as '{\"num_cycles\": 2}'") from None
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping, got {value!r}")
    return value


def type_name(tp: Any) -> str:
    base, optional = _split_optional(tp)
    if base is dict:
        name = "json"
    elif typing.get_origin(base) is tuple:
        name = f"comma-separated {typing.get_args(base)[0].__name__}s"
    else:
        name = {bool: "true|false", int: "int", float: "float", str: "str"}[base]
    return f"{name} or none" if optional else name


def _flag_type(name: str, tp: Any):
    def parse(text: str):
        try:
            return convert(tp, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"invalid value {text!r} for --{name} ({e})") from e

    parse.__name__ = type_name(tp)
    return parse


def add_config_flags(parser: argparse.ArgumentParser, *, job_defaults: dict) -> None:
    """One ``--<field>`` flag per GRPOConfig field (dashes also accepted), default unset."""
    group = parser.add_argument_group(
        "GRPOConfig fields (TRL names; these override --config, which overrides the defaults)"
    )
    for name, tp, default in config_fields():
        if f"--{name}" in parser._option_string_actions or name in RUN_KEYS:
            continue  # the command's own flag of that name (--resume_from_checkpoint, ...)
        shown = default if not isinstance(default, tuple) else ",".join(map(str, default))
        extra = f"; default job: {job_defaults[name]}" if name in job_defaults else ""
        kwargs: dict[str, Any] = dict(
            dest=f"cfg_{name}",
            default=argparse.SUPPRESS,
            type=_flag_type(name, tp),
            metavar=type_name(tp).upper().replace(" ", "_") if tp is not bool else "BOOL",
        )
        if tp is bool:
            kwargs.update(nargs="?", const=True)
        help_text = f"{FIELD_HELP.get(name, '')} (default: {shown}{extra})".strip()
        group.add_argument(f"--{name}", help=help_text, **kwargs)
        if "_" in name:  # --learning-rate also works, without cluttering --help
            group.add_argument(f"--{name.replace('_', '-')}", help=argparse.SUPPRESS, **kwargs)


# -- parser ------------------------------------------------------------------------------------

DESCRIPTION = """\
GRPO (Group Relative Policy Optimization) for language models on Apple MLX.

  grpo train                       the default job: a tiny model learns to reverse strings
  grpo train --model M --dataset D --reward R [--config run.yaml] [--<GRPOConfig field> V]
  grpo eval  [--model M] [--adapter_path OUT] [--dataset D] [--reward R]
"""

TRAIN_EPILOG = """\
With no --model, the default job builds (once, then reuses from the cache: $MLX_GRPO_CACHE,
else $XDG_CACHE_HOME/mlx-grpo, else ~/.cache/mlx-grpo) a seeded tiny model, warm-starts it
with a few supervised steps on generated examples, and trains it by GRPO on the built-in
task. --dataset also accepts a built-in task name (reverse, sort), whose reward is
exact_match. --config YAML takes every GRPOConfig field and the keys model, dataset, reward.
Writes metrics.jsonl, reward_curve.png, checkpoints and the trained weights (mlx-lm adapter
format) to --output_dir.
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        help="mlx-lm model directory or Hugging Face hub id (default: the cached tiny model)",
    )
    p.add_argument(
        "--dataset",
        help="jsonl/json/csv/parquet file or folder, hub id, or a built-in task name "
        "(default: reverse); needs a 'prompt' column, other columns reach the rewards",
    )
    p.add_argument(
        "--reward",
        help="built-in reward name(s) (exact_match, answer_match, think_format, "
        "length_penalty), 'module:function' or 'file.py:function', comma-separated "
        "(default for built-in tasks: exact_match)",
    )
    p.add_argument("--config", metavar="YAML", help="YAML file of GRPOConfig fields")
    p.add_argument(
        "--debug", action="store_true", help="print the full traceback of an error as well"
    )
    p.add_argument(
        "--warm_start_steps",
        type=_flag_type("warm_start_steps", int),
        default=None,
        help="supervised warm-start steps of the default tiny model (default: "
        "the default job's; 0 skips it)",
    )


def build_parser() -> argparse.ArgumentParser:
    from grpo.io.default_job import DEFAULT_TRAIN_ARGS

    parser = _Parser(
        prog="grpo",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"mlx-grpo {grpo.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    parser.set_defaults(_subparsers=sub.choices)

    train = sub.add_parser(
        "train",
        help="train with GRPO (no flags: the embedded default job)",
        description="Train a model with GRPO.",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    _common(train)
    train.add_argument(
        "--resume_from_checkpoint",
        nargs="?",
        const=True,
        default=None,
        metavar="DIR",
        help="resume from DIR, or from the newest checkpoint in --output_dir",
    )
    train.add_argument(
        "--adapter_path",
        metavar="DIR",
        help="continue training these mlx-lm LoRA adapters (e.g. an SFT run's output)",
    )
    add_config_flags(train, job_defaults=DEFAULT_TRAIN_ARGS)

    ev = sub.add_parser(
        "eval",
        help="score a model (and adapters) on a dataset: mean reward per function",
        description="Sample num_generations_eval (default num_generations) completions per "
        "prompt and print the mean reward of each reward function.",
        allow_abbrev=False,
    )
    _common(ev)
    ev.add_argument(
        "--adapter_path",
        metavar="DIR",
        help="adapters to load on top of --model (e.g. a grpo train output_dir)",
    )
    ev.add_argument(
        "--limit",
        type=_flag_type("limit", int),
        default=None,
        help=f"score only the first N prompts (default: all; {EVAL_ROWS} for a built-in task)",
    )
    add_config_flags(ev, job_defaults=DEFAULT_TRAIN_ARGS)
    return parser


# -- resolving the run ---------------------------------------------------------------------------


def load_yaml(path: str) -> dict:
    """The ``--config`` file as a dict; :class:`UsageError` on a missing or malformed file."""
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"--config: no such file: {path}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path}: not valid YAML ({_first_line(e)})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(
            f"--config {path}: expected a mapping of field: value, got {type(data).__name__}"
        )
    return data


def yaml_overrides(data: dict, path: str) -> tuple[dict, dict]:
    """Split a config file into ``(GRPOConfig fields, run keys)``, converting field types."""
    fields = {name: tp for name, tp, _ in config_fields()}
    cfg, run = {}, {}
    for key, value in data.items():
        if key in RUN_KEYS:
            run[key] = value
        elif key in fields:
            try:
                cfg[key] = convert(fields[key], value)
            except ValueError as e:
                raise UsageError(f"--config {path}: invalid value for {key}: {e}") from e
        else:
            hint = difflib.get_close_matches(str(key), list(fields) + list(RUN_KEYS), n=1)
            more = f"; did you mean {hint[0]}?" if hint else ""
            raise UsageError(f"--config {path}: unknown GRPOConfig field {key!r}{more}")
    return cfg, run


def flag_overrides(args: argparse.Namespace) -> dict:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_")}


def make_config(base: dict, *layers: dict):
    """``GRPOConfig(**base | layer1 | layer2 ...)``; an invalid combination is a UsageError."""
    from grpo.config import GRPOConfig

    values: dict = dict(base)
    for layer in layers:
        values.update(layer)
    try:
        return GRPOConfig(**values)
    except (ValueError, TypeError) as e:
        lines = [s.strip(" -") for s in str(e).splitlines() if s.strip(" -")]
        head, rest = lines[0].rstrip(":"), lines[1:]
        raise UsageError(f"{head}: {'; '.join(rest)}" if rest else head) from e


def _looks_like_path(value: str) -> bool:
    return value.startswith((".", "/", "~")) or Path(value).suffix.lower() in FILE_SUFFIXES


def _check_local(value: str, what: str) -> None:
    if _looks_like_path(value) and not Path(value).expanduser().exists():
        raise UsageError(f"--{what}: no such file or directory: {value}")


def _dataset_and_reward(dataset, reward) -> tuple[str, str | None, str]:
    """``(dataset, built-in task name or None, reward spec)`` with the defaults filled in."""
    from grpo.tasks import DEFAULT_TASK, TASKS

    dataset = DEFAULT_TASK if dataset is None else dataset
    is_task = isinstance(dataset, str) and dataset in TASKS and not Path(dataset).exists()
    if not is_task:
        _check_local(str(dataset), "dataset")
    if reward is None:
        if not is_task:
            raise UsageError(
                f"--reward is required for --dataset {dataset} (e.g. --reward answer_match "
                "or --reward my_module:my_reward)"
            )
        reward = "exact_match"
    return dataset, dataset if is_task else None, reward


class Run:
    """Everything ``train`` / ``eval`` needs, resolved from flags, YAML and defaults."""

    def __init__(self, args: argparse.Namespace, *, command: str):
        from grpo.io import default_job

        file_cfg, file_run = ({}, {})
        if args.config:
            file_cfg, file_run = yaml_overrides(load_yaml(args.config), args.config)
        pick = lambda name: getattr(args, name, None) or file_run.get(name)  # noqa: E731
        self.model, self.adapter_path = pick("model"), pick("adapter_path")
        self.default_model = self.model is None
        self.dataset, self.task, self.reward = _dataset_and_reward(pick("dataset"), pick("reward"))
        if self.model is not None:
            _check_local(str(self.model), "model")
        if self.adapter_path is not None and not Path(self.adapter_path).expanduser().is_dir():
            raise UsageError(f"--adapter_path: no such directory: {self.adapter_path}")
        base = dict(default_job.DEFAULT_TRAIN_ARGS) if self.default_model else {}
        if command == "eval" and self.default_model:
            base["per_device_eval_batch_size"] = 64
        adapter = {"adapter_path": str(self.adapter_path)} if command == "train" else {}
        self.config = make_config(
            base, file_cfg, flag_overrides(args), adapter if self.adapter_path else {}
        )
        ws = args.warm_start_steps
        if ws is not None and ws < 0:
            raise UsageError(f"--warm_start_steps must be >= 0, got {ws}")
        self.warm_start = default_job.evolve_warm_start(**({} if ws is None else {"steps": ws}))

    def reward_funcs(self) -> list:
        from grpo.rewards import resolve_reward_funcs

        try:
            return resolve_reward_funcs(self.reward)
        except (ValueError, TypeError) as e:
            raise UsageError(f"--reward: {e}") from e

    def model_path(self, log=print, *, group=None) -> str:
        """``--model``, or the cached default model (built first if missing).

        Under ``mlx.launch`` (``group`` of several ranks) rank 0 builds the default model
        while the others wait at a barrier, then they load it from the cache. A rank on
        another machine whose cache lacks it builds its own copy (same seeds), quietly
        unless it really builds; the build is atomic, so ranks sharing a cache never see a
        half-written model, and the trainer checks that every rank starts from the same
        weights. ``log`` receives rank 0's progress lines (callers pass a no-op on the other
        ranks); another rank that builds prints its own with a ``[rank r/W]`` prefix.
        """
        from grpo.io import default_job
        from grpo.io.dist import barrier, is_main_process, rank_prefix

        if not self.default_model:
            return str(self.model)
        spec = dict(task=self.task or "reverse", warm_start=self.warm_start)
        main = is_main_process(group)
        if main:
            path = default_job.ensure_model(**spec, log=log)
        barrier(group)
        if not main:
            here = default_job.is_cached(default_job.model_dir(**spec))
            prefix = rank_prefix(group)
            path = default_job.ensure_model(
                **spec, log=_quiet if here else (lambda msg: print(prefix + msg))
            )
        return str(path)

    def rows(self, *, split: str):
        if self.task is not None:
            from grpo.io.default_job import default_dataset

            if split == "train":
                return default_dataset(self.task)
            return default_dataset(self.task, n=EVAL_ROWS, seed=7_777)
        from grpo.io.data import load_prompts

        try:
            return load_prompts(self.dataset)
        except (ValueError, TypeError, FileNotFoundError) as e:
            raise UsageError(f"--dataset {self.dataset}: {e}") from e
        except Exception as e:  # hub / network errors from datasets
            raise UsageError(f"--dataset {self.dataset}: cannot load it ({_first_line(e)})") from e


def _load_model(path: str, adapter_path: str | None, *, trust_remote_code: bool):
    import mlx_lm

    from grpo.io.model import load_trained

    try:
        if adapter_path is not None:  # re-quantizes a QLoRA run's base as it was trained
            return load_trained(path, adapter_path, trust_remote_code=trust_remote_code)
        return mlx_lm.load(
            path,
            adapter_path=adapter_path,
            tokenizer_config={"trust_remote_code": True} if trust_remote_code else None,
            trust_remote_code=trust_remote_code,
        )
    except Exception as e:
        raise UsageError(
            f"--model {path}: cannot load it ({type(e).__name__}: {_first_line(e)})"
        ) from e


# -- commands ------------------------------------------------------------------------------------


def _check_output_dir(cfg, args) -> None:
    """Refuse an output_dir that is a file, in use, or holds another run (rank 0 only)."""
    from grpo.io import runs

    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {cfg.output_dir} exists and is a file")
    if args.resume_from_checkpoint or cfg.overwrite_output_dir:
        return  # the trainer checks (and, overwriting, deletes) under the run lock
    others = runs.other_runs_files(out, run_id=None)
    if others:
        names = ", ".join(p.name for p in others[:3]) + (", ..." if len(others) > 3 else "")
        raise UsageError(
            f"--output_dir {cfg.output_dir} already holds a run ({names}); pass "
            "--overwrite_output_dir, --resume_from_checkpoint, or another --output_dir"
        )


def reward_margin(records: list[dict], *, fraction: float = 0.1) -> tuple[float, float]:
    """Mean reward over the first and the last ``fraction`` of logged steps."""
    rewards = [r["reward"] for r in records if isinstance(r.get("reward"), (int, float))]
    if not rewards:
        return float("nan"), float("nan")
    k = max(1, round(fraction * len(rewards)))
    return sum(rewards[:k]) / k, sum(rewards[-k:]) / k


def train(args: argparse.Namespace) -> int:
    from grpo.io.dist import init_distributed

    start = time.perf_counter()
    run = Run(args, command="train")
    reward_funcs = run.reward_funcs()
    # Joins the mlx.launch job if this process is one of its ranks; None when alone.
    group = init_distributed()
    with _exit_together(group, debug=args.debug):
        _train(args, run, reward_funcs, group=group, start=start)
    return 0


def _train(args: argparse.Namespace, run: Run, reward_funcs: list, *, group, start: float):
    from grpo.io import runlock
    from grpo.io.dist import is_main_process

    cfg = run.config
    main = is_main_process(group)
    # One run per output_dir, held from the checks to the final weights and plot.
    with runlock.hold(cfg.output_dir, enabled=main):
        if main:
            _check_output_dir(cfg, args)
        _train_locked(args, run, reward_funcs, group=group, start=start)


def _train_locked(args: argparse.Namespace, run: Run, reward_funcs: list, *, group, start: float):
    from grpo.core.distributed import world_size
    from grpo.io.dist import barrier, is_main_process
    from grpo.io.logging import read_metrics
    from grpo.io.plot import plot_reward_curve

    cfg = run.config
    main = is_main_process(group)
    say = print if main else _quiet  # only rank 0 prints and writes output_dir
    rows = run.rows(split="train")
    model_path = run.model_path(log=say, group=group)
    model, tokenizer = _load_model(model_path, None, trust_remote_code=cfg.trust_remote_code)
    from grpo.trainer import GRPOTrainer

    try:
        trainer = GRPOTrainer(
            model, reward_funcs, args=cfg, train_dataset=rows, processing_class=tokenizer,
            group=group,
        )  # fmt: skip
    except (ValueError, TypeError) as e:
        raise UsageError(_one_line(e)) from e
    what = f"the built-in {run.task!r} task" if run.task else str(run.dataset)
    W = world_size(group)
    ranks = (
        f" on {W} ranks x {cfg.per_device_train_batch_size} completions per micro-batch"
        if W > 1
        else ""
    )
    say(
        f"GRPO: {trainer.max_steps} steps on {what}, reward {run.reward}, "
        f"{cfg.num_generations} completions per prompt{ranks}, output in {cfg.output_dir}/"
    )
    from grpo.errors import CheckpointError

    try:
        trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    except CheckpointError as e:
        if not trainer.training_started:  # the checkpoint to resume does not fit
            raise UsageError(f"--resume_from_checkpoint: {_one_line(e)}") from e
        _mark_exit_code(e, 1)
        raise
    except Exception as e:
        _mark_exit_code(e, 1 if trainer.training_started else 2)
        raise
    if main:
        try:
            trainer.save_model()
            metrics = Path(cfg.output_dir) / "metrics.jsonl"
            png = plot_reward_curve(metrics, Path(cfg.output_dir) / "reward_curve.png")
        except Exception as e:
            _mark_exit_code(e, 1)
            raise
        first, last = reward_margin(read_metrics(metrics))
        print(
            f"done in {time.perf_counter() - start:.0f}s: mean reward {first:.3f} (first 10% of "
            f"steps) -> {last:.3f} (last 10%), change {last - first:+.3f}"
        )
        print(f"wrote {metrics}, {png} and the trained weights in {cfg.output_dir}/")
    # Every rank ends together: if rank 0 fails writing, the others fail here too.
    barrier(group)


def _quiet(*args, **kwargs) -> None:
    return None


@contextlib.contextmanager
def _exit_together(group, *, debug: bool = False):
    """Under ``mlx.launch``, a rank that fails leaves at once so the whole job stops.

    A usage error, a non-finite stop or an interrupt prints its usual one line, prefixed
    ``[rank r/W]``, and exits with its usual code; anything else prints its traceback and
    exits 1 (:func:`grpo.io.dist.fail_fast`). Leaving with ``os._exit`` closes the ring
    sockets, so a peer waiting in a collective fails instead of hanging, and ``mlx.launch``
    stops the remaining ranks. Alone (``group`` is ``None``) errors propagate to
    :func:`main` unchanged.
    """
    from grpo.core.distributed import is_distributed
    from grpo.errors import GRPOError
    from grpo.io.dist import fail_fast, rank_prefix

    if not is_distributed(group):
        yield
        return
    with fail_fast(group):
        try:
            yield
        except (UsageError, GRPOError, KeyboardInterrupt) as e:
            code = _report(e, prefix=rank_prefix(group), debug=debug)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def evaluate(args: argparse.Namespace) -> int:
    import attrs

    run = Run(args, command="eval")
    # Score only: no new adapters, no reference model, and a one-prompt training geometry
    # (GRPOTrainer's sampler is built but never drawn from; it needs >= 1 batch of prompts).
    cfg = attrs.evolve(
        run.config,
        use_lora=False,
        beta=0.0,
        per_device_train_batch_size=run.config.num_generations,
        generation_batch_size=None,
        steps_per_generation=None,
        gradient_accumulation_steps=1,
    )
    reward_funcs = run.reward_funcs()
    rows = run.rows(split="eval")
    if args.limit is not None:
        if args.limit < 1:
            raise UsageError(f"--limit must be >= 1, got {args.limit}")
        rows = (
            rows[: args.limit]
            if isinstance(rows, list)
            else rows.select(range(min(args.limit, len(rows))))
        )
    model, tokenizer = _load_model(
        run.model_path(), run.adapter_path, trust_remote_code=cfg.trust_remote_code
    )
    from grpo.trainer import GRPOTrainer

    try:
        trainer = GRPOTrainer(
            model, reward_funcs, args=cfg, train_dataset=rows, processing_class=tokenizer
        )
    except (ValueError, TypeError) as e:
        raise UsageError(str(e).splitlines()[0]) from e
    try:
        results = trainer.evaluate(rows)
    except Exception as e:
        _mark_exit_code(e, 1)
        raise
    print(
        f"eval: {len(rows)} prompts x {cfg.num_generations_eval or cfg.num_generations} completions"
    )
    for name, value in results.items():
        print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            sub = parser if args.command is None else args._subparsers[args.command]
            sub.error("unrecognized arguments: " + " ".join(unknown))
        if args.command is None:
            parser.print_help()
            return 0
        return {"train": train, "eval": evaluate}[args.command](args)
    except SystemExit:
        raise  # --help, --version
    except BaseException as e:
        return _report(e, debug=debug)


def _one_line(e: BaseException) -> str:
    """``e``'s message on one line: its first line, then the others joined by ``; ``."""
    lines = [s.strip(" -") for s in str(e).splitlines() if s.strip(" -")]
    if not lines:
        return type(e).__name__
    head, rest = lines[0].rstrip(":"), lines[1:]
    return f"{head}: {'; '.join(rest)}" if rest else head


def _mark_exit_code(e: BaseException, code: int) -> None:
    with contextlib.suppress(AttributeError):
        e.grpo_exit_code = code


def _report(e: BaseException, *, prefix: str = "", debug: bool = False) -> int:
    """Print ``e`` as one line (plus its traceback with ``debug``); return the exit code."""
    from grpo.errors import GRPOError

    if debug:
        traceback.print_exception(e)
    if isinstance(e, UsageError):
        print(f"{prefix}error: {e}", file=sys.stderr)
        return 2
    if isinstance(e, KeyboardInterrupt):
        # grpo.io.signals.TrainingInterrupted names the checkpoint it saved; it and
        # SignalReceived (a second signal) carry the exit code of their signal.
        print(f"{prefix}interrupted: {e}" if str(e) else f"{prefix}interrupted", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    known = isinstance(e, GRPOError)
    line = (_one_line(e) if known else f"{type(e).__name__}: {_one_line(e)}").rstrip(".")
    saved = getattr(e, "checkpoint", None)
    if saved is not None:
        line += f". Saved the last good state to {saved}; continue with --resume_from_checkpoint"
    hint = e.hint if known else "an unexpected error; please report it with the traceback"
    if not debug and "--debug" not in hint:
        hint += " (--debug prints the traceback)"
    print(f"{prefix}error: {line}. Hint: {hint}.", file=sys.stderr)
    return getattr(e, "grpo_exit_code", 2 if known else 1)


if __name__ == "__main__":
    sys.exit(main())
