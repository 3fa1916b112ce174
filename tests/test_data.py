"""grpo.io.data: loading, chat templates, prompt budgets, stop strings and PromptSampler."""

import csv
import json
import logging

import datasets
import pytest
from hypothesis import given
from hypothesis import strategies as st

import grpo  # noqa: F401  (fast BLAS before mlx)
from grpo.io import data
from grpo.io.data import (
    PromptBatch,
    PromptEncoder,
    PromptSampler,
    PromptTooLongError,
    decode_completions,
    encode_prompt,
    fit_prompt,
    load_prompts,
    prompt_budget,
    render_prompt,
    stop_token_sequences,
)
from grpo.io.tiny import tokenizer_vocab

ROWS = [{"prompt": f"question {i}", "answer": str(i), "level": i % 3} for i in range(10)]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]


def rows_of(ds):
    return [dict(r) for r in ds]


# --- loading -------------------------------------------------------------------------------


def test_load_list_and_dataset_and_dict():
    ds = load_prompts(ROWS)
    assert isinstance(ds, datasets.Dataset)
    assert ds.column_names == ["prompt", "answer", "level"] and rows_of(ds) == ROWS
    assert load_prompts(ds) is ds
    dd = datasets.DatasetDict(train=ds, test=ds.select(range(2)))
    assert len(load_prompts(dd, split="test")) == 2
    with pytest.raises(
        ValueError, match=r"split 'validation' not found; available splits: \['train', 'test'\]"
    ):
        load_prompts(dd, split="validation")


def test_load_conversational_list():
    ds = load_prompts([{"prompt": CHAT, "answer": "4"}])
    assert ds[0]["prompt"] == CHAT


def _write(path, fmt):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(ROWS[0]))
            w.writeheader()
            w.writerows(ROWS)
    else:
        datasets.Dataset.from_list(ROWS).to_parquet(str(path))


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_load_local_files(tmp_path, fmt):
    path = tmp_path / f"prompts.{fmt}"
    _write(path, fmt)
    ds = load_prompts(str(path))
    got = rows_of(ds)
    # csv reads "0" back as the integer 0; compare as strings.
    assert [{k: str(v) for k, v in r.items()} for r in got] == [
        {k: str(v) for k, v in r.items()} for r in ROWS
    ]


def test_load_local_file_streaming(tmp_path):
    path = tmp_path / "prompts.jsonl"
    _write(path, "jsonl")
    ds = load_prompts(path, streaming=True)
    assert isinstance(ds, datasets.IterableDataset)
    assert next(iter(ds))["prompt"] == "question 0"


def test_load_hub_id_is_passed_to_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.Dataset.from_list(ROWS[:2])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_prompts("someone/gsm8k-prompts", split="test", streaming=False, name="main")
    assert len(ds) == 2
    assert calls == [
        ("someone/gsm8k-prompts", {"split": "test", "streaming": False, "name": "main"})
    ]


def test_load_errors(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"the dataset has no 'prompt' column; its columns are \['question', 'answer'\]",
    ):
        load_prompts([{"question": "q", "answer": "a"}])
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(
        ValueError, match=r"no 'prompt' column; its columns are \['question', 'answer'\]"
    ):
        load_prompts(path)
    with pytest.raises(FileNotFoundError, match=r"no such dataset file: '.*missing.jsonl'"):
        load_prompts(tmp_path / "missing.jsonl")
    odd = tmp_path / "prompts.xml"
    odd.write_text("<x/>")
    with pytest.raises(ValueError, match=r"unknown file type '.xml'"):
        load_prompts(odd)
    with pytest.raises(ValueError, match=r"the dataset is empty"):
        load_prompts(datasets.Dataset.from_dict({"prompt": []}))
    with pytest.raises(TypeError, match=r"expected a datasets.Dataset"):
        load_prompts(42)


def test_prompt_column_rename():
    ds = load_prompts([{"question": "q", "answer": "a"}], prompt_column="question")
    assert ds.column_names == ["prompt", "answer"]
    with pytest.raises(
        ValueError,
        match=r"prompt_column='query' is not a column; columns are \['question', 'answer'\]",
    ):
        load_prompts([{"question": "q", "answer": "a"}], prompt_column="query")
    with pytest.raises(ValueError, match=r"also has a 'prompt' column"):
        load_prompts([{"question": "q", "prompt": "a"}], prompt_column="question")


