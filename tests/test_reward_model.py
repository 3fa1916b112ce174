"""Sequence-classification reward models on MLX, checked against a NumPy forward.

The reference reads the checkpoint with ``safetensors.numpy`` (not mlx) and runs the
Llama / Qwen2 decoder in float64: embeddings, RMSNorm, attention with rotate-half RoPE and
grouped KV heads (q/k/v biases for Qwen2), SwiGLU MLP, final norm, the ``score`` head, pooled
at the rightmost non-pad token as transformers' ``GenericForSequenceClassification`` pools.
"""

import json

import numpy as np
import pytest
from helpers import tiny_args
from safetensors.numpy import load_file

import grpo  # noqa: F401
from grpo.io.reward_model import (
    RewardModel,
    RewardModelReward,
    load_reward_model,
    load_reward_tokenizer,
)
from grpo.io.tiny import build_tiny_model, build_tiny_reward_model
from grpo.rewards import resolve_reward_funcs

RTOL, ATOL = 2e-4, 2e-5  # float32 MLX against float64 NumPy over two layers


# --- NumPy reference ------------------------------------------------------------------------


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, theta):
    # x [H, L, d]; rotate-half convention (transformers' Llama / Qwen2, mlx-lm non-traditional)
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    ang = np.arange(x.shape[1], dtype=np.float64)[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    half = np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], axis=-1)
    return x * cos + half * sin


def np_hidden_states(weights, config, ids):
    """Last hidden states ``[L, D]`` of one unpadded row."""
    W = {k: v.astype(np.float64) for k, v in weights.items()}
    D, H, K = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    d, eps, theta = D // H, config["rms_norm_eps"], config["rope_theta"]
    h = W["model.embed_tokens.weight"][np.asarray(ids)]
    L = h.shape[0]
    causal = np.triu(np.full((L, L), -np.inf), k=1)

    def proj(x, name):
        out = x @ W[f"{name}.weight"].T
        return out + W[f"{name}.bias"] if f"{name}.bias" in W else out

    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        x = _rms(h, W[f"{p}.input_layernorm.weight"], eps)
        q = proj(x, f"{p}.self_attn.q_proj").reshape(L, H, d).transpose(1, 0, 2)
        k = proj(x, f"{p}.self_attn.k_proj").reshape(L, K, d).transpose(1, 0, 2)
        v = proj(x, f"{p}.self_attn.v_proj").reshape(L, K, d).transpose(1, 0, 2)
        q, k = _rope(q, theta), _rope(k, theta)
        k, v = np.repeat(k, H // K, axis=0), np.repeat(v, H // K, axis=0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(d) + causal
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = (a @ v).transpose(1, 0, 2).reshape(L, D)
        h = h + proj(o, f"{p}.self_attn.o_proj")
        x = _rms(h, W[f"{p}.post_attention_layernorm.weight"], eps)
        g, u = proj(x, f"{p}.mlp.gate_proj"), proj(x, f"{p}.mlp.up_proj")
        h = h + proj(g / (1 + np.exp(-g)) * u, f"{p}.mlp.down_proj")
    return _rms(h, W["model.norm.weight"], eps)


def np_reward(model_dir, ids, pad_token_id):
    """transformers' pooled score of one row of token ids."""
    weights = load_file(str(model_dir / "model.safetensors"))
    config = json.loads((model_dir / "config.json").read_text())
    h = np_hidden_states(weights, config, ids)
    non_pad = [t for t, x in enumerate(ids) if x != pad_token_id]
    last = non_pad[-1] if non_pad else 0
    return float(h[last] @ weights["score.weight"].astype(np.float64)[0])


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    return build_tiny_reward_model(tmp_path_factory.mktemp("rm") / "tiny-rm", seed=3)


@pytest.fixture(scope="module")
def rm(rm_dir):
    return load_reward_model(str(rm_dir))


@pytest.fixture(scope="module")
def tokenizer(rm):
    return load_reward_tokenizer(rm)


TEXTS = [("ab", " x"), ("hello", " world, this is longer!"), ("q", "?"), ("7+8=", "15")]


# --- tests ----------------------------------------------------------------------------------


def test_layout_is_transformers_sequence_classification(rm_dir, rm):
    config = json.loads((rm_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    keys = set(load_file(str(rm_dir / "model.safetensors")))
    assert "score.weight" in keys and not any(k.startswith("lm_head") for k in keys)
    assert all(k == "score.weight" or k.startswith("model.") for k in keys)
    assert isinstance(rm, RewardModel) and rm.config.num_labels == 1


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_scores_match_numpy_forward_batched_with_padding(tmp_path, model_type):
    path = build_tiny_reward_model(tmp_path / f"rm-{model_type}", seed=5, model_type=model_type)
    model = load_reward_model(str(path))
    tok = load_reward_tokenizer(model)
    fn = RewardModelReward(model, tok, batch_size=3)  # 4 rows: a padded batch of 3, then 1
    prompts, completions = zip(*TEXTS, strict=True)
    got = fn(prompts=list(prompts), completions=list(completions))
    ids = [tok(p + c, add_special_tokens=False)["input_ids"] for p, c in TEXTS]
    want = [np_reward(path, x, tok.pad_token_id) for x in ids]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    # Different rows really score differently (the check is not comparing constants).
    assert np.ptp(want) > 1e-3
    # A row scores the same alone as padded inside a batch.
    alone = [fn(prompts=[p], completions=[c])[0] for p, c in TEXTS]
    np.testing.assert_allclose(alone, got, rtol=RTOL, atol=ATOL)


def test_pooling_is_at_the_rightmost_non_pad_token(rm_dir, rm, tokenizer):
    # A pad token inside the text itself: transformers pools before the trailing pads.
    fn = RewardModelReward(rm, tokenizer)
    text = "abc<|endoftext|><|endoftext|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[-1] == tokenizer.pad_token_id
    (got,) = fn.score_texts([text])
    want = np_reward(rm_dir, ids, tokenizer.pad_token_id)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    (abc,) = fn.score_texts(["abc"])
    assert got == pytest.approx(abc, abs=1e-6)
    assert want == pytest.approx(np_reward(rm_dir, ids[:3], tokenizer.pad_token_id), abs=1e-9)


def test_conversational_rows_are_rendered_with_the_reward_chat_template(rm_dir, rm, tokenizer):
    fn = RewardModelReward(rm, tokenizer)
    prompts = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "2+2?"}]]
    completions = [
        [{"role": "assistant", "content": "yo"}],
        [{"role": "assistant", "content": "4"}],
    ]
    texts = fn.texts(prompts, completions)
    assert texts[0] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    got = fn(prompts=prompts, completions=completions)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    want = [np_reward(rm_dir, x, tokenizer.pad_token_id) for x in ids]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_resolve_by_path_names_it_as_trl_and_checks_processing_classes(rm_dir, tokenizer):
    (fn,) = resolve_reward_funcs(str(rm_dir))
    assert isinstance(fn, RewardModelReward) and fn.__name__ == "tiny-rm"
    (same,) = resolve_reward_funcs([fn.model], [tokenizer])
    assert same.tokenizer is tokenizer and same.__name__ == "tiny-rm"
    fns = resolve_reward_funcs(["think_format", str(rm_dir)], [None, tokenizer])
    assert fns[0].__name__ == "think_format" and fns[1].tokenizer is tokenizer
    with pytest.raises(ValueError, match=r"reward processing classes \(1\) must match .* \(2\)"):
        resolve_reward_funcs(["think_format", str(rm_dir)], [tokenizer])
    with pytest.raises(ValueError, match="unknown reward function"):
        resolve_reward_funcs(str(rm_dir.parent))  # a directory that is not a reward model


