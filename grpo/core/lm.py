"""A causal LM split into its trunk and its head, so logits are formed only where needed.

.. math:: \\text{logits} = \\text{head}(\\text{trunk}(x))

The training forward needs logits at the completion positions only, so it runs the trunk
(``model.model``, ``model.backbone``, ``model.language_model.model``, ...) on the whole
row and the head on the gathered hidden states. The head is *the model's own*
``__call__`` with the trunk's output substituted for the trunk call: whatever the
architecture does after its last hidden state (tied or untied output matrix, logit
scaling, soft-capping, multipliers) runs as the model wrote it, never a re-implementation.

The split is trusted only after :func:`check_split` has compared ``head(trunk(x))`` with
``model(x)`` on a few tokens; a model that fails (or one whose trunk is not found) is
scored through its own full ``__call__`` instead (:func:`completion_logits`).
"""

from __future__ import annotations

import weakref

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

# Attribute paths, from the model, of the module that maps token ids to last hidden states.
TRUNK_PATHS = (("model",), ("backbone",), ("language_model", "model"), ("transformer",))
CHECK_TOKENS = 8  # tokens of the construction-time equivalence check
CHECK_ATOL = 1e-4  # float32 logits of the split and the full forward agree to rounding

_VERDICT: dict[int, bool] = {}  # id(model) -> split verified equal to the full forward


def trunk_path(model) -> tuple[str, ...] | None:
    """The attribute path of ``model``'s trunk (a callable submodule with ``layers``)."""
    for path in TRUNK_PATHS:
        m = model
        for name in path:
            m = getattr(m, name, None) if _has(m, name) else None
        if m is not None and callable(m) and hasattr(m, "layers"):
            return path
    return None


def _has(module, name: str) -> bool:
    try:
        return name in module or name in vars(module)
    except TypeError:
        return False


def trunk(model):
    """``model``'s trunk module (raises ``ValueError`` when there is none)."""
    path = trunk_path(model)
    if path is None:
        raise ValueError(
            f"{type(model).__module__}: no trunk found at any of "
            f"{['.'.join(p) for p in TRUNK_PATHS]}"
        )
    m = model
    for name in path:
        m = getattr(m, name)
    return m


class _Output:
    """Stands in for the trunk inside the model's ``__call__``: returns the given hidden
    states; every attribute (``embed_tokens``, ``args``, ...) is the real trunk's."""

    def __init__(self, module, hidden, reads=None, where=""):
        self._module, self._hidden = module, hidden
        self._reads, self._where = reads, where

    def __call__(self, *args, **kwargs):
        return self._hidden

    def __getattr__(self, name):
        if self._reads is not None:
            self._reads.add(self._where + name)
        return getattr(self._module, name)


class _Parent:
    """A module seen with one child replaced; calling it runs the module's own ``__call__``."""

    def __init__(self, module, name, child, reads=None, where=""):
        self._module, self._name, self._child = module, name, child
        self._reads, self._where = reads, where

    def __call__(self, *args, **kwargs):
        return type(self._module).__call__(self, *args, **kwargs)

    def __getattr__(self, name):
        if name == self._name:
            return self._child
        if self._reads is not None:
            self._reads.add(self._where + name)
        return getattr(self._module, name)


def head(model, hidden: mx.array, *, reads: set | None = None) -> mx.array:
    """Logits ``[..., T, V]`` from last hidden states ``[..., T, D]``, by ``model``'s own code.

    Runs ``type(model).__call__`` with the trunk replaced by ``hidden``; only meaningful
    once :func:`check_split` has said the split reproduces the model. ``reads``, when
    given, collects the dotted paths of the attributes the head looked up.
    """
    path = trunk_path(model)
    modules = [model]
    for name in path:
        modules.append(getattr(modules[-1], name))
    where = [".".join(path[:i]) + "." if i else "" for i in range(len(path) + 1)]
    stand_in = _Output(modules[-1], hidden, reads, where[-1])
    for i in reversed(range(len(path))):
        stand_in = _Parent(modules[i], path[i], stand_in, reads, where[i])
    dummy = mx.zeros(hidden.shape[:-1], dtype=mx.int32)
    return stand_in(dummy)


def head_parameters(model, hidden: mx.array) -> list[tuple[str, mx.array]]:
    """The trainable parameters ``(path, array)`` that :func:`head` reads.

    Found by recording the attributes the model's own ``__call__`` looks up once the trunk
    is replaced (``lm_head``, or ``model.embed_tokens`` when the embeddings are tied, a
    logit scale, ...); nothing is evaluated, so it works inside a trace.

    Args:
        model: the causal LM, with its parameters set.
        hidden: any ``[..., T, D]`` hidden states (only the head's call is recorded).
    """
    reads: set[str] = set()
    head(model, hidden[..., :1, :], reads=reads)
    flat = tree_flatten(model.trainable_parameters())
    return [(p, x) for p, x in flat if any(p == r or p.startswith(r + ".") for r in reads)]