# --- rendering -----------------------------------------------------------------------------


def test_render_plain_string_passes_through():
    assert render_prompt("The sky is", tokenizer=None) == "The sky is"


def test_render_user_last_adds_generation_prompt(tiny_model):
    _, tok = tiny_model
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render_prompt(CHAT, tok) == expected
    tool = CHAT + [{"role": "tool", "content": "4"}]
    assert render_prompt(tool, tok).endswith(
        "<|im_start|>tool\n4<|im_end|>\n<|im_start|>assistant\n"
    )


def test_render_assistant_last_continues_final_message(tiny_model):
    _, tok = tiny_model
    prefill = CHAT + [{"role": "assistant", "content": "<think>"}]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>"
    )
    assert render_prompt(prefill, tok) == expected


def test_render_chat_template_override_and_kwargs(tiny_model):
    _, tok = tiny_model
    template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{{ suffix }}{% endif %}"
    )
    out = render_prompt(CHAT, tok, chat_template=template, suffix="!")
    assert out == "[system]Be brief.[user]2+2?[assistant]!"


def test_render_errors(tiny_model_dir, tiny_model):
    _, tok = tiny_model
    with pytest.raises(ValueError, match=r"invalid role in the last message: 'system'"):
        render_prompt(CHAT[:1], tok)
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    bare.chat_template = None
    with pytest.raises(
        ValueError, match=r"the tokenizer has no chat template.*pass chat_template="
    ):
        render_prompt(CHAT, bare)


def test_encode_prompt_matches_tokenizer_paths(tiny_model):
    _, tok = tiny_model
    # Conversational: the same ids as the tokenizer's own tokenising chat-template path.
    assert encode_prompt(CHAT, tok) == list(
        tok.apply_chat_template(CHAT, add_generation_prompt=True)
    )
    vocab = tokenizer_vocab()
    assert encode_prompt("Hi 2", tok) == [vocab[c] for c in "Hi 2"]
    assert encode_prompt(CHAT, tok)[:1] == [vocab["<|im_start|>"]]


# --- budgets and truncation ----------------------------------------------------------------


@pytest.mark.parametrize(
    "max_prompt, max_completion, context, expected",
    [(None, 4, None, None), (10, 4, None, 10), (10, 4, 12, 8), (None, 4, 12, 8), (3, 4, 12, 3)],
)
def test_prompt_budget(max_prompt, max_completion, context, expected):
    got = prompt_budget(
        max_prompt_length=max_prompt, max_completion_length=max_completion, context_length=context
    )
    assert got == expected


def test_prompt_budget_errors():
    with pytest.raises(
        ValueError,
        match=r"max_completion_length=12 leaves no room for a prompt in the model context of 12 tokens; use at most 11",
    ):
        prompt_budget(max_completion_length=12, context_length=12)
    with pytest.raises(ValueError, match=r"max_completion_length must be >= 1, got 0"):
        prompt_budget(max_completion_length=0)
    with pytest.raises(ValueError, match=r"max_prompt_length must be >= 1 or None, got 0"):
        prompt_budget(max_prompt_length=0, max_completion_length=4)


def test_fit_prompt_modes():
    ids = list(range(10))
    assert fit_prompt(ids, budget=4) == [6, 7, 8, 9]  # left truncation keeps the end
    assert fit_prompt(ids, budget=None) == ids
    assert fit_prompt(ids, budget=10, overflow="error") == ids
    assert fit_prompt(ids, budget=4, overflow="drop") is None
    with pytest.raises(
        PromptTooLongError, match=r"prompt at row 7 has 10 tokens, more than the budget of 4"
    ):
        fit_prompt(ids, budget=4, overflow="error", row=7)
    with pytest.raises(
        ValueError,
        match=r"overflow='clip' is not supported; choose one of \['truncate', 'error', 'drop'\]",
    ):
        fit_prompt(ids, budget=4, overflow="clip")


@given(
    st.integers(1, 40),
    st.one_of(st.none(), st.integers(1, 30)),
    st.integers(1, 20),
    st.integers(2, 50),
)
def test_truncation_always_leaves_room_for_the_completion(n, max_prompt, max_completion, context):
    if max_completion >= context:
        with pytest.raises(ValueError, match="leaves no room"):
            prompt_budget(
                max_prompt_length=max_prompt,
                max_completion_length=max_completion,
                context_length=context,
            )
        return
    budget = prompt_budget(
        max_prompt_length=max_prompt, max_completion_length=max_completion, context_length=context
    )
    ids = list(range(n))
    out = fit_prompt(ids, budget=budget)
    assert 1 <= len(out) <= budget and out == ids[len(ids) - len(out) :]
    assert context - len(out) >= max_completion >= 1


