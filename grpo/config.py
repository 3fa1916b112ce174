"""``GRPOConfig``: TRL's GRPO training arguments as a frozen attrs class.

Field names and meanings follow TRL 1.16 (``trl.GRPOConfig`` plus the ``TrainingArguments``
fields GRPO uses). Defaults are TRL's except where the docstring of :class:`GRPOConfig` says
otherwise. Invalid values and combinations raise ``ValueError`` at construction, naming the
fields and the values.
"""

from __future__ import annotations

import json
import math
from typing import Any

import attrs

from grpo.core.optim import lr_factor, optimizer_kind, parse_optim_args, warmup_steps_for
from grpo.errors import ConfigError

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
QUANTIZE_BITS = (2, 3, 4, 5, 6, 8)


def _scale_rewards(value: Any) -> Any:
    # TRL accepts booleans for backwards compatibility: True -> "group", False -> "none".
    if value is True:
        return "group"
    if value is False:
        return "none"
    return value


def _tuple_or_none(value: Any) -> Any:
    return None if value is None else tuple(value)


def _json_dict(value: Any) -> Any:
    # transformers accepts lr_scheduler_kwargs as a dict or its JSON text.
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else None
        except json.JSONDecodeError as e:
            raise ValueError(
                f"lr_scheduler_kwargs must be a dict or JSON object text, got {value!r} ({e})"
            ) from None
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"lr_scheduler_kwargs must be a dict, got {value!r}")
    return value


class _Errors:
    def __init__(self):
        self.items: list[str] = []

    def check(self, ok: bool, message: str):
        if not ok:
            self.items.append(message)

    def raise_if_any(self):
        if self.items:
            raise ConfigError("Invalid GRPOConfig:\n  - " + "\n  - ".join(self.items))


