"""A built-in agentic task: ``lookup``, a secret only a tool call reveals.

Each row of the dataset hides a random three-letter code (the ``answer`` column). The model
sees the question ``"code?"`` and one tool, ``peek``, a method of the :class:`Vault`
environment that returns its row's code. A model that answers without calling it guesses
(one chance in 26**3); one that calls ``peek`` and copies the result into its final answer
scores 1. The reward (:func:`lookup_match`) is exact match of the last assistant message,
so a row that calls the tool but never answers scores 0.

Everything is kept short for the character-level tiny model (:mod:`grpo.io.tiny`):
:data:`CHAT_TEMPLATE` renders each turn as ``<|im_start|>`` + a one-letter role + text +
``<|im_end|>`` and a tool call in the Mistral v11 form ``[TOOL_CALLS]peek{}``, so a whole
successful completion is ``[TOOL_CALLS]peek{}`` EOS, the tool turn, then the three copied
letters and EOS.

A supervised warm start (:func:`warm_start`, the loss of :mod:`grpo.warmstart`) imitates
demonstrations of which :attr:`LookupWarmStart.tool_fraction` call the tool and copy its
result and the rest answer a random code directly; it stops early, while copying is still
unreliable, so GRPO starts from a low reward and raises it by calling the tool more often
and copying better. The demonstrations are encoded exactly as the trainer's tool loop
(:class:`grpo.agent.ToolLoop`) builds a rollout: prompt, sampled call turn, the template's
tool-message suffix, answer turn.
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

import grpo
from grpo.rewards import char_match, register_reward

NAME = "lookup"
REWARD = "lookup_match"
QUESTION = "code?"
CODE_LEN = 3
CODE_ALPHABET = string.ascii_lowercase

CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>s{% for t in tools %}{{ t.function.name }}{% endfor %}"
    "<|im_end|>{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' %}<|im_start|>a{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}"
    "[TOOL_CALLS]{{ c.function.name }}{{ c.function.arguments | tojson }}"
    "{% endfor %}<|im_end|>"
    "{% else %}<|im_start|>{{ m.role[0] }}{{ m.content }}<|im_end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>a{% endif %}"
)

# GRPOConfig overrides of `grpo train --task lookup` (flags still override them).
TRAIN_ARGS: dict = {
    "use_lora": False,
    "learning_rate": 6e-4,
    "lr_scheduler_type": "constant",
    "num_generations": 8,
    "per_device_train_batch_size": 64,
    "max_completion_length": 40,
    "max_prompt_length": None,
    "tool_call_format": "mistral",
    "max_tool_calling_iterations": 1,
    "temperature": 1.0,
    "beta": 0.0,
    "max_steps": 40,
    "logging_steps": 2,
    "save_steps": 1000,
    "save_total_limit": 1,
    "seed": 0,
    "output_dir": "grpo_output",
}
DATASET_SIZE = 2000
DATASET_SEED = 1


class Vault:
    """The lookup environment: one row's secret code, revealed by :meth:`peek`."""

    def __init__(self):
        self.code = ""

    def reset(self, answer: str = "", **row) -> None:
        self.code = str(answer)

    def peek(self) -> str:
        """
        Reveal the secret code.
        """
        return self.code


def random_code(rng: random.Random) -> str:
    return "".join(rng.choices(CODE_ALPHABET, k=CODE_LEN))


def make_dataset(n: int = DATASET_SIZE, *, seed: int = DATASET_SEED) -> list[dict]:
    """``n`` rows ``{"prompt": [user message], "answer": code}`` with seeded random codes."""
    if n < 1:
        raise ValueError(f"make_dataset: n must be >= 1, got n={n!r}")
    rng = random.Random(seed)
    user = {"role": "user", "content": QUESTION}
    return [{"prompt": [dict(user)], "answer": random_code(rng)} for _ in range(n)]


def final_answer(completion) -> str:
    """Text of the last assistant message of a completion (``""`` when there is none)."""
    if isinstance(completion, str):
        return completion.strip()
    for message in reversed(list(completion)):
        if message.get("role") == "assistant":
            return str(message.get("content") or "").strip()
    return ""


@register_reward(REWARD)
def lookup_match(completions: Sequence, answer: Sequence[str], **kwargs) -> list[float]:
    """Per-character credit (:func:`grpo.rewards.char_match`) of the last assistant message
    against the row's code: 1.0 for the exact code; a guess earns 1/26 per letter on average."""
    if len(answer) != len(completions):
        raise ValueError(
            f"lookup_match: got {len(completions)} completions but {len(answer)} answers"
        )
    return [char_match(final_answer(c), str(a)) for c, a in zip(completions, answer, strict=True)]


# -- warm start ---------------------------------------------------------------------------------


@attrs.frozen
class LookupWarmStart:
    """Knobs of the supervised warm start on demonstrations.

    Attributes:
        steps: Adam steps (0 skips the warm start).
        batch_size: demonstrations per step.
        learning_rate: Adam step size.
        tool_fraction: share of demonstrations that call ``peek`` (the rest guess).
        seed: seeds the demonstrations.
    """

    steps: int = 250
    batch_size: int = 32
    learning_rate: float = 2e-3
    tool_fraction: float = 0.7
    seed: int = 0


WARM_START = LookupWarmStart()