def test_load_refuses_a_causal_lm(tmp_path):
    path = build_tiny_model(tmp_path / "lm", size="test", seed=0)
    with pytest.raises(ValueError, match="not a sequence-classification checkpoint"):
        load_reward_model(str(path))


class _ShoutingTokenizer:
    """A reward tokenizer that is not the model's own: upper-cases before encoding."""

    def __init__(self, inner):
        self.inner = inner
        self.pad_token_id = inner.pad_token_id
        self.seen: list[str] = []

    def __call__(self, texts, **kwargs):
        self.seen.extend(texts)
        return self.inner([t.upper() for t in texts], **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        return self.inner.apply_chat_template(*args, **kwargs)


def test_trainer_scores_with_the_reward_model_and_its_processing_class(
    tmp_path, tiny_model_dir, rm_dir, rm, tokenizer
):
    from grpo.trainer import GRPOTrainer

    shouting = _ShoutingTokenizer(tokenizer)
    args = tiny_args(tmp_path / "out", max_steps=1)
    data = [{"prompt": p} for p in ["ab", "cd"]]
    trainer = GRPOTrainer(
        str(tiny_model_dir),
        reward_funcs=[str(rm_dir)],
        args=args,
        train_dataset=data,
        reward_processing_classes=shouting,
    )
    assert trainer.reward_names == ("tiny-rm",)
    assert trainer.reward_processing_classes == [shouting]
    trainer.train()
    (record,) = trainer.log_history
    # Every generated row went through the given tokenizer; the logged mean is the reference
    # forward's mean over exactly those (upper-cased) texts.
    assert len(shouting.seen) == 8
    ids = [tokenizer(t.upper(), add_special_tokens=False)["input_ids"] for t in shouting.seen]
    want = np.mean([np_reward(rm_dir, x, tokenizer.pad_token_id) for x in ids])
    assert record["rewards/tiny-rm/mean"] == pytest.approx(want, rel=RTOL, abs=ATOL)
