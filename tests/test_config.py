"""GRPOConfig: TRL names and defaults, resolved batch geometry, validation messages."""

import ast
from pathlib import Path

import attrs
import pytest

from grpo.config import GRPOConfig

TRL_CONFIG = Path("/work/ref/trl116/trl/trainer/grpo_config.py")

# Our defaults that intentionally differ from TRL (documented in GRPOConfig's docstring).
DIFFERENT_FROM_TRL = {"pad_to_multiple_of", "output_dir"}


def _trl_defaults() -> dict:
    tree = ast.parse(TRL_CONFIG.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "GRPOConfig")
    out = {}
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.value, ast.Call):
            for kw in node.value.keywords:
                if kw.arg == "default":
                    try:
                        out[node.target.id] = ast.literal_eval(kw.value)
                    except ValueError:
                        pass
    return out


@pytest.mark.skipif(not TRL_CONFIG.exists(), reason="TRL reference source not available")
def test_shared_fields_have_trl_defaults():
    trl = _trl_defaults()
    ours = {f.name: f.default for f in attrs.fields(GRPOConfig)}
    shared = (set(trl) & set(ours)) - DIFFERENT_FROM_TRL
    assert len(shared) >= 20, sorted(shared)
    for name in sorted(shared):
        want = trl[name]
        got = ours[name]
        got = list(got) if isinstance(got, tuple) else got
        assert got == want, f"{name}: ours={got!r}, TRL={want!r}"


def test_training_argument_defaults_match_transformers():
    c = GRPOConfig()
    assert (c.learning_rate, c.per_device_train_batch_size, c.gradient_accumulation_steps) == (
        1e-6,
        8,
        1,
    )
    assert (c.max_steps, c.num_train_epochs, c.logging_steps, c.save_steps, c.seed) == (
        -1,
        3.0,
        10,
        500,
        42,
    )
    assert (c.lr_scheduler_type, c.warmup_ratio, c.warmup_steps, c.weight_decay) == (
        "linear",
        0.0,
        0,
        0.0,
    )
    assert (c.adam_beta1, c.adam_beta2, c.adam_epsilon, c.max_grad_norm) == (0.9, 0.999, 1e-8, 1.0)
    assert c.use_lora is None  # TRL: every weight trains unless the trainer gets a peft_config


def test_docstring_lists_every_deliberate_difference():
    doc = GRPOConfig.__doc__
    for name in DIFFERENT_FROM_TRL:
        assert name in doc
    for name in ("use_lora", "lora_dropout", "max_prompt_length", "steps_per_generation"):
        assert name in doc


@pytest.mark.parametrize(
    "kw,rows,spg,prompts",
    [
        (dict(), 8, 1, 1),
        (
            dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, num_generations=4),
            8,
            2,
            2,
        ),
        (
            dict(per_device_train_batch_size=4, generation_batch_size=16, num_generations=4),
            16,
            4,
            4,
        ),
        (dict(per_device_train_batch_size=2, steps_per_generation=3, num_generations=3), 6, 3, 2),
    ],
)
def test_resolved_generation_geometry(kw, rows, spg, prompts):
    c = GRPOConfig(**kw)
    assert c.resolved_generation_batch_size == rows
    assert c.resolved_steps_per_generation == spg
    assert c.prompts_per_generation == prompts


def test_optimizer_steps_per_generation_counts_iterations():
    c = GRPOConfig(
        per_device_train_batch_size=4,
        steps_per_generation=4,
        gradient_accumulation_steps=2,
        num_iterations=3,
        num_generations=4,
    )
    assert c.optimizer_steps_per_generation == 6


def test_scale_rewards_accepts_trl_booleans():
    assert GRPOConfig(scale_rewards=True).scale_rewards == "group"
    assert GRPOConfig(scale_rewards=False).scale_rewards == "none"


