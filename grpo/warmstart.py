"""A short supervised warm start so a freshly seeded tiny model can learn a task by GRPO.

GRPO only learns from groups whose rewards differ. A randomly initialised model never
produces a correct character, so every group scores 0 and the advantage is 0 everywhere.
A few hundred steps of cross-entropy on generated ``prompt ++ answer ++ EOS`` examples
(completion-only loss) give a model with a non-zero but far-from-perfect reward, which
GRPO then improves.

.. math::

    \\mathcal{L} = -\\frac{1}{\\sum_{i,t} m_{i,t}} \\sum_{i,t} m_{i,t}
    \\log \\pi_\\theta(y_{i,t} \\mid y_{i,<t}), \\quad m_{i,t} = 1 \\text{ on answer and EOS tokens}
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import attrs
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from grpo.tasks import Task, random_strings


@attrs.frozen
class WarmStartConfig:
    """Knobs of the supervised warm start.

    Attributes:
        steps: optimizer steps (each on a fresh batch of generated examples).
        batch_size: examples per step.
        learning_rate: Adam step size.
        seed: seeds the generated examples (the model's weights come from its own seed).
    """

    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 5e-4
    seed: int = 0

    def __attrs_post_init__(self):
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if value < (0 if name == "steps" else 1):
                raise ValueError(f"WarmStartConfig: {name} must be positive, got {name}={value!r}")
        if not self.learning_rate > 0:
            raise ValueError(
                f"WarmStartConfig: learning_rate must be > 0, got learning_rate={self.learning_rate!r}"
            )


def encode_examples(tokenizer, task: Task, strings: list[str]) -> tuple[mx.array, mx.array]:
    """Token ids of ``prompt ++ answer ++ EOS`` for each input string, right-padded.

    Args:
        tokenizer: an mlx-lm ``TokenizerWrapper`` (or anything with ``encode`` and
            ``eos_token_id``).
        task: the task that turns each string into a prompt and an answer.
        strings: ``B`` input strings.

    Returns:
        ``(tokens [B, L], mask [B, L])``: ``L`` is the longest possible example for the task
        (so every batch has the same shape); ``mask`` is 1 on answer and EOS tokens.
    """
    longest = task.alphabet[0] * task.max_len
    L = (
        len(tokenizer.encode(task.prompt(longest)))
        + len(tokenizer.encode(task.transform(longest)))
        + 1
    )
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    rows, masks = [], []
    for s in strings:
        prompt = tokenizer.encode(task.prompt(s))
        answer = tokenizer.encode(task.transform(s)) + [tokenizer.eos_token_id]
        n = len(prompt) + len(answer)
        rows.append(prompt + answer + [pad] * (L - n))
        masks.append([0] * len(prompt) + [1] * len(answer) + [0] * (L - n))
    return mx.array(rows, dtype=mx.int32), mx.array(masks, dtype=mx.float32)


def sft_loss(model: nn.Module, tokens: mx.array, mask: mx.array) -> mx.array:
    """Completion-only next-token cross-entropy, averaged over the masked target tokens.

    Args:
        model: a causal LM mapping ``[B, L]`` ids to ``[B, L, V]`` logits.
        tokens: ``[B, L]`` int ids.
        mask: ``[B, L]`` 1 where ``tokens`` is a target (answer or EOS).

    Returns:
        Scalar float32 mean cross-entropy.
    """
    logits = model(tokens[:, :-1]).astype(mx.float32)
    targets, weights = tokens[:, 1:], mask[:, 1:]
    ce = nn.losses.cross_entropy(logits, targets) * weights
    return ce.sum() / mx.maximum(weights.sum(), 1.0)


def sft_step(model: nn.Module, optimizer: optim.Optimizer) -> tuple[Callable, list]:
    """A compiled in-place supervised step ``step(tokens, mask) -> loss`` on ``model``, and
    the state to evaluate after each call."""
    loss_and_grad = nn.value_and_grad(model, sft_loss)
    state = [model.state, optimizer.state]

    # The mlx-lm idiom for a compiled in-place step: module and optimizer state are
    # declared as implicit inputs/outputs so mx.compile tracks their updates.
    @partial(mx.compile, inputs=state, outputs=state)
    def step(tokens, mask):
        loss, grads = loss_and_grad(model, tokens, mask)
        optimizer.update(model, grads)
        return loss

    return step, state


def warm_start(
    model: nn.Module,
    tokenizer,
    task: Task,
    *,
    config: WarmStartConfig = WarmStartConfig(),
    log: Callable[[str], None] | None = None,
) -> list[float]:
    """Train ``model`` in place on generated examples of ``task``; returns the loss per step.

    Each step draws a fresh batch of inputs from a seeded stream, so two runs with the same
    config and the same initial weights give the same model.
    """
    step, state = sft_step(model, optim.Adam(learning_rate=config.learning_rate))

    strings = random_strings(config.steps * config.batch_size, seed=config.seed, task=task)
    losses = []
    for i in range(config.steps):
        batch = strings[i * config.batch_size : (i + 1) * config.batch_size]
        loss = step(*encode_examples(tokenizer, task, batch))
        mx.eval(state, loss)
        losses.append(loss.item())
        if log is not None and (i + 1) % max(1, config.steps // 4) == 0:
            log(f"  warm start step {i + 1}/{config.steps}: loss {losses[-1]:.3f}")
    return losses
