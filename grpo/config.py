"""``GRPOConfig``: TRL's GRPO training arguments as a frozen attrs class.

Field names and meanings follow TRL 1.16 (``trl.GRPOConfig`` plus the ``TrainingArguments``
fields GRPO uses). Defaults are TRL's except where the docstring of :class:`GRPOConfig` says
otherwise. Invalid values and combinations raise ``ValueError`` at construction, naming the
fields and the values.
"""

from __future__ import annotations

import json
import math
import warnings
from typing import Any

import attrs

from grpo.core.loss import LOSS_TYPES, LossConfig
from grpo.core.optim import lr_factor, optimizer_kind, parse_optim_args, warmup_steps_for
from grpo.errors import ConfigError

SCALE_REWARDS = ("group", "batch", "none")
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


def _auto_is_none(value: Any) -> Any:
    # TRL's "auto" pads only on AWS Neuron; elsewhere it means None.
    return None if value == "auto" else value


def _json_dict(value: Any) -> Any:
    # transformers accepts lr_scheduler_kwargs as a dict or its JSON text.
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else None
        except json.JSONDecodeError as e:
            raise ValueError(f"expected a dict or JSON object text, got {value!r} ({e})") from None
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"expected a dict, got {value!r}")
    return value


def _str_tuple(value: Any) -> tuple:
    # transformers takes a plain string where it takes a list ("wandb" means ["wandb"]).
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _report_to(value: Any) -> tuple:
    # transformers: "none" (TRL's default) reports nowhere.
    items = _str_tuple(value)
    return () if items == ("none",) else items


def _none_is(default: Any):
    # TRL leaves some fields None and resolves them in __post_init__.
    return lambda value: default if value is None else value


def _str_tuple_or_none(value: Any) -> Any:
    return None if value is None else _str_tuple(value)


def _ignored(default: Any, why: str) -> Any:
    """A TRL field accepted without effect on MLX; setting it warns once, saying ``why``."""
    if isinstance(default, tuple):
        return attrs.field(default=default, converter=_str_tuple, metadata={"ignored": why})
    return attrs.field(default=default, metadata={"ignored": why})


def _script_field(default: Any) -> Any:
    """A field transformers' Trainer itself never reads (a training script does)."""
    return attrs.field(default=default, metadata={"script": True})


_VLLM = "vLLM is CUDA-only; mlx-grpo generates with its own mlx-lm rollout"
_GENERATE = "a transformers generate() option; mlx-grpo's rollout always batches and caches"
_CONTINUOUS = (
    "transformers' continuous-batching engine; mlx-grpo's own continuous batching is set "
    "with rollout_slots"
)
_DIST = (
    "a PyTorch distributed (accelerate, DDP, FSDP, DeepSpeed) option; mlx-grpo scales out "
    "with mx.distributed and mlx.launch (docs/distributed.md)"
)
_CUDA = "a PyTorch/CUDA runtime option with no MLX counterpart"
_COMPILED = "mlx-grpo always compiles its training step with mx.compile"
_CHECKPOINTING = (
    "gradient_checkpointing recomputes each block with mx.checkpoint, which takes no options"
)
_NOT_GRPO = "a supervised-training option that GRPO does not use"
_LOADER = "prompts are sampled in-process; there is no DataLoader"
_LOGGING = "mlx-grpo prints to the terminal and writes metrics.jsonl"
_TRACKERS = "the completions table is printed (log_completions), not sent to trackers or the Hub"
_TRACKIO_STATIC = "no static Trackio Space is created on the Hub after training (the run stays in trackio_space_id or the local store)"
_EVAL = "evaluation samples completions and scores them with the reward functions"
_HUB = "a transformers 4 name; set hub_model_id and hub_token"
_BEST = "GRPO checkpoints are kept by step (save_total_limit), not by an evaluation metric"
# generation_kwargs keys that override the sampling fields (as they override TRL's
# GenerationConfig); temperature and the length are refused there because the loss must see
# the same values as the sampler.
GENERATION_KEYS = ("top_p", "top_k", "min_p", "repetition_penalty")
GENERATION_REFUSED = {"temperature": "temperature", "max_new_tokens": "max_completion_length"}
# model_init_kwargs keys with a meaning here.
MODEL_INIT_KEYS = ("dtype", "torch_dtype")
DTYPES = ("bfloat16", "float16", "float32")
LOGGING_STRATEGIES = ("steps", "epoch", "no")
SAVE_STRATEGIES = ("steps", "epoch", "no")
EVAL_STRATEGIES = ("no", "steps", "epoch")


