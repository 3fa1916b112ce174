"""Sequence-classification reward models (TRL's ``AutoModelForSequenceClassification``) on MLX.

A TRL reward-model checkpoint is a causal-LM base without its LM head plus a linear
``score`` head: ``config.json`` names ``Qwen2ForSequenceClassification`` /
``LlamaForSequenceClassification`` (``num_labels`` 1), the weights are ``model.*`` and
``score.weight``. Here the base is mlx-lm's own architecture (only its trunk, which maps token
ids to the last, normed hidden states) and the head a bias-free ``nn.Linear``:

.. math:: r = W_{score}\\, h_{t^*}, \\quad t^* = \\max\\{t : x_t \\ne \\text{pad}\\}

pooled, as transformers' ``GenericForSequenceClassification`` pools, at the rightmost token
that is not the pad token (token 0 when a row is all padding). Rows are padded on the right,
so under the causal mask the pooled state never sees a pad token and a batch scores each row
exactly as it would alone.

:class:`RewardModelReward` makes one a TRL reward function: it renders ``prompt +
completion`` (through the reward tokenizer's chat template for conversational rows, as TRL's
``_calculate_rewards`` does), tokenises without special tokens, and scores in batches.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlx.core as mx
import mlx.nn as nn

SEQUENCE_CLASSIFICATION = "ForSequenceClassification"
SCORE_WEIGHT = "score.weight"
BATCH_SIZE = 16  # rows per reward-model forward


def is_reward_model_dir(path: str | Path) -> bool:
    """True when ``path`` is a directory whose config names a ``*ForSequenceClassification``."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        architectures = json.loads(config.read_text()).get("architectures") or ()
    except (OSError, ValueError):
        return False
    return any(str(a).endswith(SEQUENCE_CLASSIFICATION) for a in architectures)


class RewardModel(nn.Module):
    """An mlx-lm trunk (``model``) and a linear ``score`` head: ``[B, L]`` ids to ``[B, num_labels]``.

    Parameter names are the checkpoint's (``model.*``, ``score.weight``). ``config`` carries
    ``_name_or_path`` (TRL names the reward function after its last path component),
    ``pad_token_id`` (the pooling position) and ``num_labels``.
    """

    def __init__(self, trunk: nn.Module, score: nn.Linear, config: Any):
        super().__init__()
        self.model = trunk
        self.score = score
        self.config = config

    def hidden_states(self, input_ids: mx.array) -> mx.array:
        """Last hidden states ``[B, L, D]`` of the base (after its final norm)."""
        return self.model(input_ids)

    def __call__(self, input_ids: mx.array, pad_token_id: int | None = None) -> mx.array:
        """Pooled logits ``[B, num_labels]``; rows padded on the right with ``pad_token_id``
        (default ``config.pad_token_id``)."""
        pad = self.config.pad_token_id if pad_token_id is None else pad_token_id
        B, L = input_ids.shape
        if pad is None:
            if B != 1:
                raise ValueError("cannot score batches of more than one row without a pad token")
            last = mx.full((B,), L - 1, dtype=mx.int32)
        else:
            # transformers: argmax of index * mask, the rightmost non-pad position (0 if none).
            non_pad = (input_ids != pad).astype(mx.int32)
            last = mx.argmax(mx.arange(L, dtype=mx.int32)[None, :] * non_pad, axis=-1)
        h = self.hidden_states(input_ids)
        pooled = mx.take_along_axis(h, last[:, None, None].astype(mx.int32), axis=1)[:, 0]
        return self.score(pooled).astype(mx.float32)


