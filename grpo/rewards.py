"""Built-in reward functions, usable by name, and the resolver for reward-function specs.

Every built-in has TRL's signature ``fn(prompts, completions, completion_ids, **kwargs)`` (all by
keyword), accepts plain-text completions and conversational ones
(``[{"role": "assistant", "content": text}]``), and documents its range:

==================  =========  ================================================================
name                range      meaning
==================  =========  ================================================================
``answer_match``    {0, 1}     the completion's answer equals the ``answer`` column (None where
                               the row has no answer)
``think_format``    {0, 1}     ``<think>...</think><answer>...</answer>`` layout
``length_penalty``  [-1, 0]    DAPO's soft overlong penalty on completion token count
``unit_tests``      {0, 1}     the completion's code passes the ``tests`` column, run in a
                               subprocess with a timeout and no network (None without tests)
``exact_match``     [0, 1]     per-character credit against the ``answer`` column (the
                               built-in tasks' reward, :mod:`grpo.tasks`)
==================  =========  ================================================================

``resolve_reward_funcs`` turns a spec (a callable, a built-in name, ``"module:function"``,
``"path/to/file.py:function"``, a reward model, a comma-separated string or a list of these)
into callables. A reward model is, as in TRL, a sequence-classification checkpoint given by
its path or hub id, or one loaded with :func:`grpo.io.reward_model.load_reward_model`; it
scores on MLX (:class:`grpo.io.reward_model.RewardModelReward`).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import threading
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

HAS_MATH_VERIFY = importlib.util.find_spec("math_verify") is not None

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED = re.compile(r"\\boxed\s*\{")
_FRAC = re.compile(r"\\d?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_MATHS = re.compile(r"[\d\\^]")
_THINK_ANSWER = re.compile(
    r"^\s*<think>(?!.*<think>).*?</think>\s*<answer>(?!.*<answer>).*?</answer>\s*$", re.DOTALL
)


def completion_text(completion: Any) -> str:
    """Text of one completion: the string itself, or the last message's ``content``."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content") or "")
    raise TypeError(
        f"completion must be a string or a list of {{role, content}} messages, got {completion!r:.80}"
    )


def _boxed(text: str) -> str | None:
    starts = list(_BOXED.finditer(text))
    if not starts:
        return None
    i, depth = starts[-1].end(), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_answer(text: str) -> str:
    """The final answer in ``text``: the last ``<answer>...</answer>``, else the last
    ``\\boxed{...}``, else what follows the last ``####`` (GSM8K), else the whole text."""
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip()
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    return text.strip()


def normalize_answer(text: str) -> str:
    """Lower-case, collapse whitespace, drop ``$`` wrappers, thousands commas in numbers and a
    trailing period."""
    text = _FRAC.sub(r"\1/\2", text.strip())
    text = text.replace("\\$", "").replace("$", "").replace("\\%", "%")
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    text = re.sub(r"\s+", " ", text).strip().rstrip(".").strip()
    return text.lower()


def parse_number(text: str) -> Fraction | None:
    """Exact value of a plain number (``-3``, ``0.75``, ``3/4``, ``1e3``, ``1,000``), else None."""
    s = normalize_answer(text).rstrip("%").replace(" ", "")
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _math_verify_match(predicted: str, reference: str) -> bool:
    from math_verify import parse, verify

    # math-verify's timeouts use SIGALRM, which only the main thread may set (TRL does the same).
    main = threading.current_thread() is threading.main_thread()
    gold = parse(reference, parsing_timeout=5 if main else None)
    pred = parse(predicted, parsing_timeout=5 if main else None)
    return bool(gold) and bool(verify(gold, pred, timeout_seconds=5 if main else None))


def answers_match(predicted: str, reference: str, *, use_math_verify: bool | None = None) -> bool:
    """Whether ``predicted`` (a completion's text) answers ``reference``.

    Both sides go through :func:`extract_answer`. Plain numbers compare by exact value, other
    answers by :func:`normalize_answer`; when those differ and the reference looks mathematical
    (a digit, ``\\`` or ``^``), ``math-verify`` (default: when installed) compares symbolically.
    """
    pred, ref = extract_answer(predicted), extract_answer(reference)
    a, b = parse_number(pred), parse_number(ref)
    if a is not None and b is not None:
        return a == b
    if normalize_answer(pred) == normalize_answer(ref):
        return True
    if use_math_verify is None:
        use_math_verify = HAS_MATH_VERIFY
    # Only mathematical references go to math-verify: it reads words as products of symbols,
    # so "pairs" would equal "paris".
    if use_math_verify and _MATHS.search(ref):
        # math-verify looks for "$...$" / \boxed{} anchors; wrap the extracted answers so.
        return bool(_math_verify_match(f"${pred}$", f"${ref}$"))
    return False


