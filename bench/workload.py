"""The benchmark workload shared by bench/step.py and the peers in bench/peers/.

Standard library only: it is imported under TRL's environment too, which has no grpo.
"""

from __future__ import annotations

import random

G = 8
PROMPT_CHARS = 32
_LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789 "


def prompt_texts(n: int, *, seed: int = 0) -> list[str]:
    """``n`` seeded random prompts of ``PROMPT_CHARS`` characters (one token each, char-level)."""
    rng = random.Random(seed)
    return ["".join(rng.choice(_LETTERS) for _ in range(PROMPT_CHARS)) for _ in range(n)]


def digit_fraction(completions) -> list[float]:
    """Cheap deterministic reward: the fraction of digits in each completion."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def memory_rows(T: int, *, seed: int = 0):
    """One prompt of ``PROMPT_CHARS`` ids, ``G`` completions of ``T`` ids and ``G`` advantages.

    Synthetic ids (3..98), so every engine of bench/memory.py scores the same rows.
    NumPy is imported here, not at module level: both environments have it.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    prompt = rng.integers(3, 99, PROMPT_CHARS).tolist()
    completions = rng.integers(3, 99, (G, T)).tolist()
    advantages = rng.standard_normal(G).astype("float32").tolist()
    return prompt, completions, advantages
