"""Character-level tokenizers carrying real chat templates (tests/chat_templates/), so the
tool-calling code is tested against what Qwen, Llama 3.1 and Mistral templates render,
without downloading any model."""

import json
from pathlib import Path

from grpo.io.tiny import CHARS

TEMPLATES_DIR = Path(__file__).parent / "chat_templates"

SPECS = {
    "qwen2_5": dict(
        specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        eos="<|im_end|>",
        bos=None,
        format="hermes",
    ),
    "qwen3": dict(
        specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        eos="<|im_end|>",
        bos=None,
        format="hermes",
    ),
    "llama3_1": dict(
        specials=(
            "<|end_of_text|>",
            "<|begin_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|eom_id|>",
            "<|python_tag|>",
        ),
        eos="<|eot_id|>",
        bos="<|begin_of_text|>",
        format="llama3",
    ),
    "mistral_nemo": dict(
        specials=(
            "<unk>",
            "<s>",
            "</s>",
            "[INST]",
            "[/INST]",
            "[TOOL_CALLS]",
            "[AVAILABLE_TOOLS]",
            "[/AVAILABLE_TOOLS]",
            "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]",
        ),
        eos="</s>",
        bos="<s>",
        format="mistral",
    ),
}


def template(name: str) -> str:
    return (TEMPLATES_DIR / f"{name}.jinja").read_text()


def write_tokenizer(path, name: str) -> Path:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` for template ``name`` to ``path``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    spec = SPECS[name]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(spec["specials"] + CHARS)}
    unk = spec["specials"][0]
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.add_special_tokens(list(spec["specials"]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": spec["eos"],
        "bos_token": spec["bos"],
        "pad_token": unk,
        "unk_token": unk,
        "chat_template": template(name),
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return path


def load_tokenizer(tmp_path, name: str):
    """A Hugging Face fast tokenizer for template ``name``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(write_tokenizer(Path(tmp_path) / name, name)))


def build_chat_model(path, name: str, *, seed: int = 0) -> Path:
    """A tiny seeded model directory whose tokenizer carries template ``name``."""
    from grpo.io.tiny import build_tiny_model

    path = build_tiny_model(path, size="test", seed=seed)
    write_tokenizer(path, name)
    config = json.loads((path / "config.json").read_text())
    spec = SPECS[name]
    config["eos_token_id"] = (spec["specials"] + CHARS).index(spec["eos"])
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path
