"""The chunked LM head: exact log-probs, entropies and gradients, and memory that does not
grow like ``N * T * V`` in the loss's forward + backward."""

import grpo  # noqa: F401, I001  (fast BLAS before mlx)
import mlx.core as mx
import numpy as np
import pytest
from reference_numpy import np_entropy, np_log_softmax, np_token_logprobs

from grpo.core.batch import LossBatch, pack
from grpo.core import logprobs
from grpo.core.logprobs import head_chunk_rows, head_logprobs
from grpo.core.loss import LossConfig, grpo_loss


def _linear_head(params, h):
    return h @ params[0].T


def _case(N=2, T=5, D=6, V=11, seed=0):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((N, T, D)).astype(np.float32)
    W = rng.standard_normal((V, D)).astype(np.float32)
    y = rng.integers(0, V, (N, T)).astype(np.int32)
    return h, W, y


def _np_grads(h, W, y, w, c, tau):
    # L = sum(w * logp) + c * sum(H), z = h W^T / tau, in float64.
    h64, W64 = h.astype(np.float64), W.astype(np.float64)
    logp = np_log_softmax(h64 @ W64.T, tau)
    p = np.exp(logp)
    H = -(p * logp).sum(-1, keepdims=True)
    onehot = np.eye(W.shape[0])[y]
    dz = (w[..., None] * (onehot - p) - c * p * (logp + H)) / tau
    return dz @ W64, np.einsum("ntv,ntd->vd", dz, h64)


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 100])
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_values_match_numpy(chunk_rows, tau):
    h, W, y = _case()
    logp, ent = head_logprobs(
        _linear_head,
        mx.array(h),
        mx.array(y),
        [mx.array(W)],
        temperature=tau,
        with_entropy=True,
        chunk_rows=chunk_rows,
    )
    z = h.astype(np.float64) @ W.T.astype(np.float64)
    np.testing.assert_allclose(np.array(logp), np_token_logprobs(z, y, tau), atol=1e-5)
    np.testing.assert_allclose(np.array(ent), np_entropy(z, tau), atol=1e-5)
    only = head_logprobs(
        _linear_head, mx.array(h), mx.array(y), [mx.array(W)], temperature=tau, chunk_rows=3
    )
    np.testing.assert_allclose(np.array(only), np.array(logp), atol=1e-6)


@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 4, 100])
def test_gradients_match_numpy(chunk_rows, linear, monkeypatch):
    # Vocabulary blocks of 2 columns and up: the linear path's backward runs over several.
    monkeypatch.setattr(logprobs, "MIN_VOCAB_BLOCK", 2)
    h, W, y = _case(seed=1)
    w = np.random.default_rng(2).standard_normal(y.shape).astype(np.float32)

    def loss(hh, WW):
        lp, ent = head_logprobs(
            _linear_head,
            hh,
            mx.array(y),
            [WW],
            temperature=0.8,
            with_entropy=True,
            chunk_rows=chunk_rows,
            linear=linear,
        )
        return (mx.array(w) * lp).sum() + 0.3 * ent.sum()

    gh, gW = mx.grad(loss, argnums=(0, 1))(mx.array(h), mx.array(W))
    want_h, want_W = _np_grads(h, W, y, w, 0.3, 0.8)
    np.testing.assert_allclose(np.array(gh), want_h, atol=1e-4)
    np.testing.assert_allclose(np.array(gW), want_W, atol=1e-4)


def test_compiled_equals_eager_and_frozen_head_gets_hidden_gradient():
    h, W, y = _case(seed=3)
    frozen = mx.array(W)

    def loss(hh):
        def head_fn(params, x):
            return x @ frozen.T

        return head_logprobs(head_fn, hh, mx.array(y), [], chunk_rows=2).sum()

    eager = mx.value_and_grad(loss)(mx.array(h))
    compiled = mx.compile(mx.value_and_grad(loss))(mx.array(h))
    want_h, _ = _np_grads(h, W, y, np.ones(y.shape, np.float32), 0.0, 1.0)
    np.testing.assert_allclose(np.array(eager[1]), want_h, atol=1e-4)
    np.testing.assert_allclose(np.array(compiled[1]), np.array(eager[1]), atol=1e-6)
    np.testing.assert_allclose(float(compiled[0]), float(eager[0]), rtol=1e-6)


def test_rejects_mismatched_shapes():
    h, W, y = _case()
    with pytest.raises(ValueError, match="tokens"):
        head_logprobs(_linear_head, mx.array(h), mx.array(y[:, :2]), [mx.array(W)], chunk_rows=2)
    with pytest.raises(ValueError, match="chunk_rows"):
        head_logprobs(_linear_head, mx.array(h), mx.array(y), [mx.array(W)], chunk_rows=0)


def test_chunk_rows_bound_the_chunk():
    assert head_chunk_rows(151_936, 1 << 22) == 27
    assert head_chunk_rows(1 << 30, 1 << 24) == 1


