"""Tiny random configs of mlx-lm architectures, and the support matrix built from them.

``tests/test_architectures.py`` runs every case; ``docs/models.md`` is
:func:`support_matrix` of the same table (``python tests/arch_cases.py > docs/models.md``
regenerates it, and a test fails when the two differ).
"""

from __future__ import annotations

import json
from pathlib import Path

V = 128  # vocabulary (the character tokenizer uses 99 ids)
D = 64  # hidden size

_BASE = {
    "hidden_size": D,
    "num_hidden_layers": 2,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-6,
    "vocab_size": V,
    "max_position_embeddings": 512,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
_LINEAR_ATTN = {
    "linear_num_value_heads": 4,
    "linear_num_key_heads": 2,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
    "full_attention_interval": 2,
}


def _cfg(model_type: str, **over) -> dict:
    return {"model_type": model_type, **_BASE, **over}


# model_type -> (config, what the architecture exercises). Values such as logit scales and
# soft-caps are chosen far from 1 so that skipping them moves the log-probs visibly.
CASES: dict[str, tuple[dict, str]] = {
    "llama": (_cfg("llama"), "untied head"),
    "mistral": (_cfg("mistral", tie_word_embeddings=True), "tied embeddings (as_linear)"),
    "qwen2": (_cfg("qwen2", tie_word_embeddings=True), "tied embeddings, qkv bias"),
    "qwen3": (_cfg("qwen3"), "q/k norm"),
    "qwen3_moe": (
        _cfg("qwen3_moe", decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, **_MOE),
        "mixture of experts (SwitchGLU)",
    ),
    "qwen3_5": (
        {
            "model_type": "qwen3_5",
            "text_config": _cfg(
                "qwen3_5",
                **_LINEAR_ATTN,
                rope_parameters={
                    "type": "default",
                    "mrope_section": [2, 1, 1],
                    "rope_theta": 10000.0,
                    "partial_rotary_factor": 0.5,
                },
            ),
        },
        "gated-delta + attention hybrid (ArraysCache), untied head, nested text_config",
    ),
    "qwen3_next": (
        _cfg(
            "qwen3_next",
            **_LINEAR_ATTN,
            **_MOE,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            shared_expert_intermediate_size=32,
            partial_rotary_factor=0.5,
        ),
        "gated-delta hybrid with experts",
    ),
    "gemma": (_cfg("gemma"), "tied embeddings, scaled embeddings"),
    "gemma2": (
        _cfg("gemma2", final_logit_softcapping=2.0, attn_logit_softcapping=5.0),
        "final logit soft-capping, attention soft-capping",
    ),
    "gemma3_text": (
        _cfg("gemma3_text", sliding_window=4, sliding_window_pattern=2),
        "sliding window (RotatingKVCache) + global layers",
    ),
    "phi3": (_cfg("phi3"), "fused qkv / gate-up"),
    "granite": (
        _cfg(
            "granite",
            logits_scaling=0.25,
            attention_multiplier=0.25,
            embedding_multiplier=2.0,
            residual_multiplier=0.5,
            attention_bias=False,
            mlp_bias=False,
        ),
        "logit scaling",
    ),
    "granitemoehybrid": (
        _cfg(
            "granitemoehybrid",
            attention_bias=False,
            embedding_multiplier=2.0,
            attention_multiplier=0.25,
            logits_scaling=0.25,
            residual_multiplier=0.5,
            layer_types=["mamba", "attention"],
            num_local_experts=4,
            num_experts_per_tok=2,
            shared_intermediate_size=32,
            mamba_n_heads=4,
            mamba_d_head=32,
            mamba_proj_bias=False,
            mamba_d_state=8,
            mamba_d_conv=4,
            mamba_n_groups=1,
            mamba_conv_bias=True,
            tie_word_embeddings=True,
        ),
        "Mamba-2 + attention hybrid with experts, logit scaling",
    ),
    "cohere": (_cfg("cohere", logit_scale=4.0, layer_norm_eps=1e-5), "logit scale, tied"),
    "cohere2": (
        _cfg(
            "cohere2",
            logit_scale=4.0,
            layer_norm_eps=1e-5,
            sliding_window=4,
            sliding_window_pattern=2,
        ),
        "logit scale, sliding window",
    ),
    "olmo2": (_cfg("olmo2"), "post-norm blocks"),
    "smollm3": (_cfg("smollm3", no_rope_layer_interval=2), "layers without RoPE"),
    "gpt_oss": (
        _cfg(
            "gpt_oss",
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
        ),
        "attention sinks, sliding window, experts",
    ),
    "glm4_moe": (
        _cfg(
            "glm4_moe",
            moe_intermediate_size=32,
            norm_topk_prob=True,
            n_group=1,
            topk_group=1,
            n_shared_experts=1,
            n_routed_experts=4,
            routed_scaling_factor=1.0,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            rope_scaling=None,
            use_qk_norm=True,
            attention_bias=False,
            partial_rotary_factor=0.5,
        ),
        "dense then MoE layers, partial RoPE",
    ),
    "deepseek_v3": (
        _cfg(
            "deepseek_v3",
            moe_intermediate_size=32,
            n_shared_experts=1,
            n_routed_experts=4,
            num_experts_per_tok=2,
            kv_lora_rank=16,
            q_lora_rank=24,
            qk_rope_head_dim=8,
            v_head_dim=12,
            qk_nope_head_dim=16,
            first_k_dense_replace=1,
            num_key_value_heads=4,
        ),
        "multi-head latent attention (value head != key head), experts",
    ),
    "nemotron_h": (
        _cfg(
            "nemotron_h",
            hybrid_override_pattern=["M", "*", "-"],
            attention_bias=False,
            mamba_num_heads=4,
            mamba_head_dim=16,
            mamba_proj_bias=False,
            ssm_state_size=8,
            conv_kernel=4,
            n_groups=1,
            mlp_bias=False,
            layer_norm_epsilon=1e-5,
            use_bias=False,
            use_conv_bias=True,
        ),
        "Mamba-2 hybrid, trunk named `backbone`",
    ),
    "lfm2": (
        _cfg(
            "lfm2",
            norm_eps=1e-5,
            conv_bias=False,
            conv_L_cache=3,
            block_dim=D,
            block_multiple_of=16,
            block_ffn_dim_multiplier=1.0,
            block_auto_adjust_ff_dim=False,
            block_ff_dim=96,
            layer_types=["conv", "full_attention"],
            tie_word_embeddings=True,
        ),
        "short convolution (ArraysCache) + attention, tied",
    ),
    "falcon_h1": (
        _cfg(
            "falcon_h1",
            mamba_d_conv=4,
            mamba_d_head=16,
            mamba_d_ssm=64,
            mamba_d_state=8,
            mamba_n_heads=4,
            mamba_n_groups=1,
            mamba_chunk_size=8,
            lm_head_multiplier=4.0,
            embedding_multiplier=2.0,
            tie_word_embeddings=True,
        ),
        "Mamba-2 + attention in parallel, head multiplier",
    ),
    "mixtral": (_cfg("mixtral", num_local_experts=4, num_experts_per_tok=2), "mixture of experts"),
    "starcoder2": (
        _cfg("starcoder2", norm_epsilon=1e-5, tie_word_embeddings=True),
        "LayerNorm, biases",
    ),
}

# Types refused at trainer construction (none at present): model_type -> reason.
REFUSED: dict[str, str] = {}


def build(path: str | Path, model_type: str, *, seed: int = 0, std: float = 0.1) -> Path:
    """Write ``CASES[model_type]`` with seeded random weights and the char tokenizer."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    from grpo.io.tiny import build_tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {**CASES[model_type][0], "eos_token_id": 2, "torch_dtype": "float32"}
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    flat = tree_flatten(model.parameters())
    keys = mx.random.split(mx.random.key(seed), len(flat))
    weights = {}
    for (name, p), k in zip(flat, keys, strict=True):
        if "norm" in name and name.endswith("weight") and p.ndim == 1:
            weights[name] = 1.0 + 0.1 * mx.random.normal(p.shape, key=k)
        elif name.endswith("A_log"):
            weights[name] = mx.random.uniform(0.0, 1.0, p.shape, key=k)
        else:
            weights[name] = (std * mx.random.normal(p.shape, key=k)).astype(p.dtype)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    build_tokenizer(path)
    return path


def paths(model_dir: Path) -> tuple[str, str, str]:
    """How grpo runs the model in ``model_dir``: (training head, prompt sharing, rollout)."""
    from grpo.core.lm import check_split
    from grpo.core.rollout import batches_rows
    from grpo.core.shared_prefix import check_prefix_sharing
    from grpo.io.model import load_model

    model, _ = load_model(str(model_dir))
    head = "split (chunked head)" if check_split(model) else "model's own forward"
    shared = "yes" if check_prefix_sharing(model) else "no (packed rows)"
    rollout = "batched, compiled" if batches_rows(model) else "per prompt, mlx-lm caches"
    return head, shared, rollout


def support_matrix(model_dir=None) -> str:
    """``docs/models.md``: one row per tested model type (``model_dir(type)`` -> its build)."""
    if model_dir is None:
        import tempfile

        root = Path(tempfile.mkdtemp())
        model_dir = lambda name: build(root / name, name)  # noqa: E731
    lines = [
        "# Supported models",
        "",
        "Every mlx-lm model type below is tested by `tests/test_architectures.py` on a tiny",
        "random config loaded through `mlx_lm.load`: the loss's log-probs equal",
        "`log_softmax(model(prompt ++ completion))` (1e-5), the rollout's sampling log-probs",
        "equal the training forward's (1e-4), and two GRPO steps (LoRA and full fine-tune)",
        "change the trainable weights with finite metrics; LoRA reaches MoE experts through",
        "mlx-lm's `LoRASwitchLinear`. This page is generated from that test's cases",
        "(`python tests/arch_cases.py > docs/models.md`); a test fails if it drifts.",
        "",
        "Columns: *head*: the training forward runs the trunk and applies the model's own",
        "head only at completion positions (verified against the model's full forward when",
        "the trainer is built; a model that disagrees is scored by its own forward). *shared",
        "prefix*: each prompt's trunk pass serves its whole group (verified the same way).",
        "*rollout*: plain-`KVCache` models decode all rows in one compiled batch; sliding-",
        "window, recurrent/SSM and mixed caches prefill each prompt once and fork the cache",
        "into its group.",
        "",
        "Other mlx-lm types go through the same checks at construction; a model whose",
        "forward does not return `[B, L, V]` logits is refused with its `model_type`.",
        "MoE: no mlx-lm model exposes router logits, so `router_aux_loss_coef` must be 0.",
        "",
        "| model_type | exercises | head | shared prefix | rollout |",
        "|---|---|---|---|---|",
    ]
    for name, (_, note) in CASES.items():
        head, shared, rollout = paths(model_dir(name))
        lines.append(f"| `{name}` | {note} | {head} | {shared} | {rollout} |")
    if REFUSED:
        lines += ["", "## Refused", "", "| model_type | reason |", "|---|---|"]
        lines += [f"| `{name}` | {why} |" for name, why in REFUSED.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(support_matrix(), end="")
