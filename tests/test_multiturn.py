"""Multi-turn rollout: ids only appended, tool_mask / log-probs per token, budget, live rows."""

# isort: off
import grpo  # noqa: F401  (fast BLAS before mlx; conftest imports it first too)

# isort: on
import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_map_with_path
from scripted import Scripted

from grpo.core.multiturn import multiturn_rollout
from grpo.core.rollout import rollout
from grpo.core.sampling import SamplingConfig

EOS = 2


def _run(script, respond, *, prompts=((5, 6, 7),), G=2, max_tokens=32, **kw):
    sampler = Scripted(script)
    out = multiturn_rollout(
        {},
        mx.random.key(0),
        [list(p) for p in prompts],
        model=None,
        sampling=SamplingConfig(group_size=G, max_tokens=max_tokens, eos_ids=(EOS,)),
        respond=respond,
        sampler=sampler,
        **kw,
    )
    return out, sampler


def _row(out, i):
    n = int(out.rollout.completion_lengths[i])
    return (
        np.array(out.rollout.completion_ids[i, :n]).tolist(),
        np.array(out.tool_mask[i, :n]).tolist(),
        np.array(out.rollout.logprobs[i, :n]).astype(np.float64).round(4).tolist(),
    )


def test_three_turns_ids_masks_and_logprobs():
    # Row 0 calls a tool twice (3 model turns); row 1 answers at once.
    script = [[[10, 11, EOS], [20, EOS]], [[12, EOS]], [[13, EOS]]]
    seen = []

    def respond(turn, turns):
        seen.append([(t.row, t.ids, t.ended, t.final) for t in turns])
        return [[90, 91] if turn == 1 else [92] if turn == 2 else None, None][: len(turns)]

    out, sampler = _run(script, respond)
    ids, mask, lps = _row(out, 0)
    assert ids == [10, 11, EOS, 90, 91, 12, EOS, 92, 13, EOS]
    assert mask == [1, 1, 1, 0, 0, 1, 1, 0, 1, 1]
    assert lps == [-0.1, -0.2, -0.3, 0, 0, -1.1, -1.2, 0, -2.1, -2.2]
    assert _row(out, 1) == ([20, EOS], [1, 1], [-0.1, -0.2])
    assert np.array(out.num_turns).tolist() == [3, 1]
    assert not np.array(out.rollout.is_truncated).any()
    # Turn 1's ids are a prefix of the ids after turn 3 (nothing is re-tokenised).
    assert ids[:3] == script[0][0]
    # Later turns sample only the live row, from prompt ++ everything so far.
    assert [c[0] for c in sampler.calls] == [
        [[5, 6, 7]],
        [[5, 6, 7, 10, 11, EOS, 90, 91]],
        [[5, 6, 7, 10, 11, EOS, 90, 91, 12, EOS, 92]],
    ]
    assert [c[1].group_size for c in sampler.calls] == [2, 1, 1]
    assert seen == [
        [(0, [10, 11, EOS], True, False), (1, [20, EOS], True, False)],
        [(0, [12, EOS], True, False)],
        [(0, [13, EOS], True, False)],
    ]
    # Prompts are repeated per group, as in Rollout.
    assert np.array(out.rollout.prompt_lengths).tolist() == [3, 3]


def test_appended_ids_that_leave_no_room_are_dropped():
    # Budget 8: after [10, 11, EOS] (room 5), a 5-token result leaves no room for the model.
    script = [[[10, 11, EOS]]]
    out, sampler = _run(script, lambda turn, ts: [[90] * 5], G=1, max_tokens=8)
    assert _row(out, 0)[0] == [10, 11, EOS]
    assert len(sampler.calls) == 1
    assert not bool(out.rollout.is_truncated[0])


def test_a_turn_is_cut_at_the_row_budget_and_marked_truncated():
    # Room after the tool result is 3, but the sampler (bucketed budget) returns 5 tokens.
    script = [[[10, EOS]], [[30, 31, 32, 33, EOS]]]
    out, sampler = _run(
        script, lambda turn, ts: [[90, 91, 92] if turn == 1 else None], G=1, max_tokens=8
    )
    ids, mask, _ = _row(out, 0)
    assert ids == [10, EOS, 90, 91, 92, 30, 31, 32]
    assert mask == [1, 1, 0, 0, 0, 1, 1, 1]
    assert bool(out.rollout.is_truncated[0])
    assert sampler.calls[1][1].max_tokens == 4  # next power of two above the room of 3