# One line of help per wired field: `grpo train --help`, docs/api.md and the TRL field
# table read it from each field's metadata (attached by _with_help below).
_HELP: dict[str, str] = {
    "use_lora": "Train LoRA adapters (mlx-lm `linear_to_lora_layers`) instead of every weight. The CLI defaults to true (memory); in Python, `None` follows TRL: every weight unless `peft_config` is given.",
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
    "max_memory_gb": "Memory budget of an update step (GB): the model is measured and the micro-batch (with gradient accumulation making up the rest) and LM-head chunk that fit are chosen; a run that cannot fit is refused, naming what it needs (`None`: no budget).",
    "gradient_checkpointing": "Recompute each transformer block in the backward pass (less memory, ~1/3 more compute).",
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
    "rollout_slots": "Decode width: at most this many completions are decoded at once. A generation batch with more rows (prompts x `num_generations`) goes through continuous batching, each finished row's slot refilled with the next row; the completions are the same for the same seed, decode memory follows the slots (`None`: all rows at once).",
    "max_tool_calling_iterations": "Most rounds of tool calls per completion (`None`: until the budget is spent).",
    "tool_call_format": "Tool-call format: hermes, llama3 or mistral (`None`: detected from the chat template).",
    "rollout_quantization": "Sample rollouts from a copy of the policy quantized to 8 or 4 bits (mlx affine), LoRA merged first and re-quantized from the current weights before every rollout; old log-probs and the loss stay float and the mismatch is corrected by the `vllm_importance_sampling_*` fields (`None`: sample from the policy itself).",
    "rollout_quantization_group_size": "Group size of that quantization: 32, 64 or 128, dividing every layer's input size (`None`: 64, else 32).",
    "vllm_importance_sampling_correction": "With `rollout_quantization`, multiply the loss by TRL's importance weight pi_old / pi_sampler (off: no correction). Without it the sampler is the policy: no mismatch, no effect.",
    "vllm_importance_sampling_mode": "How that weight is formed: token_truncate, token_mask, sequence_truncate or sequence_mask (TRL's modes; only with `rollout_quantization`).",
    "vllm_importance_sampling_clip_max": "Upper bound C_max of that weight: clipped there (`*_truncate`) or zeroed above it (`*_mask`); `None`: no bound. Only with `rollout_quantization`.",
    "vllm_importance_sampling_clip_min": "Lower bound C_min of that weight: clipped there (`*_truncate`) or zeroed below it (`*_mask`); `None`: no bound. Only with `rollout_quantization`.",
    "vllm_importance_sampling_cap": "Deprecated in TRL (FutureWarning): sets `vllm_importance_sampling_clip_max`.",
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
    "loss_type": "Loss normalisation / surrogate: " + ", ".join(LOSS_TYPES) + ".",
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
    "report_to": "Trackers besides `metrics.jsonl`: tensorboard, wandb, trackio, all (those installed) or none; each imported only when named (`pip install 'mlx-grpo[report]'`).",
    "run_name": "Run name given to wandb and trackio.",
    "push_to_hub": "Upload output_dir (weights + README.md model card) to `hub_model_id` through huggingface_hub at `push_to_hub()`, `save_model()` and per `hub_strategy`.",
    "hub_token": "Hugging Face token for the pushes (`None`: huggingface_hub's login).",
    "hub_private_repo": "Create the Hub repository private.",
    "hub_model_id": "Hub repository `owner/name` (`None`: the name of output_dir).",
    "hub_strategy": "`every_save` (each checkpoint's weights), `checkpoint` (also `last-checkpoint/`), `all_checkpoints` or `end`, as in transformers.",
    "hub_revision": "Branch the pushes commit to (`None`: main).",
    "project": "Project of the wandb (unless `WANDB_PROJECT` is set) and trackio runs.",
    "logging_dir": "TensorBoard event directory (`TENSORBOARD_LOGGING_DIR` first; `None`: `output_dir/runs/<time>_<host>`).",
    "trackio_space_id": "Hugging Face Space that trackio syncs the run to (`None`: the local store only).",
    "trackio_bucket_id": "Hugging Face bucket for trackio's data (`None`: none).",
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


def _with_help(cls: type, fields: list) -> list:
    # Help text lives in each field's metadata; ignored and script-only fields say why.
    out = []
    for f in fields:
        why, script = f.metadata.get("ignored"), f.metadata.get("script")
        text = _HELP.get(f.name) or (
            f"TRL/transformers field, no effect on MLX: {why}."
            if why
            else "Read by a training script, not by the trainer (as in transformers)."
            if script
            else ""
        )
        out.append(f.evolve(metadata={**f.metadata, "help": text}))
    return out


def field_help() -> dict[str, str]:
    """``{field: help}`` for every :class:`GRPOConfig` field (its ``metadata["help"]``)."""
    return {f.name: f.metadata["help"] for f in attrs.fields(GRPOConfig)}


class _Errors:
    def __init__(self):
        self.items: list[str] = []

    def check(self, ok: bool, message: str):
        if not ok:
            self.items.append(message)

    def raise_if_any(self):
        if self.items:
            raise ConfigError("Invalid GRPOConfig:\n  - " + "\n  - ".join(self.items))


@attrs.frozen(kw_only=True, field_transformer=_with_help)
class GRPOConfig:
    """Configuration of a GRPO run (TRL's ``GRPOConfig`` field names and meanings).

    Batch sizes count *completions* (rows), as in TRL: a generation batch holds
    ``generation_batch_size = per_device_train_batch_size * steps_per_generation`` rows,
    i.e. ``generation_batch_size / num_generations`` prompts; it is split into
    ``steps_per_generation`` micro-batches of ``per_device_train_batch_size`` rows, reused for
    ``num_iterations`` passes, and every ``gradient_accumulation_steps`` micro-batches make
    one optimizer step (``max_steps``, ``logging_steps``, ``save_steps`` count optimizer steps).

    Defaults that differ from TRL's:
        - ``use_lora=None`` (new): what trains follows TRL: every weight, unless the trainer
          gets a ``peft_config`` (LoRA with its settings), continues adapters
          (``adapter_path``) or quantizes the base. ``True`` / ``False`` force LoRA / a full
          fine-tune; the ``grpo`` CLI defaults to ``True`` for memory. Without a
          ``peft_config``, ``lora_rank=16``, ``lora_alpha=32`` follow TRL's ``ModelConfig``;
          ``lora_dropout=0.0`` (TRL ``ModelConfig``: 0.05) so that rollout, reference and
          policy forwards agree exactly by default.
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
        - ``adapter_path`` (new): continue the LoRA adapters saved there (rank and targets
          from its ``adapter_config.json``; ``lora_rank`` etc. are then not used).
        - ``router_aux_loss_coef`` (TRL 1.16: ``None``, the model config's value): ``None`` or
          0 only, since no mlx-lm model returns its router logits; a nonzero value is refused
          naming the model type.
        - ``rollout_quantization`` / ``rollout_quantization_group_size`` (new): sample from a
          quantized copy of the policy; TRL's ``vllm_importance_sampling_*`` fields then
          correct the sampler/trainer mismatch exactly as they correct vLLM's (without
          ``rollout_quantization`` the sampler is the policy and they have no effect). It
          pays off with Metal's quantized kernels; on the CPU backend it is slower than
          float (docs/benchmarks.md).
        - vLLM, DeepSpeed/FSDP, CUDA and hub fields are accepted without effect and named in
          one warning at construction (docs/porting-from-trl.md lists every field).
    """

    # -- model and LoRA --------------------------------------------------------------------
    use_lora: bool | None = None
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_num_layers: int | None = None
    lora_target_modules: tuple[str, ...] | None = attrs.field(
        default=None, converter=_str_tuple_or_none
    )
    quantize_bits: int | None = None
    quantize_group_size: int = 64
    trust_remote_code: bool = False
    # mlx-lm adapters (adapter_config.json + adapters.safetensors) to continue training.
    adapter_path: str | None = None
    # TRL's MoE load-balancing weight; mlx-lm models expose no router logits, so only 0.
    router_aux_loss_coef: float | None = None
    gradient_checkpointing: bool = False
    # Memory budget of an update step in GB; the trainer measures the model and picks the
    # micro-batch and LM-head chunk that fit (grpo.core.memory), or refuses. None: no budget.
    max_memory_gb: float | None = None

    # -- data ----------------------------------------------------------------------------
    max_prompt_length: int | None = 512
    shuffle_dataset: bool = True
    pad_to_multiple_of: int | None = attrs.field(default=None, converter=_auto_is_none)

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
    # Rows decoded at once; more rows per generation batch go through continuous batching
    # (grpo.core.continuous). None: all rows at once.
    rollout_slots: int | None = None
    max_tool_calling_iterations: int | None = None
    tool_call_format: str | None = None
    # Sample from a quantized copy of the policy (grpo.core.quantize); the loss corrects the
    # mismatch with TRL's vLLM importance weights below.
    rollout_quantization: int | None = None
    rollout_quantization_group_size: int | None = None

    # -- sampler/trainer mismatch: TRL's vLLM correction, applied to the quantized sampler --
    vllm_importance_sampling_correction: bool = True
    vllm_importance_sampling_mode: str = "sequence_mask"
    vllm_importance_sampling_clip_max: float | None = 3.0
    vllm_importance_sampling_clip_min: float | None = None
    vllm_importance_sampling_cap: float | None = None

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
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    use_adaptive_entropy: bool = False
    entropy_coef_min: float = 0.0
    entropy_coef_max: float = 1.0
    entropy_coef_delta: float = 0.005
    entropy_target: float = 0.2

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
    output_dir: str = attrs.field(default="trainer_output", converter=_none_is("trainer_output"))
    overwrite_output_dir: bool = False
    logging_steps: float = 10
    save_steps: float = 500
    save_total_limit: int | None = None
    eval_steps: float | None = None
    per_device_eval_batch_size: int = 8
    num_generations_eval: int | None = None
    log_completions: bool = False
    num_completions_to_print: int | None = None
    disable_tqdm: bool = attrs.field(default=False, converter=_none_is(False))
    report_to: tuple[str, ...] = attrs.field(default=(), converter=_report_to)

    # -- TRL and transformers fields wired with their meaning on MLX ------------------------
    bf16: bool | None = None
    fp16: bool = False
    model_init_kwargs: dict | None = attrs.field(default=None, converter=_json_dict)
    disable_dropout: bool = False
    chat_template_kwargs: dict | None = attrs.field(default=None, converter=_json_dict)
    generation_kwargs: dict | None = attrs.field(default=None, converter=_json_dict)
    logging_strategy: str = "steps"
    logging_first_step: bool = False
    save_strategy: str = "steps"
    eval_strategy: str = "no"
    eval_on_start: bool = False
    data_seed: int | None = None
    remove_unused_columns: bool | None = False

    # -- read by a training script, not by the trainer (as in transformers) ----------------
    do_train: bool = _script_field(False)
    do_eval: bool = _script_field(False)
    do_predict: bool = _script_field(False)
    resume_from_checkpoint: str | None = _script_field(None)
    run_name: str | None = None
    project: str = "huggingface"
    logging_dir: str | None = None

    # -- accepted for TRL scripts, without effect on MLX (a warning names those set) --------
    use_vllm: bool = _ignored(False, _VLLM)
    vllm_mode: str = _ignored("colocate", _VLLM)
    vllm_model_impl: str = _ignored("vllm", _VLLM)
    vllm_enable_sleep_mode: bool = _ignored(False, _VLLM)
    vllm_structured_outputs_regex: str | None = _ignored(None, _VLLM)
    vllm_server_base_url: str | None = _ignored(None, _VLLM)
    vllm_server_host: str = _ignored("0.0.0.0", _VLLM)
    vllm_server_port: int = _ignored(8000, _VLLM)
    vllm_server_timeout: float = _ignored(240.0, _VLLM)
    vllm_group_port: int = _ignored(51216, _VLLM)
    vllm_gpu_memory_utilization: float = _ignored(0.3, _VLLM)
    vllm_max_model_length: int | None = _ignored(None, _VLLM)
    vllm_tensor_parallel_size: int = _ignored(1, _VLLM)
    use_transformers_continuous_batching: bool = _ignored(False, _CONTINUOUS)
    transformers_continuous_batching_config: dict | None = _ignored(None, _CONTINUOUS)
    use_transformers_paged: bool = _ignored(False, _GENERATE)
    cache_implementation: str | None = _ignored(None, _GENERATE)
    ds3_gather_for_generation: bool = _ignored(True, _DIST)
    log_multimodal: bool = _ignored(True, "mlx-grpo trains text-only models")
    cast_lm_head_to_fp32: bool = _ignored(
        False, "the LM head runs in the model's dtype; log-softmax and the loss are always float32"
    )
    log_unique_prompts: bool = _ignored(False, _TRACKERS)
    log_completions_hub_repo: str | None = _ignored(None, _TRACKERS)
    tf32: bool | None = _ignored(None, _CUDA)
    bf16_full_eval: bool = _ignored(False, _CUDA)
    fp16_full_eval: bool = _ignored(False, _CUDA)
    use_liger_kernel: bool = _ignored(False, _CUDA)
    liger_kernel_config: dict | None = _ignored(None, _CUDA)
    torch_compile: bool = _ignored(False, _COMPILED)
    torch_compile_backend: str | None = _ignored(None, _COMPILED)
    torch_compile_mode: str | None = _ignored(None, _COMPILED)
    torch_empty_cache_steps: int | None = _ignored(None, _CUDA)
    use_cpu: bool = _ignored(False, _CUDA)
    use_cache: bool = _ignored(
        False, "the rollout always decodes with a KV cache and the training forward never needs one"
    )
    gradient_checkpointing_kwargs: dict | None = _ignored(None, _CHECKPOINTING)
    activation_checkpointing: bool | None = _ignored(None, _CHECKPOINTING)
    activation_checkpointing_kwargs: dict | None = _ignored(None, _CHECKPOINTING)
    optim_target_modules: tuple[str, ...] | None = _ignored(
        None, "only GaLore/APOLLO optimizers read it, and they have no MLX implementation"
    )
    average_tokens_across_devices: bool = _ignored(
        True, "loss types that normalise by tokens always average them over mlx.launch ranks"
    )
    label_smoothing_factor: float = _ignored(0.0, _NOT_GRPO)
    neftune_noise_alpha: float | None = _ignored(None, _NOT_GRPO)
    auto_find_batch_size: bool = _ignored(
        False,
        "use max_steps and per_device_train_batch_size; CUDA OOM retries have no MLX counterpart",
    )
    log_on_each_node: bool = _ignored(True, "rank 0 alone logs under mlx.launch")
    logging_nan_inf_filter: bool = _ignored(
        True, "a non-finite loss stops training with an error instead of being filtered"
    )
    include_num_input_tokens_seen: str = _ignored("no", "num_tokens is always logged")
    log_level: str = _ignored("passive", _LOGGING)
    log_level_replica: str = _ignored("warning", _LOGGING)
    trackio_space_id: str | None = None
    trackio_bucket_id: str | None = None
    trackio_static_space_id: str | None = _ignored(None, _TRACKIO_STATIC)
    eval_delay: float = _ignored(0, _EVAL)
    prediction_loss_only: bool = _ignored(False, _EVAL)
    eval_do_concat_batches: bool = _ignored(True, _EVAL)
    eval_use_gather_object: bool = _ignored(False, _EVAL)
    eval_accumulation_steps: int | None = _ignored(None, _EVAL)
    include_for_metrics: tuple[str, ...] = _ignored((), _EVAL)
    batch_eval_metrics: bool = _ignored(False, _EVAL)
    save_only_model: bool = _ignored(
        False, "checkpoints always hold the optimizer state so that resume is exact"
    )
    save_on_each_node: bool = _ignored(False, "rank 0 alone writes checkpoints under mlx.launch")
    enable_jit_checkpoint: bool = _ignored(
        False, "Ctrl-C and SIGTERM always save a checkpoint at the next generation boundary"
    )
    push_to_hub: bool = False
    hub_token: str | None = None
    hub_private_repo: bool | None = None
    hub_model_id: str | None = None
    hub_strategy: str = "every_save"
    hub_always_push: bool = _ignored(
        False, "uploads are blocking, so every push completes before training goes on"
    )
    hub_revision: str | None = None
    load_best_model_at_end: bool = _ignored(False, _BEST)
    metric_for_best_model: str | None = _ignored(None, _BEST)
    greater_is_better: bool | None = _ignored(None, _BEST)
    ignore_data_skip: bool = _ignored(
        False, "resume restores the prompt sampler's position exactly; nothing is skipped"
    )
    restore_callback_states_from_checkpoint: bool = _ignored(
        False, "callbacks are plain objects without saved state"
    )
    full_determinism: bool = _ignored(
        False,
        "a run is already determined by seed: sampling keys are explicit and MLX's CPU and Metal kernels have no non-deterministic algorithms to switch off",
    )
    accelerator_config: dict | None = _ignored(None, _DIST)
    parallelism_config: dict | None = _ignored(None, _DIST)
    dataloader_drop_last: bool = _ignored(False, _LOADER)
    dataloader_num_workers: int = _ignored(0, _LOADER)
    dataloader_pin_memory: bool = _ignored(True, _LOADER)
    dataloader_persistent_workers: bool = _ignored(False, _LOADER)
    dataloader_prefetch_factor: int | None = _ignored(None, _LOADER)
    dataloader_multiprocessing_context: str | None = _ignored(None, _LOADER)
    dataloader_in_order: bool = _ignored(True, _LOADER)
    label_names: tuple[str, ...] | None = _ignored(None, _NOT_GRPO)
    train_sampling_strategy: str = _ignored("random", "prompts are shuffled by shuffle_dataset")
    length_column_name: str = _ignored("length", _NOT_GRPO)
    ddp_find_unused_parameters: bool | None = _ignored(None, _DIST)
    ddp_bucket_cap_mb: int | None = _ignored(None, _DIST)
    ddp_broadcast_buffers: bool | None = _ignored(None, _DIST)
    ddp_static_graph: bool | None = _ignored(None, _DIST)
    ddp_backend: str | None = _ignored(None, _DIST)
    ddp_timeout: int = _ignored(1800, _DIST)
    fsdp: str | None = _ignored(None, _DIST)
    fsdp_config: dict | None = _ignored(None, _DIST)
    deepspeed: str | None = _ignored(None, _DIST)
    debug: str = _ignored("", _CUDA)
    skip_memory_metrics: bool = _ignored(True, "memory metrics are not logged")
    local_rank: int = _ignored(-1, _DIST)
    # transformers 4.x names that TRL scripts still set
    evaluation_strategy: str | None = _ignored(
        None, "renamed eval_strategy in transformers; set that"
    )
    save_safetensors: bool = _ignored(True, "checkpoints are always safetensors")
    group_by_length: bool = _ignored(False, _NOT_GRPO)
    no_cuda: bool = _ignored(False, _CUDA)
    use_mps_device: bool = _ignored(False, "MLX picks Metal or the CPU itself")
    fp16_opt_level: str = _ignored("O1", _CUDA)
    half_precision_backend: str = _ignored("auto", _CUDA)
    include_tokens_per_second: bool = _ignored(False, "tokens_per_second is always logged")
    push_to_hub_model_id: str | None = _ignored(None, _HUB)
    push_to_hub_organization: str | None = _ignored(None, _HUB)
    push_to_hub_token: str | None = _ignored(None, _HUB)

    def __attrs_post_init__(self):
        _cap_alias(self)
        errors = _Errors()
        for check in (
            _check_batches, _check_generation, _check_loss, _check_optim, _check_flow,
            _check_kwargs_fields, _check_controllers, _check_misc, _check_rollout_quantization,
        ):  # fmt: skip
            check(self, errors)
        _check_finite(self, errors)
        _check_reliability(self, errors)
        # The loss fields (loss_type, beta, epsilon, temperature, ...) are checked once, by
        # LossConfig, the class that owns them; its problems are reported with the others.
        try:
            self.to_loss_config()
        except (ValueError, TypeError) as e:
            errors.items.extend(str(e).split("\n  - "))
        errors.raise_if_any()
        if self.disable_dropout:  # TRL: every dropout off, LoRA's included
            object.__setattr__(self, "lora_dropout", 0.0)
        _warn_ignored(self)

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

    def interval(self, name: str, total_steps: int) -> int | None:
        """``logging_steps`` / ``save_steps`` / ``eval_steps`` in optimizer steps for a
        ``total_steps`` run: a value below 1 is a fraction of it, rounded up (transformers);
        ``eval_steps=None`` falls back to ``logging_steps``."""
        value = getattr(self, name)
        if value is None and name == "eval_steps":
            value = self.logging_steps
        return int(value) if value >= 1 else max(1, math.ceil(total_steps * value))

    @property
    def compute_dtype(self) -> str | None:
        """``"bfloat16"`` / ``"float16"`` when ``bf16`` / ``fp16`` or ``model_init_kwargs``
        (``dtype`` / ``torch_dtype``) ask for one; ``None`` keeps the model's own dtype."""
        if self.bf16:
            return "bfloat16"
        if self.fp16:
            return "float16"
        kw = self.model_init_kwargs or {}
        dtype = kw.get("dtype", kw.get("torch_dtype"))
        return None if dtype in (None, "auto") else str(dtype).removeprefix("torch.")

    @property
    def sampling_overrides(self) -> dict:
        """The sampling knobs ``generation_kwargs`` sets (TRL passes them to ``generate``)."""
        kw = self.generation_kwargs or {}
        return {k: kw[k] for k in GENERATION_KEYS if k in kw}

    def warmup_steps_for(self, total_steps: int) -> int:
        """Warmup steps of a ``total_steps`` run, rounded as transformers rounds them."""
        return warmup_steps_for(self.warmup_steps, self.warmup_ratio, total_steps)

    # -- conversions -----------------------------------------------------------------------
    def to_loss_config(self):
        """The :class:`grpo.core.loss.LossConfig` for these settings."""
        # Fields GRPOConfig lacks (head_chunk_elements, picked by the trainer) keep defaults.
        names = [f.name for f in attrs.fields(LossConfig) if hasattr(self, f.name)]
        return LossConfig(**{name: getattr(self, name) for name in names})

    def train_step_kwargs(self) -> dict:
        """Keyword arguments of :func:`grpo.core.step.make_train_step` for these settings:
        ``accumulation``, ``max_grad_norm`` and the loss type's micro-batch ``weigh``."""
        from grpo.core.step import accumulation_weights_for

        return {
            "accumulation": self.gradient_accumulation_steps,
            "max_grad_norm": self.max_grad_norm,
            "weigh": accumulation_weights_for(self.loss_type),
        }

    def to_sampling_config(self, *, eos_token_ids=(), stop_sequences=()):
        """The :class:`grpo.core.sampling.SamplingConfig` for these settings."""
        from grpo.core.sampling import SamplingConfig

        knobs = {
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": 0.0 if self.min_p is None else self.min_p,
            "repetition_penalty": self.repetition_penalty,
            **self.sampling_overrides,
        }
        return SamplingConfig(
            group_size=self.num_generations,
            max_tokens=self.max_completion_length,
            temperature=self.temperature,
            eos_ids=tuple(eos_token_ids),
            stop_sequences=tuple(tuple(s) for s in stop_sequences),
            **knobs,
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
            isinstance(nge, int) and nge >= 1,
            f"num_generations_eval must be >= 1 or None, got num_generations_eval={nge!r}",
        )


def _check_generation(cfg: GRPOConfig, errors: _Errors):
    if cfg.max_prompt_length is not None:
        _positive_int(errors, cfg, "max_prompt_length")
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
    if cfg.rollout_slots is not None:
        _positive_int(errors, cfg, "rollout_slots")
    if cfg.max_tool_calling_iterations is not None:
        _positive_int(errors, cfg, "max_tool_calling_iterations", minimum=0)
    errors.check(
        cfg.tool_call_format in (None, "hermes", "llama3", "mistral"),
        "tool_call_format must be None (detect it from the chat template), 'hermes', 'llama3' "
        f"or 'mistral', got tool_call_format={cfg.tool_call_format!r}",
    )


def _one_of(errors: _Errors, cfg: GRPOConfig, name: str, allowed: tuple):
    value = getattr(cfg, name)
    errors.check(value in allowed, f"{name} must be one of {list(allowed)}, got {name}={value!r}")


def _check_loss(cfg: GRPOConfig, errors: _Errors):
    # The loss's own fields (loss_type, beta, epsilon, ...) are checked once, by LossConfig,
    # when __attrs_post_init__ builds it; these are the advantage and reward settings.
    _one_of(errors, cfg, "scale_rewards", SCALE_REWARDS)
    _one_of(errors, cfg, "multi_objective_aggregation", MULTI_OBJECTIVE_AGGREGATIONS)
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


def _interval(errors: _Errors, cfg: GRPOConfig, *names: str):
    # transformers: a count of steps, or a fraction of the run when below 1.
    for name in names:
        value = getattr(cfg, name)
        if value is None:
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        ok = ok and math.isfinite(value) and (value < 1 or float(value).is_integer())
        errors.check(
            ok,
            f"{name} must be a whole number of steps >= 1 or a fraction of the run in (0, 1), "
            f"got {name}={value!r}",
        )


def _check_flow(cfg: GRPOConfig, errors: _Errors):
    _one_of(errors, cfg, "logging_strategy", LOGGING_STRATEGIES)
    _one_of(errors, cfg, "save_strategy", SAVE_STRATEGIES)
    _one_of(errors, cfg, "eval_strategy", EVAL_STRATEGIES)
    _interval(errors, cfg, "logging_steps", "save_steps", "eval_steps")
    errors.check(
        not (cfg.bf16 and cfg.fp16),
        "bf16=True and fp16=True are exclusive: pick one compute dtype",
    )
    errors.check(
        cfg.data_seed is None or isinstance(cfg.data_seed, int),
        f"data_seed must be an integer or None, got data_seed={cfg.data_seed!r}",
    )


def _check_controllers(cfg: GRPOConfig, errors: _Errors):
    if cfg.sync_ref_model:
        errors.check(
            cfg.beta > 0,
            "sync_ref_model=True with beta=0.0: the reference model is not used, so there is "
            "nothing to synchronize; set beta > 0 or sync_ref_model=False",
        )
        errors.check(
            cfg.use_lora is not True,
            "sync_ref_model=True with LoRA (use_lora=True): the reference is the base model "
            "with adapters off, which a sync cannot move (TRL refuses it with PEFT too); use "
            "use_lora=False or sync_ref_model=False",
        )
    errors.check(
        0.0 <= cfg.ref_model_mixup_alpha <= 1.0,
        f"ref_model_mixup_alpha must be in [0, 1], got ref_model_mixup_alpha={cfg.ref_model_mixup_alpha!r}",
    )
    _positive_int(errors, cfg, "ref_model_sync_steps")
    lo, hi = cfg.entropy_coef_min, cfg.entropy_coef_max
    errors.check(
        all(math.isfinite(v) for v in (lo, hi, cfg.entropy_coef_delta, cfg.entropy_target))
        and 0 <= lo <= hi
        and cfg.entropy_coef_delta >= 0,
        "need finite 0 <= entropy_coef_min <= entropy_coef_max and entropy_coef_delta >= 0, got "
        f"entropy_coef_min={lo!r}, entropy_coef_max={hi!r}, "
        f"entropy_coef_delta={cfg.entropy_coef_delta!r}",
    )


def _check_kwargs_fields(cfg: GRPOConfig, errors: _Errors):
    for key, field in GENERATION_REFUSED.items():
        errors.check(
            key not in (cfg.generation_kwargs or {}),
            f"generation_kwargs={cfg.generation_kwargs!r}: set {field} instead of {key!r} "
            "there, so that the loss sees the value the sampler used",
        )
    dtype = cfg.compute_dtype
    errors.check(
        dtype is None or dtype in DTYPES,
        f"model_init_kwargs dtype must be one of {list(DTYPES)} or 'auto', got {dtype!r}",
    )


_WARNED: set[str] = set()


def ignored_settings(cfg: GRPOConfig) -> list[str]:
    """``"name=value (why)"`` for every setting of ``cfg`` that has no effect on MLX."""
    out = []
    for f in attrs.fields(type(cfg)):
        why = f.metadata.get("ignored")
        value = getattr(cfg, f.name)
        if why and value != f.default:
            out.append(f"{f.name}={value!r} ({why})")
    for name, known in (("model_init_kwargs", MODEL_INIT_KEYS), ("generation_kwargs",
                        GENERATION_KEYS)):  # fmt: skip
        extra = sorted(set(getattr(cfg, name) or {}) - set(known))
        if extra:
            out.append(f"{name} keys {extra} (no MLX counterpart; known: {list(known)})")
    return out


def trl_warnings(cfg: GRPOConfig) -> list[str]:
    """The warnings TRL's GRPOTrainer gives for these settings, in its words."""
    out = []
    if cfg.loss_type == "luspo" and cfg.importance_sampling_level != "sequence":
        out.append(
            "When using `'luspo'` loss, `importance_sampling_level` should be set to "
            "`'sequence'` to mirror the paper's setup."
        )
    if cfg.loss_type == "vespo" and cfg.importance_sampling_level != "token":
        out.append(
            "VESPO computes sequence-level importance weights internally. "
            "`importance_sampling_level` should be set to `'token'` (the default)."
        )
    if cfg.importance_sampling_level == "sequence" and cfg.loss_type in (
        "bnpo", "dr_grpo", "dapo", "cispo",
    ):  # fmt: skip
        out.append(
            f"When using `importance_sampling_level='sequence'`, the `'{cfg.loss_type}'` loss "
            "sums per-token contributions, which effectively weights each sequence by its "
            "completion length instead of optimizing the per-sequence objective. To reproduce "
            "the GSPO paper's setup, set `loss_type='grpo'`."
        )
    return out


def _warn_ignored(cfg: GRPOConfig) -> None:
    for message in trl_warnings(cfg):
        if message not in _WARNED:
            _WARNED.add(message)
            warnings.warn(message, UserWarning, stacklevel=4)
    items = ignored_settings(cfg)
    message = "GRPOConfig: ignored on MLX: " + "; ".join(items)
    if items and message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, UserWarning, stacklevel=4)