def demo_parts(loop, tokenizer) -> tuple[list[int], list[int], list[int], list[int]]:
    """``(prompt, call turn, tool header, tool tail)`` ids of a tool demonstration, as the tool
    loop lays out a rollout; the tool result's ids go between header and tail."""
    from grpo.tools import tool_schema

    prompt = loop._render(
        [{"role": "user", "content": QUESTION}],
        tools=[tool_schema(Vault().peek)],
        add_generation_prompt=True,
    )
    call = list(tokenizer.encode("[TOOL_CALLS]peek{}")) + [tokenizer.eos_token_id]
    probe = "~" * CODE_LEN  # in neither the template nor any code
    tool = {"role": "tool", "name": "peek", "content": probe, "tool_call_id": "c00000000"}
    text = tokenizer.decode(loop.suffix_ids([tool]), skip_special_tokens=False)
    head, tail = text.split(probe)
    enc = lambda t: list(loop.hf.encode(t, add_special_tokens=False))  # noqa: E731
    return prompt, call, enc(head), enc(tail)


def encode_demo(parts, tokenizer, code: str, *, use_tool: bool) -> tuple[list[int], list[float]]:
    """Ids of one demonstration (:func:`demo_parts`) and a mask that is 1 on the tokens the
    model would sample: its turns and their EOS. Without the tool it answers ``code`` as a
    guess."""
    prompt, call, head, tail = parts
    answer = list(tokenizer.encode(code)) + [tokenizer.eos_token_id]
    if not use_tool:
        return prompt + answer, [0.0] * len(prompt) + [1.0] * len(answer)
    suffix = head + list(tokenizer.encode(code)) + tail
    ids = prompt + call + suffix + answer
    mask = [0.0] * len(prompt) + [1.0] * len(call) + [0.0] * len(suffix) + [1.0] * len(answer)
    return ids, mask


def warm_start(model, tokenizer, *, config: LookupWarmStart = WARM_START, log=None):
    """Train ``model`` in place on seeded demonstrations; returns the loss per step."""

    import mlx.core as mx
    import mlx.optimizers as optim

    from grpo.agent import ToolLoop
    from grpo.warmstart import sft_step

    step, state = sft_step(
        model, optim.Adam(learning_rate=config.learning_rate, bias_correction=True)
    )

    rng = random.Random(config.seed)
    parts = demo_parts(ToolLoop(tokenizer, format="mistral"), tokenizer)
    width = len(encode_demo(parts, tokenizer, "a" * CODE_LEN, use_tool=True)[0])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    losses = []
    for i in range(config.steps):
        demos = [
            encode_demo(
                parts, tokenizer, random_code(rng), use_tool=rng.random() < config.tool_fraction
            )
            for _ in range(config.batch_size)
        ]
        tokens = mx.array([d + [pad] * (width - len(d)) for d, _ in demos], dtype=mx.int32)
        mask = mx.array([m + [0.0] * (width - len(m)) for _, m in demos])
        loss = step(tokens, mask)
        mx.eval(state, loss)
        losses.append(loss.item())
        if log is not None and (i + 1) % max(1, config.steps // 8) == 0:
            log(f"  warm start step {i + 1}/{config.steps}: loss {losses[-1]:.3f}")
    return losses


# -- the cached model ---------------------------------------------------------------------------

MODEL_SIZE, MODEL_SEED = "test", 0


def model_key(config: LookupWarmStart = WARM_START) -> str:
    """Cache directory name: everything the warm-started weights depend on."""
    from grpo.io.tiny import model_config

    spec = [CHAT_TEMPLATE, QUESTION, CODE_LEN, CODE_ALPHABET, attrs.asdict(config)]
    spec.append(model_config(MODEL_SIZE))
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
    return f"v{grpo.__version__}-{NAME}-{MODEL_SIZE}-seed{MODEL_SEED}-ws{config.steps}-{digest}"


def model_dir(cache_dir: str | Path | None = None, *, config: LookupWarmStart = WARM_START) -> Path:
    """Where :func:`ensure_model` keeps (or will build) the model; nothing is created."""
    from grpo.default_job import cache_root

    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return root / model_key(config)


def build(path: str | Path, *, config: LookupWarmStart = WARM_START, log=print) -> Path:
    """Write the tiny model with :data:`CHAT_TEMPLATE` to ``path``, warm-started."""
    import mlx.core as mx
    import mlx_lm
    from mlx.utils import tree_flatten

    from grpo.io.tiny import build_tiny_model

    path = Path(path)
    build_tiny_model(path, size=MODEL_SIZE, seed=MODEL_SEED)
    cfg_path = path / "tokenizer_config.json"
    cfg_path.write_text(
        json.dumps({**json.loads(cfg_path.read_text()), "chat_template": CHAT_TEMPLATE}, indent=2)
    )
    if config.steps == 0:
        return path
    model, tokenizer = mlx_lm.load(str(path))
    log(
        f"warm start: {config.steps} supervised steps on {NAME!r} demonstrations "
        f"({config.tool_fraction:.0%} call the tool)"
    )
    losses = warm_start(model, tokenizer, config=config, log=log)
    log(f"warm start: done, final loss {losses[-1]:.3f}")
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    return path


def ensure_model(
    cache_dir: str | Path | None = None,
    *,
    config: LookupWarmStart = WARM_START,
    log: Callable[[str], None] = print,
) -> Path:
    """The cached warm-started model of the task, built first (atomically) if missing."""
    from grpo.default_job import build_cached

    return build_cached(
        model_dir(cache_dir, config=config),
        lambda tmp: build(tmp, config=config, log=log),
        what=f"a seeded tiny model for the {NAME!r} task",
        log=log,
    )