def test_prompt_encoder_truncates_conversation_from_the_left(tiny_model):
    _, tok = tiny_model
    full = encode_prompt(CHAT, tok)
    enc = PromptEncoder(tok, max_completion_length=8, context_length=24)
    assert enc.budget == 16 < len(full)
    out = enc(CHAT)
    assert out == full[-16:]
    # The generation prompt survives left truncation.
    assert tok.decode(out).endswith("<|im_start|>assistant\n")
    with pytest.raises(PromptTooLongError, match=rf"prompt at row 3 has {len(full)} tokens"):
        PromptEncoder(tok, max_completion_length=8, context_length=24, overflow="error")(
            CHAT, row=3
        )


def test_prompt_encoder_validates_limits_up_front(tiny_model):
    _, tok = tiny_model
    with pytest.raises(ValueError, match=r"max_completion_length=30 leaves no room"):
        PromptEncoder(tok, max_completion_length=30, context_length=30)
    with pytest.raises(ValueError, match=r"'overflow' must be in"):
        PromptEncoder(tok, max_completion_length=3, overflow="clip")


def test_decode_completions_skips_special_tokens(tiny_model):
    _, tok = tiny_model
    vocab = tokenizer_vocab()
    ids = [[vocab["4"], vocab["2"], vocab["<|im_end|>"]], [vocab[c] for c in "<think>"]]
    assert decode_completions(ids, tok) == ["42", "<think>"]


# --- stop strings --------------------------------------------------------------------------


def test_stop_token_sequences(tiny_model):
    _, tok = tiny_model
    vocab = tokenizer_vocab()
    assert stop_token_sequences(None, tok) == []
    assert stop_token_sequences("</answer>", tok) == [[vocab[c] for c in "</answer>"]]
    assert stop_token_sequences(["<|im_end|>", "\n\n", "<|im_end|>"], tok) == [
        [vocab["<|im_end|>"]],
        [vocab["\n"], vocab["\n"]],
    ]
    with pytest.raises(ValueError, match=r"stop strings must be non-empty strings, got ''"):
        stop_token_sequences(["ok", ""], tok)


# --- sampler: map-style --------------------------------------------------------------------


def take(sampler, k):
    return [next(sampler) for _ in range(k)]


def test_batches_are_group_contiguous_distinct_and_aligned():
    ds = load_prompts(ROWS)
    sampler = PromptSampler(ds, batch_size=3, group_size=4, seed=0)
    for batch in take(sampler, 6):
        assert isinstance(batch, PromptBatch)
        assert len(batch.prompts) == 12 and len(batch.indices) == 3
        assert len(set(batch.indices)) == 3  # B distinct prompts
        assert batch.group_size == 4
        assert batch.unique_prompts == [ROWS[i]["prompt"] for i in batch.indices]
        for b, i in enumerate(batch.indices):  # rows b*G .. b*G+G-1 are prompt b's group
            group = slice(b * 4, b * 4 + 4)
            assert batch.prompts[group] == [ROWS[i]["prompt"]] * 4
            assert batch.columns["answer"][group] == [ROWS[i]["answer"]] * 4
            assert batch.columns["level"][group] == [ROWS[i]["level"]] * 4
        assert set(batch.columns) == {"answer", "level"}
        assert batch.prompt_ids is None


def test_epochs_cover_each_row_once_and_reshuffle():
    sampler = PromptSampler(load_prompts(ROWS), batch_size=3, group_size=1, seed=5)
    assert sampler.steps_per_epoch == 3
    epochs = [[i for b in take(sampler, 3) for i in b.indices] for _ in range(3)]
    for seen in epochs:
        assert len(seen) == 9 and len(set(seen)) == 9  # one leftover row waits for next epoch
    assert epochs[0] != epochs[1]
    state = sampler.state_dict()
    assert (state["epoch"], state["position"]) == (2, 9)
    same = PromptSampler(load_prompts(ROWS), batch_size=3, group_size=1, seed=5)
    assert [i for b in take(same, 3) for i in b.indices] == epochs[0]
    other = PromptSampler(load_prompts(ROWS), batch_size=3, group_size=1, seed=6)
    assert [i for b in take(other, 3) for i in b.indices] != epochs[0]
    ordered = PromptSampler(ROWS, batch_size=5, group_size=1, shuffle=False)
    assert [b.indices for b in take(ordered, 3)] == [
        [0, 1, 2, 3, 4],
        [5, 6, 7, 8, 9],
        [0, 1, 2, 3, 4],
    ]


