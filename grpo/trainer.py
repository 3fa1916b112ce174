"""``GRPOTrainer``: TRL's trainer API over the pure, compiled GRPO step.

One *generation batch* (``GRPOConfig.resolved_generation_batch_size`` rows) goes through

1. sample ``B`` prompts (:class:`grpo.io.data.PromptSampler`), render and tokenise them;
2. roll out ``G`` completions per prompt (:func:`grpo.core.rollout.rollout`), from the
   policy or, with ``rollout_quantization``, from its quantized copy
   (:mod:`grpo.core.quantize`); the sampled token ids are kept as they are (never
   re-encoded from text);
3. decode, score every reward function, compute group-relative advantages;
4. pad to length buckets, pack ``prompt ++ completion``; reference log-probs once per
   generation batch (``beta > 0``), old log-probs once when the policy moves before the
   batch is used up (the rollout's own sampling log-probs when sampling is
   temperature-only), always from the float policy with ``rollout_quantization``, whose
   mismatch TRL's importance weight then corrects (:func:`grpo.core.pipeline.correct_sampler`);
5. ``num_iterations`` passes over ``steps_per_generation`` micro-batches, every
   ``gradient_accumulation_steps`` of them one compiled optimizer step.

Checkpoints are written at generation-batch boundaries (the first boundary at or after a
multiple of ``save_steps``, and at the end), so resuming replays the identical trajectory.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import numpy as np

from grpo import agentic
from grpo.callbacks import TrainerControl, TrainerState, dispatch
from grpo.config import GRPOConfig
from grpo.core import distributed as D
from grpo.core.advantages import make_advantages
from grpo.core.batch import LossBatch
from grpo.core.continuous import continuous_sampler
from grpo.core.controllers import (
    applied_entropy_coef,
    sync_reference,
    update_entropy_coef,
    window_entropy,
)
from grpo.core.forward import completion_logprobs
from grpo.core.importance import sampler_metrics
from grpo.core.loss import grpo_loss
from grpo.core.memory import GIB, Fit, refusal
from grpo.core.memory import choose as choose_fit
from grpo.core.optim import decay_parameter_names, make_optimizer
from grpo.core.pipeline import (
    correct_sampler,
    loss_batch,
    micro_batches,
    pad_right,
    pad_rollout,
    per_micro,
)
from grpo.core.quantize import quantized_copy, quantized_params, rollout_group_size
from grpo.core.rollout import Rollout, rollout
from grpo.core.score import (
    check_reward_fns,
    reward_metrics,
    score,
)
from grpo.core.state import TrainState, init_state
from grpo.core.step import bucket_length, make_train_step
from grpo.errors import CheckpointError, ConfigError, NumericsError
from grpo.evaluate import evaluate_rewards, repeat_rows
from grpo.flow import Flow
from grpo.io import checkpoint as ckpt
from grpo.io import faults, runlock, runs
from grpo.io.data import (
    PromptBatch,
    PromptEncoder,
    PromptSampler,
    PromptTooLongError,
    check_prompts,
    column_names,
    decode_rollout,
    eos_token_ids,
    load_prompts,
)
from grpo.io.dist import (
    assert_in_sync,
    barrier,
    fail_fast,
    gather_json,
    init_distributed,
    is_main_process,
    main_only,
)
from grpo.io.hub import HubRepo, base_model_id, model_card, tracker_urls
from grpo.io.logging import MetricsWriter, Progress, average_metrics, print_completions
from grpo.io.memory import measure as measure_memory
from grpo.io.memory import tree_bytes
from grpo.io.model import Policy, load_model, lora_layers, prepare_policy
from grpo.io.report import Reporters, resolve_report_to
from grpo.io.reward_model import RewardModelReward
from grpo.io.signals import InterruptGuard, SignalReceived, TrainingInterrupted
from grpo.io.watch import RewardWatch
from grpo.peft_compat import resolve_lora
from grpo.rewards import resolve_reward_funcs

# Data parallelism under mlx.launch (docs/distributed.md) is supported (make_advantages takes
# the group); tests/test_distributed.py reads this flag.
DATA_PARALLEL = True
# Present only when a rank has terminated completions; NaN elsewhere when all-reducing.
_OPTIONAL_METRICS = (
    "completions/mean_terminated_length",
    "completions/min_terminated_length",
    "completions/max_terminated_length",
)


class NonFiniteError(NumericsError):
    """A loss or gradient became NaN/inf; the weights were not updated."""


def _temperature_only(cfg: GRPOConfig) -> bool:
    return cfg.top_p == 1.0 and cfg.top_k == 0 and not cfg.min_p and cfg.repetition_penalty == 1.0


def _completion_metrics(roll: Rollout, tool_mask: mx.array | None = None) -> dict[str, float]:
    # With tools, lengths count only the tokens the model sampled (TRL).
    lengths = np.array(roll.completion_lengths if tool_mask is None else tool_mask.sum(-1))
    truncated = np.array(roll.is_truncated)
    terminated = lengths[~truncated]
    out = {
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": float(truncated.mean()),
    }
    if terminated.size:
        out["completions/mean_terminated_length"] = float(terminated.mean())
        out["completions/min_terminated_length"] = float(terminated.min())
        out["completions/max_terminated_length"] = float(terminated.max())
    return out


@attrs.frozen
class Generation:
    """One scored generation batch, split into optimizer-step windows."""

    windows: list  # [LossBatch] each with a leading K axis
    metrics: dict  # reward / completion metrics of the batch
    num_tokens: int  # prompt + completion tokens
    table: tuple  # (prompts, completions, {name: rewards}, advantages, {column: log_extra values})


REF_MODEL = "ref_model.safetensors"


def _load_eval(eval_dataset: Any) -> Any:
    # A dict of eval sets (a DatasetDict included) is evaluated set by set, as in TRL.
    if isinstance(eval_dataset, dict):
        return {name: load_prompts(part) for name, part in eval_dataset.items()}
    return load_prompts(eval_dataset)


def _quantize_bits(quantization_config: Any) -> int:
    # A transformers BitsAndBytesConfig (or an object with its flags): QLoRA on mlx's own
    # affine quantization of the same width.
    if getattr(quantization_config, "load_in_4bit", False):
        return 4
    if getattr(quantization_config, "load_in_8bit", False):
        return 8
    raise ConfigError(
        "quantization_config must set load_in_4bit or load_in_8bit (mlx quantizes the base to "
        f"that width); got {quantization_config!r}"
    )


def _check_optimizers(optimizers: Any) -> Any:
    # TRL's (optimizer, lr_scheduler) pair: an mlx.optimizers optimizer (its own learning
    # rate or schedule included) replaces the one built from the config.
    import mlx.optimizers as optim

    if not isinstance(optimizers, (tuple, list)) or len(optimizers) != 2:
        raise ConfigError(
            f"optimizers must be a pair (optimizer, lr_scheduler), got {optimizers!r}"
        )
    optimizer, scheduler = optimizers
    if optimizer is not None and not isinstance(optimizer, optim.Optimizer):
        raise ConfigError(
            f"optimizers[0] must be an mlx.optimizers.Optimizer, got {type(optimizer).__name__} "
            "(a PyTorch optimizer cannot update MLX arrays; pass None to use optim=...)"
        )
    if scheduler is not None:
        raise ConfigError(
            "optimizers[1] (a PyTorch LR scheduler) is not supported: give the mlx optimizer "
            "a schedule (learning_rate=callable) or set lr_scheduler_type"
        )
    return optimizer


class GRPOTrainer:
    """Group Relative Policy Optimization with TRL's interface, on MLX.

    Args:
        model: an mlx-lm model, or a local path / hub id loaded with ``mlx_lm.load``.
        reward_funcs: a reward callable (TRL signature ``f(prompts, completions,
            completion_ids, **columns) -> list[float | None]``), a built-in name, or a list
            of these; may be ``None`` when an environment's ``get_reward`` scores the rows.
        args: a :class:`GRPOConfig` (default ``GRPOConfig()``).
        train_dataset: a ``datasets.Dataset``, list of dicts, file or hub id with a
            ``prompt`` column (text or chat messages); other columns reach the rewards.
        eval_dataset: the same, for :meth:`evaluate`.
        processing_class: the tokenizer (required when ``model`` is a module; an mlx-lm
            ``TokenizerWrapper`` or a Hugging Face tokenizer).
        callbacks: objects with any of ``on_train_begin(trainer)``,
            ``on_step_end(trainer, step, metrics)``, ``on_log(trainer, logs)``,
            ``on_save(trainer, path)``, ``on_evaluate(trainer, metrics)``,
            ``on_train_end(trainer)`` (not transformers ``TrainerCallback`` objects). Setting
            ``trainer.should_stop = True`` ends training at the next generation boundary.
        tools: callables (sync or async, with type hints and a docstring) the model may call
            during generation; rendered by the chat template, parsed, run, and their results
            appended with ``tool_mask = 0`` (never trained on). See docs/tools.md.
        rollout_func: ``rollout_func(prompts, trainer) -> dict`` replacing the built-in
            generation (keys ``prompt_ids``, ``completion_ids``, ``logprobs``; optional
            ``tool_mask`` / ``env_mask``; other keys reach the rewards). See :mod:`grpo.agentic`.
        environment_factory: an environment class (or ``{name: class}`` chosen by an
            ``environment`` column): one instance per rollout row, ``reset(**row)``, public
            methods as tools, optional ``get_reward()``. See :mod:`grpo.environments`.
        group: ``mx.distributed`` group for data parallelism; ``"auto"`` (default) joins the
            job ``mlx.launch`` started (:func:`grpo.io.dist.init_distributed`), ``None``
            forces one process. Each rank samples its own prompt shard with its own fold of
            the shared key; gradients are averaged in the step, metrics all-reduced, and only
            rank 0 writes logs and checkpoints (docs/distributed.md).
    """

    def __init__(
        self,
        model: Any,
        reward_funcs: Any = None,
        args: GRPOConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        reward_processing_classes: Any = None,
        callbacks: Sequence[Any] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
        tools: Sequence[Any] | None = None,
        rollout_func: Any = None,
        environment_factory: Any = None,
        *,
        group: Any = "auto",
    ):
        self.args = args = GRPOConfig() if args is None else args
        if not isinstance(args, GRPOConfig):
            raise TypeError(f"args must be a GRPOConfig, got {type(args).__name__}")
        if quantization_config is not None:
            self.args = args = attrs.evolve(args, quantize_bits=_quantize_bits(quantization_config))
        # Everything checkable without the model is checked before loading it.
        self._check_output_dir()
        if reward_funcs is not None and reward_funcs != []:
            reward_funcs = resolve_reward_funcs(
                reward_funcs,
                reward_processing_classes,
                chat_template_kwargs=args.chat_template_kwargs,
                trust_remote_code=args.trust_remote_code,
            )
        self._setup_agent(reward_funcs, tools, rollout_func, environment_factory)
        if args.rollout_quantization is not None and rollout_func is not None:
            raise ConfigError(
                f"rollout_quantization={args.rollout_quantization} with a rollout_func: the "
                "rollout_func samples on its own, there is no rollout to quantize; unset one"
            )
        train_dataset = agentic.placeholder_dataset(self, train_dataset)
        if train_dataset is None:
            raise ConfigError("train_dataset is required")
        self.reward_processing_classes = [
            f.tokenizer if isinstance(f, RewardModelReward) else None for f in self.reward_funcs
        ]
        self.train_dataset = load_prompts(train_dataset)
        if self.rollout_func is None:  # a rollout_func may add the columns rewards read
            columns = column_names(self.train_dataset) or []
            check_reward_fns(self.reward_funcs, columns + agentic.extra_columns(self))
        self.eval_dataset = None if eval_dataset is None else _load_eval(eval_dataset)
        self._report_to = resolve_report_to(args.report_to)  # unknown names fail here
        self._hub = HubRepo(args)  # checks hub_strategy; the repository is created on first push
        if self.eval_dataset is None and (args.eval_strategy != "no" or args.eval_on_start):
            raise ConfigError(
                f"eval_strategy={args.eval_strategy!r}, eval_on_start={args.eval_on_start} "
                "need an eval_dataset; pass eval_dataset=... or set eval_strategy='no'"
            )
        self.model, self.processing_class, self.base = self._load(model, processing_class)
        self.args = args = resolve_lora(
            args, peft_config, self.model, has_lora=bool(lora_layers(self.model))
        )
        if args.sync_ref_model and args.use_lora:
            raise ConfigError(
                "sync_ref_model=True with LoRA (a peft_config or adapters): the reference is "
                "the base model with adapters off, which a sync cannot move; train every "
                "weight or set sync_ref_model=False"
            )
        self._custom_optimizer = _check_optimizers(optimizers)
        self.callbacks = list(callbacks or [])
        self._join(group)
        self.encoder = self._make_encoder()
        self._check_prompts()
        self._tool_loop = agentic.make_tool_loop(self)
        self.sampler = self._make_sampler()
        self._init_training()
        self.num_tokens = 0
        self._state_view = TrainerState(
            lambda: self.train_state,
            max_steps=self.max_steps,
            num_train_epochs=args.num_train_epochs,
            logging_steps=self.flow.logging_steps,
            eval_steps=self.flow.eval_steps,
            save_steps=self.flow.save_steps,
            train_batch_size=args.per_device_train_batch_size,
            max_completion_length=args.max_completion_length,
            is_world_process_zero=self.rank == 0,
            is_local_process_zero=self.rank == 0,
        )
        self.log_history: list[dict] = self._state_view.log_history
        self.control = TrainerControl()
        # A callback may set this; training stops at the next generation-batch boundary
        # (after any checkpoint due there), like transformers' control.should_training_stop.
        self.should_stop = False
        self.run_id: str | None = None  # set by train(); recorded in every checkpoint
        self.training_started = False  # train() got past its checks and began step 1
        self._window: list[dict] = []  # per-step metrics since the last metrics.jsonl record
        self._hooks: list = []  # test-only callbacks (grpo.io.faults)
        self._watch = RewardWatch()  # warns about rewards that cannot teach anything

    # -- setup ---------------------------------------------------------------------------

    def _load(self, model, processing_class):
        if isinstance(model, (str, Path)):
            loaded, tokenizer = load_model(
                str(model), trust_remote_code=self.args.trust_remote_code
            )
            return self._cast(loaded), processing_class or tokenizer, str(model)
        if processing_class is None:
            raise ConfigError(
                "processing_class (the tokenizer) is required when model is an mlx module; "
                "pass the tokenizer returned by mlx_lm.load, or pass the model path instead"
            )
        return self._cast(model), processing_class, None

    def _cast(self, model):
        # bf16 / fp16 / model_init_kwargs dtype: the floating weights compute in that dtype
        # (quantized weights stay packed; the optimizer still updates in float32).
        if self.args.compute_dtype is not None:
            model.set_dtype(getattr(mx, self.args.compute_dtype))
        return model

    def _setup_agent(self, reward_funcs, tools, rollout_func, environment_factory) -> None:
        """Tools, environments and rollout_func (TRL's agentic arguments); see grpo.agentic."""
        agentic.setup(self, reward_funcs, tools, rollout_func, environment_factory)

    def _join(self, group: Any) -> None:
        self.group = init_distributed() if group == "auto" else group
        self.rank, self.world_size = D.rank(self.group), D.world_size(self.group)

    @property
    def context_length(self) -> int | None:
        """The model's context (``max_position_embeddings``), if it declares one."""
        return getattr(getattr(self.model, "args", None), "max_position_embeddings", None)

    def _make_encoder(self) -> PromptEncoder:
        # max_prompt_length=None asks for no truncation (TRL 1.16), so a prompt that does not
        # fit the context is an error, never silently cut.
        return PromptEncoder(
            self.processing_class,
            max_completion_length=self.args.max_completion_length,
            max_prompt_length=self.args.max_prompt_length,
            context_length=self.context_length,
            overflow="truncate" if self.args.max_prompt_length is not None else "error",
            template_kwargs=self.args.chat_template_kwargs or {},
        )

    def _check_prompts(self) -> None:
        """Every prompt non-empty and (without ``max_prompt_length``) within the context."""
        encoder = self.encoder if self.encoder.overflow == "error" else None
        try:
            check_prompts(self.train_dataset, encoder=encoder)
            if encoder is None and hasattr(self.train_dataset, "__len__"):  # not a stream
                # Rows share one format, so rendering the first shows now whether the
                # tokenizer can render any (e.g. a chat template for conversations).
                self.encoder(self.train_dataset[0]["prompt"], row=0)
        except PromptTooLongError as e:
            raise PromptTooLongError(
                f"train_dataset: {e.args[0].split(' (min(')[0]} = the model context "
                f"(max_position_embeddings={self.context_length}) minus "
                f"max_completion_length={self.args.max_completion_length}; shorten the prompt, "
                "or set max_prompt_length to keep only each prompt's last tokens"
            ) from e

    def _make_sampler(self) -> PromptSampler:
        return PromptSampler(
            self.train_dataset,
            batch_size=self.args.prompts_per_generation,
            group_size=self.args.num_generations,
            seed=self.args.seed if self.args.data_seed is None else self.args.data_seed,
            shuffle=self.args.shuffle_dataset,
            encoder=self.encoder,
            rank=self.rank,
            world_size=self.world_size,
        )

    def _init_training(self) -> None:
        args = self.args
        # Every rank holds the same key (so one checkpointed key serves all); rollouts draw
        # from a per-rank fold of it (_generate).
        key_model, key_run = mx.random.split(mx.random.key(args.seed))
        self.policy: Policy = prepare_policy(self.model, args, key=key_model, base=self.base)
        assert_in_sync(self.policy.params, group=self.group, what="initial parameters")
        self._make_rollout_copy()
        fit = self._fit_memory()  # may shrink the micro-batch: read self.args after this
        args = self.args
        self.max_steps = self._total_steps()
        per_epoch = self.sampler.steps_per_epoch
        self.flow = Flow.from_config(
            args,
            max_steps=self.max_steps,
            epoch_steps=None
            if per_epoch is None
            else per_epoch * args.optimizer_steps_per_generation,
        )
        self.optimizer = (
            make_optimizer(
                args, total_steps=self.max_steps, decay_names=decay_parameter_names(self.model)
            )
            if self._custom_optimizer is None
            else self._custom_optimizer
        )
        self.train_state: TrainState = init_state(self.policy.params, self.optimizer, key=key_run)
        # From here on the state holds the trainable parameters; the policy keeping the
        # initial tree would pin a stale copy of every trained weight for the whole run.
        self.policy = attrs.evolve(self.policy, params=None)
        self.sampling = args.to_sampling_config(eos_token_ids=eos_token_ids(self.processing_class))
        self.loss_config = args.to_loss_config()
        if fit is not None:
            self.loss_config = attrs.evolve(
                self.loss_config, head_chunk_elements=fit.chunk_elements
            )
        self._advantages = self._make_advantages(args.num_generations)
        self._train_step = self._build_step()
        # The adaptive entropy controller (TRL): no bonus until a first measurement.
        self.entropy_coef, self._last_world_entropy = args.entropy_coef, math.inf
        self._logprobs = mx.compile(self._logprobs_fn)

    def _fit_memory(self) -> Fit | None:
        """``max_memory_gb``: measure the model's update step, then pick the largest
        micro-batch (gradient accumulation making up the rest, same update) and LM-head
        chunk that fit; refuse with what the run needs when none does."""
        args = self.args
        if args.max_memory_gb is None:
            return None
        T = args.max_completion_length
        P = args.max_prompt_length or max(1, (self.context_length or T + 512) - T)
        P = bucket_length(P, multiple=args.pad_to_multiple_of)
        self.model.train()
        vocab = getattr(getattr(self.model, "args", None), "vocab_size", 100)
        est = measure_memory(
            self.model, self.policy.params, args.to_loss_config(),
            prompt_length=P, completion_length=T, vocab=vocab,
            resident_bytes=tree_bytes(self.model.parameters()) + tree_bytes(self.policy.ref_params)
            + tree_bytes(None if self.rollout_model is None else self.rollout_model.parameters()),
        )  # fmt: skip
        budget = args.max_memory_gb * GIB
        fit = choose_fit(est, budget=budget, rows=args.per_device_train_batch_size)
        if fit is None:
            raise ConfigError(
                refusal(est, budget=budget, checkpointing=args.gradient_checkpointing)
            )
        self.memory_estimate, f = est, args.per_device_train_batch_size // fit.rows
        spg = args.steps_per_generation
        self.args = attrs.evolve(
            args,
            per_device_train_batch_size=fit.rows,
            gradient_accumulation_steps=args.gradient_accumulation_steps * f,
            steps_per_generation=None if spg is None else spg * f,
        )
        return fit

    def _make_rollout_copy(self) -> None:
        """``rollout_quantization``: the quantized copy of the policy the rollout samples
        from (``self.rollout_model``, ``None`` when off) and its group size."""
        bits = self.args.rollout_quantization
        self.rollout_model, self.rollout_group_size = None, None
        if bits is None:
            return
        if mx.default_device() == mx.cpu:
            warnings.warn(
                "rollout_quantization on MLX's CPU backend: the quantized copy sampled 4-20x "
                "slower than the float policy in our CPU measurements (docs/benchmarks.md, "
                "'Quantized rollout'); it is meant for Metal, where quantized matmuls are fast",
                UserWarning,
                stacklevel=3,
            )
        try:
            group = rollout_group_size(self.model, self.args.rollout_quantization_group_size)
            self.rollout_model = quantized_copy(self.model, bits=bits, group_size=group)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.rollout_group_size = group

    def rollout_policy(self) -> tuple[Any, Any]:
        """``(params, model)`` the rollout samples from: the policy itself, or (with
        ``rollout_quantization``) its quantized copy with the current weights, LoRA merged
        (quantized anew at each call, i.e. once per generation batch)."""
        if self.rollout_model is None:
            return self.train_state.params, self.model
        params = quantized_params(
            self.model,
            self.train_state.params,
            bits=self.args.rollout_quantization,
            group_size=self.rollout_group_size,
        )
        # The copy holds the new weights from now on, so the previous ones can be freed.
        self.rollout_model.update(params)
        return params, self.rollout_model

    def _make_advantages(self, group_size: int):
        return make_advantages(
            group_size=group_size,
            scale=self.args.scale_rewards,
            aggregation=self.args.multi_objective_aggregation,
            group=self.group,
        )

    def _check_output_dir(self):
        out = Path(self.args.output_dir)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output_dir={str(out)!r} exists and is a file, not a directory")
        for parent in out.absolute().parents:
            if parent.exists():
                if not parent.is_dir():
                    raise ConfigError(
                        f"output_dir={str(out)!r} cannot be created: {str(parent)!r} is a file"
                    )
                break

    def _total_steps(self) -> int:
        if self.args.max_steps > 0:
            return self.args.max_steps
        per_epoch = self.sampler.steps_per_epoch
        if per_epoch is None:
            raise ConfigError(
                "a streaming train_dataset needs max_steps > 0 (its length is unknown)"
            )
        steps = per_epoch * self.args.num_train_epochs * self.args.optimizer_steps_per_generation
        return max(1, math.ceil(steps))

    def _loss_fn(self, params, batch: LossBatch):
        return grpo_loss(params, None, batch, model=self.model, cfg=self.loss_config)

    def _logprobs_fn(self, params, batch: LossBatch):
        return completion_logprobs(
            self.model,
            params,
            batch,
            temperature=self.args.temperature,
            prompt_share=self.loss_config.prompt_share,
            max_chunk_elements=self.loss_config.head_chunk_elements,
        )

    def _build_step(self):
        # nn.Dropout draws from mlx's global RNG, which a compiled function must list as
        # state (the mlx-lm idiom); this keeps the masks fresh at every step.
        return make_train_step(
            self._loss_fn,
            self.optimizer,
            **self.args.train_step_kwargs(),
            group=self.group,
            random_state=self.args.lora_dropout != 0,
        )

    # -- properties ------------------------------------------------------------------------

    @property
    def global_step(self) -> int:
        return int(self.train_state.step.item())

    @property
    def reward_names(self) -> tuple[str, ...]:
        from grpo.core.score import reward_names

        return reward_names(self.reward_funcs)

    # -- generation ------------------------------------------------------------------------

    def _decode(self, roll: Rollout) -> tuple[list[list[int]], list[str]]:
        return decode_rollout(roll, self.processing_class)

    def _pad(self, roll: Rollout) -> Rollout:
        return pad_rollout(
            roll,
            multiple=self.args.pad_to_multiple_of,
            max_completion=self.args.max_completion_length,
        )

    def _score(self, prompts, roll, columns, *, step: int, completions=None):
        completion_ids, texts = self._decode(roll)
        if completions is not None:
            texts = completions
        # TRL hands reward functions the trainer's own TrainerState (global_step, epoch,
        # max_steps, log_history, ...); max_completion_length rides along for length rewards.
        context = self.state
        scores = score(
            prompts,
            texts,
            completion_ids,
            self.reward_funcs,
            columns=columns,
            context=context,
            timeout=self.args.reward_timeout,
        )
        adv = self._advantages(scores.rewards_per_func, self.reward_weights)
        metrics = reward_metrics(
            scores.rewards_per_func, self.reward_weights, adv.is_std_zero, names=scores.names
        )
        metrics.update({k: float(np.mean(v)) for k, v in scores.metrics.items()})
        per_func = np.array(scores.rewards_per_func)
        self._watch.see(
            per_func,
            frac_zero_std=metrics["frac_reward_zero_std"],
            steps=self.args.optimizer_steps_per_generation,
            prompts=prompts,
            completions=texts,
            columns=columns,
        )
        table = (
            list(prompts),
            [agentic.display(t) for t in texts],
            {n: per_func[:, f].tolist() for f, n in enumerate(scores.names)},
            np.array(adv.advantages).tolist(),
            dict(scores.extra),
        )
        return adv, metrics, table

    def _per_micro(self, fn, params, batch: LossBatch) -> mx.array:
        n = self.args.per_device_train_batch_size
        # Reference / old log-probs are dropout-free (eval mode), the step runs in train mode;
        # each compiled function is traced once in its mode.
        self.model.eval()
        out = per_micro(fn, params, batch, micro=n)
        mx.eval(out)
        self.model.train()
        self.model.update(self.train_state.params)  # drop the trace's placeholders from the model
        return out

    def _loss_batch(
        self,
        roll: Rollout,
        advantages: mx.array,
        *,
        tool_mask: mx.array | None = None,
        sampled_logprobs: bool = True,
        quantized: bool = False,
    ) -> LossBatch:
        batch = loss_batch(
            roll,
            advantages,
            tool_mask=tool_mask,
            mask_truncated=self.args.mask_truncated_completions,
        )
        if self.policy.ref_params is not None:
            batch = batch._replace(
                ref_logprobs=self._per_micro(self._logprobs, self.policy.ref_params, batch)
            )
        if quantized:
            return self._correct_sampler(batch, roll.logprobs)
        if self.args.optimizer_steps_per_generation > 1:
            old = (
                roll.logprobs
                if _temperature_only(self.args) and sampled_logprobs
                else self._per_micro(self._logprobs, self.train_state.params, batch)
            )
            batch = batch._replace(old_logprobs=old)
        return batch

    def _correct_sampler(self, batch: LossBatch, sampling_logprobs: mx.array) -> LossBatch:
        # The quantized copy sampled: old log-probs always from the float policy (TRL
        # computes them whenever vLLM's correction is on), then TRL's weight.
        old = self._per_micro(self._logprobs, self.train_state.params, batch)
        args = self.args
        return correct_sampler(
            batch._replace(old_logprobs=old),
            sampling_logprobs,
            correction=args.vllm_importance_sampling_correction,
            mode=args.vllm_importance_sampling_mode,
            clip_min=args.vllm_importance_sampling_clip_min,
            clip_max=args.vllm_importance_sampling_clip_max,
        )

    def _generate(self, key: mx.array) -> Generation:
        prompts = next(self.sampler)
        key = D.rank_key(key, rank=self.rank)
        self.generation_key = key  # what a rollout_func samples with, for reproducible runs
        if self.rollout_func is not None or self._tool_loop is not None:
            out = agentic.generate(self, prompts, key)
            roll, tool_mask, prompt_list, columns = (
                out.rollout,
                out.tool_mask,
                out.prompts,
                out.columns,
            )
        else:
            params, model = self.rollout_policy()
            rows = len(prompts.prompt_ids) * self.sampling.group_size
            sample = continuous_sampler(model, rows, slots=self.args.rollout_slots) or rollout
            roll = sample(params, key, prompts.prompt_ids, model=model, sampling=self.sampling)
            out, tool_mask, prompt_list, columns = None, None, prompts.prompts, prompts.columns
        adv, metrics, table = self._score(
            prompt_list,
            roll,
            columns,
            step=self.global_step,
            completions=None if out is None else out.completions,
        )
        metrics.update(_completion_metrics(roll, tool_mask))
        if out is not None:
            metrics.update(out.metrics)
        roll = self._pad(roll)
        if tool_mask is not None:
            tool_mask = pad_right(tool_mask, roll.completion_ids.shape[1], 0.0)
        batch = self._loss_batch(
            roll,
            adv.advantages,
            tool_mask=tool_mask,
            sampled_logprobs=out is None or out.sampled_logprobs,
            quantized=self.rollout_model is not None,
        )
        if batch.sampler_ratio is not None:  # TRL logs these only while it corrects
            mismatch = sampler_metrics(
                batch.old_logprobs,
                batch.sampling_logprobs,
                batch.completion_mask,
                batch.sampler_ratio,
                sequence=self.args.vllm_importance_sampling_mode.startswith("sequence"),
            )
            metrics.update({k: float(v.item()) for k, v in mismatch.items()})
        metrics = self._all_reduce(metrics)
        lengths = roll.completion_lengths if tool_mask is None else tool_mask.sum(-1)
        tokens = int(np.array(roll.prompt_lengths).sum() + np.array(lengths).sum())
        if D.is_distributed(self.group):
            tokens = int(D.all_sum(mx.array(tokens), group=self.group).item())
        windows = micro_batches(
            batch,
            micro=self.args.per_device_train_batch_size,
            K=self.args.gradient_accumulation_steps,
        )
        return Generation(windows, metrics, tokens, table)

    # -- optimisation ----------------------------------------------------------------------

    def _step(self, window: LossBatch) -> dict[str, float]:
        self.model.train()
        if self.args.use_adaptive_entropy:
            coef = applied_entropy_coef(
                self.entropy_coef, self._last_world_entropy, target=self.args.entropy_target
            )
            K = window.completion_mask.shape[0]
            window = window._replace(entropy_coef=mx.full((K,), coef, mx.float32))
        state, metrics = self._train_step(self.train_state, window)
        metrics = D.reduce_metrics(metrics, group=self.group)
        # The loss and the gradients first: the update stays unevaluated until they are
        # known to be finite, and is never computed when they are not.
        mx.eval(metrics)
        values = {k: float(v.item()) for k, v in metrics.items()}
        step = self.global_step + 1
        for name in ("loss", "grad_norm"):
            if not math.isfinite(values[name]):
                self.model.update(self.train_state.params)
                raise NonFiniteError(
                    f"non-finite {name}={values[name]} at step {step}; the update was not applied"
                )
        self.train_state = state
        self.model.update(state.params)  # the compiled step leaves placeholders in the model
        del state
        # Nothing outside the update's graph holds the old parameters and optimizer state
        # now, so the update writes into their buffers.
        mx.eval(self.train_state)
        self._after_step(values)
        return values

    def _after_step(self, values: dict[str, float]) -> None:
        """TRL's between-step controllers: adaptive entropy coefficient, TR-DPO sync."""
        args = self.args
        if args.use_adaptive_entropy:
            entropy = window_entropy(values)
            del values["entropy/bonus_sum"], values["entropy/bonus_tokens"]
            self.entropy_coef = update_entropy_coef(
                self.entropy_coef, entropy, target=args.entropy_target,
                delta=args.entropy_coef_delta, lo=args.entropy_coef_min, hi=args.entropy_coef_max,
            )  # fmt: skip
            self._last_world_entropy = entropy
        if args.use_adaptive_entropy or args.entropy_coef != 0:
            values["entropy_coef"] = self.entropy_coef
        if args.sync_ref_model and self.global_step % args.ref_model_sync_steps == 0:
            ref = sync_reference(
                self.policy.ref_params, self.train_state.params, alpha=args.ref_model_mixup_alpha
            )
            mx.eval(ref)
            self.policy = attrs.evolve(self.policy, ref_params=ref)

    def _callback(self, event: str, *args) -> None:
        dispatch(self, event, *args, callbacks=[*self.callbacks, *self._hooks])

    @property
    def state(self) -> TrainerState:
        """transformers' ``TrainerState`` of the run (``global_step``, ``max_steps``,
        ``epoch``, ``log_history``, ...); the arrays read through (``state.params``,
        ``state.opt_state``, ``state.key``, ``state.step``; ``state.train`` is the
        :class:`grpo.core.state.TrainState`)."""
        view = self._state_view
        view.epoch = float(self.sampler.epoch)
        return view

    # -- train -----------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None) -> dict[str, float]:
        """Run GRPO until ``max_steps`` optimizer steps; returns the last logged metrics.

        The run holds ``output_dir``'s lock throughout (:mod:`grpo.io.runlock`), refuses to
        start over another run's files unless ``overwrite_output_dir`` (:mod:`grpo.io.runs`),
        and, if an exception ends it after some progress, saves the last good state as a
        checkpoint before re-raising (the exception's ``checkpoint`` attribute says where).

        Args:
            resume_from_checkpoint: a checkpoint directory, or ``True`` for the newest one in
                ``output_dir``. A missing or corrupt checkpoint, or one saved with other
                run settings (:data:`grpo.io.runs.RESUME_FIELDS`), raises
                :class:`grpo.errors.CheckpointError` (never a silent fresh start).
        """
        main = is_main_process(self.group)
        with runlock.hold(self.args.output_dir, enabled=main):
            return self._train(resume_from_checkpoint)

    def _train(self, resume_from_checkpoint: str | bool | None) -> dict[str, float]:
        args = self.args
        main = is_main_process(self.group)
        self.training_started = False
        if main:
            ckpt.clean_partial_saves(args.output_dir)  # a killed run's half-written saves
        resumed = self._load_resume(resume_from_checkpoint) if resume_from_checkpoint else None
        meta = resumed[2] if resumed else {}
        self.run_id = meta.get("run_id") or runs.new_run_id()
        if main:
            runs.claim(
                args.output_dir,
                run_id=self.run_id,
                resuming=resumed is not None,
                overwrite=args.overwrite_output_dir,
            )
        writer = main_only(self.group, MetricsWriter, args.output_dir)
        self._window = []
        if resumed:
            self._apply_resume(*resumed)
            writer.truncate_after(self.global_step)
        hook = faults.from_environment()
        self._hooks = [hook] if hook is not None else []
        progress = Progress(
            self.max_steps,
            initial=self.global_step,
            enabled=not args.disable_tqdm and main,
        )
        self.should_stop = False
        self.control = TrainerControl()
        self._callback("on_train_begin")
        last: dict[str, float] = {}
        saved_at = self.global_step
        self._clock = time.perf_counter()
        # Ctrl-C / SIGTERM: stop at a generation boundary, save, raise TrainingInterrupted
        # (grpo.io.signals). Not under mlx.launch, where the ranks would disagree on when.
        guard = InterruptGuard(enabled=not D.is_distributed(self.group))
        # A rank that raises (a reward function, a bad row) ends the whole job at once
        # instead of leaving its peers blocked in a collective.
        # report_to's trackers (TensorBoard, W&B, Trackio) for this train() call, rank 0 only.
        self._reporters = main_only(self.group, Reporters, self._report_to, args)
        with fail_fast(self.group), guard:
            try:
                self.training_started = True
                if self.flow.eval_on_start and self.global_step == 0:
                    self._log_eval(writer, 0)
                while self.global_step < self.max_steps:
                    gen = self._next_generation(guard)
                    if gen is None:
                        break  # interrupted while generating; rolled back to the boundary
                    self.num_tokens += gen.num_tokens
                    before = self.global_step
                    last = self._run_generation(gen, writer, progress) or last
                    if self.flow.epoch_ended(before, self.global_step):
                        self._callback("on_epoch_end")
                    if self.flow.log_at_boundary(before, self.global_step) and self._window:
                        last = self._log(self._window, writer, self.global_step, gen) or last
                        self._window = []
                    if self.flow.eval_at_boundary(before, self.global_step):
                        self._log_eval(writer, self.global_step)
                    if self.flow.save_at_boundary(saved_at, self.global_step):
                        self.save_checkpoint()
                        saved_at = self.global_step
                    if self.should_stop or guard.requested:
                        break
                # An interrupt leaves the steps since the last record in the checkpoint
                # (log_window), so a resumed run writes the same records as an
                # uninterrupted one.
                if saved_at != self.global_step and (self.flow.saves or guard.requested):
                    self.save_checkpoint()
                    saved_at = self.global_step
            except Exception as e:
                if saved_at != self.global_step and not D.is_distributed(self.group):
                    self._save_last_good(e)
                raise
            finally:
                progress.close()
                self._reporters.close()
        if guard.requested:
            saved = Path(args.output_dir) / f"checkpoint-{self.global_step}"
            raise TrainingInterrupted(
                guard.signum, self.global_step, saved if saved.is_dir() else None
            )
        self._callback("on_train_end")
        return last

    def _save_last_good(self, error: Exception) -> None:
        """Checkpoint the state before the step that raised ``error``; note where on it."""
        step = self.global_step
        try:
            path = self.save_checkpoint()
        except Exception as failed:
            error.add_note(f"the last good state (step {step}) could not be saved: {failed}")
            return
        try:
            error.checkpoint = path
        except AttributeError:  # an exception type that refuses new attributes
            pass
        error.add_note(f"saved the last good state (step {step}) to {path}")

    def _next_generation(self, guard: InterruptGuard) -> Generation | None:
        """The next scored generation batch; ``None`` if a signal abandoned it (rolled back)."""
        state, sampler = self.train_state, self.sampler.state_dict()
        try:
            with guard.abandonable():
                key, sub = mx.random.split(self.train_state.key)
                self.train_state = self.train_state._replace(key=key)
                return self._generate(sub)
        except BaseException as e:
            # Back to the generation boundary, so a checkpoint saved now (on an interrupt,
            # or the last good state after an error) replays this batch when resumed.
            self.train_state = state
            self.sampler.load_state_dict(sampler)
            self.model.update(state.params)
            if isinstance(e, SignalReceived) or not (
                isinstance(e, KeyboardInterrupt) and guard.requested
            ):
                raise
            return None

    def _run_generation(self, gen: Generation, writer, progress) -> dict:
        args, logged = self.args, {}
        per_step_tokens = gen.num_tokens / args.optimizer_steps_per_generation
        for _ in range(args.num_iterations):
            for window in gen.windows:
                if self.global_step >= self.max_steps:
                    return logged
                values = self._step(window)
                now = time.perf_counter()
                # The first step of a generation batch also pays for its rollout and scoring.
                values["step_time"] = now - self._clock
                values["tokens_per_second"] = per_step_tokens / max(now - self._clock, 1e-9)
                self._clock = now
                values.update(gen.metrics)
                values["num_tokens"] = float(self.num_tokens)
                self._window.append(values)
                step = self.global_step
                self._callback("on_step_end", step, values)
                if self.flow.log_at(step):
                    logged = self._log(self._window, writer, step, gen)
                    self._window = []
                progress.update(step, logged or values)
                if self.flow.eval_at(step):
                    self._log_eval(writer, step)
        return logged

    def _log(self, rows, writer, step, gen: Generation) -> dict:
        logs = average_metrics(rows)
        logs["num_tokens"] = float(self.num_tokens)
        logs["epoch"] = float(self.sampler.epoch)
        record = {"step": step, **logs}
        writer.write(record)
        self._reporters.log(step, record)
        self.log_history.append(record)
        self._callback("on_log", record)
        if self.args.log_completions and is_main_process(self.group):
            print_completions(*gen.table, step=step, limit=self.args.num_completions_to_print)
        return logs

    def _all_reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        """Metrics over all ranks (means; max/min by name); optional ones missing = NaN."""
        if not D.is_distributed(self.group):
            return metrics
        full = {**{k: math.nan for k in _OPTIONAL_METRICS}, **metrics}
        out = {k: float(v.item()) for k, v in D.reduce_metrics(full, group=self.group).items()}
        return {k: v for k, v in out.items() if k not in _OPTIONAL_METRICS or math.isfinite(v)}

    def _log_eval(self, writer, step):
        metrics = self.evaluate()
        record = {"step": step, **metrics}
        writer.write(record)
        self._reporters.log(step, record)
        self.log_history.append(record)

    # -- evaluation ------------------------------------------------------------------------

    def evaluate(
        self, eval_dataset: Any = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """TRL's evaluation: the training metrics on the eval set, prefixed ``eval_``.

        ``eval_loss``, ``eval_reward``, ``eval_rewards/<fn>/mean``, ``eval_kl``,
        ``eval_entropy``, ``eval_completions/...``: every eval prompt is used once, in order,
        with ``num_generations_eval`` (default ``num_generations``) completions each, sampled
        from a fixed key so evaluations at different steps are comparable and the training
        RNG is untouched. A dict of eval sets (or a ``DatasetDict``) evaluates each under
        ``eval_<name>_``. With ``rollout_quantization`` the completions come from the
        quantized sampler and the loss is corrected for it, as TRL evaluates with vLLM.
        With ``tools``, environments or a ``rollout_func`` the completions come from the
        tool loop or the ``rollout_func`` as in training (``rollout_func`` sees the eval
        key as ``trainer.generation_key``), and the ``tools/*`` metrics are reported too.
        """
        dataset = self.eval_dataset if eval_dataset is None else _load_eval(eval_dataset)
        if dataset is None:
            raise ConfigError("evaluate() needs an eval_dataset (here or in the constructor)")
        if isinstance(dataset, dict):
            out = {}
            for name, part in dataset.items():
                out.update(self.evaluate(part, metric_key_prefix=f"{metric_key_prefix}_{name}"))
            return out
        G = self.args.num_generations_eval or self.args.num_generations
        B = max(1, self.args.per_device_eval_batch_size // G)
        sampling = attrs.evolve(self.sampling, group_size=G)
        advantages = make_advantages(
            group_size=G,
            scale=self.args.scale_rewards,
            aggregation=self.args.multi_objective_aggregation,
        )
        key = mx.random.key(self.args.seed + 1)
        extra = [c for c in (column_names(dataset) or []) if c != "prompt"]
        agentic_run = self.rollout_func is not None or self._tool_loop is not None
        # TRL evaluates with its generation engine: with rollout_quantization that is the
        # quantized copy, and the eval loss carries the same sampler correction. (The tool
        # loop takes its sampler itself.)
        params, model = (None, None) if agentic_run else self.rollout_policy()
        per_chunk: list[dict] = []
        rows = list(dataset)
        for start in range(0, len(rows), B):
            chunk = rows[start : start + B]
            if agentic_run:
                key, sub = mx.random.split(key)
                gen, scores = self._eval_agentic(chunk, start, sub, sampling, extra)
                per_chunk.append(self._eval_metrics(gen.rollout, scores, advantages, gen))
                continue
            ids = [self.encoder(r["prompt"], row=start + i) for i, r in enumerate(chunk)]
            keep = [i for i, x in enumerate(ids) if x is not None]
            if not keep:
                continue
            key, sub = mx.random.split(key)
            roll, scores, _, _ = evaluate_rewards(
                params,
                sub,
                [chunk[i] for i in keep],
                [ids[i] for i in keep],
                model=model,
                tokenizer=self.processing_class,
                sampling=sampling,
                reward_funcs=self.reward_funcs,
                columns=extra,
                timeout=self.args.reward_timeout,
            )
            per_chunk.append(self._eval_metrics(roll, scores, advantages))
        out = {f"{metric_key_prefix}_{k}": v for k, v in average_metrics(per_chunk).items()}
        self._callback("on_evaluate", out)
        return out

    def _eval_agentic(self, chunk, start: int, key, sampling, columns):
        # One eval chunk through the tool loop or the rollout_func, as training generates:
        # every row repeated G times, rewards with the same columns (environments too).
        prompts, repeated = repeat_rows(chunk, sampling.group_size, columns)
        indices = list(range(start, start + len(chunk)))
        batch = PromptBatch(prompts, repeated, indices, prompt_ids=None)
        train_key, self.generation_key = getattr(self, "generation_key", None), key
        try:
            gen = agentic.generate(self, batch, key, sampling=sampling)
        finally:
            self.generation_key = train_key
        completion_ids, texts = self._decode(gen.rollout)
        scores = score(
            gen.prompts, texts if gen.completions is None else gen.completions, completion_ids,
            self.reward_funcs, columns=gen.columns, timeout=self.args.reward_timeout,
        )  # fmt: skip
        return gen, scores

    def _eval_metrics(self, roll: Rollout, scores, advantages, gen=None) -> dict[str, float]:
        # One eval chunk's rewards, completion lengths, tool metrics and loss.
        tool_mask = None if gen is None else gen.tool_mask
        adv = advantages(scores.rewards_per_func, self.reward_weights)
        m = reward_metrics(
            scores.rewards_per_func, self.reward_weights, adv.is_std_zero, names=scores.names
        )
        m.update(_completion_metrics(roll, tool_mask))
        m.update({} if gen is None else gen.metrics)
        m.update(self._eval_loss(roll, adv.advantages, tool_mask=tool_mask))
        return m

    def _eval_loss(
        self, roll: Rollout, advantages: mx.array, *, tool_mask: mx.array | None = None
    ) -> dict[str, float]:
        # The training loss and its metrics on an eval chunk, without a gradient or update.
        self.model.eval()
        try:
            roll = self._pad(roll)
            if tool_mask is not None:
                tool_mask = pad_right(tool_mask, roll.completion_ids.shape[1], 0.0)
            batch = self._loss_batch(
                roll, advantages, tool_mask=tool_mask, quantized=self.rollout_model is not None
            )
            loss, metrics = self._loss_fn(self.train_state.params, batch)
            mx.eval(loss, metrics)
        finally:
            self.model.update(self.train_state.params)
            self.model.train()
        return {"loss": float(loss.item()), **{k: float(v.item()) for k, v in metrics.items()}}

    # -- saving ----------------------------------------------------------------------------

    def _adapter_config(self) -> dict:
        if self.policy.adapter_config is not None:
            return self.policy.adapter_config
        return ckpt.full_adapter_config(len(self.model.layers), base=self.base)

    def _trainer_state(self) -> dict:
        # Every rank's sampler position (a collective: all ranks call this), so each shard
        # resumes where it stopped.
        return {
            "sampler": self.sampler.state_dict(),
            "sampler_per_rank": gather_json(self.sampler.state_dict(), group=self.group),
            "num_tokens": self.num_tokens,
            "max_steps": self.max_steps,
            "config": self.args.to_dict(),
            "controllers": {
                "entropy_coef": self.entropy_coef,
                "last_world_entropy": self._last_world_entropy,
            },
            "run_id": self.run_id,
            # Steps since the last metrics.jsonl record, so a resumed run completes the record.
            "log_window": list(self._window),
        }

    def save_checkpoint(self) -> Path:
        """Write ``output_dir/checkpoint-{step}`` atomically; rotate by ``save_total_limit``."""
        path = Path(self.args.output_dir) / f"checkpoint-{self.global_step}"
        trainer_state = self._trainer_state()
        if is_main_process(self.group):
            ckpt.save_checkpoint(
                path,
                self.train_state,
                adapter_config=self._adapter_config(),
                trainer_state=trainer_state,
                extra_trees=self._extra_trees(),
            )
            ckpt.rotate_checkpoints(
                self.args.output_dir, keep=self.args.save_total_limit, run_id=self.run_id
            )
            if self.args.push_to_hub:
                self.create_model_card()
                self._hub.push_checkpoint(path, (ckpt.ADAPTERS, ckpt.ADAPTER_CONFIG))
        barrier(self.group)
        self._callback("on_save", path)
        return path

    def save_model(
        self, output_dir: str | Path | None = None, _internal_call: bool = False
    ) -> Path:
        """Save the trained weights in mlx-lm's adapter format (``adapters.safetensors`` +
        ``adapter_config.json``), loadable by ``mlx_lm.load(base, adapter_path=output_dir)``,
        and TRL's model card (``README.md``). For a full fine-tune the file holds every
        weight (``fine_tune_type="full"``). With ``push_to_hub`` it is then pushed, as
        transformers' ``save_model`` does."""
        out = Path(output_dir or self.args.output_dir)
        if is_main_process(self.group):
            ckpt.save_adapters(out, self.train_state.params, adapter_config=self._adapter_config())
            self.create_model_card(output_dir=out)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save")
        return out

    @property
    def hub_model_id(self) -> str:
        """The Hub repository (created on first access when ``push_to_hub``)."""
        return self._hub.create() if self.args.push_to_hub else self._hub.name

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        *,
        output_dir: str | Path | None = None,
    ) -> Path:
        """Write TRL's GRPO model card to ``output_dir/README.md`` (default ``args.output_dir``)."""
        hub_id = self.args.hub_model_id
        name = model_name or (
            hub_id.split("/")[-1] if hub_id else Path(self.args.output_dir).absolute().name
        )
        card = model_card(
            self.args,
            base_model=base_model_id(self.base),
            model_name=name,
            hub_model_id=self.args.hub_model_id or name,
            fine_tune_type=self._adapter_config().get("fine_tune_type", "lora"),
            dataset_name=dataset_name,
            tags=tags,
            **tracker_urls(),
        )
        path = Path(output_dir or self.args.output_dir) / "README.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        card.save(str(path))
        return path

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        **kwargs,
    ):
        """Save the model and its card in ``output_dir`` and upload it to ``hub_model_id``
        (transformers' ``Trainer.push_to_hub``; ``kwargs`` go to :meth:`create_model_card`).
        Uploads are always blocking. Returns huggingface_hub's ``CommitInfo`` (rank 0)."""
        if not is_main_process(self.group):
            return None
        self.save_model(_internal_call=True)
        self.create_model_card(**kwargs)  # after save_model, whose card has no kwargs
        return self._hub.push_output_dir(
            commit_message=commit_message or "End of training", token=token, revision=revision
        )

    def _extra_trees(self) -> dict:
        # A TR-DPO reference has moved away from the initial weights: keep it for resume.
        return {REF_MODEL: self.policy.ref_params} if self.args.sync_ref_model else {}

    def _load_resume(self, resume_from_checkpoint: str | bool) -> tuple[Path, TrainState, dict]:
        """The checkpoint to resume, loaded and checked against this run (nothing changed)."""
        path = (
            runs.latest_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is True
            else Path(resume_from_checkpoint)
        )
        saved = ckpt.read_trainer_state(path).get("config")
        runs.check_resume_settings(saved, self.args.to_dict(), path=path)
        state, meta = ckpt.load_checkpoint(path, self.train_state)
        per_rank = meta.get("sampler_per_rank") or [meta.get("sampler")]
        if len(per_rank) != self.world_size:
            raise CheckpointError(
                f"{path} was saved by {len(per_rank)} rank(s); this job has "
                f"world_size={self.world_size}, so the prompt shards would differ"
            )
        if not isinstance(per_rank[self.rank], dict):
            raise CheckpointError(f"{path / ckpt.TRAINER_STATE} lacks the sampler position")
        return path, state, meta

    def _apply_resume(self, path: Path, state: TrainState, meta: dict) -> None:
        per_rank = meta.get("sampler_per_rank") or [meta["sampler"]]
        try:
            self.sampler.load_state_dict(per_rank[self.rank])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: {e}") from e
        self.num_tokens = int(meta.get("num_tokens", 0))
        window = meta.get("log_window") or []
        self._window = [dict(row) for row in window if isinstance(row, dict)]
        controllers = meta.get("controllers", {})
        self.entropy_coef = controllers.get("entropy_coef", self.entropy_coef)
        self._last_world_entropy = controllers.get("last_world_entropy", math.inf)
        if self.args.sync_ref_model:
            ref = ckpt.load_extra_tree(path, REF_MODEL, self.policy.ref_params)
            self.policy = attrs.evolve(self.policy, ref_params=ref)
        self.train_state = state
        self.model.update(state.params)
