"""Built-in verifiable tasks: seeded datasets of ``{"prompt", "answer"}`` rows.

A task is a small string transformation with an exact answer, generated from a seed so
that the default job needs no download:

- ``reverse``: ``"reverse: kqzt\\n"`` -> ``"tzqk"``
- ``sort``: ``"sort: kqzt\\n"`` -> ``"kqtz"``

Prompts are plain text (no chat template), which keeps them short for the character-level
tokenizer of :mod:`grpo.io.tiny`. Their reward, :func:`grpo.rewards.exact_match`, is in
``[0, 1]`` with partial credit per character, so the mean reward rises smoothly while a
model learns:

.. math::

    r(c, a) = \\frac{\\#\\{i : c_i = a_i\\}}{\\max(|c|, |a|)}
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Collection

import attrs

# The tasks' reward lives with the other built-in rewards; these names stay importable here.
from grpo.rewards import char_match, exact_match  # noqa: F401
from grpo.rewards import exact_match_text as completion_text  # noqa: F401

ALPHABET = string.ascii_lowercase


def _reverse(s: str) -> str:
    return s[::-1]


def _sort(s: str) -> str:
    return "".join(sorted(s))


@attrs.frozen
class Task:
    """A seeded string-transformation task.

    Attributes:
        name: registry name (``grpo train --dataset <name>``).
        verb: the word the prompt starts with (``"reverse: abc\\n"``).
        transform: maps the input string to its exact answer.
        min_len: shortest input string.
        max_len: longest input string.
        alphabet: characters the inputs are drawn from.
    """

    name: str
    verb: str
    transform: Callable[[str], str]
    min_len: int = 3
    max_len: int = 5
    alphabet: str = ALPHABET

    def prompt(self, s: str) -> str:
        return f"{self.verb}: {s}\n"

    def row(self, s: str) -> dict[str, str]:
        return {"prompt": self.prompt(s), "answer": self.transform(s)}


TASKS: dict[str, Task] = {
    "reverse": Task("reverse", "reverse", _reverse),
    "sort": Task("sort", "sort", _sort),
}
DEFAULT_TASK = "reverse"


def get_task(name: str) -> Task:
    """The built-in task called ``name``; ``ValueError`` naming the choices otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def random_strings(n: int, *, seed: int, task: Task) -> list[str]:
    """``n`` input strings drawn from ``task.alphabet`` with lengths in ``[min_len, max_len]``."""
    rng = random.Random(seed)
    return [
        "".join(rng.choices(task.alphabet, k=rng.randint(task.min_len, task.max_len)))
        for _ in range(n)
    ]


def make_dataset(name: str = DEFAULT_TASK, n: int = 1000, *, seed: int = 0) -> list[dict[str, str]]:
    """A datasets-style list of ``{"prompt", "answer"}`` rows for the task ``name``.

    Args:
        name: a key of :data:`TASKS`.
        n: number of rows.
        seed: the same seed gives the same rows.

    Returns:
        ``n`` dicts; ``prompt`` is plain text ending in a newline, ``answer`` the exact answer.
    """
    if n < 1:
        raise ValueError(f"make_dataset: n must be >= 1, got n={n!r}")
    task = get_task(name)
    return [task.row(s) for s in random_strings(n, seed=seed, task=task)]


def held_out_dataset(
    name: str = DEFAULT_TASK, n: int = 64, *, seed: int, exclude: Collection[str] = ()
) -> list[dict[str, str]]:
    """``n`` distinct rows of task ``name`` whose prompts are not in ``exclude`` (seeded).

    Raises ``ValueError`` if the task has too few distinct inputs left to fill ``n`` rows.
    """
    task = get_task(name)
    rng, rows, seen = random.Random(seed), [], set(exclude)
    for _ in range(100 * n):
        s = "".join(rng.choices(task.alphabet, k=rng.randint(task.min_len, task.max_len)))
        if task.prompt(s) not in seen:
            seen.add(task.prompt(s))
            rows.append(task.row(s))
            if len(rows) == n:
                return rows
    raise ValueError(f"held_out_dataset: could not draw {n} unseen rows of task {name!r}")
