"""Continuous batching: any number of decode slots gives each row the same completion."""

# isort: off
import grpo  # noqa: F401  (fast BLAS before mlx)

# isort: on
import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_map_with_path

from grpo.core import continuous
from grpo.core.continuous import rollout_continuous
from grpo.core.rollout import rollout
from grpo.core.sampling import SamplingConfig

TEXTS = ("hello world", "a", "the quick brown fox jumps")
EOS = tuple(range(3, 40))  # many end ids: rows end at scattered steps, slots get refilled


@pytest.fixture(scope="module")
def model_tok(tiny_model_dir):
    model, tok = mlx_lm.load(str(tiny_model_dir))
    model.update(tree_map_with_path(lambda p, x: x if "norm" in p else 5.0 * x, model.parameters()))
    mx.eval(model.parameters())
    return model, tok


@pytest.fixture(scope="module")
def prompts(model_tok):
    return [model_tok[1].encode(t) for t in TEXTS]


def _run(model, prompts, slots, key=3, eos_at=None, **kw):
    cfg = SamplingConfig(**{"group_size": 4, "max_tokens": 24, "eos_ids": EOS, **kw})
    return rollout_continuous(
        model.parameters(),
        mx.random.key(key),
        prompts,
        model=model,
        sampling=cfg,
        slots=slots,
        eos_at=eos_at,
    )


@pytest.mark.parametrize("slots", [1, 3, 5])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_refilled_slots_give_the_same_rows_as_all_at_once(model_tok, prompts, slots, penalty):
    model, _ = model_tok
    full = _run(model, prompts, 12, repetition_penalty=penalty)
    few = _run(model, prompts, slots, repetition_penalty=penalty)
    lengths = np.array(full.completion_lengths)
    assert len(set(lengths.tolist())) > 3  # rows end at many different steps
    np.testing.assert_array_equal(np.array(few.completion_ids), np.array(full.completion_ids))
    np.testing.assert_array_equal(np.array(few.completion_mask), np.array(full.completion_mask))
    np.testing.assert_allclose(np.array(few.logprobs), np.array(full.logprobs), atol=1e-5)


def test_logprobs_equal_teacher_forced(model_tok, prompts):
    model, _ = model_tok
    r = _run(model, prompts, 5, temperature=0.8)
    for i in range(r.completion_ids.shape[0]):
        P, T = int(r.prompt_lengths[i]), int(r.completion_lengths[i])
        ids = r.prompt_ids[i, :P].tolist() + r.completion_ids[i, :T].tolist()
        z = np.array(model(mx.array(ids)[None])[0].astype(mx.float32), np.float64) / 0.8
        logp = z - z.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        want = logp[np.arange(P - 1, P - 1 + T), ids[P:]]
        np.testing.assert_allclose(np.array(r.logprobs[i, :T]), want, atol=1e-4)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("slots", [2, 12])
def test_equals_the_batched_rollout(model_tok, prompts, temperature, slots):
    # Both draw row r's token t with U[r, t] from the same key, so the slot engine
    # reproduces rollout (which compacts finished rows) row for row.
    model, tok = model_tok
    cfg = SamplingConfig(
        group_size=4, max_tokens=24, temperature=temperature, eos_ids=EOS,
        repetition_penalty=1.3,
    )  # fmt: skip
    want = rollout(model.parameters(), mx.random.key(0), prompts, model=model, sampling=cfg)
    got = rollout_continuous(
        model.parameters(), mx.random.key(0), prompts, model=model, sampling=cfg, slots=slots
    )
    assert len(set(np.array(want.completion_lengths).tolist())) >= 3  # rows end apart
    for name in ("completion_ids", "completion_mask", "is_truncated", "prompt_ids"):
        np.testing.assert_array_equal(np.array(getattr(got, name)), np.array(getattr(want, name)))
    np.testing.assert_allclose(np.array(got.logprobs), np.array(want.logprobs), atol=1e-4)


def test_no_retrace_after_warm_up(model_tok, prompts):
    model, _ = model_tok
    _run(model, prompts, 4, key=1)
    before = continuous.TRACES[0]
    _run(model, prompts, 4, key=2)
    assert continuous.TRACES[0] == before


def test_rejects_bad_slots(model_tok, prompts):
    with pytest.raises(ValueError, match="slots"):
        _run(model_tok[0], prompts, 0)