def test_max_turns_marks_the_last_turn_final_and_ignores_its_delta():
    script = [[[10, EOS]], [[11, EOS]]]
    finals = []

    def respond(turn, turns):
        finals.append([t.final for t in turns])
        return [[90]]

    out, sampler = _run(script, respond, G=1, max_turns=2)
    assert finals == [[False], [True]]
    assert _row(out, 0)[0] == [10, EOS, 90, 11, EOS]
    assert len(sampler.calls) == 2
    assert int(out.num_turns[0]) == 2


def test_truncated_turn_is_final():
    script = [[[10, 11, 12, 13]]]
    finals = []

    def respond(turn, turns):
        finals.append([(t.ended, t.final, t.room) for t in turns])
        return [[90]]

    out, _ = _run(script, respond, G=1, max_tokens=4)
    assert finals == [[(False, True, 0)]]
    assert bool(out.rollout.is_truncated[0])


def test_respond_must_answer_every_turn():
    with pytest.raises(ValueError, match="respond returned 0 entries for 2 turns"):
        _run([[[10, EOS], [11, EOS]]], lambda turn, ts: [])


# -- with the real rollout and a model ---------------------------------------------------------


@pytest.fixture(scope="module")
def model_tok(tiny_model_dir):
    model, tok = mlx_lm.load(str(tiny_model_dir))
    model.update(tree_map_with_path(lambda p, x: x if "norm" in p else 5.0 * x, model.parameters()))
    mx.eval(model.parameters())
    return model, tok


def _teacher_forced(model, ids):
    logits = np.array(model(mx.array(ids)[None])[0].astype(mx.float32), dtype=np.float64)
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    return logp[np.arange(len(ids) - 1), ids[1:]]  # log p(ids[t+1] | ids[:t+1])


def test_real_rollout_turn_one_is_the_plain_rollout_and_logprobs_are_teacher_forced(model_tok):
    model, tok = model_tok
    prompts = [tok.encode("ab"), tok.encode("hello")]
    # Many "end" ids make turns short, so rows take several turns within the budget.
    sampling = SamplingConfig(group_size=3, max_tokens=40, eos_ids=tuple(range(40, 90)))
    delta = tok.encode("<r>")
    calls = []

    def respond(turn, turns):
        calls.append(len(turns))
        return [delta if t.row % 2 == 0 else None for t in turns]

    key = mx.random.key(3)
    out = multiturn_rollout(
        model.parameters(), key, prompts, model=model, sampling=sampling, respond=respond
    )
    _, sub = mx.random.split(key)
    plain = rollout(model.parameters(), sub, prompts, model=model, sampling=sampling)
    roll, tool_mask = out.rollout, np.array(out.tool_mask)
    turns = np.array(out.num_turns)
    assert turns.max() >= 3  # the test exercises at least three turns
    assert calls[0] == 6 and all(c <= 3 for c in calls[1:])  # odd rows never continue
    for i in range(6):
        n = int(roll.completion_lengths[i])
        ids = np.array(roll.completion_ids[i, :n]).tolist()
        m = int(plain.completion_lengths[i])
        # Turn 1 is exactly the plain rollout with the same key: a prefix of the final ids.
        assert ids[:m] == np.array(plain.completion_ids[i, :m]).tolist()
        if i % 2:
            assert n == m and turns[i] == 1
        # Appended ids sit exactly where the mask is 0, each copy of `delta` whole.
        zeros = np.flatnonzero(tool_mask[i, :n] == 0)
        assert len(zeros) == len(delta) * (turns[i] - 1)
        for s in range(0, len(zeros), len(delta)):
            start = zeros[s]
            assert ids[start : start + len(delta)] == delta
        # Every model token's sampling log-prob is the model's own, given all prior tokens
        # (the appended ones included): an independent full forward pass.
        P = len(prompts[i // 3])
        ref = _teacher_forced(model, list(prompts[i // 3]) + ids)[P - 1 :]
        lp = np.array(roll.logprobs[i, :n])
        sampled = tool_mask[i, :n] == 1
        np.testing.assert_allclose(lp[sampled], ref[sampled], atol=2e-4)
        assert (lp[~sampled] == 0).all()
