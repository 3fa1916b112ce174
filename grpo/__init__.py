"""mlx-grpo: Group Relative Policy Optimization on Apple MLX.

The public API is re-exported here (optax style) and imported lazily, so ``import grpo``
stays cheap and loads the fast BLAS before anything imports ``mlx.core``.
"""

import importlib

from grpo._blas import STATUS as _BLAS_STATUS
from grpo._blas import load_fast_blas as _load_fast_blas

_load_fast_blas()  # must run before the first `import mlx.core`

__version__ = "0.1.0"

_EXPORTS = {
    "grpo.core.numerics": ["safe_div", "masked_mean", "masked_sum", "nanmean", "nanstd"],
    "grpo.core.logprobs": ["token_logprobs", "token_logprobs_and_entropy"],
    "grpo.core.advantages": ["advantages", "make_advantages", "Advantages", "weighted_rewards"],
    "grpo.core.surrogates": ["LOSS_TYPES", "kl_k3"],
    "grpo.core.loss": ["LossConfig", "policy_loss", "make_policy_loss", "grpo_loss"],
    "grpo.core.forward": ["completion_logprobs", "lora_reference_params"],
    "grpo.core.batch": ["LossBatch", "pack"],
    "grpo.core.pipeline": ["pad_rollout", "loss_batch", "per_micro", "micro_batches"],
    "grpo.core.sampling": ["SamplingConfig"],
    "grpo.core.rollout": ["rollout", "Rollout", "Sampler"],
    "grpo.core.multiturn": ["multiturn_rollout", "MultiTurnRollout", "Turn"],
    "grpo.core.score": [
        "score", "Scores", "RewardContext", "check_reward_fns", "reward_weights",
        "reward_metrics",
    ],
    "grpo.core.state": ["TrainState", "init_state"],
    "grpo.core.step": ["make_train_step", "make_grad_step", "apply_update", "bucket_length"],
    "grpo.core.optim": [
        "make_optimizer", "make_schedule", "build_optimizer", "decay_parameter_names",
        "lr_factor",
    ],
    "grpo.rewards": [
        "resolve_reward_funcs", "register_reward", "REWARD_FUNCS", "answer_match", "think_format",
        "length_penalty", "exact_match",
    ],
    "grpo.tools": [
        "tool_schema", "parse_tool_calls", "run_tool_calls", "detect_format", "ToolCall",
        "MalformedCall", "ToolResult",
    ],
    "grpo.agent": ["ToolLoop", "AgentRollout"],
    "grpo.environments": ["Environments"],
    "grpo.io.data": [
        "load_prompts", "PromptSampler", "PromptBatch", "PromptEncoder", "PromptTooLongError",
        "render_prompt", "encode_prompt", "stop_token_sequences", "decode_completions",
        "decode_rollout", "eos_token_ids",
    ],
    "grpo.io.model": ["load_model", "prepare_policy"],
    "grpo.io.fast_attention": ["install_fast_kernels"],
    "grpo.io.checkpoint": ["save_checkpoint", "load_checkpoint"],
    "grpo.io.tiny": ["build_tiny_model", "build_tiny_reward_model"],
    "grpo.io.reward_model": ["RewardModel", "RewardModelReward", "load_reward_model"],
    "grpo.io.signals": ["TrainingInterrupted", "InterruptGuard"],
    "grpo.io.dist": ["init_distributed", "is_main_process", "main_only", "fail_fast"],
    "grpo.tasks": ["make_dataset", "TASKS", "get_task"],
    "grpo.warmstart": ["warm_start", "WarmStartConfig"],
    "grpo.default_job": ["ensure_model"],
    "grpo.io.plot": ["plot_reward_curve"],
    "grpo.config": ["GRPOConfig"],
    "grpo.errors": [
        "GRPOError", "ConfigError", "OutputDirInUse", "DataError", "RewardError",
        "CheckpointError", "NumericsError",
    ],
    "grpo.trainer": ["GRPOTrainer", "NonFiniteError"],
}  # fmt: skip
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE) + ["blas_info", "__version__"]


def __getattr__(name: str):
    if name == "distributed":  # the module of pure data-parallel helpers
        return importlib.import_module("grpo.core.distributed")
    if name == "losses":  # the loss pieces, to recompose
        return importlib.import_module("grpo.losses")
    if name not in _WHERE:
        raise AttributeError(f"module 'grpo' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__


def blas_info() -> dict:
    """Which BLAS mlx uses in this process: ``{"backend", "library", "reason"}``."""
    return dict(_BLAS_STATUS)