# -------------------------------------------------------------- memory of the loss

N, T, P = 8, 192, 8
CHUNK = 1 << 16  # logits elements per head chunk in the test


def _loss_peak(model_dir, peak_extra_bytes, *, chunk):
    from grpo.io.model import load_model

    model, _ = load_model(str(model_dir))
    rng = np.random.default_rng(0)
    prompts = mx.array(rng.integers(3, 99, (N, P)), dtype=mx.int32)
    lengths = mx.full((N,), P, mx.int32)
    completions = mx.array(rng.integers(3, 99, (N, T)), dtype=mx.int32)
    batch = LossBatch(
        pack(prompts, lengths, completions),
        lengths,
        completions,
        mx.ones((N, T), mx.float32),
        mx.array(rng.standard_normal(N).astype(np.float32)),
    )
    cfg = LossConfig(head_chunk_elements=chunk)
    params = model.trainable_parameters()
    mx.eval(params)

    def step():
        return mx.value_and_grad(lambda p: grpo_loss(p, None, batch, model=model, cfg=cfg)[0])(
            params
        )

    return peak_extra_bytes(step)


@pytest.fixture(scope="module")
def vocab_dirs(tmp_path_factory):
    from grpo.io.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("vocab")
    return {V: build_tiny_model(root / str(V), size="test", vocab_size=V) for V in (2048, 8192)}


def test_loss_memory_does_not_grow_like_n_t_v(vocab_dirs, peak_extra_bytes):
    # Full fine-tune of a tied-embedding model: going from V1 to V2 adds the embedding's
    # own weight-sized gradient and temporaries (a few D * dV floats, D = 128) but, with the
    # head chunked, nothing of size N * T * dV (N * T = 1536 positions, 12x D).
    small, big = 2048, 8192
    D = 128
    grow = _loss_peak(vocab_dirs[big], peak_extra_bytes, chunk=CHUNK) - _loss_peak(
        vocab_dirs[small], peak_extra_bytes, chunk=CHUNK
    )
    one_ntv = N * T * (big - small) * 4  # one float32 [N, T, dV] array
    bound = 3 * D * (big - small) * 4 + 4 * CHUNK * 4
    assert grow < bound < one_ntv / 2, (grow, bound, one_ntv)
    # The same measurement with the whole head in one chunk holds [N, T, V] logits and
    # their gradient: the bound above is tight enough to tell.
    whole = _loss_peak(vocab_dirs[big], peak_extra_bytes, chunk=1 << 40) - _loss_peak(
        vocab_dirs[small], peak_extra_bytes, chunk=1 << 40
    )
    assert whole > one_ntv > bound, (whole, one_ntv)


@pytest.mark.parametrize("with_entropy", [False, True])
def test_linear_head_backward_equals_the_generic_one(with_entropy):
    """The ``addmm`` weight-gradient path of a linear head gives the generic vjp's
    gradients (and the same values), over several chunks."""
    N, T, D, V = 3, 5, 16, 40
    rng = np.random.default_rng(0)
    h = mx.array(rng.standard_normal((N, T, D)).astype(np.float32))
    W = mx.array(0.3 * rng.standard_normal((V, D)).astype(np.float32))
    y = mx.array(rng.integers(0, V, (N, T)), dtype=mx.int32)

    def head_fn(ps, x):
        return x @ ps[0].T

    def f(linear):
        def loss(h, W):
            out = head_logprobs(head_fn, h, y, [W], temperature=0.7, with_entropy=with_entropy,
                                chunk_rows=4, linear=linear)  # fmt: skip
            out = out if isinstance(out, tuple) else (out,)
            return sum((o * (i + 1.5)).sum() for i, o in enumerate(out))

        return mx.value_and_grad(loss, argnums=(0, 1))(h, W)

    (v1, (dh1, dW1)), (v0, (dh0, dW0)) = f(True), f(False)
    np.testing.assert_allclose(np.array(v1), np.array(v0), rtol=1e-6)
    np.testing.assert_allclose(np.array(dh1), np.array(dh0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(dW1), np.array(dW0), rtol=1e-5, atol=1e-6)
    assert float(mx.abs(dW0).sum()) > 0


def test_check_linear_head(tiny_model_dir):
    from grpo.core.lm import check_linear_head
    from grpo.io.model import load_model

    model, _ = load_model(str(tiny_model_dir))
    assert check_linear_head(model)  # tied embeddings: h @ E.T

    # A head that scales its logits is not h @ W.T (the instance attribute shadows the
    # class's method, in the model's forward and in the head alike).
    model, _ = load_model(str(tiny_model_dir))
    emb = model.model.embed_tokens
    as_linear = emb.as_linear
    object.__setattr__(emb, "as_linear", lambda x: as_linear(x) * 0.5)
    assert not check_linear_head(model)