def test_eos_at_ends_rows_at_pre_drawn_positions(model_tok, prompts):
    model, _ = model_tok
    eos_at = np.random.default_rng(0).integers(1, 25, 12)
    eos_at[0] = 1  # ends at its very first token
    rare = (127,)  # an end id the rows hardly ever sample on their own
    full = _run(model, prompts, 12, eos_ids=rare, eos_at=eos_at)
    few = _run(model, prompts, 3, eos_ids=rare, eos_at=eos_at)
    lengths = np.array(full.completion_lengths)
    assert (lengths <= eos_at).all() and (lengths == eos_at).mean() > 0.8
    ids = np.array(full.completion_ids)
    assert all(ids[i, lengths[i] - 1] == 127 for i in range(12))
    np.testing.assert_array_equal(np.array(few.completion_ids), ids)


def test_trainer_with_rollout_slots_equals_all_rows_at_once(tiny_model_dir, tmp_path, monkeypatch):
    # 2 prompts x 4 completions per generation batch through 3 slots: rows are refilled, yet
    # every step matches the run that decodes all 8 rows at once (same seed).
    from helpers import PROMPTS, flat_numpy, tiny_args

    from grpo.io.logging import read_metrics
    from grpo.trainer import GRPOTrainer

    def sevens(completions, **kwargs):
        return [sum(ch == "7" for ch in text) / max(len(text), 1) for text in completions]

    calls, shapes, real_step = [], set(), continuous._compiled_step

    def spy_step(model, sampling):
        step = real_step(model, sampling)

        def run(params, state):
            shapes.add((id(model), state.tokens.shape[0], state.keys[0].shape[2]))
            return step(params, state)

        return run

    real = continuous.rollout_continuous
    monkeypatch.setattr(continuous, "_compiled_step", spy_step)
    monkeypatch.setattr(
        continuous, "rollout_continuous", lambda *a, **k: calls.append(k["slots"]) or real(*a, **k)
    )

    def train(out, **kw):
        args = tiny_args(out, max_steps=4, max_completion_length=12, temperature=1.0, **kw)
        trainer = GRPOTrainer(str(tiny_model_dir), sevens, args=args, train_dataset=PROMPTS)
        trainer.train()
        return trainer, read_metrics(out / "metrics.jsonl")

    off, off_logs = train(tmp_path / "off")
    assert calls == []
    traces = continuous.TRACES[0]
    on, on_logs = train(tmp_path / "on", rollout_slots=3)
    assert calls == [3] * 4
    # One trace per distinct (slots, KV columns) shape: nothing retraces after its first use.
    assert len(shapes) >= 2 and continuous.TRACES[0] - traces == len(shapes)
    for a, b in zip(off_logs, on_logs, strict=True):
        for k in ("loss", "reward", "completions/mean_length", "grad_norm"):
            np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)
    want, got = flat_numpy(off.state.params), flat_numpy(on.state.params)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_rollout_slots_is_validated_and_picks_the_engine(model_tok):
    from grpo.config import GRPOConfig
    from grpo.errors import ConfigError

    with pytest.raises(ConfigError, match="rollout_slots"):
        GRPOConfig(rollout_slots=0)
    assert GRPOConfig().rollout_slots is None
    model, _ = model_tok
    assert continuous.continuous_sampler(model, 8, slots=None) is None
    assert continuous.continuous_sampler(model, 8, slots=8) is None  # all rows fit
    assert continuous.continuous_sampler(model, 9, slots=8).keywords == {"slots": 8}


def test_step_shapes_follow_the_live_rows(model_tok, prompts, monkeypatch):
    # KV columns follow the longest live row (not P + max_tokens) and, once nothing is
    # queued, the slots shrink with the live rows.
    model, _ = model_tok
    shapes, real_step = [], continuous._compiled_step

    def spy_step(model, sampling):
        step = real_step(model, sampling)

        def run(params, state):
            shapes.append((state.tokens.shape[0], state.keys[0].shape[2]))
            return step(params, state)

        return run

    monkeypatch.setattr(continuous, "_compiled_step", spy_step)
    eos_at = np.array([3, 5, 9, 40] * 3)
    r = _run(model, prompts, 12, eos_ids=(127,), eos_at=eos_at, max_tokens=96)
    assert np.array(r.completion_lengths).max() <= 40
    P = 32  # the prompts' bucket
    widths, columns = [w for w, _ in shapes], [c for _, c in shapes]
    assert max(columns) == P + 64 and min(columns) == P + 32  # never P + 96
    assert widths[0] == 12 and widths[-1] == 4  # the three 40-token rows finish alone
