"""Sampling configuration and the pure logit transforms behind it.

Every transform maps float32 logits ``[N, V]`` to logits of the same shape with removed
tokens set to ``-inf``. They are applied in Hugging Face ``generate`` order:
repetition penalty, temperature, top-k, top-p, min-p. The sampling distribution is the
softmax of the result; ``Rollout.logprobs`` are log-probs under it (what vLLM calls
``processed_logprobs``). See docs/sampler.md for how that relates to the
temperature-only log-probs a trainer recomputes.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import mlx.core as mx

from grpo.core import fastmath

Transform = Callable[[mx.array, mx.array], mx.array]


def _positive_int(name: str):
    def check(_inst, _attr, value):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"SamplingConfig.{name} must be a positive int, got {value!r}")

    return check


def _in_range(name: str, lo: float, hi: float, *, lo_open: bool = False):
    def check(_inst, _attr, value):
        ok = (lo < value if lo_open else lo <= value) and value <= hi
        if not ok:
            bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
            raise ValueError(f"SamplingConfig.{name} must be in {bound}, got {value!r}")

    return check


def _check_temperature(_inst, _attr, value):
    if not value >= 0.0:
        raise ValueError(f"SamplingConfig.temperature must be >= 0 (0 = greedy), got {value!r}")


def _check_top_k(_inst, _attr, value):
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"SamplingConfig.top_k must be an int >= 0 (0 = off), got {value!r}")


def _check_penalty(_inst, _attr, value):
    if not value > 0.0:
        raise ValueError(f"SamplingConfig.repetition_penalty must be > 0, got {value!r}")


def _token_tuple(value) -> tuple[int, ...]:
    return tuple(int(t) for t in value)


def _stop_tuple(value) -> tuple[tuple[int, ...], ...]:
    return tuple(_token_tuple(s) for s in value)


def _check_ids(name: str):
    def check(_inst, _attr, value):
        flat = [t for s in value for t in s] if name == "stop_sequences" else list(value)
        if any(t < 0 for t in flat):
            raise ValueError(f"SamplingConfig.{name} must hold token ids >= 0, got {value!r}")
        if name == "stop_sequences" and any(len(s) == 0 for s in value):
            raise ValueError(
                f"SamplingConfig.stop_sequences must not hold an empty sequence, got {value!r}"
            )

    return check


@attrs.frozen
class SamplingConfig:
    """How completions are sampled.

    Attributes:
        group_size: ``G``, completions per prompt.
        max_tokens: ``T_max``, completion tokens per row at most (TRL's
            ``max_completion_length``).
        temperature: Logits are divided by it; ``0`` means greedy (argmax).
        top_p: Nucleus mass in ``(0, 1]``; ``1`` is off.
        top_k: Keep the ``k`` most likely tokens; ``0`` is off.
        min_p: Drop tokens with ``p < min_p * p_max``; ``0`` is off.
        repetition_penalty: CTRL penalty on every token in the prompt or the completion
            so far (Hugging Face semantics); ``1`` is off.
        eos_ids: Token ids that end a completion (several allowed); the EOS token is
            part of the completion and its mask.
        stop_sequences: Token-id sequences that end a completion when the completion
            ends with one (the io layer tokenises stop strings); included in the mask.
    """

    group_size: int = attrs.field(default=8, validator=_positive_int("group_size"))
    max_tokens: int = attrs.field(default=256, validator=_positive_int("max_tokens"))
    temperature: float = attrs.field(default=1.0, converter=float, validator=_check_temperature)
    top_p: float = attrs.field(
        default=1.0, converter=float, validator=_in_range("top_p", 0.0, 1.0, lo_open=True)
    )
    top_k: int = attrs.field(default=0, validator=_check_top_k)
    min_p: float = attrs.field(default=0.0, converter=float, validator=_in_range("min_p", 0.0, 1.0))
    repetition_penalty: float = attrs.field(default=1.0, converter=float, validator=_check_penalty)
    eos_ids: tuple[int, ...] = attrs.field(
        default=(), converter=_token_tuple, validator=_check_ids("eos_ids")
    )
    stop_sequences: tuple[tuple[int, ...], ...] = attrs.field(
        default=(), converter=_stop_tuple, validator=_check_ids("stop_sequences")
    )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def apply_repetition_penalty(logits: mx.array, seen: mx.array, *, penalty: float) -> mx.array:
    """CTRL repetition penalty (Keskar et al. 2019, Eq. 1 as in Hugging Face).

    .. math:: \\tilde z_v = z_v / \\theta \\text{ if } z_v > 0 \\text{ else } z_v \\theta,
        \\quad v \\in \\text{seen}

    Args:
        logits: ``[N, V]``.
        seen: ``[N, V]`` bool, tokens already in the prompt or completion.
        penalty: ``theta > 0``; ``1`` leaves logits unchanged.

    Returns:
        ``[N, V]`` penalised logits.
    """
    penalised = mx.where(logits < 0, logits * penalty, logits / penalty)
    return mx.where(seen, penalised, logits)


def apply_temperature(logits: mx.array, *, temperature: float) -> mx.array:
    """``z / tau`` for ``tau > 0`` (``logits [N, V] -> [N, V]``)."""
    return logits / temperature


def apply_top_k(logits: mx.array, *, k: int) -> mx.array:
    """Keep logits ``>=`` the k-th largest per row (ties kept, as in Hugging Face).

    Args:
        logits: ``[N, V]``.
        k: ``1 <= k``; ``k >= V`` keeps everything.

    Returns:
        ``[N, V]`` with dropped entries ``-inf``.
    """
    V = logits.shape[-1]
    if k >= V:
        return logits
    kth = mx.partition(logits, V - k, axis=-1)[..., V - k : V - k + 1]
    return mx.where(logits >= kth, logits, -mx.inf)


def apply_top_p(logits: mx.array, *, p: float) -> mx.array:
    """Nucleus filter (Holtzman et al. 2020): keep the most likely tokens until their
    mass reaches ``p``; a token is kept when the mass strictly above it is ``< p``.

    Args:
        logits: ``[N, V]``.
        p: ``0 < p <= 1``.

    Returns:
        ``[N, V]`` with dropped entries ``-inf`` (the top token is always kept).
    """
    if p >= 1.0:
        return logits
    order = mx.argsort(-logits, axis=-1)
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    probs = fastmath.softmax(sorted_logits, axis=-1)
    mass_above = mx.cumsum(probs, axis=-1) - probs
    # Smallest kept logit per row; everything at or above it stays.
    threshold = mx.min(mx.where(mass_above < p, sorted_logits, mx.inf), axis=-1, keepdims=True)
    return mx.where(logits >= threshold, logits, -mx.inf)


def apply_min_p(logits: mx.array, *, min_p: float) -> mx.array:
    """Min-p filter (Nguyen et al. 2024): keep ``p_v >= min_p * max_u p_u``.

    .. math:: z_v \\ge \\max_u z_u + \\log(\\text{min\\_p})

    Args:
        logits: ``[N, V]``.
        min_p: ``0 <= min_p <= 1``; ``0`` keeps everything.

    Returns:
        ``[N, V]`` with dropped entries ``-inf``.
    """
    if min_p <= 0.0:
        return logits
    cutoff = mx.max(logits, axis=-1, keepdims=True) + mx.log(mx.array(min_p, logits.dtype))
    return mx.where(logits >= cutoff, logits, -mx.inf)


def make_transform(cfg: SamplingConfig) -> Transform:
    """The ``(logits [N, V], seen [N, V]) -> logits [N, V]`` chain that ``cfg`` selects.

    Only the enabled transforms are chained, so a disabled knob costs nothing. With
    ``temperature == 0`` only the repetition penalty applies (argmax follows).
    """
    steps: list[Callable[[mx.array, mx.array], mx.array]] = []
    if cfg.repetition_penalty != 1.0:
        steps.append(
            lambda z, seen: apply_repetition_penalty(z, seen, penalty=cfg.repetition_penalty)
        )
    if not cfg.greedy:
        if cfg.temperature != 1.0:
            steps.append(lambda z, _: apply_temperature(z, temperature=cfg.temperature))
        if cfg.top_k > 0:
            steps.append(lambda z, _: apply_top_k(z, k=cfg.top_k))
        if cfg.top_p < 1.0:
            steps.append(lambda z, _: apply_top_p(z, p=cfg.top_p))
        if cfg.min_p > 0.0:
            steps.append(lambda z, _: apply_min_p(z, min_p=cfg.min_p))

    def transform(logits: mx.array, seen: mx.array) -> mx.array:
        for step in steps:
            logits = step(logits, seen)
        return logits

    return transform


def draw(z: mx.array, key: mx.array) -> tuple[mx.array, mx.array]:
    """One token per row from ``softmax(z)`` by inverting its CDF, and ``logsumexp(z)``.

    .. math:: y = \\min\\{v : \\textstyle\\sum_{u \\le v} e^{z_u - m} \\ge U \\sum_u e^{z_u - m}\\},
        \\quad U \\sim \\mathcal{U}(0, 1]

    One ``exp`` pass serves both the draw and the normaliser (Gumbel-max would add two
    ``log`` passes over ``[N, V]``). ``U > 0`` and the threshold is taken from the same
    cumulative sum, so a token with ``z = -inf`` (zero mass) is never drawn.

    Args:
        z: ``[N, V]`` float32 logits (entries may be ``-inf``, each row has a finite one).
        key: RNG key.

    Returns:
        ``(tokens [N] int32, logsumexp [N, 1] float32)``.
    """
    u = 1.0 - mx.random.uniform(shape=(z.shape[0],), key=key)
    return draw_with(z, u)


def draw_with(z: mx.array, u: mx.array) -> tuple[mx.array, mx.array]:
    """:func:`draw` with the uniforms given: ``u [N]`` in ``(0, 1]``, one per row.

    A row's token then depends only on its own logits and ``u``, not on which other rows
    share the batch (continuous batching keys each row's draws by row and step).
    """
    m = mx.stop_gradient(mx.max(z, axis=-1, keepdims=True))
    cdf = mx.cumsum(fastmath.exp(z - m), axis=-1)
    total = cdf[:, -1:]
    tokens = mx.minimum(mx.sum(cdf < u[:, None] * total, axis=-1), z.shape[-1] - 1)
    return tokens.astype(mx.int32), m + mx.log(total)


def make_sample_fn(
    cfg: SamplingConfig,
) -> Callable[[mx.array, mx.array, mx.array], tuple[mx.array, mx.array]]:
    """``(logits [N, V], seen [N, V], key) -> (tokens [N] int32, logprobs [N] float32)``.

    Tokens are drawn from ``softmax(transform(logits))`` with ``key`` (:func:`draw`;
    argmax when greedy); log-probs are of the drawn token under that same distribution.
    Greedy returns log-probs under the untempered (``tau = 1``) distribution after the
    repetition penalty, since the point mass it samples from carries no information.
    """
    return _sampler(cfg, draw)


def make_uniform_sample_fn(
    cfg: SamplingConfig,
) -> Callable[[mx.array, mx.array, mx.array], tuple[mx.array, mx.array]]:
    """:func:`make_sample_fn` with the draw's uniforms given instead of a key:
    ``(logits [N, V], seen [N, V], u [N]) -> (tokens [N], logprobs [N])`` (:func:`draw_with`)."""
    return _sampler(cfg, draw_with)


def _sampler(cfg: SamplingConfig, drawer):
    transform = make_transform(cfg)

    def sample(logits: mx.array, seen: mx.array, noise: mx.array) -> tuple[mx.array, mx.array]:
        z = transform(logits.astype(mx.float32), seen)
        if cfg.greedy:
            tokens = mx.argmax(z, axis=-1).astype(mx.int32)
            lse = fastmath.logsumexp(z, axis=-1, keepdims=True)
        else:
            tokens, lse = drawer(z, noise)
        picked = mx.take_along_axis(z, tokens[:, None], axis=-1)[:, 0] - lse[:, 0]
        return tokens, picked

    return sample