def answer_match(completions: list, answer: list, **kwargs) -> list[float | None]:
    """1.0 when the completion's answer equals the ``answer`` column, else 0.0. Range {0, 1}.

    Rows whose ``answer`` is None are not applicable (None), so this composes with other task
    rewards in a multi-task dataset. See :func:`answers_match` for the comparison.
    """
    return [
        None if ref is None else float(answers_match(completion_text(c), str(ref)))
        for c, ref in zip(completions, answer, strict=True)
    ]


def think_format(completions: list, **kwargs) -> list[float]:
    """1.0 when the completion is ``<think>...</think>`` then ``<answer>...</answer>`` (one of
    each, surrounding whitespace allowed), else 0.0. Range {0, 1}."""
    return [1.0 if _THINK_ANSWER.match(completion_text(c)) else 0.0 for c in completions]


class LengthPenalty:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13). Range [-1, 0].

    .. math::

        r(L) = \\begin{cases} 0 & L \\le L_{max} - L_c \\\\
        \\frac{L_{max} - L_c - L}{L_c} & L_{max} - L_c < L \\le L_{max} \\\\
        -1 & L > L_{max} \\end{cases}

    ``L`` is the completion's token count. ``max_length`` defaults to
    ``trainer_state.max_completion_length`` (else 1024) and ``cache`` to a quarter of it.
    """

    __name__ = "length_penalty"

    def __init__(self, max_length: int | None = None, cache: int | None = None):
        if max_length is not None and max_length < 1:
            raise ValueError(f"length_penalty: max_length must be >= 1, got {max_length}")
        if cache is not None and cache < 1:
            raise ValueError(f"length_penalty: cache must be >= 1, got {cache}")
        self.max_length, self.cache = max_length, cache

    def _limits(self, trainer_state: Any) -> tuple[int, int]:
        max_length = self.max_length
        if max_length is None:
            get = trainer_state.get if isinstance(trainer_state, dict) else None
            budget = get("max_completion_length") if get else None
            budget = budget or getattr(trainer_state, "max_completion_length", None)
            max_length = budget or 1024
        cache = min(self.cache or max(1, max_length // 4), max_length)
        return max_length, cache

    def __call__(self, completion_ids: list, trainer_state: Any = None, **kwargs) -> list[float]:
        max_length, cache = self._limits(trainer_state)
        out = []
        for ids in completion_ids:
            over = len(ids) - (max_length - cache)
            out.append(-min(max(over, 0) / cache, 1.0))
        return out


length_penalty = LengthPenalty()

_CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)
# Prepended to every program: sockets refuse to open, so a completion cannot reach the
# network (best effort inside one interpreter, not a security boundary).
_NO_NETWORK = """\
import socket as _s
def _refuse(*a, **k):
    raise OSError("network access is disabled in the unit_tests sandbox")