@pytest.mark.parametrize("cut", [0, 2, 3, 5])
def test_resume_restores_the_exact_sequence(cut):
    make = lambda: PromptSampler(load_prompts(ROWS), batch_size=3, group_size=2, seed=11)  # noqa: E731
    reference = [b.indices for b in take(make(), 8)]
    first = make()
    take(first, cut)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = make()
    resumed.load_state_dict(state)
    assert [b.indices for b in take(resumed, 8 - cut)] == reference[cut:]


def test_resume_rejects_a_different_seed_or_layout():
    state = PromptSampler(ROWS, batch_size=2, group_size=2, seed=1).state_dict()
    with pytest.raises(ValueError, match=r"the saved sampler has seed=1, this one has seed=2"):
        PromptSampler(ROWS, batch_size=2, group_size=2, seed=2).load_state_dict(state)
    with pytest.raises(
        ValueError, match=r"saved sampler has world_size=1, this one has world_size=2"
    ):
        PromptSampler(ROWS, batch_size=2, group_size=2, seed=1, world_size=2).load_state_dict(state)


def test_sharding_is_disjoint_and_in_step():
    rows = [{"prompt": f"p{i}"} for i in range(20)]
    samplers = [
        PromptSampler(rows, batch_size=2, group_size=3, seed=3, rank=r, world_size=3)
        for r in range(3)
    ]
    assert {s.steps_per_epoch for s in samplers} == {3}  # 20 // 3 = 6 rows per rank
    seen = [[i for b in take(s, 3) for i in b.indices] for s in samplers]
    flat = [i for rank_rows in seen for i in rank_rows]
    assert len(flat) == 18 and len(set(flat)) == 18  # no overlap between ranks


def test_sampler_errors():
    with pytest.raises(
        ValueError,
        match=r"rank 0's shard has 3 rows \(3 rows over 1 rank\(s\)\); batch_size=4 needs at least 4",
    ):
        PromptSampler(ROWS[:3], batch_size=4, group_size=2)
    with pytest.raises(ValueError, match=r"batch_size and group_size must be >= 1, got 2 and 0"):
        PromptSampler(ROWS, batch_size=2, group_size=0)
    with pytest.raises(
        ValueError, match=r"rank must be in \[0, world_size\), got rank=2, world_size=2"
    ):
        PromptSampler(ROWS, batch_size=2, group_size=2, rank=2, world_size=2)
    bad = [{"prompt": "ok", "a": 1}, {"prompt": "", "a": 2}]
    sampler = PromptSampler(bad, batch_size=2, group_size=1, shuffle=False)
    with pytest.raises(
        ValueError, match=r"row 1 has an empty 'prompt' \(''\); columns: \['prompt', 'a'\]"
    ):
        next(sampler)
    with pytest.raises(
        ValueError,
        match=r"row 0: 'prompt' must be a string or a list of \{role, content\} messages, got 3",
    ):
        next(PromptSampler([{"prompt": 3}], batch_size=1, group_size=1))


def test_list_rows_with_different_keys_fill_none():
    rows = [{"prompt": "a", "answer": "1"}, {"prompt": "b", "task": "t"}]
    batch = next(PromptSampler(rows, batch_size=2, group_size=1, shuffle=False))
    assert batch.columns == {"answer": ["1", None], "task": [None, "t"]}


def test_sampler_with_encoder_drops_and_counts(tiny_model, caplog):
    _, tok = tiny_model
    rows = [
        {"prompt": "x" * (3 if i % 3 else 30), "i": i} for i in range(12)
    ]  # 0, 3, 6, 9 too long
    enc = PromptEncoder(tok, max_completion_length=4, context_length=20, overflow="drop")
    sampler = PromptSampler(rows, batch_size=2, group_size=2, seed=0, encoder=enc)
    with caplog.at_level(logging.WARNING, logger=data.__name__):
        batches = take(sampler, 4)  # 8 short prompts = one epoch
    for b in batches:
        assert all(i % 3 for i in b.indices)
        assert b.prompt_ids == [encode_prompt(rows[i]["prompt"], tok) for i in b.indices]
    assert sorted(i for b in batches for i in b.indices) == [1, 2, 4, 5, 7, 8, 10, 11]
    assert sampler.num_dropped == 4 and sampler.state_dict()["num_dropped"] == 4
    assert "(4 dropped so far)" in caplog.text and "dropped the prompt at row" in caplog.text


