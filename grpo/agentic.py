"""TRL's agentic ``GRPOTrainer`` arguments: ``tools=``, ``environment_factory=``, ``rollout_func=``.

The trainer calls into this module at three points (setup, placeholder data, generation), so
its own code keeps one branch at the generation call. Semantics follow TRL 1.x:

- ``tools``: callables (sync or async) the model may call; rendered into every prompt by the
  chat template, parsed from each assistant turn, run, and their results appended
  (:class:`grpo.agent.ToolLoop` over :func:`grpo.core.multiturn.multiturn_rollout`). Tool-result
  tokens get ``tool_mask = 0`` and never train.
- ``environment_factory``: see :mod:`grpo.environments`. Reward functions receive the rows'
  instances as ``environments``; ``trainer.environments`` holds the last batch's instances.
- ``rollout_func(prompts, trainer) -> dict`` replaces the built-in generation. ``prompts`` are
  the ``N`` raw prompts of the generation batch (each repeated ``num_generations`` times); the
  dict must hold ``prompt_ids``, ``completion_ids`` and ``logprobs`` (``N`` lists each;
  ``logprobs`` may be ``None``, then old log-probs are recomputed), may hold ``tool_mask`` (or
  TRL's ``env_mask``: 1 on tokens to train on), and any other key is a list of ``N`` values
  passed to the reward functions under that name. ``trainer.generation_key`` is the batch's
  RNG key, for a rollout_func that samples with :func:`grpo.core.rollout.rollout`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import attrs
import mlx.core as mx
import numpy as np

from grpo.agent import ToolLoop
from grpo.core.rollout import Rollout
from grpo.core.score import is_conversational, reward_weights
from grpo.environments import Environments, with_observation
from grpo.rewards import resolve_reward_funcs
from grpo.tools import check_tools, tool_name, tool_schema

REQUIRED_KEYS = ("prompt_ids", "completion_ids", "logprobs")
MASK_KEYS = ("tool_mask", "env_mask")


class Generated(NamedTuple):
    """One generation batch from the tool loop or a rollout_func."""

    rollout: Rollout
    tool_mask: mx.array | None  # [N, T] float32, 1 on tokens that train
    prompts: list  # N prompts as the rewards see them (with any reset() observation)
    columns: dict  # reward kwargs: dataset columns, extra rollout_func keys, environments
    completions: list | None  # N message lists (tool loop), or None to decode the ids
    metrics: dict
    sampled_logprobs: bool  # rollout.logprobs are real sampling log-probs


# -- setup ------------------------------------------------------------------------------------


def setup(trainer, reward_funcs, tools, rollout_func, environment_factory) -> None:
    """Set ``reward_funcs``, ``reward_weights``, ``tools``, ``rollout_func`` and the
    environments on ``trainer``; every check that needs no model runs here."""
    args = trainer.args
    if rollout_func is not None and not callable(rollout_func):
        raise TypeError(f"rollout_func must be callable, got {type(rollout_func).__name__}")
    if rollout_func is not None and (tools or environment_factory is not None):
        raise ValueError(
            "rollout_func replaces the built-in generation, tool calling included; pass either "
            "rollout_func or tools / environment_factory"
        )
    tools = list(tools or [])
    trainer.rollout_func = rollout_func
    trainer._tool_dict = check_tools(tools)
    envs = None if environment_factory is None else Environments(environment_factory, tools)
    trainer._environments, trainer.environments = envs, None
    trainer.tools = envs.all_tools if envs is not None else tools
    own = [] if reward_funcs is None or reward_funcs == [] else resolve_reward_funcs(reward_funcs)
    env_rewards = [] if envs is None else envs.reward_funcs
    if not own and not env_rewards:
        raise ValueError(
            "No reward source provided: pass reward_funcs, or an environment_factory whose "
            "environment defines a get_reward method"
        )
    trainer.reward_funcs = own + env_rewards
    # reward_weights weigh the trainer's own functions; an environment's reward weighs 1 (TRL).
    weights = reward_weights(args.reward_weights, len(own)) if own else mx.zeros((0,))
    trainer.reward_weights = mx.concatenate([weights, mx.ones((len(env_rewards),))])


EMPTY_PROMPT = [{"role": "user", "content": ""}]


def _with_prompts(dataset: Any) -> Any:
    # Environment-owned data may come as rows without a prompt (only an `environment`
    # column); each gets an empty user message that reset() fills.
    import datasets

    if isinstance(dataset, list) and dataset and any("prompt" not in r for r in dataset):
        return [r if "prompt" in r else {"prompt": EMPTY_PROMPT, **r} for r in dataset]
    if isinstance(dataset, datasets.Dataset) and "prompt" not in dataset.column_names:
        return dataset.add_column("prompt", [EMPTY_PROMPT] * len(dataset))
    return dataset


def placeholder_dataset(trainer, train_dataset: Any) -> Any:
    """``train_dataset``, or (environment-owned data) empty prompts that ``reset()`` fills."""
    envs, args = trainer._environments, trainer.args
    trainer._prompt_is_placeholder = False
    if train_dataset is not None:
        if envs is None:
            return train_dataset
        out = _with_prompts(train_dataset)
        trainer._prompt_is_placeholder = out is not train_dataset
        return out
    trainer._prompt_is_placeholder = True
    if envs is None:
        raise ValueError("train_dataset is required unless an environment_factory is provided")
    if envs.multi:
        raise ValueError(
            "a dict environment_factory (several environments) requires a train_dataset with an "
            "'environment' column routing each row to its environment"
        )
    if args.max_steps <= 0:
        raise ValueError(
            "without a train_dataset the environment owns the data (reset() returns the prompt), "
            "so max_steps must be set to a positive number of steps"
        )
    return [{"prompt": EMPTY_PROMPT}] * args.prompts_per_generation


def extra_columns(trainer) -> list[str]:
    """Reward kwargs the trainer adds beside the dataset columns."""
    return ["environments"] if trainer._environments is not None else []


def make_tool_loop(trainer) -> ToolLoop | None:
    if not trainer._tool_dict and trainer._environments is None:
        return None
    args = trainer.args
    return ToolLoop(
        trainer.processing_class,
        format=args.tool_call_format,
        max_iterations=args.max_tool_calling_iterations,
        chat_template=trainer.encoder.chat_template,
        template_kwargs=trainer.encoder.template_kwargs,
    )


# -- generation -------------------------------------------------------------------------------


def generate(trainer, batch, key: mx.array, *, sampling=None) -> Generated:
    """One generation batch by ``rollout_func`` or the tool loop.

    ``sampling`` overrides the trainer's (``evaluate()`` samples ``num_generations_eval``
    completions per prompt); its ``group_size`` is the rows per prompt in ``batch``.
    """
    if trainer.rollout_func is not None:
        return _custom(trainer, batch)
    return _with_tools(trainer, batch, key, trainer.sampling if sampling is None else sampling)


def _rows(batch, *, with_prompt: bool) -> list[dict]:
    return [
        {**({"prompt": p} if with_prompt else {}), **{c: v[i] for c, v in batch.columns.items()}}
        for i, p in enumerate(batch.prompts)
    ]


def _encode(trainer, prompt, tools, *, row: int) -> list[int]:
    if not is_conversational(prompt):
        raise ValueError(
            f"row {row}: tools need conversational prompts (lists of role/content messages) so "
            "the chat template can render them; got a plain string"
        )
    schemas = [tool_schema(fn) for fn in tools] or None  # None: some templates render [] too
    kwargs = {**trainer.encoder.template_kwargs, "tools": schemas}
    ids = attrs.evolve(trainer.encoder, template_kwargs=kwargs)(prompt, row=row)
    if ids is None:
        raise ValueError(f"row {row}: the prompt with its tools does not fit the prompt budget")
    return ids


def _with_tools(trainer, batch, key, sampling) -> Generated:
    N, G = len(batch.prompts), sampling.group_size
    prompts, columns = list(batch.prompts), dict(batch.columns)
    envs = trainer._environments
    if envs is not None:
        names = envs.names(columns, N)
        instances = envs.acquire(names)
        observations = envs.reset(
            instances, _rows(batch, with_prompt=not trainer._prompt_is_placeholder)
        )
        prompts = [with_observation(p, o) for p, o in zip(prompts, observations, strict=True)]
        tools_per_row = [envs.tools_for(e) for e in instances]
        rendered = [envs.schemas_for(n) for n in names]
        trainer.environments = instances
        columns["environments"] = instances
    else:
        tools_per_row = [trainer._tool_dict] * N
        rendered = [list(trainer._tool_dict.values())] * N
    ids = [
        _encode(trainer, p, t, row=i)
        for i, (p, t) in enumerate(zip(prompts, rendered, strict=True))
    ]
    if all(ids[i] == ids[i - i % G] for i in range(N)):
        ids = ids[::G]  # every group shares its prompt: prefill it once
    else:
        sampling = attrs.evolve(sampling, group_size=1)
    params, model = trainer.rollout_policy()  # the quantized copy with rollout_quantization
    out = trainer._tool_loop.run(params, key, ids, tools_per_row, model=model, sampling=sampling)
    metrics = {f"tools/calls/{tool_name(fn)}": 0.0 for fn in trainer.tools}
    metrics.update(out.metrics)
    return Generated(out.rollout, out.tool_mask, prompts, columns, out.completions, metrics, True)


def _as_rows(name: str, values: Any, n: int) -> list:
    if (
        values is None
        or isinstance(values, (str, bytes))
        or not isinstance(values, Sequence | np.ndarray | mx.array)
    ):
        raise ValueError(
            f"rollout_func's {name!r} must be a list of {n} rows, got {type(values).__name__}"
        )
    rows = [list(np.asarray(v).tolist()) if not isinstance(v, list) else v for v in values]
    if len(rows) != n:
        raise ValueError(f"rollout_func's {name!r} has {len(rows)} rows for {n} prompts")
    return rows


def _pad(rows: list[list], width: int, value, dtype) -> mx.array:
    return mx.array([list(r) + [value] * (width - len(r)) for r in rows], dtype=dtype)


def _custom(trainer, batch) -> Generated:
    prompts = list(batch.prompts)
    n = len(prompts)
    out = trainer.rollout_func(prompts, trainer)
    if not isinstance(out, Mapping):
        raise TypeError(f"rollout_func must return a dict, got {type(out).__name__}")
    missing = sorted(set(REQUIRED_KEYS) - set(out))
    if missing:
        raise ValueError(
            f"rollout_func must return keys {missing} in its output dict (it returned "
            f"{sorted(out)}; required: {list(REQUIRED_KEYS)})"
        )
    prompt_ids = _as_rows("prompt_ids", out["prompt_ids"], n)
    completion_ids = _as_rows("completion_ids", out["completion_ids"], n)
    lengths = [len(c) for c in completion_ids]
    sampled = out["logprobs"] is not None
    logprobs = _as_rows("logprobs", out["logprobs"], n) if sampled else [[0.0] * m for m in lengths]
    mask_key = next((k for k in MASK_KEYS if out.get(k) is not None), None)
    tool_mask = _as_rows(mask_key, out[mask_key], n) if mask_key else None
    for name, rows in (("logprobs", logprobs), (mask_key, tool_mask)):
        if rows is not None and [len(r) for r in rows] != lengths:
            raise ValueError(f"rollout_func's {name!r} rows must match completion_ids' lengths")
    if min(len(p) for p in prompt_ids) == 0:
        raise ValueError("rollout_func returned an empty prompt_ids row")
    P, T = max(len(p) for p in prompt_ids), max(1, max(lengths))
    eos = set(trainer.sampling.eos_ids)
    roll = Rollout(
        prompt_ids=_pad(prompt_ids, P, 0, mx.int32),
        prompt_lengths=mx.array([len(p) for p in prompt_ids], dtype=mx.int32),
        completion_ids=_pad(completion_ids, T, 0, mx.int32),
        logprobs=_pad(logprobs, T, 0.0, mx.float32),
        completion_mask=_pad([[1.0] * m for m in lengths], T, 0.0, mx.float32),
        is_truncated=mx.array([not c or c[-1] not in eos for c in completion_ids]),
        completion_lengths=mx.array(lengths, dtype=mx.int32),
    )
    extra = {}
    for k, v in out.items():
        if k in (*REQUIRED_KEYS, *MASK_KEYS):
            continue
        if isinstance(v, (str, bytes)) or not hasattr(v, "__len__") or len(v) != n:
            raise ValueError(
                f"rollout_func's extra field {k!r} must hold one value per prompt ({n}), got "
                f"{v!r:.60}"
            )
        extra[k] = list(v)
    mask = None if tool_mask is None else _pad(tool_mask, T, 0.0, mx.float32)
    columns = {**batch.columns, **extra}
    return Generated(roll, mask, prompts, columns, None, {}, sampled)


def display(completion: Any) -> str:
    """A completion as one string for the completions table (tool turns included)."""
    if isinstance(completion, str):
        return completion
    parts = []
    for m in completion:
        calls = m.get("tool_calls") or []
        text = m.get("content") or ""
        text += "".join(
            f" <call {c['function']['name']}({c['function']['arguments']})>" for c in calls
        )
        parts.append(f"[{m['role']}{':' + m['name'] if m.get('name') else ''}] {text}".strip())
    return "\n".join(parts)
