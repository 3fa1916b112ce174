"""Rollout engine: log-probs, greedy paths, padding, determinism, EOS handling, sampling maths."""

# isort: off
import grpo  # noqa: F401  (fast BLAS before mlx; conftest imports it first too)

# isort: on
import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten, tree_map_with_path, tree_unflatten
from mlx_lm.models import llama
from strategies import arrays

from grpo.core import rollout as rollout_module
from grpo.core.rollout import Rollout, Sampler, rollout, shares_prefix
from grpo.core.sampling import (
    SamplingConfig,
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    make_sample_fn,
)

TEXTS = ("hello world", "a", "the quick brown fox jumps")


@pytest.fixture(autouse=True, params=["mlx-kernels", "fast-kernels"])
def kernels(request):
    """Every test runs on mlx-lm's own attention and cache layout, and on grpo's CPU kernels
    with the shared-prefix decode cache (``install_fast_kernels``)."""
    from grpo.io.fast_attention import install_fast_kernels

    fast = request.param == "fast-kernels"
    install_fast_kernels(llama, enabled=fast)
    rollout_module._STEPS.clear()  # compiled decode steps are traced per kernel set
    yield fast
    install_fast_kernels(llama)  # the session default (conftest)
    rollout_module._STEPS.clear()


@pytest.fixture(scope="module")
def model_tok(tiny_model_dir):
    """The seeded test model with weights x5, so greedy completions vary with the prompt.

    Loaded separately from the session ``tiny_model`` so that fixture is never mutated.
    """
    model, tok = mlx_lm.load(str(tiny_model_dir))
    model.update(tree_map_with_path(lambda p, x: x if "norm" in p else 5.0 * x, model.parameters()))
    mx.eval(model.parameters())
    return model, tok


@pytest.fixture(scope="module")
def prompts(model_tok):
    _, tok = model_tok
    return [tok.encode(t) for t in TEXTS]


def _run(model, prompts, key=0, **kw):
    return rollout(
        model.parameters(), mx.random.key(key), prompts, model=model, sampling=SamplingConfig(**kw)
    )


def _teacher_forced(model, prompt, completion, temperature=1.0):
    ids = mx.array(list(prompt) + list(completion))[None]
    logits = np.array(model(ids)[0].astype(mx.float32), dtype=np.float64) / temperature
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    P = len(prompt)
    return logp[np.arange(P - 1, P - 1 + len(completion)), completion]


def _rows(r: Rollout, i):
    P, T = int(r.prompt_lengths[i]), int(r.completion_lengths[i])
    return r.prompt_ids[i, :P].tolist(), r.completion_ids[i, :T].tolist()


def test_shared_prefix_cache_follows_the_kernels(model_tok, kernels):
    assert shares_prefix(model_tok[0]) == kernels


