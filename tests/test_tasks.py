"""Built-in tasks, their reward, the supervised warm start and the default-model cache."""

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import grpo  # noqa: F401  (fast BLAS before mlx)
from grpo import default_job
from grpo.tasks import (
    TASKS,
    char_match,
    completion_text,
    exact_match,
    get_task,
    make_dataset,
)
from grpo.warmstart import WarmStartConfig, encode_examples, sft_loss, warm_start

letters = st.text(alphabet="abcdefghij", max_size=7)


# -- tasks and reward ---------------------------------------------------------------------


def test_reverse_rows_hand_checked():
    rows = make_dataset("reverse", 50, seed=3)
    for row in rows:
        assert row["prompt"].startswith("reverse: ") and row["prompt"].endswith("\n")
        word = row["prompt"][len("reverse: ") : -1]
        assert 3 <= len(word) <= 5 and word.isalpha() and word.islower()
        assert row["answer"] == "".join(reversed(word))


def test_sort_rows_are_sorted():
    for row in make_dataset("sort", 30, seed=1):
        word = row["prompt"][len("sort: ") : -1]
        assert row["answer"] == "".join(sorted(word))


def test_dataset_is_seeded():
    assert make_dataset("reverse", 20, seed=7) == make_dataset("reverse", 20, seed=7)
    assert make_dataset("reverse", 20, seed=7) != make_dataset("reverse", 20, seed=8)


def test_unknown_task_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown task 'nope'.*reverse"):
        get_task("nope")
    with pytest.raises(ValueError, match="n must be >= 1"):
        make_dataset("reverse", 0)


def test_char_match_hand_computed():
    assert char_match("abc", "abc") == 1.0
    assert char_match("abx", "abc") == pytest.approx(2 / 3)
    assert char_match("ab", "abcd") == pytest.approx(0.5)  # missing characters count against
    assert char_match("abcdef", "abc") == pytest.approx(0.5)  # so do extra ones
    assert char_match("", "abc") == 0.0
    assert char_match("", "") == 1.0


@given(letters, letters)
def test_char_match_bounds_and_exactness(p, a):
    r = char_match(p, a)
    assert 0.0 <= r <= 1.0
    assert (r == 1.0) == (p == a)
    # Independent reference: count agreeing positions with numpy.
    n = max(len(p), len(a))
    if n:
        pp = np.array(list(p.ljust(n, "\0")))
        aa = np.array(list(a.ljust(n, "\1")))
        assert r == pytest.approx((pp == aa).mean())


def test_reward_reads_text_and_chat_completions_and_cuts_at_stop_tokens():
    completions = ["cba<|im_end|>", [{"role": "assistant", "content": " cba\n"}], "cbx", "zzzzzz"]
    rewards = exact_match(None, completions, answer=["cba"] * 4)
    assert rewards == pytest.approx([1.0, 1.0, 2 / 3, 0.0])
    assert completion_text("ab<|endoftext|>cd") == "ab"


def test_reward_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        exact_match(None, ["a", "b"], answer=["a"])


def test_reward_works_through_the_scorer():
    from grpo.core.score import score

    rows = make_dataset("reverse", 2, seed=0)
    prompts = [r["prompt"] for r in rows for _ in range(2)]
    answers = [r["answer"] for r in rows for _ in range(2)]
    texts = [answers[0], "", answers[2], answers[2][:-1] + "#"]
    scores = score(prompts, texts, [[1]] * 4, [exact_match], columns={"answer": answers})
    got = np.array(scores.rewards_per_func)[:, 0]
    expected = [1.0, 0.0, 1.0, (len(answers[2]) - 1) / len(answers[2])]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


# -- warm start -----------------------------------------------------------------------------


