"""A built-in agentic task: multiplication that pays off only with a calculator tool.

Status: work in progress, not yet wired into the CLI and not tested. Measured on the shared
2-core CPU: 400 warm-start steps take about 270 s, after which the sampled model calls the
tool in about a quarter of its completions but rarely copies the operands or the result, so
the reward starts near 0.1 and GRPO has little to climb from. It needs a cheaper warm start
(shorter demonstrations or a larger model) before a reward-margin test can run in a minute.

``grpo train --dataset calculator`` runs it on a cached tiny model: a prompt is a product such
as ``"37*8"``; the model may answer directly (a 0.4M-parameter model cannot multiply, so
that earns little) or call ``calc`` in the Hermes format
(``<tool_call>{"name":"calc","arguments":{"x": "37*8"}}</tool_call>``), read the result and
copy it. The reward is per-character credit of the final answer (:func:`grpo.tasks.char_match`).
A short supervised warm start teaches both behaviours half the time each; GRPO then learns
to call the tool, and the mean reward rises.

The tiny tokenizer gets :data:`CHAT_TEMPLATE`, a compact Hermes/ChatML template that renders
the tools' names into the prompt, assistant tool calls as ``<tool_call>`` JSON and tool
results as ``tool`` turns; it is prefix-preserving, as the tool loop requires.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

import grpo
from grpo.tasks import char_match, completion_text

CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\ntools:{% for t in tools %} {{ t.function.name }}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}{% set f = c.function or c %}"
    '<tool_call>{"name":"{{ f.name }}","arguments":{{ f.arguments | tojson }}}</tool_call>'
    "{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

NAME = "calculator"
MIN_A, MAX_A, MIN_B, MAX_B = 10, 99, 2, 9


def calc(x: str) -> str:
    """
    Evaluate a product of two integers.

    Args:
        x: The product, such as 37*8.
    """
    a, b = x.split("*")
    return str(int(a) * int(b))


TOOLS = (calc,)


def _operands(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(MIN_A, MAX_A), rng.randint(MIN_B, MAX_B)) for _ in range(n)]


def make_dataset(n: int = 1000, *, seed: int = 0) -> list[dict]:
    """``n`` rows ``{"prompt": [user message], "answer": str}`` (seeded)."""
    return [
        {"prompt": [{"role": "user", "content": f"{a}*{b}"}], "answer": str(a * b)}
        for a, b in _operands(n, seed)
    ]


def calculator_reward(completions: Sequence, answer: Sequence[str], **kwargs) -> list[float]:
    """Per-character credit of the final assistant message against ``answer``."""
    return [
        char_match(completion_text(c), str(a)) for c, a in zip(completions, answer, strict=True)
    ]


# -- warm start ---------------------------------------------------------------------------------


def conversation(a: int, b: int, *, use_tool: bool) -> list[dict]:
    """The demonstration the warm start imitates: a tool call then the answer, or the answer."""
    user = {"role": "user", "content": f"{a}*{b}"}
    if not use_tool:
        return [user, {"role": "assistant", "content": str(a * b)}]
    call = {"type": "function", "function": {"name": "calc", "arguments": {"x": f"{a}*{b}"}}}
    return [
        user,
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "name": "calc", "content": calc(f"{a}*{b}")},
        {"role": "assistant", "content": str(a * b)},
    ]


def encode_demo(tokenizer, messages: list[dict]) -> tuple[list[int], list[float]]:
    """Ids of the rendered demonstration and a mask that is 1 on assistant turns only (each
    turn's text after its header, through its end-of-turn token)."""
    from grpo.agent import hf_tokenizer
    from grpo.tools import tool_schema

    hf = hf_tokenizer(tokenizer)
    text = hf.apply_chat_template(
        messages,
        tools=[tool_schema(fn) for fn in TOOLS],
        tokenize=False,
        chat_template=CHAT_TEMPLATE,
    )
    enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    head, end = "<|im_start|>assistant\n", "<|im_end|>"
    spans, at = [], text.find(head)
    while at >= 0:
        start = at + len(head)
        stop = text.index(end, start) + len(end)
        spans.append((start, stop))
        at = text.find(head, stop)
    mask = [float(any(a <= s and e <= b for a, b in spans)) for s, e in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


@attrs.frozen
class WarmStart:
    steps: int = 400
    batch_size: int = 32
    learning_rate: float = 3e-3
    tool_fraction: float = 0.5
    num_demos: int = 2000
    seed: int = 0


def warm_start(model, tokenizer, *, config: WarmStart = WarmStart(), log=None) -> list[float]:
    """Supervised steps on demonstrations (``tool_fraction`` of them call the tool)."""
    from functools import partial

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    from grpo.io.warmstart import sft_loss

    optimizer = optim.Adam(learning_rate=config.learning_rate)
    loss_and_grad = nn.value_and_grad(model, sft_loss)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(tokens, mask):
        loss, grads = loss_and_grad(model, tokens, mask)
        optimizer.update(model, grads)
        return loss

    rng = random.Random(config.seed)
    pairs = _operands(config.num_demos, config.seed + 17)
    demos = [
        encode_demo(tokenizer, conversation(a, b, use_tool=rng.random() < config.tool_fraction))
        for a, b in pairs
    ]
    L = max(len(d[0]) for d in demos)
    losses = []
    for i in range(config.steps):
        batch = [demos[rng.randrange(len(demos))] for _ in range(config.batch_size)]
        tokens = mx.array([d[0] + [0] * (L - len(d[0])) for d in batch], dtype=mx.int32)
        mask = mx.array([d[1] + [0.0] * (L - len(d[1])) for d in batch])
        loss = step(tokens, mask)
        mx.eval(state, loss)
        losses.append(loss.item())
        if log is not None and (i + 1) % max(1, config.steps // 4) == 0:
            log(f"  warm start step {i + 1}/{config.steps}: loss {losses[-1]:.3f}")
    return losses


# -- the cached model ---------------------------------------------------------------------------

MODEL_SIZE, MODEL_SEED = "test", 0
TRAIN_ARGS: dict = {
    "use_lora": False,
    "learning_rate": 1e-3,
    "lr_scheduler_type": "constant",
    "num_generations": 8,
    "per_device_train_batch_size": 64,
    "max_completion_length": 96,
    "max_prompt_length": None,
    "temperature": 1.0,
    "beta": 0.0,
    "max_steps": 60,
    "logging_steps": 5,
    "save_steps": 10_000,
    "seed": 0,
    "output_dir": "grpo_output",
}


def model_key(config: WarmStart = WarmStart()) -> str:
    spec = [CHAT_TEMPLATE, MIN_A, MAX_A, MIN_B, MAX_B, attrs.asdict(config), MODEL_SIZE, MODEL_SEED]
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
    return f"v{grpo.__version__}-{NAME}-{MODEL_SIZE}-seed{MODEL_SEED}-ws{config.steps}-{digest}"


def build(path: Path, *, config: WarmStart = WarmStart(), log: Callable = print) -> Path:
    """Write the tiny model with :data:`CHAT_TEMPLATE` to ``path``, warm-started."""
    import mlx.core as mx
    import mlx_lm
    from mlx.utils import tree_flatten

    from grpo.io.tiny import build_tiny_model

    build_tiny_model(path, size=MODEL_SIZE, seed=MODEL_SEED)
    cfg_path = Path(path) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2))
    if config.steps == 0:
        return Path(path)
    model, tokenizer = mlx_lm.load(str(path))
    log(f"warm start: {config.steps} supervised steps on calculator demonstrations")
    losses = warm_start(model, tokenizer, config=config, log=log)
    log(f"warm start: done, final loss {losses[-1]:.3f}")
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(Path(path) / "model.safetensors"), weights, metadata={"format": "mlx"})
    return Path(path)


def ensure_model(cache_dir=None, *, config: WarmStart = WarmStart(), log: Callable = print) -> Path:
    """The cached warm-started calculator model, built (atomically) if missing."""
    from grpo.io.default_job import cache_root, is_cached

    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    final = root / model_key(config)
    if is_cached(final):
        log(f"model: cached warm-started tiny model {final}")
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    try:
        build(tmp, config=config, log=log)
        try:
            tmp.rename(final)
        except OSError:
            if not is_cached(final):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