@attrs.frozen(kw_only=True)
class GRPOConfig:
    """Configuration of a GRPO run (TRL's ``GRPOConfig`` field names and meanings).

    Batch sizes count *completions* (rows), as in TRL: a generation batch holds
    ``generation_batch_size = per_device_train_batch_size * steps_per_generation`` rows,
    i.e. ``generation_batch_size / num_generations`` prompts; it is split into
    ``steps_per_generation`` micro-batches of ``per_device_train_batch_size`` rows, reused for
    ``num_iterations`` passes, and every ``gradient_accumulation_steps`` micro-batches make
    one optimizer step (``max_steps``, ``logging_steps``, ``save_steps`` count optimizer steps).

    Defaults that differ from TRL's:
        - ``use_lora=True`` (new): train LoRA adapters (mlx-lm's ``linear_to_lora_layers``)
          instead of every weight. ``lora_rank=16``, ``lora_alpha=32`` follow TRL's
          ``ModelConfig``; ``lora_dropout=0.0`` (TRL ``ModelConfig``: 0.05) so that rollout,
          reference and policy forwards agree exactly by default.
        - ``max_prompt_length=512``: TRL 1.16 removed the field (earlier TRL: 512); prompts
          longer than this keep their last tokens (left truncation, as TRL did).
          ``max_prompt_length=None`` truncates nothing (TRL 1.16): a prompt that does not fit
          the model context with ``max_completion_length`` is an error before training.
        - ``pad_to_multiple_of=None`` pads prompt and completion lengths to the next power of
          two (TRL: no padding), so the compiled step sees a bounded set of shapes.
        - ``output_dir="trainer_output"`` (TRL: ``None``, which transformers maps to
          ``"trainer_output"``).
        - ``steps_per_generation`` must be a multiple of ``gradient_accumulation_steps``
          (TRL lets one accumulation window span two generation batches).
        - ``quantize_bits`` / ``quantize_group_size`` (new): quantize the base model at load
          for QLoRA (TRL: ``load_in_4bit`` through bitsandbytes).
        - ``gradient_checkpointing=False`` (TRL: ``True``): recomputing every transformer
          block in the backward pass costs about one more forward; turn it on when the
          activations of long completions do not fit (docs/benchmarks.md has the trade).
        - ``optim`` takes transformers' names; every AdamW name (``adamw_torch``,
          ``adamw_torch_fused``, ``adamw_hf``, ...) is ``torch.optim.AdamW`` exactly
          (bias-corrected, decoupled decay, no decay on biases and norm weights), and the
          8-bit / paged AdamW variants run the same update with float32 states.
        - No vLLM, DeepSpeed, tool calling, adaptive entropy or multimodal fields.
    """

    # -- model and LoRA --------------------------------------------------------------------
    use_lora: bool = True
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_num_layers: int | None = None
    lora_target_modules: tuple[str, ...] | None = attrs.field(
        default=None, converter=_tuple_or_none
    )
    quantize_bits: int | None = None
    quantize_group_size: int = 64
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False

    # -- data ----------------------------------------------------------------------------
    max_prompt_length: int | None = 512
    shuffle_dataset: bool = True
    pad_to_multiple_of: int | None = None

    # -- generation ----------------------------------------------------------------------
    num_generations: int = 8
    max_completion_length: int = 512
    generation_batch_size: int | None = None
    steps_per_generation: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    repetition_penalty: float = 1.0

    # -- loss ----------------------------------------------------------------------------
    beta: float = 0.0
    num_iterations: int = 1
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    importance_sampling_level: str = "token"
    reward_weights: tuple[float, ...] | None = attrs.field(default=None, converter=_tuple_or_none)
    reward_timeout: float | None = None
    multi_objective_aggregation: str = "sum_then_normalize"
    scale_rewards: str = attrs.field(default="group", converter=_scale_rewards)
    loss_type: str = "dapo"
    mask_truncated_completions: bool = False
    top_entropy_quantile: float = 1.0
    use_bias_correction_kl: bool = True
    off_policy_mask_threshold: float | None = None
    entropy_coef: float = 0.0
    sapo_temperature_neg: float = 1.05
    sapo_temperature_pos: float = 1.0
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0

    # -- optimisation --------------------------------------------------------------------
    learning_rate: float = 1e-6
    lr_scheduler_type: str = "linear"
    lr_scheduler_kwargs: dict | None = attrs.field(default=None, converter=_json_dict)
    warmup_ratio: float = 0.0
    warmup_steps: float = 0
    weight_decay: float = 0.0
    optim: str = "adamw_torch"
    optim_args: str | None = None
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_steps: int = -1
    num_train_epochs: float = 3.0
    seed: int = 42

    # -- logging, evaluation, checkpoints ------------------------------------------------
    output_dir: str = "trainer_output"
    overwrite_output_dir: bool = False
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = None
    eval_steps: int | None = None
    per_device_eval_batch_size: int = 8
    num_generations_eval: int | None = None
    log_completions: bool = False
    num_completions_to_print: int | None = None
    disable_tqdm: bool = False
    report_to: tuple[str, ...] = attrs.field(default=(), converter=tuple)

    def __attrs_post_init__(self):
        errors = _Errors()
        for check in (_check_batches, _check_generation, _check_loss, _check_optim, _check_misc):
            check(self, errors)
        _check_finite(self, errors)
        _check_reliability(self, errors)
        errors.raise_if_any()
        # The loss's own checks (sapo / vespo / entropy knobs) run here too, at construction.
        try:
            self.to_loss_config()
        except ValueError as e:
            raise ConfigError(f"Invalid GRPOConfig:\n  - {e}") from e

    # -- resolved batch geometry (TRL fills these in __post_init__; we keep fields as given
    # so attrs.evolve stays valid, and resolve here) ----------------------------------------
    @property
    def resolved_steps_per_generation(self) -> int:
        """Micro-batches per generation batch (TRL default: ``gradient_accumulation_steps``)."""
        if self.steps_per_generation is not None:
            return self.steps_per_generation
        if self.generation_batch_size is not None:
            return self.generation_batch_size // self.per_device_train_batch_size
        return self.gradient_accumulation_steps

    @property
    def prompt_share(self) -> int:
        """Rows of every micro-batch that share a prompt, in contiguous blocks:
        ``gcd(per_device_train_batch_size, num_generations)`` (rows are group-contiguous and
        micro-batches start at multiples of ``per_device_train_batch_size``)."""
        return math.gcd(self.per_device_train_batch_size, self.num_generations)

    @property
    def resolved_generation_batch_size(self) -> int:
        """Rows (completions) per generation batch."""
        return self.per_device_train_batch_size * self.resolved_steps_per_generation

    @property
    def prompts_per_generation(self) -> int:
        """Prompts sampled per generation batch: ``generation_batch_size / num_generations``."""
        return self.resolved_generation_batch_size // self.num_generations

    @property
    def optimizer_steps_per_generation(self) -> int:
        """Optimizer steps taken on one generation batch (``num_iterations`` passes)."""
        return (
            self.resolved_steps_per_generation
            * self.num_iterations
            // self.gradient_accumulation_steps
        )

    @property
    def resolved_epsilon_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def lora_scale(self) -> float:
        """mlx-lm's LoRA ``scale`` = ``lora_alpha / lora_rank`` (PEFT's convention)."""
        return self.lora_alpha / self.lora_rank

    def warmup_steps_for(self, total_steps: int) -> int:
        """Warmup steps of a ``total_steps`` run, rounded as transformers rounds them."""
        return warmup_steps_for(self.warmup_steps, self.warmup_ratio, total_steps)

    # -- conversions -----------------------------------------------------------------------
    def to_loss_config(self):
        """The :class:`grpo.core.loss.LossConfig` for these settings."""
        from grpo.core.loss import LossConfig

        return LossConfig(**{f.name: getattr(self, f.name) for f in attrs.fields(LossConfig)})

    def to_sampling_config(self, *, eos_token_ids=(), stop_sequences=()):
        """The :class:`grpo.core.sampling.SamplingConfig` for these settings."""
        from grpo.core.sampling import SamplingConfig

        return SamplingConfig(
            group_size=self.num_generations,
            max_tokens=self.max_completion_length,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            repetition_penalty=self.repetition_penalty,
            eos_ids=tuple(eos_token_ids),
            stop_sequences=tuple(tuple(s) for s in stop_sequences),
        )

    def to_dict(self) -> dict:
        """Plain JSON-able dict (tuples become lists)."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in attrs.fields(type(self))
        }

    @classmethod
    def from_dict(cls, values: dict) -> GRPOConfig:
        """Build from a dict (e.g. a checkpoint's ``config.json``); unknown keys raise."""
        names = {f.name for f in attrs.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"GRPOConfig: unknown field(s) {unknown}")
        return cls(**values)


def _positive_int(errors: _Errors, cfg: GRPOConfig, *names: str, minimum: int = 1):
    for name in names:
        value = getattr(cfg, name)
        errors.check(
            isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
            f"{name} must be an integer >= {minimum}, got {name}={value!r}",
        )


def _check_batches(cfg: GRPOConfig, errors: _Errors):
    _positive_int(errors, cfg, "per_device_train_batch_size", "gradient_accumulation_steps")
    _positive_int(errors, cfg, "num_iterations", "per_device_eval_batch_size")
    errors.check(
        isinstance(cfg.num_generations, int) and cfg.num_generations >= 2,
        "GRPO needs at least 2 generations per prompt to compute group-relative advantages; "
        f"got num_generations={cfg.num_generations!r}",
    )
    if len(errors.items):
        return
    gbs, spg, bs = (
        cfg.generation_batch_size,
        cfg.steps_per_generation,
        cfg.per_device_train_batch_size,
    )
    if gbs is not None and spg is not None:
        errors.check(
            gbs == bs * spg,
            "generation_batch_size and steps_per_generation are mutually exclusive unless "
            f"generation_batch_size == per_device_train_batch_size * steps_per_generation; got "
            f"generation_batch_size={gbs}, steps_per_generation={spg}, "
            f"per_device_train_batch_size={bs}",
        )
    if gbs is not None:
        errors.check(
            gbs >= 1 and gbs % bs == 0,
            f"generation_batch_size={gbs} must be a positive multiple of "
            f"per_device_train_batch_size={bs}",
        )
    if spg is not None:
        _positive_int(errors, cfg, "steps_per_generation")
    if errors.items:
        return
    rows, spg = cfg.resolved_generation_batch_size, cfg.resolved_steps_per_generation
    errors.check(
        rows % cfg.num_generations == 0,
        f"generation_batch_size={rows} (per_device_train_batch_size={bs} x "
        f"steps_per_generation={spg}) must be divisible by num_generations="
        f"{cfg.num_generations} so that every prompt's group is complete",
    )
    errors.check(
        spg % cfg.gradient_accumulation_steps == 0,
        f"steps_per_generation={spg} must be a multiple of gradient_accumulation_steps="
        f"{cfg.gradient_accumulation_steps} (one accumulation window never spans two "
        "generation batches)",
    )
    nge = cfg.num_generations_eval
    if nge is not None:
        errors.check(
            isinstance(nge, int) and nge >= 2,
            f"num_generations_eval must be >= 2 or None, got num_generations_eval={nge!r}",
        )


def _check_generation(cfg: GRPOConfig, errors: _Errors):
    _positive_int(errors, cfg, "max_completion_length")
    if cfg.max_prompt_length is not None:
        _positive_int(errors, cfg, "max_prompt_length")
    errors.check(
        cfg.temperature > 0, f"temperature must be > 0, got temperature={cfg.temperature!r}"
    )
    errors.check(0 < cfg.top_p <= 1, f"top_p must be in (0, 1], got top_p={cfg.top_p!r}")
    errors.check(cfg.top_k >= 0, f"top_k must be >= 0 (0 disables it), got top_k={cfg.top_k!r}")
    if cfg.min_p is not None:
        errors.check(0 <= cfg.min_p <= 1, f"min_p must be in [0, 1], got min_p={cfg.min_p!r}")
    errors.check(
        cfg.repetition_penalty > 0,
        f"repetition_penalty must be > 0, got repetition_penalty={cfg.repetition_penalty!r}",
    )
    if cfg.pad_to_multiple_of is not None:
        _positive_int(errors, cfg, "pad_to_multiple_of")


def _one_of(errors: _Errors, cfg: GRPOConfig, name: str, allowed: tuple):
    value = getattr(cfg, name)
    errors.check(value in allowed, f"{name} must be one of {list(allowed)}, got {name}={value!r}")


def _check_loss(cfg: GRPOConfig, errors: _Errors):
    _one_of(errors, cfg, "loss_type", LOSS_TYPES)
    _one_of(errors, cfg, "scale_rewards", SCALE_REWARDS)
    _one_of(errors, cfg, "importance_sampling_level", IMPORTANCE_SAMPLING_LEVELS)
    _one_of(errors, cfg, "multi_objective_aggregation", MULTI_OBJECTIVE_AGGREGATIONS)
    errors.check(cfg.beta >= 0, f"beta must be >= 0, got beta={cfg.beta!r}")
    errors.check(cfg.epsilon > 0, f"epsilon must be > 0, got epsilon={cfg.epsilon!r}")
    if cfg.epsilon_high is not None:
        errors.check(
            cfg.epsilon_high > 0, f"epsilon_high must be > 0, got epsilon_high={cfg.epsilon_high!r}"
        )
    if cfg.delta is not None:
        errors.check(
            cfg.delta > 1, f"delta must be > 1 (an upper ratio bound), got delta={cfg.delta!r}"
        )
    errors.check(
        0.0 <= cfg.top_entropy_quantile <= 1.0,
        f"top_entropy_quantile must be in [0, 1], got top_entropy_quantile={cfg.top_entropy_quantile!r}",
    )
    if cfg.reward_weights is not None:
        errors.check(
            len(cfg.reward_weights) > 0
            and all(math.isfinite(float(w)) for w in cfg.reward_weights),
            f"reward_weights must be a non-empty list of finite numbers, got "
            f"reward_weights={list(cfg.reward_weights)!r}",
        )


def _check_optim(cfg: GRPOConfig, errors: _Errors):
    for check in (
        lambda: optimizer_kind(cfg.optim),
        lambda: parse_optim_args(cfg.optim_args),
        lambda: lr_factor(
            cfg.lr_scheduler_type,
            learning_rate=cfg.learning_rate,
            warmup_steps=0,
            total_steps=100,
            scheduler_kwargs=cfg.lr_scheduler_kwargs,
        ),  # fmt: skip
    ):
        try:
            check()
        except ValueError as e:
            errors.items.append(str(e))
    errors.check(
        cfg.learning_rate >= 0,
        f"learning_rate must be >= 0, got learning_rate={cfg.learning_rate!r}",
    )
    errors.check(
        0 <= cfg.warmup_ratio <= 1,
        f"warmup_ratio must be in [0, 1], got warmup_ratio={cfg.warmup_ratio!r}",
    )
    errors.check(
        isinstance(cfg.warmup_steps, (int, float)) and cfg.warmup_steps >= 0,
        "warmup_steps must be >= 0 (steps, or a fraction of the run when below 1), got "
        f"warmup_steps={cfg.warmup_steps!r}",
    )
    errors.check(
        cfg.weight_decay >= 0, f"weight_decay must be >= 0, got weight_decay={cfg.weight_decay!r}"
    )
    errors.check(
        0 <= cfg.adam_beta1 < 1 and 0 <= cfg.adam_beta2 < 1,
        f"adam_beta1 and adam_beta2 must be in [0, 1), got adam_beta1={cfg.adam_beta1!r}, "
        f"adam_beta2={cfg.adam_beta2!r}",
    )
    errors.check(
        cfg.adam_epsilon > 0, f"adam_epsilon must be > 0, got adam_epsilon={cfg.adam_epsilon!r}"
    )
    errors.check(
        cfg.max_grad_norm >= 0,
        f"max_grad_norm must be >= 0 (0 disables clipping), got max_grad_norm={cfg.max_grad_norm!r}",
    )
    errors.check(
        isinstance(cfg.max_steps, int) and (cfg.max_steps == -1 or cfg.max_steps >= 1),
        f"max_steps must be -1 (use num_train_epochs) or >= 1, got max_steps={cfg.max_steps!r}",
    )
    errors.check(
        cfg.num_train_epochs > 0,
        f"num_train_epochs must be > 0, got num_train_epochs={cfg.num_train_epochs!r}",
    )


def _check_misc(cfg: GRPOConfig, errors: _Errors):
    _positive_int(errors, cfg, "logging_steps", "save_steps")
    if cfg.eval_steps is not None:
        _positive_int(errors, cfg, "eval_steps")
    if cfg.save_total_limit is not None:
        _positive_int(errors, cfg, "save_total_limit")
    _positive_int(errors, cfg, "lora_rank")
    errors.check(
        0.0 <= cfg.lora_dropout < 1.0,
        f"lora_dropout must be in [0, 1), got lora_dropout={cfg.lora_dropout!r}",
    )
    errors.check(cfg.lora_alpha > 0, f"lora_alpha must be > 0, got lora_alpha={cfg.lora_alpha!r}")
    if cfg.lora_num_layers is not None:
        _positive_int(errors, cfg, "lora_num_layers")
    if cfg.quantize_bits is not None:
        errors.check(
            cfg.quantize_bits in QUANTIZE_BITS,
            f"quantize_bits must be one of {list(QUANTIZE_BITS)} or None, got "
            f"quantize_bits={cfg.quantize_bits!r}",
        )
        errors.check(
            cfg.use_lora,
            f"quantize_bits={cfg.quantize_bits} (QLoRA) needs use_lora=True: quantized base "
            "weights cannot be fine-tuned directly",
        )
    errors.check(
        cfg.quantize_group_size in (32, 64, 128),
        f"quantize_group_size must be 32, 64 or 128, got quantize_group_size={cfg.quantize_group_size!r}",
    )
    errors.check(
        isinstance(cfg.output_dir, str) and cfg.output_dir != "",
        f"output_dir must be a non-empty path, got output_dir={cfg.output_dir!r}",
    )


def _check_finite(cfg: GRPOConfig, errors: _Errors):
    # inf passes every ">= 0" check above (inf learning_rate, num_train_epochs=inf, ...)
    # but ruins the run; NaN fails them with a less direct message, so name both here.
    for field in attrs.fields(type(cfg)):
        value = getattr(cfg, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            errors.check(False, f"{field.name} must be a finite number, got {field.name}={value!r}")


def _check_reliability(cfg: GRPOConfig, errors: _Errors):
    t = cfg.reward_timeout
    if t is not None:
        errors.check(
            isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0,
            f"reward_timeout must be a number of seconds > 0 or None, got reward_timeout={t!r}",
        )
    errors.check(
        isinstance(cfg.overwrite_output_dir, bool),
        f"overwrite_output_dir must be true or false, got {cfg.overwrite_output_dir!r}",
    )