def test_encode_examples_marks_answer_and_eos(tiny_model):
    _, tok = tiny_model
    task = TASKS["reverse"]
    tokens, mask = encode_examples(tok, task, ["abc", "vwxyz"])
    assert tokens.shape == mask.shape and tokens.shape[0] == 2
    for row, word in enumerate(["abc", "vwxyz"]):
        ids = np.array(tokens[row]).tolist()
        m = np.array(mask[row]).astype(bool)
        prompt = tok.encode(task.prompt(word))
        assert ids[: len(prompt)] == prompt
        target = [t for t, keep in zip(ids, m, strict=True) if keep]
        assert target == tok.encode(word[::-1]) + [tok.eos_token_id]


def test_sft_loss_matches_numpy_reference(tiny_model):
    model, tok = tiny_model
    tokens, mask = encode_examples(tok, TASKS["reverse"], ["abcd", "xyz", "hello"])
    got = sft_loss(model, tokens, mask).item()
    logits = np.array(model(tokens[:, :-1]).astype(mx.float32), dtype=np.float64)
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    targets, w = np.array(tokens[:, 1:]), np.array(mask[:, 1:])
    nll = -np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    assert got == pytest.approx((nll * w).sum() / w.sum(), rel=1e-4)


def test_warm_start_lowers_the_loss_and_is_deterministic(tiny_model_dir):
    import mlx_lm

    cfg = WarmStartConfig(steps=30, batch_size=16)
    runs = []
    for _ in range(2):
        model, tok = mlx_lm.load(str(tiny_model_dir))
        runs.append(warm_start(model, tok, TASKS["reverse"], config=cfg))
    first, second = runs
    assert np.mean(first[-5:]) < np.mean(first[:5]) - 0.2
    np.testing.assert_allclose(first, second, rtol=1e-5)


def test_warm_start_config_validates():
    with pytest.raises(ValueError, match="batch_size"):
        WarmStartConfig(batch_size=0)
    with pytest.raises(ValueError, match="learning_rate"):
        WarmStartConfig(learning_rate=0.0)


# -- default-model cache ----------------------------------------------------------------------


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.delenv("MLX_GRPO_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_job.cache_root() == tmp_path / "xdg" / "mlx-grpo"
    monkeypatch.setenv("MLX_GRPO_CACHE", str(tmp_path / "explicit"))
    assert default_job.cache_root() == tmp_path / "explicit"


def test_ensure_model_builds_once_then_reuses(tmp_path):
    import mlx_lm

    ws = default_job.evolve_warm_start(steps=4, batch_size=4)
    lines: list[str] = []
    path = default_job.ensure_model(tmp_path, warm_start=ws, log=lines.append)
    assert any(line.startswith("warm start: 4 supervised steps") for line in lines)
    # Nothing but the finished model is left in the cache root (the build dir was renamed).
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    model, tok = mlx_lm.load(str(path))
    assert tok.eos_token_id is not None
    before = (path / "model.safetensors").stat().st_mtime_ns
    again: list[str] = []
    assert default_job.ensure_model(tmp_path, warm_start=ws, log=again.append) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == before
    assert any("cached" in line for line in again)
    # The warm start changed the weights away from the seeded initialisation.
    fresh = default_job.ensure_model(tmp_path, warm_start=ws.__class__(steps=0), log=lambda s: None)
    w0 = mx.load(str(fresh / "model.safetensors"))
    w1 = mx.load(str(path / "model.safetensors"))
    assert set(w0) == set(w1)
    assert any(not mx.array_equal(w0[k], w1[k]).item() for k in w0)


def test_model_key_changes_with_anything_the_weights_depend_on(monkeypatch):
    import attrs

    import grpo.tasks

    base = default_job.model_key()
    assert default_job.model_key(seed=1) != base
    assert default_job.model_key(size="tiny") != base
    assert default_job.model_key(task="sort") != base
    assert default_job.model_key(warm_start=default_job.evolve_warm_start(steps=7)) != base
    longer = attrs.evolve(grpo.tasks.TASKS["reverse"], max_len=6)
    monkeypatch.setitem(grpo.tasks.TASKS, "reverse", longer)
    assert default_job.model_key() != base