def make_head_fn(model, paths: list[str]):
    """``head_fn(params, hidden) -> logits``: :func:`head` with the weights at ``paths``
    taken from ``params`` (for :func:`grpo.core.logprobs.head_logprobs`)."""

    # A compiled step's tape keeps this function alive; a strong reference would let the
    # tape's destruction (under mlx's compile-cache lock) free the model and the compiled
    # functions it holds, which take that lock again.
    ref = weakref.ref(model)

    def head_fn(params, hidden):
        m = ref()
        if paths:
            m.update(tree_unflatten(list(zip(paths, params, strict=True))))
        return head(m, hidden)

    return head_fn


def check_split(model, *, atol: float = CHECK_ATOL) -> bool:
    """True when ``head(trunk(x))`` equals ``model(x)`` on :data:`CHECK_TOKENS` tokens.

    Evaluates eagerly (call it outside ``mx.compile``), in eval mode, and records the
    verdict for :func:`split_ok`. A trunk that is missing, raises, or disagrees gives False.
    """
    was_training = model.training
    model.eval()
    try:
        x = mx.arange(1, CHECK_TOKENS + 1, dtype=mx.int32)[None, :]
        full = model(x).astype(mx.float32)
        try:
            split = head(model, trunk(model)(x)).astype(mx.float32)
        except Exception:  # noqa: BLE001  (a split that cannot even run is not the model)
            split = None
        # Evaluated outside the except: inside mx.compile this raises, and no verdict is kept.
        ok = split is not None and tuple(split.shape) == tuple(full.shape)
        ok = ok and bool(mx.allclose(split, full, atol=atol, rtol=0))
    finally:
        model.train(was_training)
    _record(model, ok)
    return ok


def _record(model, ok: bool) -> None:
    if id(model) not in _VERDICT:
        weakref.finalize(model, _VERDICT.pop, id(model), None)
    _VERDICT[id(model)] = ok


_LINEAR: dict[int, bool] = {}


def check_linear_head(model, *, atol: float = CHECK_ATOL) -> bool:
    """True when the head is ``h @ W.T`` for its one weight ``W`` ``[V, D]`` (an untied
    ``lm_head`` without bias, or tied embeddings, and no logit scale or soft cap).

    Evaluates eagerly on random hidden states and records the verdict for
    :func:`linear_head`; a head that is anything else (or cannot run) gives False.
    """
    ok = False
    if split_ok(model):
        D = trunk(model)(mx.array([[1]], dtype=mx.int32)).shape[-1]
        probe = mx.random.normal((1, 4, D), key=mx.random.key(0))
        weights = head_parameters(model, probe)
        if len(weights) == 1 and weights[0][1].ndim == 2:
            W = weights[0][1]
            got = head(model, probe.astype(W.dtype)).astype(mx.float32)[0]
            want = probe[0].astype(W.dtype).astype(mx.float32) @ W.astype(mx.float32).T
            ok = tuple(got.shape) == tuple(want.shape)
            ok = ok and bool(mx.allclose(got, want, atol=atol, rtol=1e-4))
    if id(model) not in _LINEAR:
        weakref.finalize(model, _LINEAR.pop, id(model), None)
    _LINEAR[id(model)] = ok
    return ok


def linear_head(model) -> bool:
    """The recorded :func:`check_linear_head` verdict; checks now if none (eagerly)."""
    return cached_verdict(_LINEAR, model, check_linear_head)


def split_ok(model) -> bool:
    """The recorded :func:`check_split` verdict; checks now if there is none (eagerly).

    Inside a traced function (``mx.compile``, ``value_and_grad``) a model never checked
    cannot be evaluated, so it is scored by its full forward for that trace.
    """
    return cached_verdict(_VERDICT, model, check_split)


def cached_verdict(verdicts: dict, model, check) -> bool:
    """``verdicts[id(model)]``, else ``check(model)``, which records it; False when
    ``check`` cannot run (it evaluates arrays, which a traced function cannot)."""
    verdict = verdicts.get(id(model))
    if verdict is not None:
        return verdict
    try:
        return check(model)
    except Exception:  # noqa: BLE001  (eval inside a transformation)
        return False


def completion_logits(model, input_ids: mx.array, positions: mx.array, hidden_fn=None):
    """Logits ``[N, T, V]`` at ``positions`` ``[N, T]`` of the rows ``input_ids`` ``[N, L]``.

    With a verified split the head runs on ``[N, T, D]`` hidden states only (from
    ``hidden_fn()`` when given, else the trunk at ``positions``); otherwise the model's own
    full forward runs and its ``[N, L, V]`` logits are gathered at ``positions``.
    """
    if split_ok(model):
        if hidden_fn is not None:
            return head(model, hidden_fn())
        h = trunk(model)(input_ids)
        return head(model, mx.take_along_axis(h, positions[..., None], axis=1))
    logits = model(input_ids)
    return mx.take_along_axis(logits, positions[..., None], axis=1)
