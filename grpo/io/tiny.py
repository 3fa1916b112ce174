"""Build tiny seeded mlx-lm models and character-level tokenizers on disk.

Tests, demos and benchmarks never download weights: they build a model directory
from a seed (``config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json``) and load it through the real ``mlx_lm.load`` path.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHARS = tuple(string.digits + string.ascii_letters + string.punctuation + " \n")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "{% if not (loop.last and continue_final_message is defined and continue_final_message) %}"
    "<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# name -> (hidden, layers, heads, kv_heads, intermediate, vocab); parameter counts with
# tied embeddings: test ~0.37M, tiny ~3.2M, small ~28M, medium ~168M (benchmarks only).
SIZES = {
    "test": (128, 2, 4, 2, 352, 128),
    "tiny": (256, 4, 8, 4, 704, 1024),
    "small": (512, 8, 8, 4, 1408, 8192),
    "medium": (1024, 12, 16, 4, 2816, 32000),
}


def tokenizer_vocab() -> dict[str, int]:
    return {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}


def build_tokenizer(path: str | Path) -> None:
    """Write a character-level ``tokenizer.json`` + ``tokenizer_config.json`` to ``path``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordLevel(vocab=tokenizer_vocab(), unk_token="<|endoftext|>"))
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "unk_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def model_config(
    size: str = "tiny",
    *,
    model_type: str = "llama",
    vocab_size=None,
    max_position_embeddings: int = 2048,
) -> dict:
    hidden, layers, heads, kv_heads, inter, vocab = SIZES[size]
    vocab = max(vocab_size or vocab, len(tokenizer_vocab()))
    return {
        "model_type": model_type,
        "architectures": ["Qwen2ForCausalLM" if model_type == "qwen2" else "LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab,
        "max_position_embeddings": max_position_embeddings,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "eos_token_id": tokenizer_vocab()["<|im_end|>"],
        "torch_dtype": "float32",
    }


def seeded_weights(model, seed: int) -> dict[str, mx.array]:
    """Fresh N(0, 0.02) weights (norm scales 1) for every parameter, from one seed."""
    flat = tree_flatten(model.parameters())
    keys = mx.random.split(mx.random.key(seed), len(flat))
    out = {}
    for (name, p), k in zip(flat, keys, strict=True):
        if name.endswith("norm.weight") or "layernorm" in name:
            out[name] = mx.ones_like(p)
        elif name.endswith(".bias"):
            out[name] = mx.zeros_like(p)
        else:
            out[name] = (0.02 * mx.random.normal(p.shape, key=k)).astype(p.dtype)
    return out


def build_tiny_model(
    path: str | Path,
    *,
    size: str = "tiny",
    seed: int = 0,
    model_type: str = "llama",
    vocab_size: int | None = None,
    max_position_embeddings: int = 2048,
) -> Path:
    """Write a seeded mlx-lm model directory loadable by ``mlx_lm.load(path)``."""
    import importlib

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model_config(
        size, model_type=model_type, vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
    )  # fmt: skip
    arch = importlib.import_module(f"mlx_lm.models.{model_type}")
    model = arch.Model(arch.ModelArgs.from_dict(config))
    weights = seeded_weights(model, seed)
    model.update(tree_unflatten(list(weights.items())))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    build_tokenizer(path)
    return path


def build_tiny_reward_model(
    path: str | Path,
    *,
    size: str = "test",
    seed: int = 0,
    model_type: str = "llama",
    score_scale: float = 1.0,
) -> Path:
    """Write a seeded sequence-classification checkpoint laid out as transformers writes one
    (``*ForSequenceClassification``, ``num_labels`` 1, weights ``model.*`` and
    ``score.weight``, no LM head), with the character tokenizer."""
    import importlib

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model_config(size, model_type=model_type)
    arch = importlib.import_module(f"mlx_lm.models.{model_type}")
    model = arch.Model(arch.ModelArgs.from_dict(config))
    weights = {k: v for k, v in seeded_weights(model, seed).items() if k.startswith("model.")}
    key, bias_key = mx.random.split(mx.random.key(seed + 1))
    biases = sorted(k for k in weights if k.endswith(".bias"))
    # Non-zero q/k/v biases (qwen2), so a forward that drops them disagrees.
    for name, sub in zip(biases, mx.random.split(bias_key, max(len(biases), 1)), strict=False):
        weights[name] = 0.02 * mx.random.normal(weights[name].shape, key=sub)
    hidden = config["hidden_size"]
    weights["score.weight"] = score_scale * mx.random.normal((1, hidden), key=key) / hidden**0.5
    name = "Qwen2" if model_type == "qwen2" else "Llama"
    config.update(
        architectures=[f"{name}ForSequenceClassification"],
        id2label={"0": "LABEL_0"},
        label2id={"LABEL_0": 0},
        pad_token_id=tokenizer_vocab()["<|endoftext|>"],
    )
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    build_tokenizer(path)
    return path