def test_evolve_and_dict_round_trip():
    c = GRPOConfig(per_device_train_batch_size=4, num_generations=4, reward_weights=[1.0, 0.5])
    d = c.to_dict()
    assert d["reward_weights"] == [1.0, 0.5]
    assert GRPOConfig.from_dict(d) == c
    assert attrs.evolve(c, beta=0.1).beta == 0.1
    with pytest.raises(ValueError, match="unknown field"):
        GRPOConfig.from_dict({**d, "not_a_field": 1})


def test_frozen():
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        GRPOConfig().beta = 1.0


@pytest.mark.parametrize(
    "kw,needles",
    [
        (dict(num_generations=1), ["num_generations=1", "at least 2"]),
        (
            dict(per_device_train_batch_size=6, num_generations=4),
            ["generation_batch_size=6", "num_generations=4"],
        ),
        (dict(loss_type="ppo"), ["loss_type='ppo'", "dapo"]),
        (dict(scale_rewards="std"), ["scale_rewards='std'"]),
        (dict(importance_sampling_level="word"), ["importance_sampling_level='word'"]),
        (dict(epsilon=0.0), ["epsilon=0.0"]),
        (dict(epsilon_high=-0.1), ["epsilon_high=-0.1"]),
        (dict(beta=-0.01), ["beta=-0.01"]),
        (dict(max_completion_length=0), ["max_completion_length=0"]),
        (dict(temperature=0.0), ["temperature=0.0"]),
        (dict(top_p=1.5), ["top_p=1.5"]),
        (
            dict(generation_batch_size=16, steps_per_generation=3),
            ["generation_batch_size=16", "steps_per_generation=3"],
        ),
        (
            dict(
                per_device_train_batch_size=4,
                steps_per_generation=3,
                gradient_accumulation_steps=2,
                num_generations=2,
            ),
            ["steps_per_generation=3", "gradient_accumulation_steps=2"],
        ),
        (
            dict(lr_scheduler_type="reduce_lr_on_plateau"),
            ["lr_scheduler_type='reduce_lr_on_plateau'"],
        ),
        (dict(lr_scheduler_type="cosine_with_min_lr"), ["cosine_with_min_lr", "min_lr"]),
        (
            dict(lr_scheduler_type="cosine", lr_scheduler_kwargs={"min_lr": 0.1}),
            ["lr_scheduler_kwargs", "min_lr"],
        ),
        (dict(optim="lion_8bit"), ["optim='lion_8bit'", "adamw_torch"]),
        (dict(optim="sgd", optim_args="momentum"), ["optim_args", "key=value"]),
        (dict(warmup_steps=-1), ["warmup_steps=-1"]),
        (dict(max_grad_norm=-1.0), ["max_grad_norm=-1.0"]),
        (dict(max_steps=0), ["max_steps=0"]),
        (dict(use_lora=False, quantize_bits=4), ["quantize_bits=4", "use_lora=True"]),
        (dict(quantize_bits=7), ["quantize_bits=7"]),
        (dict(lora_rank=0), ["lora_rank=0"]),
        (dict(reward_weights=[1.0, float("nan")]), ["reward_weights"]),
        (dict(num_iterations=0), ["num_iterations=0"]),
        (dict(top_entropy_quantile=1.5), ["top_entropy_quantile=1.5"]),
        (dict(output_dir=""), ["output_dir=''"]),
    ],
)
def test_invalid_values_name_the_field(kw, needles):
    with pytest.raises(ValueError) as e:
        GRPOConfig(**kw)
    for needle in needles:
        assert needle in str(e.value)


def test_all_errors_reported_together():
    with pytest.raises(ValueError) as e:
        GRPOConfig(beta=-1.0, temperature=-1.0)
    assert "beta=-1.0" in str(e.value) and "temperature=-1.0" in str(e.value)


def test_warmup_steps_for():
    assert GRPOConfig(warmup_ratio=0.1).warmup_steps_for(25) == 3
    assert GRPOConfig(warmup_ratio=0.1, warmup_steps=7).warmup_steps_for(25) == 7
    assert GRPOConfig().warmup_steps_for(25) == 0