def _check_misc(cfg: GRPOConfig, errors: _Errors):
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
            cfg.use_lora is not False,
            f"quantize_bits={cfg.quantize_bits} (QLoRA) needs use_lora=True: quantized base "
            "weights cannot be fine-tuned directly",
        )
    errors.check(
        cfg.quantize_group_size in (32, 64, 128),
        f"quantize_group_size must be 32, 64 or 128, got quantize_group_size={cfg.quantize_group_size!r}",
    )
    if cfg.max_memory_gb is not None:
        errors.check(
            cfg.max_memory_gb > 0,
            f"max_memory_gb must be > 0 or None, got max_memory_gb={cfg.max_memory_gb!r}",
        )
    errors.check(
        isinstance(cfg.output_dir, str) and cfg.output_dir != "",
        f"output_dir must be a non-empty path, got output_dir={cfg.output_dir!r}",
    )


def _check_finite(cfg: GRPOConfig, errors: _Errors):
    # inf passes every ">= 0" check above (inf learning_rate, num_train_epochs=inf, ...)
    # but ruins the run; NaN fails them with a less direct message, so name both here.
    # LossConfig says the same of its own fields.
    owned_by_loss = {f.name for f in attrs.fields(LossConfig)}
    for field in attrs.fields(type(cfg)):
        if field.name in owned_by_loss:
            continue
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