_s.socket = _s.create_connection = _s.socketpair = _s.getaddrinfo = _refuse
del _s, _refuse
"""


def extract_code(text: str) -> str:
    """The last fenced code block of ``text`` (```python ... ```), else the whole text."""
    blocks = _CODE_BLOCK.findall(text)
    return blocks[-1] if blocks else text


def _prelude(memory_bytes: int, cpu_seconds: int) -> str:
    # Limits are set by the child itself: a preexec_fn is unsafe with the reward's threads.
    return _NO_NETWORK + (
        "import resource as _r\n"
        f"for _k, _v in ((_r.RLIMIT_AS, {memory_bytes}), (_r.RLIMIT_CPU, {cpu_seconds})):\n"
        "    try:\n"
        "        _r.setrlimit(_k, (_v, _v))\n"
        "    except (ValueError, OSError):\n"
        "        pass  # macOS refuses RLIMIT_AS; the timeout still applies\n"
        "del _r, _k, _v\n"
    )


def run_python(program: str, *, timeout: float, memory_mb: int = 1024) -> bool:
    """Run ``program`` in a fresh isolated interpreter; True when it exits with status 0.

    The child gets an empty working directory, an empty environment, ``python -I`` (no
    user site, no ``PYTHON*`` variables), no network (sockets refuse), and memory / CPU
    limits; on ``timeout`` seconds its whole process group is killed and the result is
    False.
    """
    import os
    import signal
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="grpo-unit-tests-") as cwd:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _prelude(memory_mb * 2**20, math.ceil(timeout)) + program],
            cwd=cwd, env={}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            return proc.wait(timeout=timeout) == 0
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the child and anything it spawned
            proc.wait()
            return False


class UnitTests:
    """1.0 when the completion's code passes the row's ``tests``, else 0.0. Range {0, 1}.

    The code is the completion's last fenced code block (else its whole text); ``tests`` is
    Python source (asserts, or calls that raise on failure), or a list of such lines. The
    program ``code + tests`` runs by :func:`run_python` with ``timeout`` seconds; an
    exception, a failed assert, a timeout or a network attempt scores 0. Completions run
    ``workers`` at a time (default: the CPU count). Rows whose ``tests`` is None score None.
    """

    __name__ = "unit_tests"

    def __init__(self, timeout: float = 5.0, workers: int | None = None, memory_mb: int = 1024):
        if timeout <= 0:
            raise ValueError(f"unit_tests: timeout must be > 0, got {timeout}")
        self.timeout, self.workers, self.memory_mb = timeout, workers, memory_mb

    def _one(self, completion: Any, tests: Any) -> float | None:
        if tests is None:
            return None
        body = "\n".join(tests) if isinstance(tests, (list, tuple)) else str(tests)
        program = extract_code(completion_text(completion)) + "\n\n" + body + "\n"
        return float(run_python(program, timeout=self.timeout, memory_mb=self.memory_mb))

    def __call__(self, completions: list, tests: list, **kwargs) -> list[float | None]:
        import concurrent.futures
        import os

        workers = self.workers or os.cpu_count() or 1
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(self._one, completions, tests))


unit_tests = UnitTests()

# Special tokens of grpo.io.tiny's tokenizer (ChatML): a completion decoded with them kept is
# cut at the first one, so exact_match does not depend on how the caller decoded.
_STOP_STRINGS = ("<|im_end|>", "<|endoftext|>", "<|im_start|>")


def exact_match_text(completion) -> str:
    """The text :func:`exact_match` compares: the string, or the last chat message's content,
    cut at the first ChatML stop token and stripped."""
    if isinstance(completion, (list, tuple)):
        completion = completion[-1]["content"] if completion else ""
    elif isinstance(completion, dict):
        completion = completion["content"]
    text = str(completion)
    for stop in _STOP_STRINGS:
        text = text.split(stop, 1)[0]
    return text.strip()


def char_match(prediction: str, answer: str) -> float:
    """Fraction of positions where ``prediction`` and ``answer`` agree, over the longer length.

    .. math:: r = \\#\\{i : p_i = a_i\\} / \\max(|p|, |a|)

    Returns 1.0 only for an exact match (and for two empty strings).
    """
    longest = max(len(prediction), len(answer))
    if longest == 0:
        return 1.0
    return sum(p == a for p, a in zip(prediction, answer, strict=False)) / longest


def exact_match(
    prompts: Sequence | None = None,
    completions: Sequence = (),
    *,
    answer: Sequence[str],
    **kwargs,
) -> list[float]:
    """TRL-style reward: per-character credit in ``[0, 1]`` against the ``answer`` column.

    Args:
        prompts: unused (kept for the TRL reward signature).
        completions: ``N`` completions (strings or chat messages).
        answer: ``N`` exact answers (the dataset column, repeated per completion).

    Returns:
        ``N`` floats in ``[0, 1]``; 1.0 means an exact answer.
    """
    if len(answer) != len(completions):
        raise ValueError(
            f"exact_match: got {len(completions)} completions but {len(answer)} answers"
        )
    return [
        char_match(exact_match_text(c), str(a)) for c, a in zip(completions, answer, strict=True)
    ]


REWARD_FUNCS: dict[str, Callable] = {
    "answer_match": answer_match,
    "think_format": think_format,
    "length_penalty": length_penalty,
    "unit_tests": unit_tests,
    "exact_match": exact_match,
}


def register_reward(name: str) -> Callable[[Callable], Callable]:
    """Decorator registering a reward function under ``name`` for use by name."""

    def register(fn: Callable) -> Callable:
        REWARD_FUNCS[name] = fn
        return fn

    return register


def _import(spec: str) -> Callable:
    module_name, _, attr = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser().resolve()
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            if loader_spec is None or not path.is_file():
                raise FileNotFoundError(f"no such file: {path}")
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as e:
        raise ValueError(f"cannot load reward function {spec!r}: {type(e).__name__}: {e}") from e
    if not callable(obj):
        raise ValueError(f"reward function {spec!r} is not callable: {obj!r}")
    return obj


_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _is_reward_model(item: Any) -> bool:
    from grpo.io.reward_model import RewardModel, is_reward_model_dir

    if isinstance(item, RewardModel):
        return True
    if not isinstance(item, str) or item.strip() in REWARD_FUNCS or ":" in item:
        return False
    path = Path(item.strip()).expanduser()
    return is_reward_model_dir(path) if path.exists() else bool(_REPO_ID.match(item.strip()))


def _reward_model(item: Any, processing_class: Any, options: dict) -> Callable:
    from grpo.io.reward_model import (
        RewardModelReward,
        load_reward_model,
        load_reward_tokenizer,
    )

    remote = options.get("trust_remote_code", False)
    model = item
    if isinstance(item, str):
        model = load_reward_model(item.strip(), trust_remote_code=remote)
    if processing_class is None:
        processing_class = load_reward_tokenizer(model, trust_remote_code=remote)
    return RewardModelReward(
        model, processing_class, chat_template_kwargs=options.get("chat_template_kwargs")
    )


def _resolve_one(item: Any) -> Callable:
    if callable(item):
        return item
    if not isinstance(item, str):
        raise TypeError(f"reward function spec must be a callable or a string, got {item!r}")
    name = item.strip()
    if name in REWARD_FUNCS:
        return REWARD_FUNCS[name]
    if ":" in name:
        return _import(name)
    raise ValueError(
        f"unknown reward function {name!r}; known built-ins: {', '.join(sorted(REWARD_FUNCS))} "
        "(or pass a callable, 'module:function', 'path/to/file.py:function' or a reward "
        "model's directory or hub id)"
    )


def resolve_reward_funcs(
    spec: Callable | str | Sequence[Callable | str],
    processing_classes: Any = None,
    *,
    chat_template_kwargs: dict | None = None,
    trust_remote_code: bool = False,
) -> list[Callable]:
    """Reward functions from a callable, a name, ``"module:function"``, a reward model (a
    sequence-classification checkpoint's path or hub id, or a loaded
    :class:`~grpo.io.reward_model.RewardModel`), a comma-separated string of those, or a list
    mixing them.

    ``processing_classes`` is TRL's ``reward_processing_classes``: one tokenizer (or a list
    with one entry per reward function; entries of plain functions are ignored) used by the
    reward model at the same position; ``None`` loads the tokenizer stored with the model.
    """
    from grpo.io.reward_model import RewardModel

    if isinstance(spec, str):
        items: list = [s for s in spec.split(",") if s.strip()]
    elif isinstance(spec, RewardModel):
        items = [spec]
    elif callable(spec):
        items = [spec]
    elif spec is None or isinstance(spec, (list, tuple)):
        items = list(spec or [])
    else:
        raise TypeError(
            f"reward_funcs must be a callable, a name or a list of those, got {spec!r} "
            f"({type(spec).__name__}), which is not callable"
        )
    if not items:
        raise ValueError(f"no reward functions in {spec!r}")
    if processing_classes is None:
        processing_classes = [None] * len(items)
    elif not isinstance(processing_classes, (list, tuple)):
        processing_classes = [processing_classes]
    if len(processing_classes) != len(items):
        raise ValueError(
            f"The number of reward processing classes ({len(processing_classes)}) must match "
            f"the number of reward functions ({len(items)})."
        )
    options = {"chat_template_kwargs": chat_template_kwargs, "trust_remote_code": trust_remote_code}
    return [
        _reward_model(item, pc, options) if _is_reward_model(item) else _resolve_one(item)
        for item, pc in zip(items, processing_classes, strict=True)
    ]