def _local_path(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    from mlx_lm.utils import _download

    return _download(name_or_path)


def load_reward_model(
    name_or_path: str | Path, *, trust_remote_code: bool = False, dtype: str | None = None
) -> RewardModel:
    """Load a sequence-classification checkpoint (local directory or hub id) as a
    :class:`RewardModel`: the base through mlx-lm's loader (its sanitize and quantization),
    the ``score`` head from the same safetensors files.

    Raises:
        ValueError: the config is not a ``*ForSequenceClassification``, or weights of the
            base or the head are missing.
    """
    from mlx_lm.utils import load_model

    from grpo.core.lm import trunk as trunk_of

    name = str(name_or_path)
    path = _local_path(name)
    if not is_reward_model_dir(path):
        raise ValueError(
            f"{name!r} is not a sequence-classification checkpoint: its config.json must name "
            f"an architecture ending in {SEQUENCE_CLASSIFICATION!r} (e.g. "
            "Qwen2ForSequenceClassification), as TRL reward models do"
        )
    base, config = load_model(path, strict=False, trust_remote_code=trust_remote_code)
    weights: dict[str, mx.array] = {}
    for f in sorted(path.glob("model*.safetensors")):
        weights.update(mx.load(str(f)))
    if SCORE_WEIGHT not in weights:
        raise ValueError(f"{name!r}: no {SCORE_WEIGHT!r} in its safetensors files")
    if hasattr(base, "sanitize"):
        weights = base.sanitize(dict(weights))
    trunk = trunk_of(base)
    from mlx.utils import tree_flatten

    missing = [k for k, _ in tree_flatten(trunk.parameters()) if f"model.{k}" not in weights]
    if missing:
        raise ValueError(f"{name!r}: the base's weights {missing[:5]} are missing")
    w = weights[SCORE_WEIGHT]
    score = nn.Linear(w.shape[1], w.shape[0], bias=False)
    score.weight = w
    num_labels = int(config.get("num_labels") or len(config.get("id2label") or {}) or w.shape[0])
    if num_labels != w.shape[0]:
        raise ValueError(f"{name!r}: num_labels={num_labels} but score.weight has {w.shape[0]}")
    cfg = SimpleNamespace(
        _name_or_path=name,
        pad_token_id=config.get("pad_token_id"),
        num_labels=num_labels,
        architectures=list(config.get("architectures") or ()),
        model_type=config.get("model_type"),
    )
    model = RewardModel(trunk, score, cfg)
    if dtype is not None:
        model.set_dtype(getattr(mx, dtype))
    model.eval()
    mx.eval(model.parameters())
    return model


def _hf(tokenizer: Any) -> Any:
    # mlx-lm's TokenizerWrapper holds the Hugging Face tokenizer; a Hugging Face fast
    # tokenizer's own ``_tokenizer`` is the Rust backend, which is not unwrapped.
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    return tokenizer._tokenizer if isinstance(tokenizer, TokenizerWrapper) else tokenizer


def load_reward_tokenizer(model: RewardModel, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer stored with the reward model (TRL loads it from the same id)."""
    from transformers import AutoTokenizer

    path = _local_path(model.config._name_or_path)
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def _is_conversational(prompt: Any) -> bool:
    return (
        isinstance(prompt, (list, tuple))
        and len(prompt) > 0
        and isinstance(prompt[0], Mapping)
        and "role" in prompt[0]
    )


class RewardModelReward:
    """A :class:`RewardModel` as a TRL reward function ``f(prompts, completions, **kw)``.

    ``__name__`` is TRL's: the last component of the model's ``_name_or_path``. Texts are
    ``prompt + completion``; conversational rows are one conversation rendered by the reward
    tokenizer's chat template (with ``chat_template_kwargs``). The tokenizer's pad token (its
    EOS when it has none, as TRL sets) pads on the right and marks the pooled position.
    """

    def __init__(
        self,
        model: RewardModel,
        tokenizer: Any,
        *,
        chat_template_kwargs: Mapping | None = None,
        batch_size: int = BATCH_SIZE,
    ):
        self.model = model
        self.tokenizer = _hf(tokenizer)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.batch_size = batch_size
        self.__name__ = str(model.config._name_or_path).rstrip("/").split("/")[-1]
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(self.tokenizer, "eos_token_id", None)
        self.pad_token_id = pad
        # TRL: the model pools at the tokenizer's pad token.
        model.config.pad_token_id = pad

    def texts(self, prompts: Sequence, completions: Sequence) -> list[str]:
        """The strings the reward model reads, one per row."""
        if prompts and _is_conversational(prompts[0]):
            return [
                self.tokenizer.apply_chat_template(
                    list(p) + list(c), tokenize=False, **self.chat_template_kwargs
                )
                for p, c in zip(prompts, completions, strict=True)
            ]
        return [p + c for p, c in zip(prompts, completions, strict=True)]

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        """First logit of the pooled head output for each text, in batches."""
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        out: list[float] = []
        pad = 0 if self.pad_token_id is None else self.pad_token_id
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start : start + self.batch_size]
            L = max(len(x) for x in chunk)
            rows = mx.array([list(x) + [pad] * (L - len(x)) for x in chunk], dtype=mx.int32)
            logits = self.model(rows, pad_token_id=self.pad_token_id)
            out.extend(logits[:, 0].tolist())
        return out

    def __call__(self, prompts: Sequence, completions: Sequence, **kwargs) -> list[float]:
        return self.score_texts(self.texts(prompts, completions))