def test_sampler_when_nothing_fits(tiny_model):
    _, tok = tiny_model
    enc = PromptEncoder(tok, max_completion_length=4, context_length=10, overflow="drop")
    sampler = PromptSampler([{"prompt": "y" * 50}] * 3, batch_size=2, group_size=2, encoder=enc)
    with pytest.raises(
        ValueError,
        match=r"a whole epoch gave fewer than batch_size=2 usable prompts on rank 0 \(3 dropped",
    ):
        next(sampler)
    strict = PromptEncoder(tok, max_completion_length=4, context_length=10, overflow="error")
    with pytest.raises(
        PromptTooLongError, match=r"prompt at row \d has 50 tokens, more than the budget of 6"
    ):
        next(PromptSampler([{"prompt": "y" * 50}] * 3, batch_size=2, group_size=2, encoder=strict))


# --- sampler: streaming --------------------------------------------------------------------


def guarded_stream(n, limit):
    """An IterableDataset whose generator raises if asked for more than ``limit`` rows."""

    def gen():
        for i in range(n):
            if i >= limit:
                raise RuntimeError(f"over-consumed: row {i} requested, limit {limit}")
            yield {"prompt": f"s{i}", "answer": str(i)}

    return datasets.IterableDataset.from_generator(gen)


def test_streaming_is_consumed_lazily():
    sampler = PromptSampler(guarded_stream(100, limit=6), batch_size=2, group_size=3, shuffle=False)
    batches = take(sampler, 3)  # exactly 6 rows: never drained
    assert [b.indices for b in batches] == [[0, 1], [2, 3], [4, 5]]
    assert batches[0].prompts == ["s0"] * 3 + ["s1"] * 3
    assert batches[0].columns == {"answer": ["0"] * 3 + ["1"] * 3}
    assert sampler.state_dict()["position"] == 6
    with pytest.raises(RuntimeError, match="over-consumed"):  # the guard does fire
        next(sampler)


def test_streaming_epochs_and_sharding():
    stream = guarded_stream(5, limit=5)
    sampler = PromptSampler(stream, batch_size=2, group_size=1, shuffle=False)
    assert sampler.steps_per_epoch is None
    # Row 4 cannot complete a batch: epoch 1 restarts the stream.
    assert [b.indices for b in take(sampler, 3)] == [[0, 1], [2, 3], [0, 1]]
    assert sampler.state_dict()["epoch"] == 1
    ranks = [
        PromptSampler(
            guarded_stream(9, 9), batch_size=2, group_size=1, shuffle=False, rank=r, world_size=2
        )
        for r in range(2)
    ]
    got = [[b.indices for b in take(s, 2)] for s in ranks]
    assert got == [[[0, 2], [4, 6]], [[1, 3], [5, 7]]]  # disjoint, row 8's round is incomplete


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("cut", [1, 3])
def test_streaming_resume(shuffle, cut):
    def make():
        return PromptSampler(
            guarded_stream(7, 7),
            batch_size=2,
            group_size=2,
            seed=4,
            shuffle=shuffle,
            shuffle_buffer=3,
        )

    reference = [b.unique_prompts for b in take(make(), 6)]
    if shuffle:
        assert reference[:3] != [["s0", "s1"], ["s2", "s3"], ["s4", "s5"]]
        assert reference[:3] != reference[3:]  # reshuffled per epoch (seed + epoch)
    first = make()
    take(first, cut)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert [b.unique_prompts for b in take(resumed, 6 - cut)] == reference[cut:]


def test_streaming_missing_prompt_column_names_columns():
    def gen():
        yield {"question": "q", "answer": "a"}

    sampler = PromptSampler(
        datasets.IterableDataset.from_generator(gen), batch_size=1, group_size=1
    )
    with pytest.raises(
        ValueError, match=r"no 'prompt' column; its columns are \['question', 'answer'\]"
    ):
        next(sampler)