def _cap_alias(cfg: GRPOConfig) -> None:
    # TRL 1.16 keeps the old name as a deprecated alias that overrides clip_max.
    if cfg.vllm_importance_sampling_cap is None:
        return
    warnings.warn(
        "The `vllm_importance_sampling_cap` argument is deprecated and will be removed in "
        "v2.0.0. Use `vllm_importance_sampling_clip_max` instead.",
        FutureWarning,
        stacklevel=4,
    )
    object.__setattr__(cfg, "vllm_importance_sampling_clip_max", cfg.vllm_importance_sampling_cap)


def _check_rollout_quantization(cfg: GRPOConfig, errors: _Errors):
    from grpo.core.importance import IS_MODES
    from grpo.core.quantize import GROUP_SIZES, ROLLOUT_BITS

    bits, group = cfg.rollout_quantization, cfg.rollout_quantization_group_size
    errors.check(
        bits is None or bits in ROLLOUT_BITS,
        f"rollout_quantization must be one of {list(ROLLOUT_BITS)} or None, got "
        f"rollout_quantization={bits!r}",
    )
    errors.check(
        group is None or group in GROUP_SIZES,
        f"rollout_quantization_group_size must be one of {list(GROUP_SIZES)} or None, got "
        f"rollout_quantization_group_size={group!r}",
    )
    errors.check(
        bits is None or cfg.quantize_bits is None,
        f"rollout_quantization={bits} with quantize_bits={cfg.quantize_bits}: the QLoRA base "
        "is already quantized, so its rollout already runs on quantized weights; unset one",
    )
    mode = cfg.vllm_importance_sampling_mode
    _one_of(errors, cfg, "vllm_importance_sampling_mode", IS_MODES)
    lo, hi = cfg.vllm_importance_sampling_clip_min, cfg.vllm_importance_sampling_clip_max
    errors.check(
        lo is None or hi is None or lo < hi,
        f"vllm_importance_sampling_clip_min ({lo}) must be less than "
        f"vllm_importance_sampling_clip_max ({hi}).",
    )
    errors.check(
        not (cfg.vllm_importance_sampling_correction and str(mode).endswith("truncate"))
        or lo is not None
        or hi is not None,
        "At least one of `vllm_importance_sampling_clip_min` or "
        "`vllm_importance_sampling_clip_max` must be set when `vllm_importance_sampling_mode` "
        "is a `*_truncate` mode.",
    )
    errors.check(
        not (bits and cfg.vllm_importance_sampling_correction and cfg.loss_type == "vespo")
        or mode in ("token_truncate", "token_mask"),
        "VESPO loss requires `vllm_importance_sampling_mode` to be either 'token_truncate' or "
        f"'token_mask'. Got: {mode}.",
    )
