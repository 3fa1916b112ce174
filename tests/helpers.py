"""Small shared pieces for trainer-level tests (configs and prompts of the tiny runs)."""

import numpy as np
from mlx.utils import tree_flatten

from grpo.config import GRPOConfig

PROMPTS = [{"prompt": p} for p in ["a", "b", "cd", "efg", "hi", "jk", "lmn", "op"]]


def tiny_args(output_dir, **kw) -> GRPOConfig:
    """A few-second GRPO run on the tiny model: 2 prompts x 4 completions of 4 tokens."""
    base = dict(
        output_dir=str(output_dir),
        use_lora=True,  # the tiny runs test LoRA unless they say otherwise
        max_steps=6,
        num_generations=4,
        per_device_train_batch_size=8,
        max_completion_length=4,
        max_prompt_length=8,
        learning_rate=1e-2,
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    return GRPOConfig(**{**base, **kw})


def flat_numpy(tree) -> dict:
    """A parameter (or optimizer-state) tree as ``{dotted.path: np.ndarray}``."""
    return {k: np.array(v) for k, v in tree_flatten(tree)}