def test_shared_prefix_layout_gives_the_same_rollout(model_tok, prompts, kernels):
    # The prompt stored once per group (SharedPrefixKVCache) vs once per row: same tokens
    # and log-probs to float32 rounding, on ragged prompts, through a grown KV capacity.
    if not kernels:
        pytest.skip("the shared layout needs the fast kernels")
    model, _ = model_tok
    kw = dict(group_size=3, max_tokens=40, temperature=1.0)
    shared = _run(model, prompts, key=5, **kw)
    rollout_module._STEPS.clear()
    original = rollout_module.shares_prefix
    rollout_module.shares_prefix = lambda m: False
    try:
        per_row = _run(model, prompts, key=5, **kw)
    finally:
        rollout_module.shares_prefix = original
    np.testing.assert_array_equal(np.array(shared.completion_ids), np.array(per_row.completion_ids))
    np.testing.assert_allclose(np.array(shared.logprobs), np.array(per_row.logprobs), atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_teacher_forced(model_tok, prompts, temperature):
    model, tok = model_tok
    r = _run(model, prompts, key=3, group_size=3, max_tokens=12, temperature=temperature,
             eos_ids=tok.eos_token_ids)  # fmt: skip
    assert r.logprobs.dtype == mx.float32
    for i in range(r.completion_ids.shape[0]):
        p, c = _rows(r, i)
        ref = _teacher_forced(model, p, c, temperature)
        np.testing.assert_allclose(np.array(r.logprobs[i, : len(c)]), ref, atol=1e-4)
        assert np.all(np.array(r.logprobs[i, len(c) :]) == 0)


def test_greedy_equals_mlx_lm_generate(model_tok, prompts):
    model, tok = model_tok
    r = _run(
        model, prompts, group_size=1, max_tokens=16, temperature=0.0, eos_ids=tok.eos_token_ids
    )
    for i, p in enumerate(prompts):
        ref = [resp.token for resp in mlx_lm.stream_generate(model, tok, p, max_tokens=16)]
        assert _rows(r, i)[1] == ref
        assert len(set(ref)) > 2  # the check is not vacuous: completions vary


def test_batched_ragged_equals_single(model_tok, prompts):
    model, _ = model_tok
    assert len({len(p) for p in prompts}) == 3
    batched = _run(model, prompts, group_size=2, max_tokens=16, temperature=0.0)
    for b, p in enumerate(prompts):
        single = _run(model, [p], group_size=2, max_tokens=16, temperature=0.0)
        assert batched.completion_ids[2 * b : 2 * b + 2].tolist() == single.completion_ids.tolist()
        np.testing.assert_allclose(np.array(batched.logprobs[2 * b : 2 * b + 2]),
                                   np.array(single.logprobs), atol=1e-4)  # fmt: skip
    # group-contiguous prompt rows, right-padded
    assert batched.prompt_ids.shape == (6, max(len(p) for p in prompts))
    for i in range(6):
        assert _rows(batched, i)[0] == prompts[i // 2]
        assert np.all(np.array(batched.prompt_ids[i, len(prompts[i // 2]) :]) == 0)


def test_deterministic_under_key(model_tok, prompts):
    model, _ = model_tok
    a = _run(model, prompts, key=7, group_size=4, max_tokens=10)
    b = _run(model, prompts, key=7, group_size=4, max_tokens=10)
    c = _run(model, prompts, key=8, group_size=4, max_tokens=10)
    for x, y in zip(a, b, strict=True):
        assert mx.array_equal(x, y)
    assert not mx.array_equal(a.completion_ids, c.completion_ids)
    # rows of one group differ: each row draws its own tokens
    assert len({tuple(row) for row in a.completion_ids[:4].tolist()}) > 1


def test_top_k_one_equals_greedy(model_tok, prompts):
    model, _ = model_tok
    greedy = _run(model, prompts, group_size=2, max_tokens=12, temperature=0.0)
    top1 = _run(model, prompts, key=5, group_size=2, max_tokens=12, temperature=1.3, top_k=1)
    assert greedy.completion_ids.tolist() == top1.completion_ids.tolist()
    assert np.allclose(np.array(top1.logprobs), 0.0)  # a point mass


def test_repetition_penalty_avoids_seen_tokens(model_tok, prompts):
    model, _ = model_tok
    r = _run(model, prompts, group_size=1, max_tokens=8, temperature=0.0, repetition_penalty=1e4)
    plain = _run(model, prompts, group_size=1, max_tokens=8, temperature=0.0)
    for i, p in enumerate(prompts):
        c = _rows(r, i)[1]
        assert len(set(c)) == len(c) and not set(c) & set(p)
    assert any(len(set(_rows(plain, i)[1])) < 8 for i in range(3))  # the penalty mattered


def test_model_mode_and_params_restored(model_tok, prompts):
    model, _ = model_tok
    before = tree_flatten(model.parameters())
    model.train()
    other = tree_map_with_path(lambda p, x: x if "norm" in p else 0.5 * x, model.parameters())
    r_other = rollout(other, mx.random.key(0), prompts, model=model,
                      sampling=SamplingConfig(group_size=1, max_tokens=8, temperature=0.0))  # fmt: skip
    assert model.training
    model.eval()
    for (n, x), (_, y) in zip(before, tree_flatten(model.parameters()), strict=True):
        assert x is y, n
    r_own = _run(model, prompts, group_size=1, max_tokens=8, temperature=0.0)
    assert r_other.completion_ids.tolist() != r_own.completion_ids.tolist()


def test_builtin_rollout_is_a_sampler():
    def takes(sampler: Sampler) -> Sampler:
        return sampler

    assert takes(rollout) is rollout


# ---- EOS timing on a hand-built "successor" model ---------------------------------

EOS, EOS2 = 2, 5
SUCC = {10: EOS, 20: 21, 21: 22, 22: EOS, 30: 31, 31: 30, 40: 41, 41: EOS2}


@pytest.fixture(scope="module")
def successor_model():
    """A 1-layer Llama whose next token is SUCC[last token]: attention and MLP outputs
    are zero, the embedding is one-hot, and lm_head maps token x to SUCC[x]."""
    V = D = 64
    args = llama.ModelArgs(model_type="llama", hidden_size=D, num_hidden_layers=1, intermediate_size=16,
                           num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-6,
                           vocab_size=V, tie_word_embeddings=False)  # fmt: skip
    model = llama.Model(args)
    flat = dict(tree_flatten(model.parameters()))
    flat = {
        k: mx.zeros_like(v) if k.endswith(("o_proj.weight", "down_proj.weight")) else v
        for k, v in flat.items()
    }
    flat["model.embed_tokens.weight"] = mx.eye(V)
    head = np.zeros((V, D), np.float32)
    for x in range(V):
        head[SUCC.get(x, (x + 1) % V), x] = 5.0  # logit gap 5 * sqrt(D) = 40
    flat["lm_head.weight"] = mx.array(head)
    model.update(tree_unflatten(list(flat.items())))
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_eos_at_step_one_midway_and_never(successor_model, temperature):
    model = successor_model
    prompts = [[7, 10], [3, 4, 5, 20], [30], [40]]
    r = _run(
        model,
        prompts,
        key=1,
        group_size=2,
        max_tokens=6,
        temperature=temperature,
        eos_ids=(EOS, EOS2),
    )
    assert r.completion_ids.shape == (8, 6)
    expect_ids = [
        [EOS, 0, 0, 0, 0, 0],
        [21, 22, EOS, 0, 0, 0],
        [31, 30, 31, 30, 31, 30],
        [41, EOS2, 0, 0, 0, 0],
    ]
    expect_len = [1, 3, 6, 2]
    for i in range(8):
        assert r.completion_ids[i].tolist() == expect_ids[i // 2]
        n = expect_len[i // 2]
        assert r.completion_mask[i].tolist() == [1.0] * n + [0.0] * (6 - n)
        assert int(r.completion_lengths[i]) == n
        assert bool(r.is_truncated[i]) == (i // 2 == 2)
        assert np.all(np.array(r.logprobs[i, n:]) == 0)
    assert r.prompt_lengths.tolist() == [2, 2, 4, 4, 1, 1, 1, 1]


def test_stop_sequence_and_trimmed_length(successor_model):
    model = successor_model
    r = _run(model, [[30], [20]], group_size=1, max_tokens=8, temperature=0.0,
             eos_ids=(EOS,), stop_sequences=((30, 31),))  # fmt: skip
    # row 0: 31 30 31 -> ends with (30, 31) at step 3; row 1: 21 22 EOS
    assert r.completion_ids.tolist() == [[31, 30, 31], [21, 22, EOS]]
    assert r.is_truncated.tolist() == [False, False]
    assert r.completion_lengths.tolist() == [3, 3]


def test_no_eos_runs_to_max_tokens(successor_model):
    r = _run(successor_model, [[10]], group_size=3, max_tokens=5, temperature=0.0)
    assert r.completion_ids.shape == (3, 5) and r.is_truncated.tolist() == [True] * 3


# ---- validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [("group_size", 0), ("max_tokens", -1), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5),
     ("top_k", -1), ("min_p", 1.2), ("repetition_penalty", 0.0), ("eos_ids", (-1,)), ("stop_sequences", ((),))],
)  # fmt: skip
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**{field: value})


def test_rejects_bad_prompts(successor_model):
    with pytest.raises(ValueError, match="non-empty"):
        _run(successor_model, [[1], []], max_tokens=2)
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        _run(successor_model, [[1], [1000]], max_tokens=2)


# ---- pure sampling transforms vs NumPy ----------------------------------------------


def _np_softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _kept(x):
    return np.isfinite(np.array(x))


logit_rows = st.integers(1, 4).flatmap(
    lambda n: st.integers(2, 12).flatmap(
        lambda v: arrays((n, v), st.floats(-4.0, 4.0, width=32)).filter(
            lambda a: all(len(np.unique(r)) == len(r) for r in a)
        )
    )
)


@given(logit_rows, st.integers(1, 14))
def test_top_k_matches_numpy(z, k):
    kth = -np.sort(-z, axis=-1)[:, min(k, z.shape[1]) - 1 : min(k, z.shape[1])]
    expect = z >= kth
    got = apply_top_k(mx.array(z), k=k)
    assert np.array_equal(_kept(got), expect)
    np.testing.assert_array_equal(np.array(got)[expect], z[expect])


@given(logit_rows, st.floats(0.05, 1.0))
def test_top_p_matches_numpy(z, p):
    probs = _np_softmax(z)
    order = np.argsort(-z, axis=-1)
    sorted_p = np.take_along_axis(probs, order, -1)
    above = np.cumsum(sorted_p, -1) - sorted_p
    assume(np.all(np.abs(above - p) > 1e-4))  # float32 vs float64 at the boundary
    expect = np.zeros_like(z, dtype=bool)
    np.put_along_axis(expect, order, above < p, -1)
    assert np.array_equal(_kept(apply_top_p(mx.array(z), p=p)), expect)
    assert expect[np.arange(len(z)), z.argmax(-1)].all()


@given(logit_rows, st.floats(0.0, 1.0))
def test_min_p_matches_numpy(z, min_p):
    probs = _np_softmax(z)
    ratio = probs / probs.max(-1, keepdims=True)
    assume(np.all(np.abs(ratio - min_p) > 1e-4))
    expect = ratio >= min_p if min_p > 0 else np.ones_like(z, bool)
    assert np.array_equal(_kept(apply_min_p(mx.array(z), min_p=min_p)), expect)


@given(logit_rows, st.floats(0.2, 5.0), st.data())
def test_repetition_penalty_matches_numpy(z, theta, data):
    seen = np.array(data.draw(st.lists(st.booleans(), min_size=z.size, max_size=z.size))).reshape(
        z.shape
    )
    expect = np.where(seen, np.where(z < 0, z * theta, z / theta), z)
    got = apply_repetition_penalty(mx.array(z), mx.array(seen), penalty=theta)
    np.testing.assert_allclose(np.array(got), expect, rtol=1e-6)


@given(logit_rows, st.floats(0.3, 2.0), st.integers(0, 6), st.floats(0.3, 1.0), st.floats(0.0, 0.5),
       st.integers(0, 2**31 - 1))  # fmt: skip
def test_sample_fn_logprob_is_of_the_filtered_distribution(z, temperature, k, p, min_p, seed):
    cfg = SamplingConfig(temperature=temperature, top_k=k, top_p=p, min_p=min_p)
    # NumPy chain in Hugging Face order: temperature, top-k, top-p, min-p.
    y = z.astype(np.float64) / temperature
    keep = np.ones_like(y, bool)
    if k:
        keep &= y >= -np.sort(-y, -1)[:, min(k, y.shape[1]) - 1 : min(k, y.shape[1])]
    y1 = np.where(keep, y, -np.inf)
    pr = _np_softmax(y1)
    order = np.argsort(-y1, -1)
    sp = np.take_along_axis(pr, order, -1)
    above = np.cumsum(sp, -1) - sp
    assume(np.all(np.abs(above - p) > 1e-4))
    kp = np.zeros_like(keep)
    np.put_along_axis(kp, order, above < p, -1)
    keep &= kp if p < 1 else True
    pr = _np_softmax(np.where(keep, y, -np.inf))
    ratio = pr / pr.max(-1, keepdims=True)
    assume(np.all(np.abs(ratio[keep] - min_p) > 1e-4))
    if min_p > 0:
        keep &= ratio >= min_p
    with np.errstate(divide="ignore"):
        ref = np.log(_np_softmax(np.where(keep, y, -np.inf)))
    tokens, logp = make_sample_fn(cfg)(mx.array(z), mx.zeros((1, 1), mx.bool_), mx.random.key(seed))
    tokens = np.array(tokens)
    assert keep[np.arange(len(z)), tokens].all()
    np.testing.assert_allclose(np.array(logp), ref[np.arange(len(z)), tokens], atol=1e-5)


# ---- compiled decode: finished rows dropped, no retrace after warm-up ---------------


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_finished_rows_are_dropped_without_changing_results(successor_model, temperature):
    from grpo.core import rollout as R

    prompts = [[10], [20], [30], [40]]
    r = _run(successor_model, prompts, key=2, group_size=2, max_tokens=20, temperature=temperature,
             eos_ids=(EOS, EOS2))  # fmt: skip
    # after 8 steps only prompt 30's two rows are live: the batch is compacted 8 -> 2
    assert r.completion_lengths.tolist() == [1, 1, 3, 3, 20, 20, 2, 2]
    assert r.completion_ids[4].tolist() == [31, 30] * 10
    assert r.completion_ids[2].tolist() == [21, 22, EOS] + [0] * 17
    assert r.is_truncated.tolist() == [False] * 4 + [True] * 2 + [False] * 2
    assert R.FILTER_FRACTION > 0


def test_compaction_matches_full_batch_greedy(model_tok, prompts, monkeypatch):
    from grpo.core import rollout as R

    model, _ = model_tok
    # EOS ids taken from two prompts' greedy completions, so rows finish at different steps
    # and after 8 steps at most a third of the rows is live.
    probe = _run(
        model, prompts, group_size=1, max_tokens=24, temperature=0.0
    ).completion_ids.tolist()
    eos = (probe[0][1], probe[1][0])
    assume_never = not set(eos) & set(probe[2])
    assert assume_never, "pick other prompts: the third row would end too"
    kw = dict(group_size=3, max_tokens=24, temperature=0.0, eos_ids=eos)
    compacted = _run(model, prompts, **kw)
    monkeypatch.setattr(R, "FILTER_FRACTION", 0.0)
    full = _run(model, prompts, **kw)
    lengths = compacted.completion_lengths.tolist()
    assert len(set(lengths)) == 3 and max(lengths) == 24
    for x, y in zip(compacted, full, strict=True):
        np.testing.assert_allclose(np.array(x), np.array(y), atol=1e-5)


def test_compaction_changes_no_sampled_row(model_tok, prompts, monkeypatch):
    # Row r draws token t with U[r, t] whichever rows share its step.
    from grpo.core import rollout as R

    model, _ = model_tok
    kw = dict(group_size=4, max_tokens=24, eos_ids=tuple(range(3, 14)), repetition_penalty=1.2)
    compacted = _run(model, prompts, key=0, **kw)
    monkeypatch.setattr(R, "FILTER_FRACTION", 0.0)
    full = _run(model, prompts, key=0, **kw)
    lengths = np.array(compacted.completion_lengths)
    assert (lengths <= 8).mean() > 0.5 and lengths.max() > 8  # compaction did happen
    for x, y in zip(compacted, full, strict=True):
        np.testing.assert_allclose(np.array(x), np.array(y), atol=1e-5)


def test_no_retrace_after_warm_up(model_tok):
    from grpo.core import rollout as R

    model, tok = model_tok
    cfg = dict(group_size=2, max_tokens=20, eos_ids=())
    _run(model, [tok.encode("warm up")], **cfg)
    before = R.TRACES[0]
    for i, text in enumerate(["x", "another prompt", "abc" * 9]):  # all within one 32-bucket
        _run(model, [tok.encode(text)], key=i, **cfg)
    assert R.TRACES[0] == before


def test_chunked_prefill_matches_single_call(model_tok, prompts, monkeypatch):
    from grpo.core import rollout as R

    model, _ = model_tok
    one = _run(model, prompts, key=4, group_size=2, max_tokens=10)
    monkeypatch.setattr(R, "PREFILL_CHUNK", 5)
    chunked = _run(model, prompts, key=4, group_size=2, max_tokens=10)
    assert one.completion_ids.tolist() == chunked.completion_ids.tolist()
    np.testing.assert_allclose(np.array(one.logprobs), np.array(chunked.logprobs), atol=1e-5)


# ---- end detection vs a Python loop ---------------------------------------------------

token_rows = st.integers(1, 4).flatmap(
    lambda n: st.integers(1, 9).flatmap(
        lambda t: st.lists(
            st.lists(st.integers(0, 5), min_size=t, max_size=t), min_size=n, max_size=n
        )
    )
)


@settings(max_examples=200)  # a pure function on tiny arrays: cheap
@given(
    token_rows,
    st.lists(st.integers(0, 3), max_size=1),
    st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=3), max_size=2),
)
def test_end_flags_and_mask_match_python(rows, eos, stops):
    from grpo.core.rollout import completion_mask, end_flags

    def first_end(row):
        for t in range(len(row)):
            if row[t] in eos or any(
                t + 1 >= len(s) and row[t + 1 - len(s) : t + 1] == s for s in stops
            ):
                return t
        return None

    ends = end_flags(mx.array(rows), eos_ids=tuple(eos), stop_sequences=tuple(map(tuple, stops)))
    mask = np.array(completion_mask(ends))
    for row, m, e in zip(rows, mask, np.array(ends), strict=True):
        t = first_end(row)
        n = len(row) if t is None else t + 1
        assert m.tolist() == [1.0] * n + [0.0] * (len(row) - n)
        assert e.any() == (t is not None)
